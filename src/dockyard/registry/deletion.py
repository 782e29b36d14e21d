"""Deleting a whole repository (``dockyard rm``; the admin API calls the same
:func:`delete_repository`, through ``Registry.delete_repository``).

**What goes.** What belongs to a repository is three directories of its own: ``_manifests``
(tags, revision links, the referrers index), ``_layers`` (its links to blobs) and ``_uploads``
(uploads in progress). A repository's directory may also hold other repositories
(``team/app/sub`` inside ``team/app``); they are never touched. Nothing under ``blobs/`` is
touched either: stored content is never rewritten and may be shared with other repositories.
What only the deleted repository referenced is unreferenced now, and the next garbage
collection reclaims it once it is older than the grace period (``dockyard gc --grace 0``, with
the writable servers read-only, at once).

**Gone from the catalog at once.** The catalog lists the directories holding ``_manifests``.
Where a move is a rename (the filesystem; ``Store.atomic_move``), ``_manifests`` is renamed in
one step into a directory of this deletion under ``/dockyard/trash`` — every tag, revision and
referrers entry vanishes together — then ``_layers`` and ``_uploads`` follow, and the moved
directories are deleted. Object storage has no rename: the tags go first (nothing resolves by
tag any more), then the revision links, the rest of ``_manifests``, the layer links and the
uploads, and the catalog drops the name when the last ``_manifests`` key is gone. Either way the
order is the one that keeps every intermediate state a consistent repository (no tag without
its manifest, no manifest without its blobs' links; untagged manifests and unused links are
ordinary), so a deletion stopped half way (a crash) leaves nothing broken, and running it again
finishes it.

**Pushes racing the delete** (the argument in full: docs/data-safety.md, "Deleting a
repository while clients push"). Every push either completed before the delete and is removed
by it, or fails cleanly, or completes entirely after it; it never leaves a tag pointing at a
missing manifest or a manifest whose blobs are not linked. Two halves make it so:

1. ``ManifestStore.put`` *confirms* after its last write: the revision link it wrote and every
   link it checked before writing (the blobs and child manifests it references) are still
   there. If not, it *withdraws* what no longer stands — the tags pointing at the manifest, the
   revision link, its referrers entry, directories left empty — and fails with
   ``NAME_UNKNOWN`` (or ``MANIFEST_BLOB_UNKNOWN``).
2. The deletion repeats its pass, after a short settle, until a pass finds nothing of the
   repository. A push that checked its blobs before a pass moved ``_layers``, wrote its
   revision into the fresh ``_manifests`` after the pass moved the old one, and confirmed just
   before ``_layers`` went, has been told 201: the next pass removes it (it completed before the
   delete did, and was removed by it). When writes still arrive in the last pass allowed
   (unsettled), there is no next pass: the deletion ends by removing each manifest whose blobs'
   links went, with its tags (``_withdraw_unlinked``).

Blob uploads need nothing: a chunk or a commit of a session whose ``startedat`` went with
``_uploads`` fails with ``BLOB_UPLOAD_UNKNOWN``, and a link a commit or mount writes after the
last pass is a layer link without a manifest, like the first step of any new push.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dockyard.errors import ErrorCode, RegistryError
from dockyard.oci.digest import Digest
from dockyard.oci.manifest import read_stored
from dockyard.oci.names import validate_name
from dockyard.registry import inventory, layout
from dockyard.registry.cache import BlobDescriptorCache, NoCache
from dockyard.storage.driver import PathNotFound
from dockyard.storage.store import Store

if TYPE_CHECKING:
    from dockyard.registry.index import Index

log = logging.getLogger("dockyard.deletion")

#: the directories a repository owns, in the order they are removed: manifests (tags with
#: them) before the links their blobs need, so no state in between has a broken manifest
OWNED: tuple[tuple[str, Callable[[str], str]], ...] = (
    ("_manifests", layout.manifests_dir),
    ("_layers", layout.layers_dir),
    ("_uploads", layout.uploads_dir),
)
#: seconds between passes: in-flight requests land (and are removed by the next pass, or
#: withdraw themselves) rather than after the last one. Correctness does not depend on it.
DEFAULT_SETTLE = 0.5
#: passes at most; writes still arriving in the last one leave ``settled`` False
MAX_PASSES = 5
#: a trash directory older than this is a deletion that crashed before it finished
TRASH_AGE = 3600.0


@dataclass
class RepositoryDeletion:
    """What a repository delete removed (with ``dry_run``: what it would remove)."""

    name: str
    dry_run: bool
    #: tag -> the manifest it pointed to
    tags: dict[str, Digest] = field(default_factory=dict)
    #: manifests (revision links)
    manifests: set[Digest] = field(default_factory=set)
    #: blobs linked into the repository (the links go; the blobs stay for garbage collection)
    layers: set[Digest] = field(default_factory=set)
    #: ids of uploads in progress
    uploads: set[str] = field(default_factory=set)
    #: passes made (0 for a dry run)
    passes: int = 0
    #: False when writes to the repository still arrived during the last pass allowed: what
    #: they wrote after it may remain (run the delete again)
    settled: bool = True
    seconds: float = 0.0

    def tags_of(self, digest: Digest) -> list[str]:
        """The removed tags that pointed at ``digest``, sorted."""
        return sorted(t for t, d in self.tags.items() if d == digest)

    def manifest_tags(self) -> dict[str, list[str]]:
        """Each removed manifest (by digest, sorted) with the tags that pointed at it: what
        ``events.repository_delete_events`` takes."""
        return {str(d): self.tags_of(d) for d in sorted(self.manifests, key=str)}

    def stray_tags(self) -> list[str]:
        """Removed tags that pointed at no manifest of the repository (a broken store)."""
        return sorted(t for t, d in self.tags.items() if d not in self.manifests)

    def summary(self) -> str:
        verb = "would remove" if self.dry_run else "removed"
        return (
            f"{verb} repository {self.name}: {len(self.tags)} tags, {len(self.manifests)} "
            f"manifests, {len(self.layers)} layer links, {len(self.uploads)} uploads in "
            "progress"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "repository": self.name,
            "dry_run": self.dry_run,
            "tags": {t: str(d) for t, d in sorted(self.tags.items())},
            "manifests": sorted(str(d) for d in self.manifests),
            "layer_links": len(self.layers),
            "uploads": sorted(self.uploads),
            "passes": self.passes,
            "settled": self.settled,
            "seconds": round(self.seconds, 3),
        }


async def delete_repository(
    storage: Store,
    name: str,
    *,
    cache: BlobDescriptorCache | None = None,
    index: Index | None = None,
    dry_run: bool = False,
    settle: float = DEFAULT_SETTLE,
    max_passes: int = MAX_PASSES,
) -> RepositoryDeletion:
    """Remove the repository ``name`` (its tags, manifests, referrers entries, layer links and
    uploads in progress; see the module docstring for how and why in this order). Links are
    forgotten in the shared ``cache`` before they go. NAME_INVALID for a name that cannot be a
    repository's, NAME_UNKNOWN when the repository holds none of its directories.

    ``storage.delete.enabled`` is not consulted here: the caller decides (the operator's
    ``dockyard rm`` always may; an HTTP API should refuse as ``api.base.require_delete``
    does)."""
    name = validate_name(name)
    started = time.monotonic()
    deletion = RepositoryDeletion(name, dry_run)
    if not await _owned(storage, name):
        raise RegistryError(ErrorCode.NAME_UNKNOWN, detail={"name": name})
    if dry_run:
        await _note(storage, deletion)
        deletion.seconds = time.monotonic() - started
        return deletion
    await _purge_trash(storage)
    trash = layout.trash(f"{int(time.time())}-{secrets.token_hex(6)}")
    forget = cache or NoCache()
    deletion.settled = False
    for n in range(max_passes):
        if n:
            await asyncio.sleep(settle)
        deletion.passes += 1
        if not await _remove_pass(storage, forget, deletion, f"{trash}/{n}"):
            deletion.settled = True
            break
    if not deletion.settled:
        # Writes still arrived in the last pass: a push that confirmed just before that pass
        # took _layers has no next pass to remove it. What stands without its blobs' links goes.
        await _withdraw_unlinked(storage, name)
    await storage.delete_if_present(trash)
    await storage.remove_empty_dir(layout.trash_dir())
    await _prune(storage, name)
    if index is not None:
        try:
            await index.refresh(storage, name)
        except Exception:  # derived data: the index's verification repairs it
            log.warning("the metadata index was not updated for %s", name, exc_info=True)
    deletion.seconds = time.monotonic() - started
    log.info(
        "repository deleted",
        extra={
            "fields": {
                "repository": name,
                "tags": len(deletion.tags),
                "manifests": len(deletion.manifests),
                "layer_links": len(deletion.layers),
                "uploads": len(deletion.uploads),
                "passes": deletion.passes,
                "settled": deletion.settled,
            }
        },
    )
    return deletion


async def _owned(storage: Store, name: str) -> list[str]:
    """Which of its own directories the repository has now (one listing)."""
    try:
        children = set(await storage.list(layout.repository(name)))
    except PathNotFound:
        return []
    return [leaf for leaf, _ in OWNED if leaf in children]


async def _note(storage: Store, deletion: RepositoryDeletion) -> set[Digest]:
    """Add what the repository holds now to ``deletion``; returns its layer links."""
    repo = await inventory.read_repository(storage, deletion.name)
    for tag, digest in repo.tags.items():
        deletion.tags.setdefault(tag, digest)
    deletion.manifests |= set(repo.revisions)
    deletion.layers |= repo.layers
    deletion.uploads |= set(await inventory.uploads(storage, deletion.name))
    return repo.layers


async def _remove_pass(
    storage: Store, cache: BlobDescriptorCache, deletion: RepositoryDeletion, aside: str
) -> bool:
    """One pass over the repository's directories; False if it had none left."""
    name = deletion.name
    if not await _owned(storage, name):
        return False
    seen = await _note(storage, deletion)
    # The cache's rule: forgotten before the link goes (it raises if it cannot forget, and
    # then nothing of this pass is removed).
    for digest in sorted(seen, key=str):
        await cache.forget_link(name, digest)
    if storage.atomic_move:
        # One rename per directory: the whole of _manifests disappears in one step.
        for leaf, path in OWNED:
            try:
                await storage.move(path(name), f"{aside}/{leaf}")
            except PathNotFound:
                continue  # not there (or another deletion took it)
        await _forget_late(storage, cache, name, f"{aside}/_layers", seen)
        await storage.delete_if_present(aside)
        return True
    # No rename: tags, then manifests, then the rest of _manifests, links, uploads.
    await storage.delete_if_present(layout.tags_dir(name))
    await storage.delete_if_present(layout.revisions_dir(name))
    await storage.delete_if_present(layout.manifests_dir(name))
    await _forget_late(storage, cache, name, layout.layers_dir(name), seen)
    await storage.delete_if_present(layout.layers_dir(name))
    await storage.delete_if_present(layout.uploads_dir(name))
    return True


