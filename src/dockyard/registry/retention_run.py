"""Running retention policies on a store: read each repository (a snapshot), plan
(``registry.retention``), look again at what the plan would delete, and delete through the
model (``TagStore.untag``, ``ManifestStore.delete``), one audit log line and one delete event
per deletion.

Safety, in the order it is applied:

- **First run.** A policy whose deletions were never confirmed only reports: until
  ``dockyard retention --confirm`` has run it once (unrestricted), which writes a record under
  ``/dockyard/retention/<policy id>``. Changing a policy's rules makes it a new policy.
- **Share.** A run that would delete more than the policy's ``maxshare`` of a repository's
  tags only reports for that repository, unless confirmed for this run.
- **A second look.** Snapshots may be stale (the metadata index is updated after the layout,
  and registry:2 may write the store too), so before deleting, the repository's current tags
  and revisions are read from the layout, and the revision links of the manifests to delete
  are checked for a recent use (a pull stamps them, on every instance). The repository is
  planned again on that view, and only what both plans delete is deleted.
- **At each deletion.** A tag is deleted only if it still points where the plan saw it; a
  manifest is deleted with a guard that refuses, before anything is removed, if a tag other
  than those planned points to it now.
- One run at a time across instances (a lease, ``/dockyard/leases/retention``).

Deleting a manifest leaves its blobs to garbage collection, which runs after retention on the
maintenance schedule (``maintenance.py``).
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

from dockyard.config import PolicyConfig
from dockyard.errors import ErrorCode, RegistryError
from dockyard.oci.digest import SUPPORTED_ALGORITHMS, Digest
from dockyard.oci.manifest import read_stored
from dockyard.registry import inventory, layout
from dockyard.registry.blobs import BlobStore
from dockyard.registry.lease import Lease
from dockyard.registry.records import ManifestRecord, RepositorySnapshot, TagRecord, record_of
from dockyard.registry.repository import Registry, Repository
from dockyard.registry.retention import (
    RetentionPlan,
    RetentionPolicies,
    RetentionPolicy,
    narrow,
    plan,
)
from dockyard.storage.driver import PathNotFound, StorageError
from dockyard.storage.store import Store

log = logging.getLogger("dockyard.retention")
#: one line per deletion: what, where, and the rule that decided it
audit = logging.getLogger("dockyard.audit")

#: the lease one run holds (registry.lease)
LEASE = "retention"
#: a revision link this much newer than its tags' pushes was stamped by a use (a pull, a HEAD,
#: an index pushed with it as a child), not written by the push itself
STAMP_SLACK = 1.0
#: how many storage requests a snapshot or a second look keeps in flight
_CONCURRENCY = 32

#: reads a repository: from the metadata index, or the layout (:func:`layout_snapshot`)
SnapshotSource = Callable[[str], Awaitable[RepositorySnapshot]]
#: told of every deletion, after it: (repository, manifest digest or None, tags removed)
DeletionListener = Callable[[str, Digest | None, Sequence[str]], Awaitable[None]]


async def _bounded(jobs: Sequence[Awaitable[Any]]) -> list[Any]:
    gate = asyncio.Semaphore(_CONCURRENCY)

    async def one(job: Awaitable[Any]) -> Any:
        async with gate:
            return await job

    return await asyncio.gather(*(one(j) for j in jobs))


async def _modified(storage: Store, path: str) -> float | None:
    try:
        return (await storage.stat(path)).modified
    except PathNotFound:
        return None


async def _read_record(store: BlobStore, digest: Digest, pushed: float) -> ManifestRecord | None:
    try:
        body = await store.read(digest)
    except RegistryError:  # linked, its data gone: fsck's business, nothing to plan on
        return None
    return record_of(digest, body, read_stored(body), pushed, None)


def _with_stamps(
    manifests: dict[Digest, ManifestRecord], tags: list[TagRecord], stamps: dict[Digest, float]
) -> tuple[dict[Digest, ManifestRecord], list[TagRecord]]:
    """Revision-link times read as pulls where they are later than every push of the tags on
    the manifest (of the manifest itself, if untagged) and than the pull known already."""
    pushes: dict[Digest, float] = {}
    for tag in tags:
        pushes[tag.digest] = max(pushes.get(tag.digest, 0.0), tag.pushed)
    manifests = dict(manifests)
    for digest, stamped in stamps.items():
        record = manifests.get(digest)
        if record is None:
            continue
        pushed = pushes.get(digest, record.pushed)
        if stamped > pushed + STAMP_SLACK and stamped > (record.pulled or 0.0):
            manifests[digest] = replace(record, pulled=stamped)
    tags = [
        replace(t, pulled=manifests[t.digest].pulled)
        if t.digest in manifests and (manifests[t.digest].pulled or 0.0) > (t.pulled or 0.0)
        else t
        for t in tags
    ]
    return manifests, tags


async def layout_snapshot(storage: Store, name: str) -> RepositorySnapshot:
    """A repository as registry:2's layout shows it, for a registry without the metadata
    index: tags pushed when their ``current`` link was written, manifests read from the blob
    store. The layout keeps no pull times; a revision link's time is its push or its last use
    (a pull stamps it, at most every touch interval), so it is the manifest's ``pushed`` and,
    where it is later than the pushes of the tags on the manifest, its ``pulled`` too."""
    repo = await inventory.read_repository(storage, name)
    store = BlobStore(storage)
    tag_names = sorted(repo.tags)
    pushed = await _bounded(
        [_modified(storage, layout.tag_current_link(name, t)) for t in tag_names]
    )
    records = await _bounded(
        [_read_record(store, d, modified) for d, modified in repo.revisions.items()]
    )
    manifests = {r.digest: r for r in records if r is not None}
    tags = [
        TagRecord(tag, repo.tags[tag], when)
        for tag, when in zip(tag_names, pushed, strict=True)
        if when is not None
    ]
    manifests, tags = _with_stamps(manifests, tags, dict(repo.revisions))
    return RepositorySnapshot(name, tags, manifests)


def snapshot_source(registry: Registry) -> SnapshotSource:
    """Where a run reads repositories from: the metadata index when the registry has one
    (exact pull times; a repository it does not hold yet is indexed from the layout first),
    else the layout itself."""
    index = registry.index
    if index is None:
        return partial(layout_snapshot, registry.storage)
    known: set[str] = set()

    async def from_index(name: str) -> RepositorySnapshot:
        if not known:
            known.update(await index.indexed_repositories())
        if name not in known:
            await index.refresh(registry.storage, name)
            known.add(name)
        return await index.snapshot(name)

    return from_index


async def _revisions(storage: Store, name: str) -> set[Digest]:
    found: set[Digest] = set()
    base = layout.revisions_dir(name)
    for algorithm, length in SUPPORTED_ALGORITHMS.items():
        try:
            hexes = await storage.list(f"{base}/{algorithm}")
        except PathNotFound:
            continue
        found.update(Digest(algorithm, h) for h in hexes if len(h) == length)
    return found


async def second_look(
    repository: Repository, snapshot: RepositorySnapshot, first: RetentionPlan
) -> RepositorySnapshot:
    """``snapshot`` brought up to date with the layout where it matters to ``first``: the
    current tags (one moved or new since counts as pushed now), manifests stored since (read,
    so what hangs on them is seen), and recent uses of the manifests ``first`` deletes."""
    storage = repository.registry.storage
    names = await repository.tags.all()
    targets = await _bounded([repository.tags.current(t) for t in names])
    known = {t.tag: t for t in snapshot.tags}
    tags = []
    for tag, digest in zip(names, targets, strict=True):
        if digest is None:
            continue
        old = known.get(tag)
        tags.append(
            old if old is not None and old.digest == digest else TagRecord(tag, digest, first.now)
        )
    manifests = dict(snapshot.manifests)
    fresh = (await _revisions(storage, repository.name) | {t.digest for t in tags}) - set(manifests)
    store = repository.registry.blobs
    for record in await _bounded(
        [_read_record(store, d, first.now) for d in sorted(fresh, key=str)]
    ):
        if record is not None:
            manifests[record.digest] = record
    doomed = [v.digest for v in first.deleted_manifests]
    times = await _bounded(
        [_modified(storage, layout.revision_link(repository.name, d)) for d in doomed]
    )
    stamps = {d: t for d, t in zip(doomed, times, strict=True) if t is not None}
    manifests, tags = _with_stamps(manifests, tags, stamps)
    return RepositorySnapshot(snapshot.name, tags, manifests)


# -- first runs ---------------------------------------------------------------------------------


async def is_confirmed(storage: Store, policy: RetentionPolicy) -> bool:
    return await _modified(storage, layout.retention_record(policy.id)) is not None


async def record_confirmation(storage: Store, policy: RetentionPolicy, by: str) -> None:
    record = {
        "policy": list(policy.repositories),
        "rules": policy.describe(),
        "confirmed": time.time(),
        "by": by,
    }
    await storage.write(layout.retention_record(policy.id), json.dumps(record).encode())


# -- applying a plan ------------------------------------------------------------------------------


@dataclass
class RepositoryRun:
    """One repository's part of a run: its plan (after the second look), and what happened."""

    plan: RetentionPlan
    #: why the deletions were only reported (a first run, too large a share); None otherwise
    withheld: str | None = None
    deleted_tags: list[str] = field(default_factory=list)
    deleted_manifests: list[Digest] = field(default_factory=list)
    #: planned deletions not made, each with why (moved or re-tagged since, gone already)
    spared: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            **self.plan.to_json(),
            "withheld": self.withheld,
            "deleted_tags": self.deleted_tags,
            "deleted_manifests": [str(d) for d in self.deleted_manifests],
            "spared": self.spared,
            "errors": self.errors,
        }


