"""The registry model's entry points: :class:`Registry` (the whole store) and
:class:`Repository` (one name). The HTTP layer talks only to these; they never see a request."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from dockyard.oci.names import validate_name
from dockyard.registry import layout
from dockyard.registry.blobs import DEFAULT_TOUCH_INTERVAL, BlobStore, LinkedBlobs
from dockyard.registry.cache import BlobDescriptorCache
from dockyard.registry.listing import Page, TagListings, catalog_page
from dockyard.registry.manifests import ManifestBodies, ManifestStore
from dockyard.registry.policies import Policies
from dockyard.registry.referrers import ReferrersIndex
from dockyard.registry.tags import TagStore
from dockyard.registry.upload_locks import NoUploadLocks, UploadLocks
from dockyard.registry.uploads import HasherCache, Uploads, UploadTokens
from dockyard.storage.driver import PathNotFound, StorageError
from dockyard.storage.store import Store

if TYPE_CHECKING:
    from dockyard.registry.deletion import RepositoryDeletion
    from dockyard.registry.index import Index
    from dockyard.registry.quotas import Quotas


async def repository_dirs(storage: Store, markers: tuple[str, ...]) -> list[str]:
    """Sorted names of the directories under ``repositories/`` holding any of ``markers``
    (``_manifests``, ``_layers``, ``_uploads``), found in one walk of the tree."""
    entries = await storage.walk(layout.REPOSITORIES, lambda name: not name.startswith("_"))
    prefix = layout.REPOSITORIES + "/"
    names = set()
    for entry in entries:
        parent, _, leaf = entry.path.rpartition("/")
        if entry.is_dir and leaf in markers and parent.startswith(prefix):
            names.add(parent[len(prefix) :])
    return sorted(names)


class Repository:
    def __init__(self, registry: Registry, name: str) -> None:
        self.name = name
        self.registry = registry
        store = registry.blobs
        self.blobs = LinkedBlobs(name, store, registry.index)
        self.tags = TagStore(name, registry.storage, registry.index, registry.tag_listings)
        self.referrers = ReferrersIndex(name, store)
        self.manifests = ManifestStore(
            name,
            store,
            self.blobs,
            self.tags,
            self.referrers,
            registry.manifest_bodies,
            registry.index,
            registry.quotas,
        )
        self.uploads = Uploads(
            name,
            store,
            self.blobs,
            registry.tokens,
            registry.hashers,
            registry.upload_locks,
            registry.max_upload_sessions,
            registry.quotas,
        )

    async def exists(self) -> bool:
        try:
            info = await self.registry.storage.stat(layout.manifests_dir(self.name))
        except PathNotFound:
            return False
        return info.is_dir


class Registry:
    """The whole store. ``registry.configured.open_store`` builds one from the configuration;
    :meth:`close` releases what it holds (storage, cache, upload locks)."""

    def __init__(
        self,
        storage: Store,
        *,
        secret: str,
        delete_enabled: bool,
        touch_interval: float = DEFAULT_TOUCH_INTERVAL,
        cache: BlobDescriptorCache | None = None,
        upload_locks: UploadLocks | None = None,
        max_upload_sessions: int = 0,
        sparse_manifests: bool = False,
        policies: Policies | None = None,
        index: Index | None = None,
        quotas: Quotas | None = None,
    ) -> None:
        self.storage = storage
        #: space limits per repository and namespace, counted in ``index``
        self.quotas = quotas
        #: the metadata index (derived: sorted tags, times, usage); None in bare unit tests
        self.index = index
        #: per-repository rules (immutable tags) for what clients change
        self.policies = policies or Policies()
        self.delete_enabled = delete_enabled
        #: clients may push manifests whose references are absent (``ManifestStore.put``)
        self.sparse_manifests = sparse_manifests
        self.upload_locks: UploadLocks = upload_locks or NoUploadLocks()
        self.max_upload_sessions = max_upload_sessions
        self.blobs = BlobStore(storage, touch_interval, cache)
        self.tokens = UploadTokens(secret)
        self.hashers = HasherCache()
        self.manifest_bodies = ManifestBodies()
        #: sorted tag names of recently listed repositories, checked by one stat per request
        self.tag_listings = TagListings()

    def repository(self, name: str) -> Repository:
        return Repository(self, validate_name(name))

    async def repositories(self) -> list[str]:
        """Every repository name, sorted: directories under ``repositories/`` that hold a
        ``_manifests`` directory (registry:2's rule); ``_``-prefixed directories are never
        names and are not descended into."""
        return await repository_dirs(self.storage, ("_manifests",))

    async def delete_repository(
        self, name: str, *, dry_run: bool = False, settle: float | None = None
    ) -> RepositoryDeletion:
        """Remove the repository ``name``: its tags, manifests, layer links and uploads in
        progress, never its blobs (garbage collection reclaims those only it used), never a
        repository nested in it. Gone from the catalog at once; pushes racing it complete before
        it or fail cleanly (registry.deletion has how). ``dry_run``: only what would go.
        NAME_UNKNOWN if there is no such repository.

        The entry point of ``dockyard rm`` and of the admin API. It does not consult
        ``storage.delete.enabled`` (the operator's command always may; an HTTP handler checks
        with ``api.base.require_delete`` first) and emits no event (the caller records the
        ``delete`` events, see ``events.repository_delete_events``)."""
        # Imported here: registry.deletion reads the store through registry.inventory, which
        # imports this module.
        from dockyard.registry.deletion import DEFAULT_SETTLE, delete_repository

        return await delete_repository(
            self.storage,
            name,
            cache=self.blobs.cache,
            index=self.index,
            dry_run=dry_run,
            settle=DEFAULT_SETTLE if settle is None else settle,
        )

    async def check_storage(self) -> None:
        """Write, read back and delete a probe file; raises StorageError when storage cannot
        do that (full, read-only, unreachable)."""
        path = layout.health_probe(f"probe-{os.getpid()}")
        payload = os.urandom(16)
        await self.storage.write(path, payload)
        if await self.storage.read(path) != payload:
            raise StorageError("storage returned different bytes than were written")
        await self.storage.delete(path)

    async def catalog(
        self, n: int | None, last: str | None, visible: Callable[[str], bool] | None = None
    ) -> Page:
        """A page of repository names, counting only those ``visible`` accepts: the names
        ``repositories`` gives, paginated, read with a walk that stops at the page's end and
        never lists a directory whose names all sort at or before ``last``
        (``registry.listing.catalog_page``)."""
        return await catalog_page(self.storage, layout.REPOSITORIES, n, last, visible)

    async def close(self) -> None:
        """Release the cache's and the upload locks' connections, then storage's."""
        await self.blobs.cache.close()
        await self.upload_locks.close()
        if self.index is not None:
            await self.index.close()
        await self.storage.close()
