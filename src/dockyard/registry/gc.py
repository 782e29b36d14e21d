"""Garbage collection that runs while the registry serves pushes and pulls.

Mark: every repository's manifests are roots (with ``delete_untagged``, only tagged ones, plus
untagged ones used within the grace period); from them, index children and referrers whose
subject is kept, and every digest a kept manifest references. Sweep: blobs not marked, and
(with ``delete_untagged``) revision links of manifests not kept. What a kept manifest references
and the store does not hold — the absent children and blobs of a sparse manifest
(``validation.manifests.sparse``, the pull-through cache), a non-distributable layer, a subject
not pushed yet — is expected: there is nothing to keep, and nothing is reported.

Why a push racing with the collection is never broken — the argument, in three rules:

1. *Everything a client is told exists is stamped.* Any request that tells a client a blob or
   manifest is there, or that makes it referenced — a blob HEAD/GET, the commit of an upload, a
   cross-repository mount, a manifest GET/HEAD, and a manifest PUT for every blob and child it
   references — first refreshes the modification time of the file (the blob's ``data``, the
   manifest's revision link). Stamps are refreshed at most every ``touch_interval``, which is
   kept at a quarter of the grace period or less.
2. *The collector never deletes anything stamped within the grace period.* A file is a
   candidate only if its time is older than ``start - grace - touch_interval`` (the touch
   interval the server runs with, so a stamp skipped as "recent enough" still counts). A client
   that learnt of a blob before the collection started and references it later (a slow push)
   is covered as long as its push takes less than the grace period (24 h by default).
3. *The collector checks again after taking the file out of reach.* It renames a candidate
   (``data`` -> ``data.gc-<run>``), then reads its time again: a stamp that landed between its
   first look and the rename is seen now, and the file is put back. A stamp attempted after the
   rename fails with "not found", so that client is told the blob is missing and uploads it
   again — it is never told "exists" about something that is then deleted. (A reader that finds
   a linked blob missing looks once more after 50 ms, which covers the instant between the
   rename and the putting back.)

Uploads in progress live under ``_uploads`` and are never touched here (upload purging removes
abandoned ones by age). Only one collection runs at a time across all instances sharing the
storage (a lease in ``/dockyard/leases/gc``).

*Immediate* collection (``immediate=True``, ``dockyard gc --grace 0``) removes everything no
manifest references at once: no time protects anything (not even a stamp a read-only server
makes while the collection runs: a read is not a reference), and a candidate is deleted without
being moved aside first. The three rules above are then replaced by one precondition: no server
accepts writes. The collection takes its lease with the purpose ``immediate`` (the marker
writable servers look for) and then refuses, before it deletes anything, if a writable server
is alive (registry.presence has the handshake). Whatever it removes is forgotten in the shared
cache first, as always.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import aclosing
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

from dockyard import metrics
from dockyard.oci.digest import Digest
from dockyard.oci.manifest import Manifest, read_stored, referenced_digest_texts
from dockyard.registry import inventory, layout
from dockyard.registry.blobs import BlobStore, read_link
from dockyard.registry.cache import BlobDescriptorCache
from dockyard.registry.lease import Lease
from dockyard.registry.presence import (
    GC_LEASE,
    IMMEDIATE,
    ImmediateCollectionRefused,
    PresenceRecords,
    check_immediate,
)
from dockyard.registry.progress import NoProgress, Progress
from dockyard.storage.driver import PathNotFound, StorageError
from dockyard.storage.store import Store

if TYPE_CHECKING:
    from dockyard.registry.index import Index

log = logging.getLogger("dockyard.gc")

#: the phases a collection reports progress in (registry.progress)
MARK = "mark repositories"
SWEEP_BLOBS = "sweep blobs"
SWEEP_LINKS = "sweep layer links"


@dataclass
class GCReport:
    dry_run: bool
    immediate: bool = False
    repositories: int = 0
    manifests_kept: int = 0
    #: stored blobs kept because a kept manifest references them (or they are one)
    blobs_marked: int = 0
    blobs_removed: int = 0
    bytes_removed: int = 0
    blobs_recent: int = 0
    manifests_removed: int = 0
    links_removed: int = 0
    removed: list[str] = field(default_factory=list)
    #: records of servers that died without withdrawing them, removed (immediate mode)
    stale_presences: int = 0
    #: what the operator should know (a dry run of an immediate collection that would be
    #: refused says so here)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        verb = "would remove" if self.dry_run else "removed"
        mode = "immediate collection (no grace period): " if self.immediate else ""
        return (
            f"{mode}{self.repositories} repositories, {self.manifests_kept} manifests kept, "
            f"{self.blobs_marked} blobs in use; {verb} {self.blobs_removed} blobs "
            f"({self.bytes_removed} bytes), {self.manifests_removed} untagged manifests, "
            f"{self.links_removed} dangling layer links; kept {self.blobs_recent} unreferenced "
            f"blobs used within the grace period ({self.seconds:.1f} s)"
        )


class GarbageCollector:
    def __init__(
        self,
        storage: Store,
        *,
        grace: float,
        touch_interval: float,
        delete_untagged: bool = False,
        dry_run: bool = False,
        progress: Progress | None = None,
        cache: BlobDescriptorCache | None = None,
        immediate: bool = False,
        presences: PresenceRecords | None = None,
        index: Index | None = None,
    ) -> None:
        self.storage = storage
        #: refreshed for the repositories the collection changed (their usage, untagged ones)
        self.index = index
        self.changed: set[str] = set()
        self.immediate = immediate
        self.presences = presences or PresenceRecords(storage)
        self.store = BlobStore(storage, cache=cache)
        self.grace = grace
        self.touch_interval = touch_interval
        #: keys (:func:`digest_key`) of the blobs swept (or that a dry run would sweep)
        self.swept: set[bytes] = set()
        #: key of every digest a kept manifest references (or is) -> whether the sweep found
        #: it stored; only keys, which cost a third of a Digest, since this is what grows with
        #: the store
        self.marked: dict[bytes, bool] = {}
        self.delete_untagged = delete_untagged
        self.dry_run = dry_run
        self.progress = progress or NoProgress()
        self.run_id = uuid.uuid4().hex[:12]
        self.lease: Lease | None = None
        self.cutoff = 0.0

    async def run(self) -> GCReport:
        report = GCReport(dry_run=self.dry_run, immediate=self.immediate)
        #: bytes of every stored blob the sweep saw
        self.bytes_seen = 0
        started = time.time()
        if self.immediate:
            self.cutoff = math.inf  # nothing is kept for being recent
        else:
            # The server refreshes a stamp only once per touch interval: content used within
            # the grace period may carry a stamp up to that much older.
            self.cutoff = started - self.grace - self.touch_interval
        if self.immediate and not self.dry_run:
            # Refuse before writing the marker when a writable server is plainly running: the
            # marker would hold back its writes for a moment. (Ages by this machine's clock;
            # the check that counts comes after the marker, in storage time.)
            check_immediate(await self.presences.sightings(time.time()), self.store.cache.kind)
        # A dry run deletes nothing: it must not hold writable servers back.
        purpose = IMMEDIATE if self.immediate and not self.dry_run else ""
        async with Lease(self.storage, GC_LEASE, purpose=purpose) as lease:
            self.lease = lease
            if self.immediate:
                await self._check_servers(lease, report)
            names = await inventory.repository_names(self.storage)
            report.repositories = len(names)
            self.progress.total(MARK, len(names))
            # Reads run a few repositories ahead of the mark (ahead()), which consumes them in
            # order: on a cold disk the reads of several wait on it at once.
            async with aclosing(ahead(names, self._read_repository)) as repos:
                async for _, (repo, bodies) in repos:
                    await self._mark_repository(repo, bodies, self.marked, report)
                    self.progress.advance(MARK)
            await lease.renew()
            await self._sweep_blobs(self.marked, report)
            await lease.renew()
            self.progress.total(SWEEP_LINKS, len(names))
            async with aclosing(ahead(names, self._layer_links)) as links:
                async for name, digests in links:
                    await self._sweep_links(name, digests, report)
                    self.progress.advance(SWEEP_LINKS)
        if self.index is not None and not self.dry_run:
            for name in sorted(self.changed):
                await self.index.refresh(self.storage, name)
        report.seconds = time.time() - started
        self._record(report)
        await self._keep_figures(report)
        log.info(
            "garbage collection finished",
            extra={
                "fields": {
                    "dry_run": self.dry_run,
                    "blobs_removed": report.blobs_removed,
                    "bytes_removed": report.bytes_removed,
                    "manifests_removed": report.manifests_removed,
                }
            },
        )
        return report

    async def _check_servers(self, lease: Lease, report: GCReport) -> None:
        """The collector's half of the handshake (registry.presence): the marker (this lease)
        is written; now no writable server may be alive. A dry run only reports it."""
        now = (await self.storage.stat(lease.path)).modified  # storage time, as the records'
        sightings = await self.presences.sightings(now)
        try:
            check_immediate(sightings, self.store.cache.kind)
        except ImmediateCollectionRefused as exc:
            if not self.dry_run:
                raise
            report.warnings.append(f"run without --dry-run, this would be refused: {exc}")
        if self.dry_run:
            return
        for sighting in sightings:
            if not sighting.alive:
                await self.presences.remove_stale(sighting)
                report.stale_presences += 1
                log.info("removed the record of a server gone: %s", sighting.describe())

    # -- mark ---------------------------------------------------------------------------

    async def _read_repository(
        self, name: str
    ) -> tuple[inventory.RepositoryInventory, dict[Digest, bytes | None]]:
        """The repository's revisions (and with -m its tags) and their manifests' bodies (None
        for one not stored), read in one batch."""
        # Tags matter only to -m; layer links not at all (the sweep reads those).
        repo = await inventory.read_repository(
            self.storage, name, tags=self.delete_untagged, layers=False
        )
        digests = list(repo.revisions)
        found = await self.storage.read_many([layout.blob_data(d) for d in digests])
        return repo, {d: f.content if f else None for d, f in zip(digests, found, strict=True)}

    async def _mark_repository(
        self,
        repo: inventory.RepositoryInventory,
        bodies: dict[Digest, bytes | None],
        marked: dict[bytes, bool],
        report: GCReport,
    ) -> None:
        name = repo.name
        if self.delete_untagged:
            # Parsed only to follow index children and subjects: without -m every revision
            # is kept and its raw JSON is all the mark needs.
            parsed: dict[Digest, Manifest | None] = {
                d: (read_stored(b) if b is not None else None) for d, b in bodies.items()
            }
            kept = self._kept(repo, parsed)
        else:
            kept = set(repo.revisions)
        for digest in kept:
            key = digest_key(digest)
            if key is not None:
                marked[key] = False
            body = bodies.get(digest)
            if body is not None:
                marked.update(dict.fromkeys(referenced_keys(body), False))
        report.manifests_kept += len(kept)
        for digest in set(repo.revisions) - kept:
            path = layout.revision_link(name, digest)
            if await self._remove(path, _nothing):
                self.changed.add(name)
                report.manifests_removed += 1
                report.removed.append(f"manifest {name}@{digest}")
                if not self.dry_run:
                    await self.storage.remove_empty_dir(path.rsplit("/", 1)[0])

    def _kept(
        self, repo: inventory.RepositoryInventory, parsed: dict[Digest, Manifest | None]
    ) -> set[Digest]:
        if not self.delete_untagged:
            return set(repo.revisions)
        kept = {d for d in repo.tags.values() if d in repo.revisions}
        kept |= {d for d, modified in repo.revisions.items() if modified >= self.cutoff}
        while True:
            grown = set(kept)
            for digest in kept:
                manifest = parsed.get(digest)
                if manifest is not None:
                    grown |= {c.digest for c in manifest.children if c.digest in repo.revisions}
            for digest, manifest in parsed.items():
                if (
                    manifest is not None
                    and manifest.subject is not None
                    and (manifest.subject.digest in kept)
                ):
                    grown.add(digest)
            if grown == kept:
                return kept
            kept = grown

    # -- sweep --------------------------------------------------------------------------

    async def _remove(self, path: str, forget: Callable[[], Awaitable[None]]) -> bool:
        """Delete ``path`` unless it was used within the grace period, checking again after
        moving it aside (rule 3 in the module docstring); ``forget`` drops it from the shared
        cache first. True if it was (or would be) removed."""
        try:
            if (await self.storage.stat(path)).modified >= self.cutoff:
                return False
        except PathNotFound:
            return False
        if self.dry_run:
            return True
        if self.lease is not None:
            self.lease.check()  # never delete after losing the lease to another collector
        await forget()
        if self.immediate:  # nobody writes: nothing can be stamped back into use
            try:
                await self.storage.delete(path)
            except PathNotFound:
                return False
            return True
        aside = f"{path}.gc-{self.run_id}"
        try:
            await self.storage.move(path, aside)
        except PathNotFound:
            return False
        try:
            recent = (await self.storage.stat(aside)).modified >= self.cutoff
        except PathNotFound:
            return False
        if recent:
            # Put it back, unless a fresh copy was written meanwhile: then that one stays (the
            # same bytes; stored content is never replaced).
            if not await self.storage.move_new(aside, path):
                await self.storage.delete(aside)
            return False
        await self.storage.delete(aside)
        return True

    async def _keep_figures(self, report: GCReport) -> None:
        """The run's figures beside the store, for the web UI's usage page (what a collection
        would reclaim, as of the last run or dry run)."""
        figures = {
            "finished": time.time(),
            "dry_run": report.dry_run,
            "repositories": report.repositories,
            "blobs_removed": report.blobs_removed,
            "bytes_removed": report.bytes_removed,
            "manifests_removed": report.manifests_removed,
            "bytes_seen": self.bytes_seen,
            "seconds": report.seconds,
        }
        try:
            await self.storage.write(layout.gc_last_run(), json.dumps(figures).encode())
        except StorageError as exc:
            log.warning("the collection's figures were not kept: %s", exc)

    def _record(self, report: GCReport) -> None:
        """The run in the metrics (when they are on), and the space blobs now use."""
        m = metrics.active
        if m is None:
            return
        m.gc_runs.inc()
        m.gc_duration.observe(report.seconds)
        used = self.bytes_seen
        if not report.dry_run:
            m.gc_reclaimed.inc(report.bytes_removed)
            used -= report.bytes_removed
        m.storage_used.set(used)

    async def _sweep_blobs(self, marked: dict[bytes, bool], report: GCReport) -> None:
        # One prefix directory (blobs/<alg>/<xx>) at a time, a listing and a batch of stats
        # each, never a list of every blob (memory stays the mark's); progress counts
        # directories.
        prefixes = await inventory.blob_prefixes(self.storage)
        self.progress.total(SWEEP_BLOBS, len(prefixes))

        async def blobs_in(prefix: tuple[str, str]) -> list[inventory.StoredBlob]:
            return await inventory.blobs_in(self.storage, *prefix)

        async with aclosing(ahead(prefixes, blobs_in)) as scans:
            async for _, found in scans:
                # Marked and recent blobs decided here, in the loop: only a candidate costs an
                # await (the hundreds of thousands of others, nothing but a lookup).
                for blob in found:
                    self.bytes_seen += blob.size
                    key = digest_key(blob.digest)
                    if key is not None and key in marked:
                        marked[key] = True  # stored: the link sweep need not look again
                        report.blobs_marked += 1  # here: a marked digest may not be stored
                    elif blob.modified >= self.cutoff:
                        report.blobs_recent += 1
                    else:
                        await self._sweep_candidate(blob, key, report)
                self.progress.advance(SWEEP_BLOBS)

    async def _sweep_candidate(
        self, blob: inventory.StoredBlob, key: bytes | None, report: GCReport
    ) -> None:
        """A blob nothing marked and not used within the grace period (as the sweep saw it)."""
        path = layout.blob_data(blob.digest)
        if await self._remove(path, partial(self.store.cache.forget_blob, blob.digest)):
            if key is not None:
                self.swept.add(key)
            report.blobs_removed += 1
            report.bytes_removed += blob.size
            report.removed.append(f"blob {blob.digest} ({blob.size} bytes)")
            if not self.dry_run:
                await self.storage.remove_empty_dir(layout.blob_dir(blob.digest))
                # its file list (the web UI's, derived) would otherwise outlive it
                await self.storage.delete_if_present(layout.layer_listing(blob.digest))
        else:
            report.blobs_recent += 1

    async def _layer_links(self, name: str) -> list[Digest]:
        return await inventory.layer_link_candidates(self.storage, name)

    async def _sweep_links(self, name: str, digests: list[Digest], report: GCReport) -> None:
        """Layer links whose blob is gone (swept now or before) and that nobody used lately."""
        # Every link's digest from a listing; only a link that looks dangling is read (it
        # counts only if it holds its own digest, as for the rest of the registry).
        for digest in digests:
            key = digest_key(digest)
            # In a dry run the swept blobs are still there: count their links as they would be.
            if key not in self.swept:
                if key is not None and self.marked.get(key):
                    continue  # marked and found stored by the sweep: kept, so still there
                if await self.store.exists(digest):
                    continue
            path = layout.layer_link(name, digest)
            if await read_link(self.storage, path) != digest:
                continue
            if await self._remove(path, partial(self.store.cache.forget_link, name, digest)):
                report.links_removed += 1
                self.changed.add(name)
                if not self.dry_run:
                    await self.storage.remove_empty_dir(path.rsplit("/", 1)[0])


async def _nothing() -> None:
    return None


#: reads a phase keeps in flight ahead of what it is deciding (registry:2 reads one at a time).
#: On a cold disk the waits overlap; in the page cache more than a few only have pool threads
#: contend for the interpreter. Single runs on 100k blobs, 2 cores (bench/gc_scale.py), noisy:
#: depth 1, 2, 4 and 8 took about 5.8, 5.1, 4.4 and 7.1 s warm; 30, 30, 15 and 16-27 s cold.
READ_AHEAD = 4

K = TypeVar("K")
V = TypeVar("V")


async def ahead(
    items: Iterable[K], read: Callable[[K], Awaitable[V]]
) -> AsyncIterator[tuple[K, V]]:
    """``(item, await read(item))`` for each item, in order, with up to READ_AHEAD reads
    running at once: the storage works on the next items (on its threads, or the network)
    while the caller decides about this one. Only reads run ahead; whatever the caller does
    with a result (deleting) still happens one item at a time, after it has been read.
    Memory: READ_AHEAD results at most."""
    pending: deque[tuple[K, asyncio.Task[V]]] = deque()
    queue = iter(items)

    def fill() -> None:
        for item in queue:
            pending.append((item, asyncio.ensure_future(read(item))))
            if len(pending) >= READ_AHEAD:
                return

    try:
        fill()
        while pending:
            item, task = pending.popleft()
            result = await task
            fill()
            yield item, result
    finally:
        for _, task in pending:  # the caller stopped (an error, the lease lost): no strays
            task.cancel()
        if pending:
            await asyncio.gather(*(task for _, task in pending), return_exceptions=True)


#: a digest Digest.parse accepts (a supported algorithm, its length of lowercase hex)
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128}")
_LOWER_HEX = re.compile(r"[0-9a-f]+")


def digest_key(digest: Digest) -> bytes | None:
    """The mark's key for a digest: its raw bytes (a sha256 digest's 32 and a sha512's 64
    cannot be confused), None for one that is not lowercase hex (a stray directory name, which
    no manifest can reference: never marked, never found marked)."""
    if not _LOWER_HEX.fullmatch(digest.hex):
        return None
    return bytes.fromhex(digest.hex)


def referenced_keys(body: bytes) -> set[bytes]:
    """The keys of ``referenced_digests(body)`` (oci.manifest), without making a Digest of
    each: the same fields, the same digests accepted (``_DIGEST`` is what Digest.parse takes)."""
    return {
        bytes.fromhex(text[text.index(":") + 1 :])
        for text in referenced_digest_texts(body)
        if _DIGEST.fullmatch(text)
    }


async def last_run(storage: Store) -> dict[str, Any] | None:
    """The figures of the last collection (or dry run) on this store, None before the first."""
    try:
        figures = json.loads(await storage.read(layout.gc_last_run()))
    except (PathNotFound, ValueError):
        return None
    return figures if isinstance(figures, dict) else None
