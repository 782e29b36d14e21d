"""The referrers index: for each subject digest, the manifests in the repository that name it
as their ``subject``. registry:2 has no such index; Dockyard keeps one as link files under
``_manifests/referrers/`` (a directory registry:2 ignores) so the referrers API is a directory
listing, not a scan. Entries are checked against the revision links when read, so a manifest
deleted by another tool (registry:2, say) never shows up."""

from __future__ import annotations

import asyncio

from dockyard.errors import RegistryError
from dockyard.oci.digest import Digest
from dockyard.oci.manifest import Descriptor, read_stored, sniff_media_type
from dockyard.registry import layout
from dockyard.registry.blobs import BlobStore, read_link, write_link
from dockyard.storage.driver import PathNotFound


class ReferrersIndex:
    def __init__(self, name: str, store: BlobStore) -> None:
        self.name = name
        self.store = store
        self.storage = store.storage

    async def add(self, subject: Digest, referrer: Digest) -> None:
        await write_link(self.storage, layout.referrer_link(self.name, subject, referrer), referrer)

    async def remove(self, subject: Digest, referrer: Digest) -> None:
        path = layout.referrer_link(self.name, subject, referrer)
        await self.storage.delete_if_present(path.rsplit("/", 1)[0])

    async def list(self, subject: Digest, artifact_type: str | None = None) -> list[Descriptor]:
        """Descriptors of the referrers of ``subject``, sorted by digest, optionally only those
        of one artifact type."""
        base = layout.referrers_dir(self.name, subject)
        candidates: list[Digest] = []
        try:
            algorithms = await self.storage.list(base)
        except PathNotFound:
            return []
        for algorithm in algorithms:
            try:
                hexes = await self.storage.list(f"{base}/{algorithm}")
            except PathNotFound:
                continue
            candidates.extend(Digest(algorithm, h) for h in hexes)
        found = await asyncio.gather(*(self._describe(subject, d) for d in candidates))
        out = [d for d in found if d is not None]
        if artifact_type is not None:
            out = [d for d in out if d.artifact_type == artifact_type]
        return sorted(out, key=lambda d: str(d.digest))

    async def _describe(self, subject: Digest, digest: Digest) -> Descriptor | None:
        if await read_link(self.storage, layout.revision_link(self.name, digest)) != digest:
            return None
        try:
            body = await self.store.read(digest)
        except RegistryError:  # linked but its data is gone: not listable
            return None
        manifest = read_stored(body)
        if manifest is None or manifest.subject is None or manifest.subject.digest != subject:
            return None
        return Descriptor(
            media_type=sniff_media_type(body),
            digest=digest,
            size=len(body),
            artifact_type=manifest.artifact_type,
            annotations=manifest.annotations,
        )
