"""Manifests: validated on the way in, stored as blobs, linked under ``_manifests/revisions``,
served back byte for byte."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dockyard.errors import ErrorCode, RegistryError
from dockyard.oci.digest import Digest
from dockyard.oci.manifest import Manifest, parse_manifest, read_stored, sniff_media_type
from dockyard.registry import layout
from dockyard.registry.blobs import (
    BlobStore,
    LinkedBlobs,
    keep,
    read_link,
    write_link,
)
from dockyard.registry.records import manifest_record
from dockyard.registry.referrers import ReferrersIndex
from dockyard.registry.tags import TagStore, manifest_unknown
from dockyard.storage.driver import PathNotFound
from dockyard.tracing import in_repository, traced

if TYPE_CHECKING:
    from dockyard.registry.index import Index
    from dockyard.registry.policies import TagGuard
    from dockyard.registry.quotas import Quotas


@dataclass(frozen=True, slots=True)
class StoredManifest:
    digest: Digest
    media_type: str
    body: bytes


@dataclass(frozen=True, slots=True)
class PushedManifest:
    digest: Digest
    manifest: Manifest


class ManifestBodies:
    """Per process: recently served manifest bytes by digest. Content-addressed bytes never
    change, so a copy is never stale; whether a repository has the manifest is still asked of
    storage on every request (its revision link). Saves one storage read per manifest request,
    which on object storage is a round trip."""

    def __init__(self, capacity: int = 16 * 1024 * 1024) -> None:
        self._entries: OrderedDict[Digest, bytes] = OrderedDict()
        self._capacity = capacity
        self._size = 0

    def get(self, digest: Digest) -> bytes | None:
        body = self._entries.get(digest)
        if body is not None:
            self._entries.move_to_end(digest)
        return body

    def put(self, digest: Digest, body: bytes) -> None:
        if digest in self._entries or len(body) > self._capacity // 16:
            return
        if Digest.from_bytes(body, digest.algorithm) != digest:
            return  # damaged in storage: served as it is (fsck reports it), never remembered
        self._entries[digest] = body
        self._size += len(body)
        while self._size > self._capacity:
            _, dropped = self._entries.popitem(last=False)
            self._size -= len(dropped)


class ManifestStore:
    def __init__(
        self,
        name: str,
        store: BlobStore,
        blobs: LinkedBlobs,
        tags: TagStore,
        referrers: ReferrersIndex,
        bodies: ManifestBodies | None = None,
        index: Index | None = None,
        quotas: Quotas | None = None,
    ) -> None:
        self.name = name
        self.bodies = bodies or ManifestBodies(0)
        self.index = index
        self.quotas = quotas if quotas is not None and quotas.applies(name) else None
        self.store = store
        self.storage = store.storage
        self.blobs = blobs
        self.tags = tags
        self.referrers = referrers

    async def _keep(self, digest: Digest) -> bool:
        """In this repository, and now marked in use: True, else False. The revision link's
        stamp is the mark: while it is there the collector keeps the manifest and so its data
        (registry.gc), so the data needs no stamp of its own — one storage request, not four."""
        try:
            await keep(
                self.storage, layout.revision_link(self.name, digest), self.store.touch_interval
            )
        except PathNotFound:
            return False
        return True

    async def _body(self, digest: Digest) -> bytes | None:
        try:
            body = await self.store.read(digest)
        except RegistryError:
            return None
        self.bodies.put(digest, body)
        return body

    @traced("registry.manifest.get", in_repository, expected=(RegistryError,))
    async def get(self, digest: Digest) -> StoredManifest:
        body = self.bodies.get(digest)
        if body is None:
            present, body = await asyncio.gather(self._keep(digest), self._body(digest))
        else:
            present = await self._keep(digest)
        if not present or body is None:
            raise manifest_unknown(str(digest))
        return StoredManifest(digest=digest, media_type=sniff_media_type(body), body=body)

    @traced("registry.manifest.put", in_repository, expected=(RegistryError,))
    async def put(
        self,
        body: bytes,
        content_type: str | None,
        digest: Digest | None,
        tags: list[str],
        *,
        sparse: bool = False,
        guard: TagGuard | None = None,
        quota: bool = True,
    ) -> PushedManifest:
        """Validate and store a manifest, then point ``tags`` at it. ``digest`` is the one the
        client pushed by, if any: the body must hash to it.

        ``sparse``: the manifest may reference blobs (config, layers) and manifests (index
        children) this repository does not hold — the OCI spec's sparse manifests, for a mirror
        of some platforms of an image or a cache that has not pulled the rest yet. It must still
        parse and be valid; what it references and the repository holds is stamped as ever.
        Off, anything absent is MANIFEST_BLOB_UNKNOWN.

        ``guard``: the immutable tags' check (a client's push; not a cache's own refresh). A tag
        it protects is refused before anything is written if it points elsewhere already, and
        is created exclusively if it does not exist.

        ``quota``: the manifest's bytes are reserved against the repository's quotas
        (registry.quotas) and refused over a limit; off for a pull-through cache's fills, which
        are counted but never refused (a pull must not fail for a push quota)."""
        manifest = parse_manifest(body, content_type)
        if digest is None:
            digest = Digest.from_bytes(body)
        elif Digest.from_bytes(body, digest.algorithm) != digest:
            raise RegistryError(
                ErrorCode.DIGEST_INVALID,
                "manifest content does not match the digest it was pushed by",
                {"digest": str(digest)},
            )
        held = await self._check_references(manifest, sparse)
        protected = {t: r for t in tags if guard is not None and (r := guard(t)) is not None}
        for tag, refusal in protected.items():
            if await self.tags.current(tag) not in (None, digest):
                raise refusal

        reservation = None
        if self.quotas is not None and quota:  # the manifest is a blob of the repository too
            reservation = self.quotas.transient()
            await self.quotas.reserve(self.name, reservation, len(body), digest)
        try:
            return await self._store(digest, body, manifest, tags, protected, held)
        finally:
            if self.quotas is not None and reservation is not None:
                await self.quotas.release(self.name, reservation)

    async def _store(
        self,
        digest: Digest,
        body: bytes,
        manifest: Manifest,
        tags: list[str],
        protected: dict[str, RegistryError],
        held: dict[str, Digest],
    ) -> PushedManifest:
        # Content, then the revision link, then the referrers entry, then tags: every link
        # written points at something already in place.
        await self.store.put(digest, body)
        await write_link(self.storage, layout.revision_link(self.name, digest), digest)
        if manifest.subject is not None:
            await self.referrers.add(manifest.subject.digest, digest)
        for tag in tags:
            refusal = protected.get(tag)
            if refusal is None:
                await self.tags.tag(tag, digest)
            else:  # lost a race for a new immutable tag: this manifest stays, untagged
                await self.tags.tag_once(tag, digest, refusal)
        await self._confirm(digest, manifest, held)
        if self.index is not None:
            await self._index_push(digest, body, manifest, tags)
        return PushedManifest(digest=digest, manifest=manifest)

    async def _index_push(
        self, digest: Digest, body: bytes, manifest: Manifest, tags: list[str]
    ) -> None:
        assert self.index is not None
        used = {d.digest: d.size for d in manifest.blobs}
        used[digest] = len(body)
        record = manifest_record(digest, body, manifest, time.time())
        await self.index.manifest_pushed(self.name, record, tags, used)

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

    async def _check_references(self, manifest: Manifest, sparse: bool) -> dict[str, Digest]:
        """Every reference the repository holds is stamped (the collector's rule 1, in
        registry.gc), sparse or not; one it does not hold is refused unless ``sparse``.
        Returns the links found (path -> digest), for :meth:`_confirm`; none when ``sparse``,
        whose manifest may lack anything."""
        references = [*manifest.blobs, *manifest.children]
        found = await asyncio.gather(
            *(self._blob_present(d.digest) for d in manifest.blobs),
            *(self._keep(d.digest) for d in manifest.children),
        )
        missing = sorted({str(d.digest) for d, ok in zip(references, found, strict=True) if not ok})
        if sparse:
            return {}
        if missing:
            raise RegistryError(
                ErrorCode.MANIFEST_BLOB_UNKNOWN,
                "manifest references content that is not in this repository",
                {"digests": missing},
            )
        held = {layout.layer_link(self.name, d.digest): d.digest for d in manifest.blobs}
        for child in manifest.children:
            held[layout.revision_link(self.name, child.digest)] = child.digest
        return held

    async def _confirm(self, digest: Digest, manifest: Manifest, held: dict[str, Digest]) -> None:
        """After the push's last write: its revision link and every link it checked before
        writing (``held``) are still there. A repository delete (registry.deletion) racing the
        push may have taken either; then what this push left no longer stands, so it is
        withdrawn and the push fails: a push completes before a delete or fails cleanly, never
        leaving a tag without its manifest or a manifest without its blobs' links. (One storage
        round trip: the reads go out together.)"""
        paths = [layout.revision_link(self.name, digest), *held]
        found = await asyncio.gather(*(read_link(self.storage, path) for path in paths))
        missing = sorted({str(d) for d, f in zip(held.values(), found[1:], strict=True) if f != d})
        if found[0] == digest and not missing:
            return
        await self._withdraw(digest, manifest)
        if found[0] != digest:
            raise RegistryError(
                ErrorCode.NAME_UNKNOWN,
                "the repository (or this manifest) was deleted while the manifest was pushed; "
                "nothing of this push remains",
                {"name": self.name},
            )
        raise RegistryError(
            ErrorCode.MANIFEST_BLOB_UNKNOWN,
            "content the manifest references was removed from the repository while it was "
            "pushed (a repository or blob delete); nothing of this push remains",
            {"digests": missing},
        )

    async def _withdraw(self, digest: Digest, manifest: Manifest) -> None:
        """Remove what a push left that no longer stands (see :meth:`_confirm`): every tag
        pointing at ``digest`` — not only this push's: any such tag stands on the same revision
        link — then the revision link and the referrers entry, then the tags once more (a racing
        push of the same manifest may have tagged it in between: the revision goes before its
        tags can be checked again, never a tag left pointing at nothing), and the directories
        left empty: an empty ``_manifests`` would list the repository in the catalog."""
        for tag in await self.tags.pointing_to(digest):
            await self.storage.delete_if_present(layout.tag_dir(self.name, tag))
        revision_dir = layout.revision_link(self.name, digest).rsplit("/", 1)[0]
        await self.storage.delete_if_present(revision_dir)
        emptied = [layout.tags_dir(self.name), revision_dir]
        if manifest.subject is not None:
            await self.referrers.remove(manifest.subject.digest, digest)
            referrer = layout.referrer_link(self.name, manifest.subject.digest, digest)
            emptied.append(referrer.rsplit("/", 1)[0])
        for tag in await self.tags.pointing_to(digest):
            await self.storage.delete_if_present(layout.tag_dir(self.name, tag))
        if self.index is not None:
            await self.index.manifest_deleted(self.name, digest)
        top = layout.manifests_dir(self.name)
        for directory in emptied:
            # Up to _manifests, each only if empty (a racing writer recreates its parents).
            while directory.startswith(top + "/"):
                await self.storage.remove_empty_dir(directory)
                directory = directory.rsplit("/", 1)[0]
        await self.storage.remove_empty_dir(top)

    @traced("registry.manifest.delete", in_repository, expected=(RegistryError,))
    async def delete(self, digest: Digest, guard: TagGuard | None = None) -> list[str]:
        """Remove the manifest from the repository, with the tags that point to it and its
        referrers-index entry; returns those tags. The bytes stay in ``blobs/`` until garbage
        collection. Refused, before anything is removed, if ``guard`` protects one of the
        tags."""
        link = await read_link(self.storage, layout.revision_link(self.name, digest))
        if link != digest:
            raise manifest_unknown(str(digest))
        subject = None
        try:
            stored = read_stored(await self.store.read(digest))
            subject = stored.subject if stored else None
        except RegistryError:
            pass
        tags = await self.tags.pointing_to(digest)
        for tag in tags:
            refusal = guard(tag) if guard is not None else None
            if refusal is not None:
                raise refusal
        for tag in tags:
            await self.storage.delete_if_present(layout.tag_dir(self.name, tag))
        await self.storage.delete_if_present(
            layout.revision_link(self.name, digest).rsplit("/", 1)[0]
        )
        if subject is not None:
            await self.referrers.remove(subject.digest, digest)
        if self.index is not None:
            await self.index.manifest_deleted(self.name, digest)
        return tags