@dataclass
class RetentionReport:
    dry_run: bool
    confirm: bool
    repositories: list[RepositoryRun] = field(default_factory=list)
    #: ids of the policies this run confirmed (their first-run records written)
    confirmed: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def withheld(self) -> list[RepositoryRun]:
        return [r for r in self.repositories if r.withheld is not None]

    @property
    def errors(self) -> list[str]:
        return [f"{r.plan.repository}: {e}" for r in self.repositories for e in r.errors]

    def summary(self) -> str:
        planned_tags = sum(len(r.plan.deleted_tags) for r in self.repositories)
        planned_manifests = sum(len(r.plan.order) for r in self.repositories)
        done_tags = sum(len(r.deleted_tags) for r in self.repositories)
        done_manifests = sum(len(r.deleted_manifests) for r in self.repositories)
        head = f"retention: {len(self.repositories)} repositories under policies"
        if self.dry_run:
            text = f"{head}; would delete {planned_tags} tags and {planned_manifests} manifests"
        else:
            text = f"{head}; deleted {done_tags} tags and {done_manifests} manifests"
        withheld = self.withheld
        if withheld:
            tags = sum(len(r.plan.deleted_tags) for r in withheld)
            manifests = sum(len(r.plan.order) for r in withheld)
            text += (
                f"; {'would withhold' if self.dry_run else 'withheld'} {tags} tags and "
                f"{manifests} manifests in {len(withheld)} repositories (only reported: "
                "run with --confirm to apply)"
            )
        if self.errors:
            text += f"; {len(self.errors)} errors"
        return f"{text} ({self.seconds:.1f} s)"

    def to_json(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "confirm": self.confirm,
            "repositories": [r.to_json() for r in self.repositories],
            "confirmed_policies": self.confirmed,
            "errors": self.errors,
            "seconds": round(self.seconds, 3),
        }


