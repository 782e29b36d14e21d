"""Manifests: validated on the way in, stored as blobs, linked under ``_manifests/revisions``,
served back byte for byte."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from dockyard.errors import ErrorCode, RegistryError
from dockyard.oci.digest import Digest
from dockyard.oci.manifest import Manifest, parse_manifest, read_stored, sniff_media_type
from dockyard.registry import layout
from dockyard.registry.blobs import (
    BlobStore,
    LinkedBlobs,
    delete_if_present,
    keep,
    read_link,
    write_link,
)
from dockyard.registry.referrers import ReferrersIndex
from dockyard.registry.tags import TagStore, manifest_unknown
from dockyard.storage.driver import PathNotFound


@dataclass(frozen=True, slots=True)
class StoredManifest:
    digest: Digest
    media_type: str
    body: bytes


@dataclass(frozen=True, slots=True)
class PushedManifest:
    digest: Digest
    manifest: Manifest


class ManifestStore:
    def __init__(
        self,
        name: str,
        store: BlobStore,
        blobs: LinkedBlobs,
        tags: TagStore,
        referrers: ReferrersIndex,
    ) -> None:
        self.name = name
        self.store = store
        self.driver = store.driver
        self.blobs = blobs
        self.tags = tags
        self.referrers = referrers

    async def exists(self, digest: Digest) -> bool:
        link = await read_link(self.driver, layout.revision_link(self.name, digest))
        return link == digest and await self.store.exists(digest)

    async def _keep(self, digest: Digest) -> bool:
        """Present and now marked in use (its revision link and its data): True, else False."""
        path = layout.revision_link(self.name, digest)
        if await read_link(self.driver, path) != digest:
            return False
        try:
            await keep(self.driver, path, self.store.touch_interval)
            await self.store.keep(digest)
        except (PathNotFound, RegistryError):
            return False
        return True

    async def get(self, digest: Digest) -> StoredManifest:
        if not await self._keep(digest):
            raise manifest_unknown(str(digest))
        try:
            body = await self.store.read(digest)
        except RegistryError:
            raise manifest_unknown(str(digest)) from None
        return StoredManifest(digest=digest, media_type=sniff_media_type(body), body=body)

    async def put(
        self, body: bytes, content_type: str | None, digest: Digest | None, tags: list[str]
    ) -> PushedManifest:
        """Validate and store a manifest, then point ``tags`` at it. ``digest`` is the one the
        client pushed by, if any: the body must hash to it."""
        manifest = parse_manifest(body, content_type)
        if digest is None:
            digest = Digest.from_bytes(body)
        elif Digest.from_bytes(body, digest.algorithm) != digest:
            raise RegistryError(
                ErrorCode.DIGEST_INVALID,
                "manifest content does not match the digest it was pushed by",
                {"digest": str(digest)},
            )
        await self._check_references(manifest)

        # Content, then the revision link, then the referrers entry, then tags: every link
        # written points at something already in place.
        await self.store.put(digest, body)
        await write_link(self.driver, layout.revision_link(self.name, digest), digest)
        if manifest.subject is not None:
            await self.referrers.add(manifest.subject.digest, digest)
        for tag in tags:
            await self.tags.tag(tag, digest)
        return PushedManifest(digest=digest, manifest=manifest)

    async def _blob_present(self, digest: Digest) -> bool:
        """Linked here and its data present, which is stamped: a manifest about to reference
        it makes it in use (registry.gc). A stamp younger than the touch interval is left as it
        is: no collection can take the blob before the manifest is in place to mark it."""
        if not await self.blobs.is_linked(digest):
            return False
        try:
            await self.store.keep(digest)
        except RegistryError:
            return False
        return True

    async def _check_references(self, manifest: Manifest) -> None:
        references = [*manifest.blobs, *manifest.children]
        found = await asyncio.gather(
            *(self._blob_present(d.digest) for d in manifest.blobs),
            *(self._keep(d.digest) for d in manifest.children),
        )
        missing = sorted({str(d.digest) for d, ok in zip(references, found, strict=True) if not ok})
        if missing:
            raise RegistryError(
                ErrorCode.MANIFEST_BLOB_UNKNOWN,
                "manifest references content that is not in this repository",
                {"digests": missing},
            )

    async def delete(self, digest: Digest) -> None:
        """Remove the manifest from the repository, with the tags that point to it and its
        referrers-index entry. The bytes stay in ``blobs/`` until garbage collection."""
        link = await read_link(self.driver, layout.revision_link(self.name, digest))
        if link != digest:
            raise manifest_unknown(str(digest))
        subject = None
        try:
            stored = read_stored(await self.store.read(digest))
            subject = stored.subject if stored else None
        except RegistryError:
            pass
        for tag in await self.tags.pointing_to(digest):
            await delete_if_present(self.driver, layout.tag_dir(self.name, tag))
        await delete_if_present(
            self.driver, layout.revision_link(self.name, digest).rsplit("/", 1)[0]
        )
        if subject is not None:
            await self.referrers.remove(subject.digest, digest)