async def _withdraw_unlinked(storage: Store, name: str) -> None:
    """Remove every manifest of ``name`` whose config or layers are not linked in it any more,
    and the tags on it (the tags first: no tag is left pointing at nothing): what a push left
    that confirmed between a deletion's last pass taking ``_manifests`` and taking ``_layers``.
    A push still in flight withdraws itself (its own confirmation reads the links after its
    last write); one that comes later is whole."""
    repo = await inventory.read_repository(storage, name)
    for digest in repo.revisions:
        try:
            manifest = read_stored(await storage.read(layout.blob_data(digest)))
        except PathNotFound:
            continue
        if manifest is None or all(b.digest in repo.layers for b in manifest.blobs):
            continue
        log.warning(
            "a push that raced the deletion left %s@%s without its blobs' links: removed",
            name,
            digest,
        )
        for tag, target in repo.tags.items():
            if target == digest:
                await storage.delete_if_present(layout.tag_dir(name, tag))
        await storage.delete_if_present(layout.revision_link(name, digest).rsplit("/", 1)[0])


async def _forget_late(
    storage: Store, cache: BlobDescriptorCache, name: str, layers: str, seen: set[Digest]
) -> None:
    """Forget the links under ``layers`` written after the pass read the repository."""
    for digest in await inventory.layer_digests(storage, layers):
        if digest not in seen:
            await cache.forget_link(name, digest)


async def _prune(storage: Store, name: str) -> None:
    """Remove the repository's directory and its parents where they are empty now (a parent
    or a child repository keeps them: removing an empty directory does nothing otherwise)."""
    path = layout.repository(name)
    while path.startswith(layout.REPOSITORIES + "/"):
        await storage.remove_empty_dir(path)
        path = path.rsplit("/", 1)[0]


async def _purge_trash(storage: Store) -> None:
    """Delete what deletions that crashed left in the trash (named by their start time)."""
    try:
        entries = await storage.list(layout.trash_dir())
    except PathNotFound:
        return
    cutoff = time.time() - TRASH_AGE
    for entry in entries:
        started, _, _ = entry.partition("-")
        if started.isdigit() and int(started) < cutoff:
            await storage.delete_if_present(layout.trash(entry))
