"""The registry the configuration describes: :func:`open_store`, the one place that builds the
storage driver, its :class:`~dockyard.storage.store.Store`, the blob descriptor cache and the
upload locks. The server, the maintenance commands and the scheduled maintenance all start
here."""

from __future__ import annotations

import os
import secrets

from dockyard.config import Config
from dockyard.errors import ConfigError
from dockyard.registry.cache import build_cache, redis_from_config
from dockyard.registry.index import Index, MetadataIndex
from dockyard.registry.policies import Policies
from dockyard.registry.quotas import Quotas
from dockyard.registry.repository import Registry
from dockyard.registry.upload_locks import build_upload_locks
from dockyard.storage import build_driver
from dockyard.storage.driver import ExclusiveCreate, NoOverwriteMove, StorageDriver, Touch
from dockyard.storage.store import Store

#: What the registry cannot run without: claims, seals, manifests and leases are exclusive
#: creates and blobs are published with a no-overwrite move (docs/data-safety.md); garbage
#: collection is safe only because what clients are told exists is touched (docs/gc.md).
REQUIRED = (ExclusiveCreate, NoOverwriteMove, Touch)


def checked_store(driver: StorageDriver) -> Store:
    """The driver's store; ConfigError naming the driver if it lacks what the registry needs."""
    store = Store(driver)
    missing = store.missing(REQUIRED)
    if missing:
        raise ConfigError(
            "storage",
            f"the {driver.name} storage driver lacks {', '.join(missing)}, which the registry "
            "needs to keep stored content safe",
        )
    return store


def index_directory(config: Config) -> str:
    """``index.directory``, else ``<rootdirectory>/dockyard/index`` with filesystem storage
    (beside the store, where registry:2 never looks), else ``/var/lib/dockyard/index``."""
    if config.index.directory:
        return config.index.directory
    if config.storage.filesystem is not None:
        return os.path.join(config.storage.filesystem.rootdirectory, "dockyard", "index")
    return "/var/lib/dockyard/index"


def index_backend(config: Config) -> str:
    """``index.backend``, ``auto`` resolved: Redis where several instances share one store
    (``redis.addr`` set, storage not the filesystem driver), since a SQLite file per host is not
    shared between instances; SQLite otherwise."""
    if config.index.backend != "auto":
        return config.index.backend
    if config.redis.addr and config.storage.filesystem is None:
        return "redis"
    return "sqlite"


def open_index(config: Config, storage: Store) -> Index:
    """The metadata index of ``storage``: a :class:`MetadataIndex` (SQLite, see
    :func:`index_directory`) or a ``RedisIndex`` (its keys named after the store's id)."""
    if index_backend(config) == "redis":
        from dockyard.registry.index_redis import RedisIndex  # loads redis only when used

        return RedisIndex(
            lambda: redis_from_config(config), storage=storage, pull_flush=config.index.pullflush
        )
    return MetadataIndex(
        os.path.join(index_directory(config), "metadata.sqlite3"),
        pull_flush=config.index.pullflush,
        scopes=[q.scope for q in config.quotas],
    )


def open_store(config: Config, *, secret: str | None = None) -> Registry:
    """The configured registry, ready for use (nothing connects before it is first used);
    ``Registry.close`` releases it. ``secret`` signs upload state (``http.secret``); tools
    that never serve uploads leave it out and get a random one."""
    storage = checked_store(build_driver(config))
    index = open_index(config, storage)
    return Registry(
        storage,
        secret=secret if secret is not None else secrets.token_hex(32),
        delete_enabled=config.storage.delete.enabled,
        touch_interval=config.storage.maintenance.gc.touch_interval,
        cache=build_cache(config, storage),
        upload_locks=build_upload_locks(config, storage),
        max_upload_sessions=config.http.limits.uploadsperrepository,
        sparse_manifests=config.validation.manifests.sparse,
        policies=Policies(config.policies),
        index=index,
        quotas=Quotas(config.quotas, index),
    )