def _audit(action: str, run: RepositoryRun, **fields: Any) -> None:
    fields = {
        "repository": run.plan.repository,
        **fields,
        "policy": run.plan.policy.label,
        "actor": "dockyard retention",
    }
    audit.info(
        "retention deleted %s %s",
        action,
        fields.get("tag") or fields.get("digest"),
        extra={"fields": fields},
    )


class _Refused(Exception):
    """A tag not in the plan points to a manifest about to be deleted."""


async def _delete_tag(
    repo: Repository, run: RepositoryRun, tag: str, digest: Digest, rule: str
) -> bool:
    if await repo.tags.current(tag) != digest:
        run.spared.append(f"tag {tag}: no longer points to {digest}")
        return False
    try:
        await repo.tags.untag(tag)
    except RegistryError:  # deleted by someone else meanwhile
        run.spared.append(f"tag {tag}: deleted already")
        return False
    run.deleted_tags.append(tag)
    _audit("tag", run, tag=tag, digest=str(digest), rule=rule)
    return True


async def apply_plan(
    repo: Repository,
    run: RepositoryRun,
    lease: Lease | None = None,
    deletions: DeletionListener | None = None,
) -> None:
    """Delete what ``run.plan`` deletes, recording the outcome in ``run``: first the tags of
    manifests that stay, then the manifests in the plan's order, each with its planned tags."""
    p = run.plan
    reasons = {v.tag: v.reason for v in p.deleted_tags}
    doomed = {v.digest for v in p.deleted_manifests}
    tags_of: dict[Digest, set[str]] = {}
    for verdict in p.deleted_tags:
        tags_of.setdefault(verdict.digest, set()).add(verdict.tag)

    async def told(digest: Digest | None, tags: Sequence[str]) -> None:
        if deletions is None:
            return
        try:
            await deletions(p.repository, digest, tags)
        except OSError as exc:  # deleted all the same: say so, and go on
            run.errors.append(f"delete event of {digest or ', '.join(tags)} not recorded: {exc}")

    async def tag_alone(tag: str, digest: Digest) -> None:
        try:
            if await _delete_tag(repo, run, tag, digest, reasons[tag]):
                await told(None, [tag])
        except StorageError as exc:
            run.errors.append(f"tag {tag}: {exc}")

    for verdict in p.deleted_tags:
        if verdict.digest in doomed:
            continue
        if lease is not None:
            lease.check()
        await tag_alone(verdict.tag, verdict.digest)
    for manifest in p.deleted_manifests:
        if lease is not None:
            lease.check()
        planned = tags_of.get(manifest.digest, set())

        def guard(tag: str, planned: set[str] = planned) -> RegistryError | None:
            if tag in planned:
                return None
            return RegistryError(ErrorCode.DENIED, f"tagged {tag} since the plan")

        try:
            removed = await repo.manifests.delete(manifest.digest, guard)
        except RegistryError as exc:
            if exc.code == ErrorCode.MANIFEST_UNKNOWN:
                run.spared.append(f"manifest {manifest.digest}: deleted already")
            else:
                run.spared.append(f"manifest {manifest.digest}: {exc.message}")
                # The manifest stays; its planned tags still go, each as a tag of its own.
                for tag in sorted(planned):
                    await tag_alone(tag, manifest.digest)
            continue
        except StorageError as exc:
            run.errors.append(f"manifest {manifest.digest}: {exc}")
            continue
        run.deleted_manifests.append(manifest.digest)
        for tag in sorted(planned - set(removed)):
            run.spared.append(f"tag {tag}: no longer points to {manifest.digest}")
        for tag in removed:
            run.deleted_tags.append(tag)
            _audit("tag", run, tag=tag, digest=str(manifest.digest), rule=reasons.get(tag, ""))
        _audit("manifest", run, digest=str(manifest.digest), tags=removed, rule=manifest.reason)
        await told(manifest.digest, removed)


