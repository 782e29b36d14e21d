"""Blobs: the global content-addressed store, and each repository's view of it (its links).

A blob's bytes live once under ``blobs/``; a repository can serve a blob only if it links it.
Content becomes visible only by a no-overwrite move of fully written, digest-verified data (see
uploads.py): stored content is never replaced, so a blob, once there, keeps its bytes. A link is
written only after the data it points to is in place.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dockyard.errors import ErrorCode, RegistryError
from dockyard.oci.digest import Digest
from dockyard.registry import layout
from dockyard.registry.cache import BlobDescriptorCache, NoCache
from dockyard.storage.driver import PathNotFound, StorageError
from dockyard.storage.store import LocalRange, Store, StreamedRange
from dockyard.tracing import in_repository, traced

if TYPE_CHECKING:
    from dockyard.registry.index import Index

#: A blob's bytes opened for a response: a local file to send with zero-copy sendfile, or a
#: stream (see storage.store.Store.open_range).
BlobContent = LocalRange | StreamedRange


@dataclass(frozen=True, slots=True)
class BlobInfo:
    digest: Digest
    size: int
    modified: float


def blob_unknown(digest: Digest) -> RegistryError:
    return RegistryError(ErrorCode.BLOB_UNKNOWN, detail={"digest": str(digest)})


async def read_link(storage: Store, path: str) -> Digest | None:
    """The digest a link file holds; None when it is missing or does not hold a digest."""
    try:
        text = (await storage.read(path)).decode("ascii", "replace").strip()
    except PathNotFound:
        return None
    try:
        return Digest.parse(text)
    except RegistryError:
        return None


async def write_link(storage: Store, path: str, digest: Digest) -> None:
    await storage.write(path, str(digest).encode("ascii"))


async def keep(storage: Store, path: str, interval: float) -> float:
    """Record that ``path`` is in use: touch it unless it was touched within ``interval``
    seconds; return its modification time. PathNotFound if it is missing.

    This is half of what keeps online garbage collection safe (see ``registry.gc``): anything a
    client is told exists has a recent time, and the collector never deletes a file whose time
    is recent, checking again after it has moved the file aside."""
    info = await storage.stat(path)
    now = time.time()
    if now - info.modified >= interval:
        await stamp(storage, path)
        return now
    return info.modified


#: how long a stamp waits before it confirms the file is still there, where a move is not one
#: atomic step (docs/gc.md, "On S3"): far longer than a collector takes from its last look at
#: a file it moved aside to deleting the original
STAMP_CONFIRM_DELAY = 0.25


async def stamp(storage: Store, path: str) -> None:
    """Touch ``path``; PathNotFound if it is missing, or if it vanished right after the touch
    because a collector that had already moved it aside deleted it."""
    await storage.touch(path)
    if not storage.atomic_move:
        await asyncio.sleep(STAMP_CONFIRM_DELAY)
        await storage.stat(path)


#: how often (seconds) a blob or link in use has its time refreshed; must stay well below the
#: garbage collector's grace period
DEFAULT_TOUCH_INTERVAL = 3600.0


class BlobStore:
    """The registry-wide content store under ``blobs/``."""

    def __init__(
        self,
        storage: Store,
        touch_interval: float = DEFAULT_TOUCH_INTERVAL,
        cache: BlobDescriptorCache | None = None,
    ) -> None:
        self.storage = storage
        self.touch_interval = touch_interval
        self.cache: BlobDescriptorCache = cache or NoCache()

    async def stat(self, digest: Digest) -> BlobInfo:
        try:
            info = await self.storage.stat(layout.blob_data(digest))
        except PathNotFound:
            raise blob_unknown(digest) from None
        if info.is_dir:
            raise StorageError(f"{layout.blob_data(digest)} is a directory")
        return BlobInfo(digest=digest, size=info.size, modified=info.modified)

    async def exists(self, digest: Digest) -> bool:
        try:
            await self.stat(digest)
        except RegistryError:
            return False
        return True

    async def keep(self, digest: Digest) -> BlobInfo:
        """Stat the blob and mark it in use (see :func:`keep`); BLOB_UNKNOWN if missing."""
        path = layout.blob_data(digest)
        try:
            info = await self.storage.stat(path)
            now = time.time()
            if now - info.modified >= self.touch_interval:
                await stamp(self.storage, path)
        except PathNotFound:
            raise blob_unknown(digest) from None
        return BlobInfo(digest=digest, size=info.size, modified=info.modified)

    async def read(self, digest: Digest) -> bytes:
        """Whole content of a small blob (a manifest)."""
        try:
            return await self.storage.read(layout.blob_data(digest))
        except PathNotFound:
            raise blob_unknown(digest) from None

    async def put(self, digest: Digest, data: bytes) -> None:
        """Store bytes whose digest the caller has computed, unless the blob exists (stored
        content is never replaced: it is only marked in use, as a fresh write would be; see
        :func:`keep`); the file appears whole or not at all."""
        if not await self.storage.write_new(layout.blob_data(digest), data):
            try:
                await self.keep(digest)
            except RegistryError:  # taken by a collection since: store it again
                await self.storage.write_new(layout.blob_data(digest), data)

    async def publish(self, source: str, digest: Digest) -> bool:
        """Give the verified file ``source`` the blob's name unless the blob exists: True if
        it did; False if the blob was there already (``source`` is left for the caller to
        discard). The blob appears whole or not at all, and is never replaced."""
        return await self.storage.move_new(source, layout.blob_data(digest))

    async def open(self, digest: Digest, offset: int, length: int) -> BlobContent:
        """``length`` bytes of the blob from ``offset``, opened for a response: a local file
        for zero-copy sendfile where storage has one, else a stream. BLOB_UNKNOWN if the blob
        is gone (a collection may remove it after it was found)."""
        try:
            return await self.storage.open_range(layout.blob_data(digest), offset, length)
        except PathNotFound:
            raise blob_unknown(digest) from None

    async def redirect_url(self, digest: Digest, method: str) -> str | None:
        """Where a client can fetch the blob directly (object storage), or None."""
        return await self.storage.redirect_url(layout.blob_data(digest), method)


class LinkedBlobs:
    """One repository's blobs: those linked under its ``_layers``."""

    def __init__(self, name: str, store: BlobStore, index: Index | None = None) -> None:
        self.name = name
        self.store = store
        self.storage = store.storage
        self.index = index

    async def is_linked(self, digest: Digest) -> bool:
        return await read_link(self.storage, layout.layer_link(self.name, digest)) == digest

    @traced("registry.blob.stat", in_repository, expected=(RegistryError,))
    async def stat(self, digest: Digest) -> BlobInfo:
        """The blob if this repository may serve it. Manifests are blobs too: registry:2 only
        serves ``_layers`` links from the blob endpoint; Dockyard also serves a repository's
        manifests there (``oras blob fetch`` of a manifest digest works)."""
        cache = self.store.cache
        size = await cache.linked_size(self.name, digest)
        if size is not None:
            return BlobInfo(digest=digest, size=size, modified=0.0)
        layer = await self.is_linked(digest)
        if not layer:
            link = await read_link(self.storage, layout.revision_link(self.name, digest))
            if link != digest:
                raise blob_unknown(digest)
        try:
            info = await self.store.keep(digest)
        except RegistryError:
            # The collector may hold a recently used blob aside for a moment before putting it
            # back (registry.gc); look once more before answering that it is gone.
            await asyncio.sleep(0.05)
            info = await self.store.keep(digest)
        if layer:  # only layer links: they are the only ones removed through forget_link
            await cache.remember(self.name, digest, info.size)
        return info

    @traced("registry.blob.open", in_repository, expected=(RegistryError,))
    async def open(self, digest: Digest, offset: int, length: int) -> BlobContent:
        """The blob's bytes for a response (see BlobStore.open); call :meth:`stat` first, which
        checks this repository may serve it."""
        return await self.store.open(digest, offset, length)

    @traced("registry.blob.redirect", in_repository, expected=(RegistryError,))
    async def redirect_url(self, digest: Digest, method: str) -> str | None:
        return await self.store.redirect_url(digest, method)

    async def link(self, digest: Digest, size: int | None = None) -> None:
        """Link the blob into the repository; ``size`` (its stored size, when the caller knows
        it) counts it in the repository's usage at once."""
        await write_link(self.storage, layout.layer_link(self.name, digest), digest)
        if self.index is not None and size is not None:
            await self.index.blob_linked(self.name, digest, size)

    @traced("registry.blob.delete", in_repository, expected=(RegistryError,))
    async def unlink(self, digest: Digest) -> None:
        if not await self.is_linked(digest):
            raise blob_unknown(digest)
        path = layout.layer_link(self.name, digest)
        await self.store.cache.forget_link(self.name, digest)
        await self.storage.delete_if_present(path.rsplit("/", 1)[0])
