"""``dockyard gc``, ``du``, ``fsck``, ``purge-uploads`` and ``rm``: maintenance that runs against
the store directly, while the registry keeps serving (``gc --grace 0`` with its writable servers
read-only or stopped)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Coroutine
from dataclasses import asdict
from typing import Any, TypeVar

import click

from dockyard.cli import load, main
from dockyard.cli.output import (
    Column,
    echo_json,
    echo_quotas,
    echo_table,
    format_size,
    progress_bars,
)
from dockyard.cli.remote import remote_du, remote_options, remote_rm
from dockyard.config import Config, parse_duration
from dockyard.errors import ConfigError, ErrorCode, RegistryError
from dockyard.registry.cache import redis_from_config
from dockyard.registry.configured import open_store
from dockyard.registry.deletion import RepositoryDeletion
from dockyard.registry.gc import GarbageCollector
from dockyard.registry.lease import LeaseBusy
from dockyard.registry.presence import ImmediateCollectionRefused, PresenceRecords
from dockyard.registry.purge import purge_uploads
from dockyard.registry.repository import Registry
from dockyard.registry.usage import StoreUsage, measure
from dockyard.storage.driver import StorageError

T = TypeVar("T")


def _duration(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _run(config: Config, work: Callable[[Registry], Coroutine[Any, Any, T]]) -> T:
    """Run ``work`` on the configured registry (with the shared cache, which deletions must
    update)."""
    try:
        registry = open_store(config)
    except ConfigError as exc:
        click.echo(f"dockyard: {exc}", err=True)
        sys.exit(2)

    async def main() -> T:
        try:
            return await work(registry)
        finally:
            await registry.close()

    return asyncio.run(main())


config_argument = click.argument("config_path", required=False, metavar="[CONFIG]")
json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print the result as JSON (for scripts)."
)


@main.command()
@config_argument
@click.option("--dry-run", is_flag=True, help="Report what would be removed; change nothing.")
@click.option(
    "--delete-untagged",
    "-m",
    is_flag=True,
    help="Also remove manifests no tag reaches (keeping index children and referrers "
    "of kept manifests).",
)
@click.option(
    "--grace",
    metavar="DURATION",
    help="Keep unreferenced content used within this long (default: "
    "storage.maintenance.gc.grace, 24h), plus the server's touch interval (a quarter of the "
    "configured grace, at most 1h). 0 (or 0s, 0h...) collects immediately: everything no "
    "manifest references goes now, but only while no writable server uses the storage "
    "(read-only ones may keep serving); otherwise it is refused (exit status 4) and "
    "nothing is deleted.",
)
@click.option("--quiet", "-q", is_flag=True, help="Print only the summary.")
@json_option
def gc(
    config_path: str | None,
    dry_run: bool,
    delete_untagged: bool,
    grace: str | None,
    quiet: bool,
    as_json: bool,
) -> None:
    """Collect garbage: remove blobs no manifest references (like registry:2's
    garbage-collect), safely while the registry serves.

    \b
    With --grace 0 the collection is immediate, for when content must disappear now (a
    leaked secret): stop the writable servers or restart them with
    storage.maintenance.readonly.enabled: true
    (REGISTRY_STORAGE_MAINTENANCE_READONLY_ENABLED=true), run it, then restart them
    writable. It checks that no writable server is running (each server records its
    presence in storage) and forgets what it deletes in the Redis cache. A versioned S3
    bucket keeps old versions of deleted objects: expire noncurrent versions too
    (docs/gc.md).

    Exit status: 3 when another collection is running, 4 when an immediate collection is
    refused."""
    config = load(config_path)
    grace_seconds = _duration(grace)
    if grace_seconds is None:
        grace_seconds = config.storage.maintenance.gc.grace
    immediate = grace_seconds == 0

    async def work(registry: Registry) -> Any:
        # Servers record their presence in Redis too when it is configured.
        redis = redis_from_config(config) if immediate and config.redis.addr else None
        try:
            with progress_bars("gc") as progress:
                collector = GarbageCollector(
                    registry.storage,
                    grace=grace_seconds,
                    touch_interval=config.storage.maintenance.gc.touch_interval,
                    delete_untagged=delete_untagged,
                    dry_run=dry_run,
                    progress=progress,
                    cache=registry.blobs.cache,
                    immediate=immediate,
                    presences=PresenceRecords(registry.storage, redis),
                    index=registry.index,
                )
                return await collector.run()
        finally:
            if redis is not None:
                await redis.aclose()

    try:
        report = _run(config, work)
    except LeaseBusy as exc:
        click.echo(f"dockyard: another garbage collection is running: {exc}", err=True)
        sys.exit(3)
    except ImmediateCollectionRefused as exc:
        click.echo(f"dockyard: refused, nothing was deleted: {exc}", err=True)
        sys.exit(4)
    except StorageError as exc:
        click.echo(f"dockyard: garbage collection failed: {exc}", err=True)
        sys.exit(1)
    for warning in report.warnings:
        click.echo(f"dockyard: {warning}", err=True)
    if as_json:
        summary = asdict(report)
        if quiet:
            del summary["removed"]
        echo_json(summary)
        return
    if not quiet:
        prefix = "would remove" if dry_run else "removed"
        for item in report.removed:
            click.echo(f"{prefix} {item}")
    click.echo(report.summary())


@main.command()
@config_argument
@json_option
@remote_options
def du(
    config_path: str | None,
    as_json: bool,
    url: str | None,
    username: str | None,
    password_stdin: bool,
) -> None:
    """Space used per repository (unique to it, shared with others) and by the whole store,
    and per quota (``quotas``): what the walk of the store finds and what the metadata index
    counts (which quotas enforce, with uploads in progress).

    With --url, no CONFIG: what the registry at URL reports through its JSON API, from its
    metadata index, for the repositories your credentials may pull (and, for an
    administrator, the whole registry and every quota)."""
    if url:
        remote_du(url, username, password_stdin, as_json)
        return
    config = load(config_path)

    async def work(registry: Registry) -> StoreUsage:
        limits = [(q.scope, q.limit) for q in config.quotas]
        usage = await measure(registry.storage, limits)
        if registry.index is not None:
            for scope in usage.scopes:
                counted = await registry.index.usage(scope.scope)
                scope.indexed, scope.uploading = counted.bytes, counted.uploading
        return usage

    usage = _run(config, work)
    if as_json:
        echo_json(usage.to_json())
        return
    columns = [
        Column("REPOSITORY"),
        Column("MANIFESTS", numeric=True),
        Column("TAGS", numeric=True),
        Column("UNIQUE", numeric=True),
        Column("SHARED", numeric=True),
        Column("TOTAL", numeric=True),
    ]
    rows = [
        [
            r.name,
            str(r.manifests),
            str(r.tags),
            format_size(r.unique_bytes),
            format_size(r.shared_bytes),
            format_size(r.total_bytes),
        ]
        for r in usage.repositories
    ]
    echo_table(columns, rows)
    click.echo(
        f"\nstore: {usage.blobs} blobs, {format_size(usage.total_bytes)} "
        f"({format_size(usage.referenced_bytes)} referenced, "
        f"{format_size(usage.unreferenced_bytes)} in {usage.unreferenced_blobs} unreferenced "
        "blobs that gc would reclaim)"
    )
    echo_quotas(
        [
            (s.scope, s.used, s.uploading, s.limit, s.indexed if s.indexed is not None else s.used)
            for s in usage.scopes
        ]
    )


@main.command()
@config_argument
@click.option(
    "--repair", is_flag=True, help="Move corrupt blobs to /dockyard/quarantine (never deleted)."
)
@json_option
def fsck(config_path: str | None, repair: bool, as_json: bool) -> None:
    """Check that every blob matches its digest and every link and tag points to content."""
    from dockyard.registry.fsck import check

    async def work(registry: Registry) -> Any:
        with progress_bars("fsck") as progress:
            return await check(
                registry.storage, repair=repair, progress=progress, cache=registry.blobs.cache
            )

    report = _run(load(config_path), work)
    if as_json:
        echo_json({**asdict(report), "clean": report.clean})
        sys.exit(0 if report.clean else 1)
    for problem in report.problems:
        click.echo(f"problem: {problem}")
    for item in report.quarantined:
        click.echo(f"quarantined: {item}")
    if report.sparse_manifests:
        click.echo(
            f"{report.sparse_manifests} sparse manifests (referencing content their repository "
            "does not hold, which is allowed)"
        )
    click.echo(
        f"checked {report.blobs_checked} blobs ({format_size(report.bytes_checked)}): "
        f"{'clean' if report.clean else f'{len(report.problems)} problems'}"
    )
    sys.exit(0 if report.clean else 1)


@main.command("purge-uploads")
@config_argument
@click.option(
    "--age",
    metavar="DURATION",
    help="Remove uploads started longer ago than this "
    "(default: storage.maintenance.uploadpurging.age, 168h).",
)
@click.option("--dry-run", is_flag=True, help="Report; change nothing.")
@json_option
def purge_uploads_command(
    config_path: str | None, age: str | None, dry_run: bool, as_json: bool
) -> None:
    """Remove abandoned uploads (what upload purging does on its schedule)."""
    config = load(config_path)
    seconds = _duration(age)
    if seconds is None:
        seconds = config.storage.maintenance.uploadpurging.age
    report = _run(config, lambda registry: purge_uploads(registry.storage, seconds, dry_run))
    if as_json:
        echo_json(asdict(report))
        return
    for item in report.removed:
        click.echo(f"{'would remove' if dry_run else 'removed'} {item}")
    click.echo(f"{len(report.removed)} abandoned uploads")


@main.command("rm")
@click.argument("repository")
@config_argument
@click.option("--dry-run", is_flag=True, help="Report what would be removed; change nothing.")
@json_option
@remote_options
def rm(
    repository: str,
    config_path: str | None,
    dry_run: bool,
    as_json: bool,
    url: str | None,
    username: str | None,
    password_stdin: bool,
) -> None:
    """Delete the repository REPOSITORY: its tags, manifests, layer links and uploads in
    progress. It leaves the catalog at once; blobs only it used are reclaimed by the next gc
    once older than the grace period (the blobs of other repositories are never touched).
    Repositories nested in it (REPOSITORY/sub) stay. Safe while the registry serves: a push
    racing it completes before it (and is removed) or fails.

    \b
    The operator's command: it works whether or not storage.delete.enabled is set (that
    setting governs what clients may delete through the API) and removes immutable tags
    too. With notifications configured, delete events (one per manifest and tag, and one
    for the repository) go into the outbox of CONFIG, delivered by the server using it.

    Exit status: 3 when there is no such repository, 4 when pushes to it kept arriving
    while it was deleted (run it again), 2 for a name no repository can have, 1 on a storage
    or outbox failure.

    \b
    With --url the server does it (DELETE /dockyard/api/v1/repositories/REPOSITORY): the
    caller needs the delete right on the repository, and admin where an immutable tag
    would go; events name the caller."""
    if url is not None:
        remote_rm(url, username, password_stdin, repository, dry_run, as_json)
        return
    config = load(config_path)
    try:
        deletion: RepositoryDeletion = _run(
            config, lambda registry: registry.delete_repository(repository, dry_run=dry_run)
        )
    except RegistryError as exc:
        if exc.code is ErrorCode.NAME_UNKNOWN:
            click.echo(f"dockyard: no repository named {repository}", err=True)
            sys.exit(3)
        click.echo(f"dockyard: {repository!r}: {exc.message}", err=True)
        sys.exit(2)
    except StorageError as exc:
        click.echo(f"dockyard: deleting {repository} failed: {exc}", err=True)
        sys.exit(1)
    status = 0
    if not dry_run:
        # here, not at the top: the outbox's module brings aiohttp, which the other commands
        # of this module (gc, du, healthcheck) do not need at start-up
        from dockyard.events import (
            command_request,
            instance_source,
            record_from_command,
            repository_delete_events,
        )

        events = repository_delete_events(
            deletion.name,
            deletion.manifest_tags(),
            deletion.stray_tags(),
            command_request("rm"),
            "dockyard rm",  # the actor: the operator's command (as retention's events name it)
            instance_source(config),
        )
        try:
            record_from_command(config, events)
        except OSError as exc:
            click.echo(f"dockyard: the repository is deleted, its events are not: {exc}", err=True)
            status = 1
        if not deletion.settled:
            click.echo(
                f"dockyard: pushes to {repository} kept arriving during {deletion.passes} "
                "passes; what they wrote last may remain: run dockyard rm again",
                err=True,
            )
            status = status or 4
    if as_json:
        echo_json(deletion.to_json())
        sys.exit(status)
    verb = "would remove" if dry_run else "removed"
    for tag, digest in sorted(deletion.tags.items()):
        click.echo(f"{verb} tag {deletion.name}:{tag} ({digest})")
    for digest in sorted(deletion.manifests, key=str):
        click.echo(f"{verb} manifest {deletion.name}@{digest}")
    for upload in sorted(deletion.uploads):
        click.echo(f"{verb} upload {deletion.name}/_uploads/{upload}")
    click.echo(deletion.summary())
    sys.exit(status)
