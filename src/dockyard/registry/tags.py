"""Tags: ``_manifests/tags/<tag>/current/link`` names the manifest a tag points to; the
``index/`` beside it records every digest the tag has pointed to (registry:2 keeps it, and its
garbage collector reads it)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from dockyard.errors import ErrorCode, RegistryError
from dockyard.oci.digest import Digest
from dockyard.registry import layout
from dockyard.registry.blobs import read_link, write_link
from dockyard.registry.listing import Page, TagListings, page_of
from dockyard.storage.driver import PathNotFound
from dockyard.storage.store import Store
from dockyard.tracing import in_repository, traced

if TYPE_CHECKING:
    from dockyard.registry.index import Index


def manifest_unknown(reference: str) -> RegistryError:
    return RegistryError(ErrorCode.MANIFEST_UNKNOWN, detail={"reference": reference})


class TagStore:
    def __init__(
        self,
        name: str,
        storage: Store,
        index: Index | None = None,
        listings: TagListings | None = None,
    ) -> None:
        self.name = name
        self.storage = storage
        self.index = index
        #: the process's cache of sorted tag lists (registry.listing); None: list every time
        self.listings = listings

    @traced("registry.tag.resolve", in_repository, expected=(RegistryError,))
    async def resolve(self, tag: str) -> Digest:
        digest = await read_link(self.storage, layout.tag_current_link(self.name, tag))
        if digest is None:
            raise manifest_unknown(tag)
        return digest

    @traced("registry.tag.put", in_repository, expected=(RegistryError,))
    async def tag(self, tag: str, digest: Digest) -> None:
        # The index entry first: a reader that sees the new current link also finds it indexed.
        await write_link(self.storage, layout.tag_index_link(self.name, tag, digest), digest)
        await write_link(self.storage, layout.tag_current_link(self.name, tag), digest)

    async def current(self, tag: str) -> Digest | None:
        """The manifest ``tag`` points to; None when there is no such tag."""
        return await read_link(self.storage, layout.tag_current_link(self.name, tag))

    @traced("registry.tag.put_once", in_repository, expected=(RegistryError,))
    async def tag_once(self, tag: str, digest: Digest, refusal: RegistryError) -> None:
        """Point an immutable ``tag`` at ``digest``: only if it does not exist yet (created
        exclusively, so of two pushes racing for a new tag one wins on every worker and
        instance) or already points there; else ``refusal`` is raised."""
        current = await self.current(tag)
        if current == digest:
            return
        if current is None:
            await write_link(self.storage, layout.tag_index_link(self.name, tag, digest), digest)
            link = layout.tag_current_link(self.name, tag)
            if await self.storage.write_new(link, str(digest).encode("ascii")):
                return
            if await self.current(tag) == digest:  # the other push was of the same manifest
                return
        raise refusal

    @traced("registry.tag.delete", in_repository, expected=(RegistryError,))
    async def untag(self, tag: str) -> None:
        if not await self.storage.delete_if_present(layout.tag_dir(self.name, tag)):
            raise manifest_unknown(tag)
        if self.index is not None:
            await self.index.tag_deleted(self.name, tag)

    @traced("registry.tag.list", in_repository, expected=(RegistryError,))
    async def all(self) -> list[str]:
        """Every tag, sorted. An empty list for a repository without tags."""
        return list(await self._sorted())

    @traced("registry.tag.page", in_repository, expected=(RegistryError,))
    async def page(self, n: int | None, last: str | None) -> Page:
        """The tags after ``last``, at most ``n`` (``listing.page_of``'s rules). With the
        listing cached and its directory unchanged, one stat and a bisection."""
        return page_of(await self._sorted(), n, last)

    async def _sorted(self) -> tuple[str, ...]:
        """The sorted tag names: from the process's cache while the tags directory's version
        is the one they were listed under, else listed (and cached if the directory has been
        still long enough: registry.listing)."""
        tags_dir = layout.tags_dir(self.name)
        listings = self.listings
        try:
            version = None
            if listings is not None:
                version = await self.storage.directory_version(tags_dir)
            if listings is not None and version is not None:
                cached = listings.get(self.name, version)
                if cached is not None:
                    return cached
            # Listed after the stat: whatever the listing misses changed after it, so later
            # than the version's time, and the next request's stat sees another version.
            names = tuple(sorted(await self.storage.list(tags_dir)))
        except PathNotFound:
            return ()
        if listings is not None and version is not None:
            listings.put(self.name, version, names)
        return names

    async def pointing_to(self, digest: Digest) -> list[str]:
        tags = await self.all()
        targets = await asyncio.gather(
            *(read_link(self.storage, layout.tag_current_link(self.name, t)) for t in tags)
        )
        return [t for t, target in zip(tags, targets, strict=True) if target == digest]
