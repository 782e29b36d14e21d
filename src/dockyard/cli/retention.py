"""``dockyard retention``: apply the retention rules of ``policies`` now (the maintenance
schedule applies them before each garbage collection), or with ``--dry-run`` print what would
go and the rule that decided it."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import click

from dockyard.cli import load, main
from dockyard.cli.maintenance import _run, config_argument, json_option
from dockyard.cli.output import echo_json
from dockyard.cli.remote import remote_options, remote_retention
from dockyard.events.deletes import delete_listener
from dockyard.logs import configure
from dockyard.registry.lease import LeaseBusy
from dockyard.registry.repository import Registry
from dockyard.registry.retention import RetentionPolicies, TagVerdict
from dockyard.registry.retention_run import RepositoryRun, RetentionReport, run_retention
from dockyard.storage.driver import StorageError

#: exit statuses besides 0 (done), 2 (configuration) and 3 (another run holds the lease)
FAILED = 1
WITHHELD = 4


def describe(run: RepositoryRun, dry_run: bool, verbose: bool) -> Iterator[str]:
    """The lines of one repository: its deletions (planned, or made), each with the rule that
    decided it; with ``verbose`` also what stays and why."""
    p, name = run.plan, run.plan.repository
    report_only = dry_run or run.withheld is not None
    verb = "would delete" if report_only else "deleted"
    if report_only:
        tags, manifests = p.deleted_tags, p.deleted_manifests
    else:
        done_tags, done_manifests = set(run.deleted_tags), set(run.deleted_manifests)
        tags = [v for v in p.deleted_tags if v.tag in done_tags]
        manifests = [v for v in p.deleted_manifests if v.digest in done_manifests]
    if not (tags or manifests or run.spared or run.errors or run.withheld or verbose):
        return
    yield (
        f"{name}: policy {p.policy.label}; {verb} {len(tags)} of {len(p.tags)} tags and "
        f"{len(manifests)} of {len(p.manifests)} manifests"
    )
    if run.withheld is not None:
        yield f"  only reported, nothing deleted: {run.withheld}"
    for tag in tags:
        yield f"  {verb} tag {name}:{tag.tag} ({tag.digest}): {tag.reason}"
    for manifest in manifests:
        yield f"  {verb} manifest {name}@{manifest.digest}: {manifest.reason}"
    for verdict in p.spared:  # planned, then kept on the second look
        if isinstance(verdict, TagVerdict):
            yield f"  spared tag {name}:{verdict.tag} ({verdict.digest}): {verdict.reason}"
        else:
            yield f"  spared manifest {name}@{verdict.digest}: {verdict.reason}"
    for line in run.spared:
        yield f"  spared {line}"
    for error in run.errors:
        yield f"  error: {error}"
    if verbose:
        tagged = {v.digest for v in p.kept_tags}
        for tag in p.kept_tags:
            if not tag.spared:
                yield f"  keep tag {name}:{tag.tag} ({tag.digest}): {tag.reason}"
        for manifest in p.manifests:
            if manifest.keep and not manifest.spared and manifest.digest not in tagged:
                yield f"  keep manifest {name}@{manifest.digest}: {manifest.reason}"


def render(report: RetentionReport, verbose: bool = False) -> Iterator[str]:
    for run in report.repositories:
        yield from describe(run, report.dry_run, verbose)
    yield report.summary()


@main.command()
@config_argument
@click.option(
    "--dry-run", is_flag=True, help="Print what would be deleted and why; change nothing."
)
@click.option(
    "--confirm",
    is_flag=True,
    help="Apply deletions that are otherwise only reported: a policy's first run (confirming "
    "the policy, unless --repository restricts the run) and a repository where more than the "
    "policy's maxshare of the tags would go.",
)
@click.option(
    "--repository",
    "only",
    metavar="GLOB",
    help="Only the repositories matching GLOB (* also crosses /).",
)
@click.option(
    "--verbose", "-v", is_flag=True, help="Also print what stays, with the rule that keeps it."
)
@json_option
@remote_options
def retention(
    config_path: str | None,
    dry_run: bool,
    confirm: bool,
    only: str | None,
    verbose: bool,
    as_json: bool,
    url: str | None,
    username: str | None,
    password_stdin: bool,
) -> None:
    """Delete the tags and manifests that the retention rules of `policies` do not keep (their
    blobs then go with the next garbage collection), printing each with the rule that decided
    it. Every deletion is audit-logged (logger dockyard.audit, on stderr) and makes the same
    delete events as an API delete.

    \b
    Safe by default: a policy's first run, and a repository where more than the policy's
    maxshare of the tags would go, are only reported until confirmed with --confirm.

    \b
    Exit status: 0 done (or a dry run), 1 a deletion failed, 2 a configuration error, 3
    another retention run holds the lease, 4 deletions were withheld (only reported: run
    again with --confirm to apply them).

    \b
    With --url the server runs it (POST /dockyard/api/v1/retention, an administrator's
    call) with its own configuration; the same exit statuses."""
    if url is not None:
        body: dict[str, object] = {"dry_run": dry_run, "confirm": confirm}
        if only is not None:
            body["repository"] = only
        report = remote_retention(url, username, password_stdin, body, as_json)
        if report["errors"]:
            sys.exit(FAILED)
        if not dry_run and any(r.get("withheld") for r in report["repositories"]):
            sys.exit(WITHHELD)
        return
    config = load(config_path)
    configure(config.log)  # the audit lines go to stderr, formatted as the server's logs
    if not RetentionPolicies(config.policies):
        click.echo("dockyard: no policy has a retention section: nothing to do", err=True)
        return
    listener = None if dry_run else delete_listener(config)

    async def work(registry: Registry) -> RetentionReport:
        return await run_retention(
            registry,
            config.policies,
            dry_run=dry_run,
            confirm=confirm,
            only=only,
            deletions=listener,
        )

    try:
        report = _run(config, work)
    except LeaseBusy as exc:
        click.echo(f"dockyard: another retention run is in progress: {exc}", err=True)
        sys.exit(3)
    except StorageError as exc:
        click.echo(f"dockyard: retention failed: {exc}", err=True)
        sys.exit(FAILED)
    if as_json:
        echo_json(report.to_json())
    else:
        for line in render(report, verbose):
            click.echo(line)
    if report.errors:
        sys.exit(FAILED)
    if report.withheld and not dry_run:
        sys.exit(WITHHELD)
