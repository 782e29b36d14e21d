"""The blob descriptor cache (registry:2's ``storage.cache.blobdescriptor: redis``), shared by
every instance through Redis.

It answers one question without a storage round trip: "may repository R serve blob D, and how
big is it?" — the HEAD each client sends for every layer of every push and pull, which on object
storage costs two requests (the link, the blob). Four rules keep it from ever claiming content
that storage no longer has:

1. *Only storage fills it.* An entry is written after storage confirmed the link and the blob and
   the blob's time was refreshed (``keep``). Writes never consult it: an upload, a mount or a
   manifest push checks storage, so a stale entry can never make Dockyard skip writing something.
2. *Entries live at most one touch interval.* A blob touched within the touch interval is never
   a garbage-collection candidate (see ``registry.gc``), so while its entry lives the blob is
   there — unless Dockyard itself deletes it, and then:
3. *Every deletion forgets first.* Unlinking a blob from a repository and every removal by the
   garbage collector delete the entry before they touch storage, and leave a tombstone that
   keeps it from being written again for ``FORGOTTEN_TTL``. A reader racing the deletion — it
   confirmed the link and the blob in storage just before they went, and writes its entry just
   after — finds the tombstone and writes nothing (the check and the write are one Redis
   script). An online collection would also see that reader's ``keep`` on its second look and
   put the blob back; an immediate one (``gc --grace 0``) looks at no times, so the tombstone
   is what keeps a deleted blob from being announced again.
4. *Keys carry the store's epoch,* a random id kept in storage (``/dockyard/cache-epoch``).
   Storage that was wiped or replaced has a new epoch, so entries a Redis kept from an earlier
   store are never read.

A flushed Redis is an empty cache; an unreachable one is skipped (with a warning, retried after a
pause) and every answer comes from storage.
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import TYPE_CHECKING, Any, Protocol

from dockyard import metrics
from dockyard.oci.digest import Digest
from dockyard.registry import layout
from dockyard.storage.driver import PathNotFound, StorageError
from dockyard.storage.store import Store

if TYPE_CHECKING:
    from dockyard.config import Config

log = logging.getLogger("dockyard.cache")

#: seconds between re-reads of the storage epoch
EPOCH_CHECK_INTERVAL = 60.0
#: seconds Redis is left alone after it failed
RETRY_AFTER_FAILURE = 5.0
#: seconds after a deletion during which no entry is written for what was deleted (rule 3):
#: far longer than a reader takes from confirming a blob in storage to writing its entry
FORGOTTEN_TTL = 300.0

#: KEYS: blob entry, link entry, blob tombstone, link tombstone; ARGV: size, ttl in ms
_REMEMBER_UNLESS_FORGOTTEN = """
if redis.call('EXISTS', KEYS[3]) == 1 or redis.call('EXISTS', KEYS[4]) == 1 then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('SET', KEYS[2], '1', 'PX', ARGV[2])
return 1
"""


class BlobDescriptorCache(Protocol):
    #: "redis" for a cache shared through Redis, "none" for NoCache (recorded in a server's
    #: presence: an immediate collection must forget what the servers could have cached)
    kind: str

    async def linked_size(self, name: str, digest: Digest) -> int | None:
        """The size of a blob ``name`` may serve, if known; None means "ask storage"."""
        ...

    async def remember(self, name: str, digest: Digest, size: int) -> None: ...

    async def forget_link(self, name: str, digest: Digest) -> None:
        """Called before a link is deleted; raises StorageError if it cannot forget."""
        ...

    async def forget_blob(self, digest: Digest) -> None:
        """Called before a blob is deleted; raises StorageError if it cannot forget."""
        ...

    async def close(self) -> None: ...


class NoCache:
    """Every answer from storage. (A per-process cache could not see deletions made by other
    workers, so registry:2's ``inmemory`` setting also means this.)"""

    kind = "none"

    async def linked_size(self, name: str, digest: Digest) -> int | None:
        return None

    async def remember(self, name: str, digest: Digest, size: int) -> None:
        return None

    async def forget_link(self, name: str, digest: Digest) -> None:
        return None

    async def forget_blob(self, digest: Digest) -> None:
        return None

    async def close(self) -> None:
        return None


class RedisCache:
    kind = "redis"

    def __init__(self, client: Any, storage: Store, ttl: float) -> None:
        self.client = client
        self._remember = client.register_script(_REMEMBER_UNLESS_FORGOTTEN)
        self.storage = storage
        # Milliseconds: an entry must never outlive the touch interval, however short.
        self.ttl_ms = max(1, int(ttl * 1000))
        self._epoch = ""
        self._epoch_checked = 0.0
        self._down_until = 0.0

    async def _prefix(self) -> str:
        now = time.monotonic()
        if not self._epoch or now - self._epoch_checked > EPOCH_CHECK_INTERVAL:
            self._epoch = await read_epoch(self.storage)
            self._epoch_checked = now
        return f"dockyard:{self._epoch}"

    def _available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _failed(self, exc: BaseException) -> None:
        if self._available():
            log.warning(
                "redis is unavailable; answering from storage",
                extra={"fields": {"error": f"{type(exc).__name__}: {exc}"}},
            )
        self._down_until = time.monotonic() + RETRY_AFTER_FAILURE

    async def linked_size(self, name: str, digest: Digest) -> int | None:
        size = await self._linked_size(name, digest)
        m = metrics.active
        if m is not None:  # registry:2's and distribution 3's cache counters
            m.cache_total.labels("Request").inc()
            m.cache_requests.inc()
            if size is None:
                m.cache_total.labels("Miss").inc()
            else:
                m.cache_total.labels("Hit").inc()
                m.cache_hits.inc()
        return size

    async def _linked_size(self, name: str, digest: Digest) -> int | None:
        if not self._available():
            return None
        try:
            prefix = await self._prefix()
            link, blob = await self.client.mget(
                f"{prefix}:link:{name}:{digest}", f"{prefix}:blob:{digest}"
            )
        except Exception as exc:
            self._failed(exc)
            if metrics.active is not None:
                metrics.active.cache_errors.inc()
            return None
        if link is None or blob is None:
            return None
        try:
            return int(blob)
        except ValueError:
            return None

    async def remember(self, name: str, digest: Digest, size: int) -> None:
        if not self._available():
            return
        try:
            prefix = await self._prefix()
            blob, link = f"blob:{digest}", f"link:{name}:{digest}"
            await self._remember(
                keys=[
                    f"{prefix}:{blob}",
                    f"{prefix}:{link}",
                    f"{prefix}:forgotten:{blob}",
                    f"{prefix}:forgotten:{link}",
                ],
                args=[str(size), self.ttl_ms],
            )
        except Exception as exc:
            self._failed(exc)

    async def _delete(self, suffix: str) -> None:
        """Forget an entry, leaving its tombstone (rule 3), or fail: the deletion that called
        this must not go ahead while another instance could still read the entry. (Tried even
        during a pause.)"""
        try:
            prefix = await self._prefix()
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.set(f"{prefix}:forgotten:{suffix}", "1", px=int(FORGOTTEN_TTL * 1000))
                pipe.delete(f"{prefix}:{suffix}")
                await pipe.execute()
        except Exception as exc:
            self._failed(exc)
            raise StorageError(
                f"cannot remove {suffix} from the redis cache, so it is not deleted: {exc}"
            ) from exc

    async def forget_link(self, name: str, digest: Digest) -> None:
        await self._delete(f"link:{name}:{digest}")

    async def forget_blob(self, digest: Digest) -> None:
        await self._delete(f"blob:{digest}")

    async def close(self) -> None:
        try:
            await self.client.aclose()
        except Exception:  # closing a client whose server is gone
            log.debug("closing the redis client failed", exc_info=True)


async def read_epoch(storage: Store) -> str:
    """The store's epoch, created on first use (exactly once, whoever races)."""
    return await read_token(storage, layout.cache_epoch())


async def read_token(storage: Store, path: str) -> str:
    """The random token at ``path`` in the store, written on first use (an exclusive create:
    exactly once, whoever races): the cache's epoch, the metadata index's store id."""
    for _ in range(3):
        try:
            return (await storage.read(path)).decode("ascii", "replace").strip()
        except PathNotFound:
            await storage.write_new(path, secrets.token_hex(8).encode())
    return (await storage.read(path)).decode("ascii", "replace").strip()


def build_cache(config: Config, storage: Store) -> BlobDescriptorCache:
    """Redis when ``storage.cache.blobdescriptor: redis``; otherwise none (see NoCache)."""
    if config.storage.cache.blobdescriptor != "redis":
        return NoCache()
    return RedisCache(
        redis_from_config(config), storage, ttl=config.storage.maintenance.gc.touch_interval
    )


def redis_from_config(config: Config) -> Any:
    """A client for the configured ``redis`` section (``redis.addr`` must be set)."""
    r = config.redis
    return redis_client(
        r.addr,
        r.password,
        r.username,
        r.db,
        socket_connect_timeout=r.dialtimeout,
        socket_timeout=max(r.readtimeout, r.writetimeout),
        max_connections=r.pool.maxactive,
        ssl=r.tls.enabled,
    )


def redis_client(addr: str, password: str, username: str, db: int, **options: Any) -> Any:
    """A redis.asyncio client (connections are made lazily, on the loop that uses them)."""
    import redis.asyncio  # loaded only when Redis is configured

    host, _, port = addr.rpartition(":")
    return redis.asyncio.Redis(
        host=host.strip("[]") or "127.0.0.1",
        port=int(port),
        password=password or None,
        username=username or None,
        db=db,
        **options,
    )
