"""Checking the store (``dockyard fsck``): every blob's content matches its digest, every link
points to a blob that exists, every tag to a manifest that exists. With ``repair``, corrupt blobs
are moved to ``/dockyard/quarantine/`` (never deleted), so a pull fails cleanly instead of
serving bad bytes and the data can still be examined.

A manifest that references content its repository does not hold (a config, a layer, an index
child) is not a problem: the OCI spec allows such *sparse* manifests, Dockyard accepts them with
``validation.manifests.sparse``, the pull-through cache stores indexes before their children are
pulled, and pulling what is absent is an ordinary 404. They are counted (``sparse_manifests``),
for information."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from dockyard.errors import RegistryError
from dockyard.oci.digest import Digest, new_hasher
from dockyard.oci.manifest import read_stored
from dockyard.registry import inventory, layout
from dockyard.registry.blobs import BlobStore
from dockyard.registry.cache import BlobDescriptorCache
from dockyard.registry.progress import NoProgress, Progress
from dockyard.storage.driver import PathNotFound
from dockyard.storage.store import Store

#: the phases a check reports progress in (registry.progress)
VERIFY_BLOBS = "verify blobs"
CHECK_REPOSITORIES = "check repositories"


@dataclass
class FsckReport:
    blobs_checked: int = 0
    bytes_checked: int = 0
    problems: list[str] = field(default_factory=list)
    quarantined: list[str] = field(default_factory=list)
    #: manifests referencing content their repository does not hold: allowed, not a problem
    sparse_manifests: int = 0

    @property
    def clean(self) -> bool:
        return not self.problems


async def _hash(storage: Store, path: str, algorithm: str) -> str:
    hasher = new_hasher(algorithm)
    loop = asyncio.get_running_loop()
    async for chunk in storage.reader(path):
        await loop.run_in_executor(None, hasher.update, chunk)
    return hasher.hexdigest()


async def check(
    storage: Store,
    *,
    repair: bool = False,
    progress: Progress | None = None,
    cache: BlobDescriptorCache | None = None,
) -> FsckReport:
    report = FsckReport()
    progress = progress or NoProgress()
    store = BlobStore(storage, cache=cache)
    corrupt = set()
    digests = await inventory.blob_digests(storage)
    progress.total(VERIFY_BLOBS, len(digests))
    async for blob in inventory.blobs(storage, digests):
        progress.advance(VERIFY_BLOBS)
        path = layout.blob_data(blob.digest)
        try:
            actual = await _hash(storage, path, blob.digest.algorithm)
        except PathNotFound:
            continue  # removed meanwhile (garbage collection)
        report.blobs_checked += 1
        report.bytes_checked += blob.size
        if actual == blob.digest.hex:
            continue
        corrupt.add(blob.digest)
        report.problems.append(
            f"blob {blob.digest}: content hashes to {blob.digest.algorithm}:{actual}"
        )
        if repair:
            target = layout.quarantine(blob.digest, time.strftime("%Y%m%dT%H%M%S"))
            await store.cache.forget_blob(blob.digest)
            await storage.move(path, target)
            report.quarantined.append(f"{blob.digest} -> {target}")
    names = await inventory.repository_names(storage)
    progress.total(CHECK_REPOSITORIES, len(names))
    for name in names:
        repo = await inventory.read_repository(storage, name)
        held: set[Digest] = set()
        for digest in sorted(repo.layers, key=str):
            if digest in corrupt or not await store.exists(digest):
                report.problems.append(f"{name}: layer link {digest} points to a missing blob")
            else:
                held.add(digest)
        for digest in sorted(repo.revisions, key=str):
            if digest in corrupt or not await store.exists(digest):
                report.problems.append(f"{name}: manifest {digest} has no data")
            elif await _is_sparse(store, digest, held, repo.revisions):
                report.sparse_manifests += 1
        for tag, digest in sorted(repo.tags.items()):
            if digest not in repo.revisions:
                report.problems.append(f"{name}:{tag} points to {digest}, not in the repository")
        progress.advance(CHECK_REPOSITORIES)
    return report


async def _is_sparse(
    store: BlobStore, digest: Digest, held: set[Digest], manifests: Mapping[Digest, object]
) -> bool:
    """The manifest references a blob not linked (with data) in its repository, or a manifest
    not in it. One that cannot be read or parsed any more is not counted: its bytes were
    checked above."""
    try:
        manifest = read_stored(await store.read(digest))
    except RegistryError:
        return False
    if manifest is None:
        return False
    return any(d.digest not in held for d in manifest.blobs) or any(
        d.digest not in manifests for d in manifest.children
    )