# -- a whole run ------------------------------------------------------------------------------


async def _plan_repository(
    registry: Registry, name: str, policy: RetentionPolicy, snapshot: SnapshotSource, now: float
) -> RetentionPlan:
    snap = await snapshot(name)
    first = plan(snap, policy, now)
    if first.empty:
        return first
    repo = registry.repository(name)
    return narrow(first, plan(await second_look(repo, snap, first), policy, now))


async def run_retention(
    registry: Registry,
    policies: Sequence[PolicyConfig],
    *,
    snapshot: SnapshotSource | None = None,
    now: float | None = None,
    dry_run: bool = False,
    confirm: bool = False,
    only: str | None = None,
    deletions: DeletionListener | None = None,
    actor: str = "dockyard retention",
) -> RetentionReport:
    """Plan every repository a policy with ``retention`` claims (those matching the glob
    ``only``, if given) and, unless ``dry_run``, apply the plans. ``confirm`` applies what would
    otherwise only be reported (a policy's first run, a share over ``maxshare``); a confirmed
    run over every repository records the policies as confirmed. LeaseBusy if another run
    holds the lease."""
    started = time.time()
    now = started if now is None else now
    snapshot = snapshot or snapshot_source(registry)
    rules = RetentionPolicies(policies)
    report = RetentionReport(dry_run=dry_run, confirm=confirm)
    if not rules:
        return report
    storage = registry.storage
    confirmed = {p.id: await is_confirmed(storage, p) for p in rules.all()}
    names = [
        n for n in await registry.repositories() if only is None or fnmatch.fnmatchcase(n, only)
    ]

    async def each(lease: Lease | None) -> None:
        for name in names:
            policy = rules.of(name)
            if policy is None:
                continue
            try:
                planned = await _plan_repository(registry, name, policy, snapshot, now)
            except RegistryError as exc:  # a directory whose name no repository can have
                log.warning("retention skips %s: %s", name, exc.message)
                continue
            run = RepositoryRun(planned)
            report.repositories.append(run)
            if run.plan.empty:
                continue
            if not confirm and not confirmed[policy.id]:
                run.withheld = (
                    f"first run of the policy for {policy.label} (id {policy.id}): "
                    "confirm it once with dockyard retention --confirm"
                )
            elif not confirm and run.plan.over_share:
                run.withheld = (
                    f"it would delete {len(run.plan.deleted_tags)} of {len(run.plan.tags)} "
                    f"tags ({run.plan.share:.0%}), more than maxshare "
                    f"{run.plan.policy.maxshare:.0%}: confirm with dockyard retention --confirm"
                )
            if dry_run or run.withheld is not None:
                continue
            await apply_plan(registry.repository(name), run, lease, deletions)

    if dry_run:
        await each(None)
    else:
        async with Lease(storage, LEASE) as lease:
            await each(lease)
            if confirm and only is None:
                for policy in {p.id: p for p in rules.all()}.values():
                    if not confirmed[policy.id]:
                        await record_confirmation(storage, policy, actor)
                        report.confirmed.append(policy.id)
    report.seconds = time.time() - started
    return report
