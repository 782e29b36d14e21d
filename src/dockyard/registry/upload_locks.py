"""One request at a time per upload session, where that is cheap to know.

A second PATCH while one is in flight, or a PUT (or DELETE) during a PATCH, is answered at once
with 400 BLOB_UPLOAD_INVALID instead of racing. This is a courtesy to clients, not what keeps
data safe: the upload model (registry/uploads.py) stays correct with any number of concurrent
requests on one session, so a lock that is lost (Redis flushed, a holder that stalls) can only
make a racing request fail later instead of at once.

- Filesystem: an ``flock`` on the session's ``startedat`` file, held for the request. The kernel
  drops it when the request's descriptor closes or its process dies, so it cannot outlive its
  holder; it covers every worker on the host (and hosts sharing an NFS store with lock support).
- S3 with Redis (``redis.addr``): a key set with NX and a 30 s expiry, renewed every 10 s while
  the request runs and deleted (if still ours) at its end; covers every instance.
- S3 without Redis: none.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Protocol

from dockyard.errors import ErrorCode, RegistryError
from dockyard.registry import layout
from dockyard.storage.driver import Locks, PathNotFound
from dockyard.storage.store import Store

if TYPE_CHECKING:
    from dockyard.config import Config

log = logging.getLogger("dockyard.uploads")

#: Redis lock lifetime and renewal period (milliseconds / seconds)
REDIS_LOCK_MS = 30_000
REDIS_RENEW_SECONDS = 10.0

_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""


def upload_busy(upload_id: str) -> RegistryError:
    return RegistryError(
        ErrorCode.BLOB_UPLOAD_INVALID,
        "another request on this upload is still in progress; retry when it has finished",
        {"id": upload_id},
    )


class UploadLocks(Protocol):
    #: the Redis connection when the locks are Redis keys (the pull-through cache's fetch locks
    #: share it), else None
    redis_client: Any

    def hold(self, name: str, upload_id: str) -> contextlib.AbstractAsyncContextManager[None]:
        """Hold the session for one request; raise 400 BLOB_UPLOAD_INVALID if another request
        holds it, BLOB_UPLOAD_UNKNOWN if the session does not exist (where that is known)."""
        ...

    async def close(self) -> None: ...


class NoUploadLocks:
    redis_client = None

    @contextlib.asynccontextmanager
    async def hold(self, name: str, upload_id: str) -> AsyncIterator[None]:
        yield

    async def close(self) -> None:
        return None


class FileUploadLocks:
    redis_client = None

    def __init__(self, storage: Store) -> None:
        self.storage = storage

    @contextlib.asynccontextmanager
    async def hold(self, name: str, upload_id: str) -> AsyncIterator[None]:
        lock = self.storage.lock(layout.upload_started_at(name, upload_id))
        if lock is None:
            yield
            return
        try:
            taken = lock.acquire()
        except PathNotFound:
            raise RegistryError(ErrorCode.BLOB_UPLOAD_UNKNOWN, detail={"id": upload_id}) from None
        if not taken:
            raise upload_busy(upload_id)
        try:
            yield
        finally:
            lock.release()

    async def close(self) -> None:
        return None


class RedisUploadLocks:
    def __init__(self, client: Any) -> None:
        self.client = client
        self.redis_client = client

    @contextlib.asynccontextmanager
    async def hold(self, name: str, upload_id: str) -> AsyncIterator[None]:
        key = f"dockyard:upload-lock:{name}:{upload_id}"
        token = secrets.token_hex(16)
        try:
            taken = await self.client.set(key, token, nx=True, px=REDIS_LOCK_MS)
        except Exception as exc:  # Redis down: serve unserialised (safety does not need it)
            log.warning("upload lock unavailable: %s: %s", type(exc).__name__, exc)
            yield
            return
        if not taken:
            raise upload_busy(upload_id)
        renewer = asyncio.create_task(self._renew(key, token))
        try:
            yield
        finally:
            renewer.cancel()
            with contextlib.suppress(BaseException):
                await renewer
            with contextlib.suppress(Exception):
                await self.client.eval(_RELEASE, 1, key, token)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.client.aclose()

    async def _renew(self, key: str, token: str) -> None:
        while True:
            await asyncio.sleep(REDIS_RENEW_SECONDS)
            with contextlib.suppress(Exception):
                await self.client.eval(_RENEW, 1, key, token, REDIS_LOCK_MS)


def build_upload_locks(config: Config, storage: Store) -> UploadLocks:
    """flock where the storage has files; Redis where it is configured; else none."""
    if storage.has(Locks):
        return FileUploadLocks(storage)
    if config.redis.addr:
        from dockyard.registry.cache import redis_client

        r = config.redis
        client = redis_client(
            r.addr,
            r.password,
            r.username,
            r.db,
            socket_connect_timeout=r.dialtimeout,
            socket_timeout=max(r.readtimeout, r.writetimeout),
            max_connections=r.pool.maxactive,
            ssl=r.tls.enabled,
        )
        return RedisUploadLocks(client)
    return NoUploadLocks()
