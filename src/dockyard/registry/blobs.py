"""Blobs: the global content-addressed store, and each repository's view of it (its links).

A blob's bytes live once under ``blobs/``; a repository can serve a blob only if it links it.
Content becomes visible only by a rename of fully written, digest-verified data (see uploads.py),
and a link is written only after the data it points to is in place.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from dockyard.errors import ErrorCode, RegistryError
from dockyard.oci.digest import Digest
from dockyard.registry import layout
from dockyard.storage.driver import PathNotFound, StorageDriver, StorageError


@dataclass(frozen=True, slots=True)
class BlobInfo:
    digest: Digest
    size: int
    modified: float


def blob_unknown(digest: Digest) -> RegistryError:
    return RegistryError(ErrorCode.BLOB_UNKNOWN, detail={"digest": str(digest)})


async def read_link(driver: StorageDriver, path: str) -> Digest | None:
    """The digest a link file holds; None when it is missing or does not hold a digest."""
    try:
        text = (await driver.read(path)).decode("ascii", "replace").strip()
    except PathNotFound:
        return None
    try:
        return Digest.parse(text)
    except RegistryError:
        return None


async def write_link(driver: StorageDriver, path: str, digest: Digest) -> None:
    await driver.write(path, str(digest).encode("ascii"))


async def delete_if_present(driver: StorageDriver, path: str) -> bool:
    try:
        await driver.delete(path)
    except PathNotFound:
        return False
    return True


class BlobStore:
    """The registry-wide content store under ``blobs/``."""

    def __init__(self, driver: StorageDriver) -> None:
        self.driver = driver

    async def stat(self, digest: Digest) -> BlobInfo:
        try:
            info = await self.driver.stat(layout.blob_data(digest))
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

    async def read(self, digest: Digest) -> bytes:
        """Whole content of a small blob (a manifest)."""
        try:
            return await self.driver.read(layout.blob_data(digest))
        except PathNotFound:
            raise blob_unknown(digest) from None

    async def put(self, digest: Digest, data: bytes) -> None:
        """Store bytes whose digest the caller has computed; atomic (temp file + rename)."""
        await self.driver.write(layout.blob_data(digest), data)

    async def adopt(self, source: str, digest: Digest) -> None:
        """Make a verified file the blob's content by moving it into place (a rename on a
        filesystem: the blob appears whole or not at all). Replacing existing identical content
        is harmless and repairs a damaged copy."""
        await self.driver.move(source, layout.blob_data(digest))

    def reader(
        self, digest: Digest, offset: int = 0, length: int | None = None
    ) -> AsyncIterator[bytes]:
        return self.driver.reader(layout.blob_data(digest), offset, length)

    def local_path(self, digest: Digest) -> str | None:
        return self.driver.local_path(layout.blob_data(digest))


class LinkedBlobs:
    """One repository's blobs: those linked under its ``_layers``."""

    def __init__(self, name: str, store: BlobStore) -> None:
        self.name = name
        self.store = store
        self.driver = store.driver

    async def is_linked(self, digest: Digest) -> bool:
        return await read_link(self.driver, layout.layer_link(self.name, digest)) == digest

    async def stat(self, digest: Digest) -> BlobInfo:
        """The blob if this repository may serve it. Manifests are blobs too: registry:2 only
        serves ``_layers`` links from the blob endpoint; Dockyard also serves a repository's
        manifests there (``oras blob fetch`` of a manifest digest works)."""
        linked = await self.is_linked(digest)
        if not linked:
            link = await read_link(self.driver, layout.revision_link(self.name, digest))
            linked = link == digest
        if not linked:
            raise blob_unknown(digest)
        return await self.store.stat(digest)

    async def link(self, digest: Digest) -> None:
        await write_link(self.driver, layout.layer_link(self.name, digest), digest)

    async def unlink(self, digest: Digest) -> None:
        if not await self.is_linked(digest):
            raise blob_unknown(digest)
        path = layout.layer_link(self.name, digest)
        await delete_if_present(self.driver, path.rsplit("/", 1)[0])
