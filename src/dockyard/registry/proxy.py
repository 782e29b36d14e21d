"""The pull-through cache: proxied repositories, served from an upstream and cached here.

A proxied repository is an ordinary repository of the store (its *canonical* local name, see
upstream/routing.py): what has been fetched is linked there as if it had been pushed, so GC,
``du`` and fsck see it, and expiry only unlinks.

- **By digest** (manifests and blobs) content is immutable: once linked here it is served
  without asking the upstream.
- **Tags** and tag lists are asked of the upstream on every request (a HEAD, which Docker Hub
  does not count as a pull), unless the upstream's ``tagttl`` says a recent answer will do. If
  the upstream is down, throttling or failing, the cached answer is served and marked stale.
- **Blobs** are fetched once, by one process (a lock per digest: ``flock`` on a filesystem, a
  Redis key across instances), written to a private file while the first client receives the
  bytes, verified, and only then published under ``blobs/`` and linked. The last chunk is held
  back until the digest is verified, so a client never receives a whole wrong blob; an upstream
  that sends wrong or short content leaves nothing behind. Others asking meanwhile wait for the
  blob to appear.
- **Isolation**: a blob is served under a proxied name only if it is linked there, or the
  upstream confirms that repository has it; knowing a digest held elsewhere is not enough.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from dockyard import metrics
from dockyard.errors import ErrorCode, RegistryError
from dockyard.oci.digest import Digest, new_hasher
from dockyard.oci.manifest import MAX_MANIFEST_BYTES
from dockyard.oci.mediatypes import DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_INDEX, OCI_MANIFEST
from dockyard.oci.names import validate_tag
from dockyard.proxyconfig import ProxyConfig
from dockyard.registry import layout
from dockyard.registry.blobs import BlobInfo, blob_unknown
from dockyard.registry.listing import Page, page_of
from dockyard.registry.manifests import StoredManifest
from dockyard.registry.repository import Registry, Repository
from dockyard.registry.tags import manifest_unknown
from dockyard.storage.driver import Locks, PathNotFound
from dockyard.storage.store import Store
from dockyard.upstream.client import UpstreamClient, UpstreamError
from dockyard.upstream.routing import Route, Router

log = logging.getLogger("dockyard.proxy")

ACCEPT = ", ".join((OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST))
#: bytes per read from the upstream, and how many reads may wait for a slow first client
CHUNK = 256 * 1024
QUEUE_CHUNKS = 8
#: how often a request waiting for another process's fetch looks again
WAIT_POLL = 0.1
REDIS_LOCK_MS = 30_000
#: an upstream's answer to ``tags/list`` (Docker Hub's longest lists are a few MB)
MAX_TAG_LIST_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Answer:
    """A manifest from the cache; ``stale`` if the upstream could not be asked."""

    manifest: StoredManifest
    stale: bool = False
    #: fetched from the upstream now (a cache miss)
    fetched: bool = False


def upstream_failed(exc: UpstreamError, what: str) -> RegistryError:
    """What a client hears when the upstream failed and nothing cached can answer."""
    if exc.kind == "throttled":
        return RegistryError(
            ErrorCode.TOOMANYREQUESTS,
            f"{exc}; {what} is not cached",
            {"upstream": exc.upstream},
            headers={"Retry-After": str(max(1, round(exc.retry_after)))},
        )
    if exc.kind == "denied":
        return RegistryError(
            ErrorCode.DENIED, f"{exc}; check the upstream's credentials", {"upstream": exc.upstream}
        )
    return RegistryError(
        ErrorCode.UNAVAILABLE, f"{exc}; {what} is not cached", {"upstream": exc.upstream}
    )


class FetchLocks:
    """One fetch per digest: across processes on a filesystem (flock), across instances with
    Redis, else within this process."""

    def __init__(self, storage: Store, redis: Any = None) -> None:
        self.storage = storage
        self.redis = redis
        self._local: set[Digest] = set()

    @contextlib.asynccontextmanager
    async def try_hold(self, digest: Digest) -> AsyncIterator[bool]:
        if digest in self._local:
            yield False
            return
        self._local.add(digest)
        try:
            if self.storage.has(Locks):
                async with self._flock(digest) as taken:
                    yield taken
            elif self.redis is not None:
                async with self._redis(digest) as taken:
                    yield taken
            else:
                yield True
        finally:
            self._local.discard(digest)

    @contextlib.asynccontextmanager
    async def _flock(self, digest: Digest) -> AsyncIterator[bool]:
        path = layout.proxy_fetch_lock(digest)
        with contextlib.suppress(Exception):
            await self.storage.write_new(path, b"")
        lock = self.storage.lock(path)
        assert lock is not None
        taken = lock.acquire()
        try:
            yield taken
        finally:
            if taken:
                lock.release()

    @contextlib.asynccontextmanager
    async def _redis(self, digest: Digest) -> AsyncIterator[bool]:
        from dockyard.registry.upload_locks import _RELEASE, _RENEW

        key, token = f"dockyard:proxy-fetch:{digest}", secrets.token_hex(16)
        try:
            taken = bool(await self.redis.set(key, token, nx=True, px=REDIS_LOCK_MS))
        except Exception as exc:  # Redis down: each instance fetches for itself
            log.warning("fetch lock unavailable: %s: %s", type(exc).__name__, exc)
            yield True
            return

        async def renew() -> None:
            while True:
                await asyncio.sleep(REDIS_LOCK_MS / 3000)
                with contextlib.suppress(Exception):
                    await self.redis.eval(_RENEW, 1, key, token, REDIS_LOCK_MS)

        renewer = asyncio.create_task(renew()) if taken else None
        try:
            yield taken
        finally:
            if renewer is not None:
                renewer.cancel()
                with contextlib.suppress(Exception):
                    await self.redis.eval(_RELEASE, 1, key, token)


class PullThroughCache:
    """Every upstream of the configuration, for one server process (or a CLI command)."""

    def __init__(self, registry: Registry, proxy: ProxyConfig, redis: Any = None) -> None:
        self.registry = registry
        self.router = Router(proxy)
        self.clients = {u.name: UpstreamClient(u) for u in self.router.upstreams}
        self.fetch_locks = FetchLocks(registry.storage, redis)
        #: fetches still filling the cache after their client left
        self._fills: set[asyncio.Task[None]] = set()
        #: fetches under way in this process: requests asking for the same meanwhile wait for
        #: the outcome and share a failure, rather than queue up for an attempt each (one
        #: upstream timeout per request before them, when the upstream hangs)
        self._underway: dict[tuple[str, str, Digest], asyncio.Future[None]] = {}

    async def join(self, key: tuple[str, str, Digest]) -> bool:
        """Wait for this process's fetch of ``key`` (kind, repository, digest) if one is under
        way: True once it succeeded, its exception if it failed; False if there is none."""
        future = self._underway.get(key)
        if future is None:
            return False
        await asyncio.shield(future)
        return True

    def begin(self, key: tuple[str, str, Digest]) -> asyncio.Future[None]:
        future = asyncio.get_running_loop().create_future()
        self._underway[key] = future
        return future

    def end(
        self, key: tuple[str, str, Digest], future: asyncio.Future[None], error: Exception | None
    ) -> None:
        if self._underway.get(key) is future:
            del self._underway[key]
        if future.done():
            return
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)
            future.exception()  # retrieved: nobody may be waiting

    def route(self, name: str, ns: str | None = None) -> Route | None:
        return self.router.route(name, ns)

    def repository(self, route: Route) -> ProxiedRepository:
        return ProxiedRepository(self, route)

    async def close(self) -> None:
        for key, future in list(self._underway.items()):
            self.end(key, future, RegistryError(ErrorCode.UNAVAILABLE, "the server is stopping"))
        for task in list(self._fills):
            task.cancel()
        await asyncio.gather(*self._fills, return_exceptions=True)
        await asyncio.gather(*(c.close() for c in self.clients.values()), return_exceptions=True)


class ProxiedRepository:
    def __init__(self, cache: PullThroughCache, route: Route) -> None:
        self.cache = cache
        self.route = route
        self.upstream = route.upstream
        self.client = cache.clients[route.upstream.name]
        self.local: Repository = cache.registry.repository(route.local_name)
        self.remote = route.remote_name
        self.storage = cache.registry.storage

    # -- manifests ---------------------------------------------------------------------------
    async def manifest(self, reference: str | Digest) -> Answer:
        m = metrics.active
        if m is not None:
            m.proxy_requests.labels("manifest").inc()
        fetched = True  # a failure is a miss too: nothing was served from the cache
        try:
            if isinstance(reference, Digest):
                answer = await self._manifest_by_digest(reference)
            else:
                answer = await self._manifest_by_tag(reference)
            fetched = answer.fetched
            return answer
        finally:
            if m is not None:
                (m.proxy_misses if fetched else m.proxy_hits).labels("manifest").inc()

    async def _manifest_by_digest(self, digest: Digest) -> Answer:
        try:
            return Answer(await self.local.manifests.get(digest))
        except RegistryError as exc:
            if exc.code is not ErrorCode.MANIFEST_UNKNOWN:
                raise
        try:
            return Answer(await self._fetch_manifest(str(digest), digest, []), fetched=True)
        except UpstreamError as exc:
            raise upstream_failed(exc, "this manifest") from None

    async def _manifest_by_tag(self, tag: str) -> Answer:
        if self.upstream.tagttl > 0 and await self._tag_is_fresh(tag):
            return Answer(await self.local.manifests.get(await self.local.tags.resolve(tag)))
        try:
            digest = await self._resolve_upstream(tag)
            if digest is None:
                raise manifest_unknown(tag)
            try:
                stored = await self.local.manifests.get(digest)
            except RegistryError as exc:
                if exc.code is not ErrorCode.MANIFEST_UNKNOWN:
                    raise
                return Answer(await self._fetch_manifest(tag, digest, [tag]), fetched=True)
            if self.upstream.tagttl > 0 or await self._cached_tag(tag) != digest:
                await self.local.tags.tag(tag, digest)  # moved upstream, or confirmed now
            return Answer(stored)
        except UpstreamError as exc:
            where = f"{self.route.local_name}:{tag}"
            try:
                cached = await self.local.tags.resolve(tag)
                stored = await self.local.manifests.get(cached)
            except RegistryError:
                log.warning("%s; %s is not cached", exc, where)
                raise upstream_failed(exc, "this tag") from None
            log.warning("%s; serving the cached tag %s", exc, where)
            return Answer(stored, stale=True)

    async def _cached_tag(self, tag: str) -> Digest | None:
        try:
            return await self.local.tags.resolve(tag)
        except RegistryError:
            return None

    async def _tag_is_fresh(self, tag: str) -> bool:
        try:
            info = await self.storage.stat(layout.tag_current_link(self.route.local_name, tag))
        except PathNotFound:
            return False
        return time.time() - info.modified < self.upstream.tagttl

    async def _resolve_upstream(self, tag: str) -> Digest | None:
        """The digest the upstream's tag points to (a HEAD, as registry:2 does); None if the
        upstream has no such tag."""
        response = await self.client.request(
            "HEAD", self.remote, f"manifests/{tag}", {"Accept": ACCEPT}
        )
        response.release()
        if response.status == 404:
            return None
        header = response.headers.get("Docker-Content-Digest")
        if response.status == 200 and header:
            try:
                return Digest.parse(header)
            except RegistryError:
                pass
        return None if response.status >= 400 else await self._digest_by_get(tag)

    async def _digest_by_get(self, tag: str) -> Digest | None:
        body, _ = await self._get_manifest_body(tag)
        return None if body is None else Digest.from_bytes(body)

    async def _get_manifest_body(self, reference: str) -> tuple[bytes | None, str | None]:
        response = await self.client.request(
            "GET", self.remote, f"manifests/{reference}", {"Accept": ACCEPT}
        )
        try:
            if response.status == 404:
                return None, None
            if response.status != 200:
                raise UpstreamError(
                    self.client.name, "invalid", f"answered {response.status} for a manifest"
                )
            body = await self.client.read_body(response, MAX_MANIFEST_BYTES)
            if body is None:
                raise UpstreamError(self.client.name, "invalid", "sent an oversized manifest")
            return body, response.headers.get("Content-Type")
        finally:
            response.release()

    async def _fetch_manifest(
        self, reference: str, digest: Digest, tags: list[str]
    ) -> StoredManifest:
        """The manifest, fetched once however many ask for it at the same time (the others
        wait for it, as for a blob, and share its failure), and tagged."""
        key = ("manifest", self.route.local_name, digest)
        while await self.cache.join(key):
            try:
                stored = await self.local.manifests.get(digest)
            except RegistryError as exc:
                if exc.code is not ErrorCode.MANIFEST_UNKNOWN:
                    raise
                continue
            for tag in tags:
                await self.local.tags.tag(tag, digest)
            return stored
        outcome = self.cache.begin(key)
        try:
            stored = await self._fetch_manifest_locked(reference, digest, tags)
        except BaseException as exc:
            shared = exc if isinstance(exc, RegistryError | UpstreamError) else None
            self.cache.end(
                key,
                outcome,
                shared
                or UpstreamError(self.client.name, "unavailable", "the fetch was interrupted"),
            )
            raise
        self.cache.end(key, outcome, None)
        return stored

    async def _fetch_manifest_locked(
        self, reference: str, digest: Digest, tags: list[str]
    ) -> StoredManifest:
        """Fetch under the lock, or wait for the process that holds it."""
        while True:
            async with self.cache.fetch_locks.try_hold(digest) as taken:
                try:
                    stored = await self.local.manifests.get(digest)
                except RegistryError as exc:
                    if exc.code is not ErrorCode.MANIFEST_UNKNOWN:
                        raise
                    if taken:
                        return await self._fetch_manifest_now(reference, digest, tags)
                else:
                    for tag in tags:
                        await self.local.tags.tag(tag, digest)
                    return stored
            await asyncio.sleep(WAIT_POLL)  # another request is fetching it: wait for it

    async def _fetch_manifest_now(
        self, reference: str, digest: Digest, tags: list[str]
    ) -> StoredManifest:
        """Fetch by digest, verify, store."""
        body, content_type = await self._get_manifest_body(str(digest))
        if body is None:
            raise manifest_unknown(reference)
        if Digest.from_bytes(body, digest.algorithm) != digest:
            raise RegistryError(
                ErrorCode.MANIFEST_INVALID,
                "the upstream sent a manifest that does not match its digest; nothing was cached",
                {"digest": str(digest), "upstream": self.client.name},
                status=502,
            )
        # Sparse: an index's children and an image's blobs arrive when they are asked for.
        await self.local.manifests.put(body, content_type, digest, tags, sparse=True, quota=False)
        # The manifest's layer link records when it was fetched (its revision link is stamped
        # whenever it is used): expiry counts from it (registry.proxy_expiry).
        await self.local.blobs.link(digest)
        return await self.local.manifests.get(digest)

    # -- tags --------------------------------------------------------------------------------
    async def tags(self, n: int | None, last: str | None) -> tuple[Page, bool]:
        """A page of tags from the upstream; the cached ones (stale=True) if it fails."""
        query = {k: str(v) for k, v in (("n", n), ("last", last)) if v is not None}
        try:
            response = await self.client.request("GET", self.remote, "tags/list", query=query)
            try:
                if response.status == 404:
                    raise RegistryError(ErrorCode.NAME_UNKNOWN, detail={"name": self.remote})
                if response.status != 200:
                    raise UpstreamError(self.client.name, "invalid", f"{response.status}")
                raw = await self.client.read_body(response, MAX_TAG_LIST_BYTES)
                more = "next" in response.headers.get("Link", "")
            finally:
                response.release()
            if raw is None:
                raise UpstreamError(self.client.name, "invalid", "sent an oversized tag list")
            try:
                tags = json.loads(raw).get("tags") or []
            except (ValueError, AttributeError):
                tags = None
            if not isinstance(tags, list):
                raise UpstreamError(self.client.name, "invalid", "sent a malformed tag list")
            return Page([t for t in tags if _is_tag(t)], more), False
        except UpstreamError as exc:
            cached = await self.local.tags.all()
            if not cached and not await self.local.exists():
                log.warning("%s; %s is not cached", exc, self.route.local_name)
                raise upstream_failed(exc, "this repository") from None
            log.warning("%s; serving the cached tags of %s", exc, self.route.local_name)
            return page_of(cached, n, last), True

    # -- referrers ---------------------------------------------------------------------------
    async def referrers(
        self, subject: Digest, artifact_type: str | None
    ) -> tuple[list[dict[str, Any]], bool] | None:
        """The upstream's referrers of ``subject`` (descriptors, and whether it applied the
        artifactType filter); None when it cannot tell (no referrers API, unreachable): the
        cached referrers answer then. A referrer is fetched and cached when it is pulled."""
        query = {"artifactType": artifact_type} if artifact_type is not None else None
        try:
            response = await self.client.request(
                "GET", self.remote, f"referrers/{subject}", query=query
            )
        except UpstreamError as exc:
            log.warning("%s; serving the cached referrers of %s", exc, subject)
            return None
        try:
            if response.status != 200:
                return None
            raw = await self.client.read_body(response, MAX_MANIFEST_BYTES)
            filtered = "artifactType" in response.headers.get("OCI-Filters-Applied", "")
        except UpstreamError:
            return None
        finally:
            response.release()
        try:
            manifests = json.loads(raw).get("manifests") if raw is not None else None
        except (ValueError, AttributeError):
            manifests = None
        if not isinstance(manifests, list) or not all(isinstance(m, dict) for m in manifests):
            return None
        return [_descriptor(m) for m in manifests if _descriptor(m)], filtered

    # -- blobs -------------------------------------------------------------------------------
    async def cached_blob(self, digest: Digest) -> BlobInfo | None:
        """The blob if this repository may serve it from the cache now: linked here, or held in
        the store and confirmed by the upstream for this repository (then linked)."""
        try:
            return await self.local.blobs.stat(digest)
        except RegistryError as exc:
            if exc.code is not ErrorCode.BLOB_UNKNOWN:
                raise
        if not await self.cache.registry.blobs.exists(digest):
            return None
        if await self.remote_blob_size(digest) is None:
            raise blob_unknown(digest)
        await self.local.blobs.link(digest)
        return await self.local.blobs.stat(digest)

    async def remote_blob_size(self, digest: Digest) -> int | None:
        """Size of the upstream's blob (HEAD), -1 if it did not say; None if it has none in
        this repository."""
        try:
            response = await self.client.request("HEAD", self.remote, f"blobs/{digest}")
        except UpstreamError as exc:
            raise upstream_failed(exc, "this blob") from None
        response.release()
        if response.status != 200:
            return None
        return -1 if response.content_length is None else response.content_length

    async def fetch(self, digest: Digest) -> BlobFetch | BlobInfo:
        """Start fetching the blob, or (if another request fetched it meanwhile) the cached
        blob. BLOB_UNKNOWN if the upstream does not have it. A fetch already under way in
        this process is waited for, and its failure is this request's."""
        key = ("blob", self.route.local_name, digest)
        while True:
            info = await self.cached_blob(digest)
            if info is not None:
                return info
            if not await self.cache.join(key):
                break
        outcome = self.cache.begin(key)
        try:
            fetched = await self._fetch_locked(digest)
        except BaseException as exc:
            error = exc if isinstance(exc, RegistryError) else _interrupted(digest)
            self.cache.end(key, outcome, error)
            raise
        if isinstance(fetched, BlobInfo):
            self.cache.end(key, outcome, None)
        else:

            def finished(done: asyncio.Future[None]) -> None:
                error = _interrupted(digest) if done.cancelled() else done.exception()
                self.cache.end(key, outcome, error if isinstance(error, Exception) else None)

            fetched.done.add_done_callback(finished)
        return fetched

    async def _fetch_locked(self, digest: Digest) -> BlobFetch | BlobInfo:
        """Take the lock and start the fetch, or wait for the process that holds it."""
        while True:
            info = await self.cached_blob(digest)
            if info is not None:
                return info
            hold = self.cache.fetch_locks.try_hold(digest)
            taken = await hold.__aenter__()
            if taken:
                try:
                    info = await self.cached_blob(digest)  # finished just before we locked
                    if info is not None:
                        await hold.__aexit__(None, None, None)
                        return info
                    fetch = BlobFetch(self, digest, hold)
                    await fetch.start()
                    return fetch
                except BaseException as exc:
                    await hold.__aexit__(type(exc), exc, exc.__traceback__)
                    raise
            await hold.__aexit__(None, None, None)
            await asyncio.sleep(WAIT_POLL)  # another process is fetching it: wait for it


class BlobFetch:
    """One blob on its way from the upstream into the cache, and to the first client.

    A task reads the upstream and writes a private file; the first client reads along through a
    bounded queue (its pace holds the fetch back, so memory stays bounded). If the client goes
    away, or takes nothing for half the upstream's ``timeout`` (its response is then cut short), the
    fetch carries on without it: a stalled client must not hold the blob back from the others.
    The last chunk reaches the client only after the digest is verified; then the file is
    published under ``blobs/`` (never replacing a blob) and linked in the repository."""

    _END = b""

    def __init__(self, repo: ProxiedRepository, digest: Digest, hold: Any) -> None:
        self.repo = repo
        self.digest = digest
        self._hold = hold
        self.size: int | None = None
        self._queue: asyncio.Queue[bytes | BaseException] = asyncio.Queue(QUEUE_CHUNKS)
        self._listening = True
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._response: Any = None

    async def start(self) -> None:
        """Ask the upstream for the blob (BLOB_UNKNOWN if it has none), then fill in the
        background."""
        repo = self.repo
        try:
            response = await repo.client.request("GET", repo.remote, f"blobs/{self.digest}")
        except UpstreamError as exc:
            raise upstream_failed(exc, "this blob") from None
        if response.status != 200:
            response.release()
            if response.status == 404:
                raise blob_unknown(self.digest)
            raise upstream_failed(
                UpstreamError(repo.client.name, "invalid", f"answered {response.status}"),
                "this blob",
            )
        self.size = response.content_length
        self._response = response
        task = asyncio.create_task(self._fill())
        repo.cache._fills.add(task)
        task.add_done_callback(repo.cache._fills.discard)

    async def chunks(self) -> AsyncIterator[bytes]:
        """The blob's bytes for the first client. Raises if the fetch fails (the response is
        then cut short: the client sees an error, never a complete wrong blob)."""
        try:
            while True:
                item = await self._queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item is self._END or item == b"":
                    return
                yield item
        finally:
            self.detach()

    def detach(self) -> None:
        """The client is gone: the fetch goes on into the cache alone."""
        self._listening = False
        while not self._queue.empty():
            self._queue.get_nowait()

    async def _give(self, item: bytes) -> None:
        if not self._listening:
            return
        # Half the upstream's read timeout: while the client holds the fetch back, nothing is
        # read from the upstream, which must not time out because of it.
        patience = self.repo.upstream.timeout / 2
        try:
            async with asyncio.timeout(patience or None):
                await self._queue.put(item)
        except TimeoutError:
            log.warning(
                "fetching %s for %s: the client took nothing for %g s; going on without it",
                self.digest,
                self.repo.route.local_name,
                patience,
            )
            self._tell(RegistryError(ErrorCode.UNAVAILABLE, "the client stopped reading the blob"))

    def _tell(self, error: RegistryError) -> None:
        """Make ``error`` the next thing the client takes (what is queued before it is of no
        use now), and feed it nothing more."""
        if self._listening:
            self._listening = False
            while not self._queue.empty():
                self._queue.get_nowait()
            self._queue.put_nowait(error)

    async def _fill(self) -> None:
        repo, digest = self.repo, self.digest
        storage = repo.storage
        incoming = layout.proxy_incoming(secrets.token_hex(16))
        hasher = new_hasher(digest.algorithm)
        received = 0
        writer = None
        held: bytes | None = None

        loop = asyncio.get_running_loop()
        pending: asyncio.Future[Any] | None = None

        async def absorb(chunk: bytes) -> None:
            """Write and hash one chunk at once, on worker threads (hashlib lets go of the
            GIL): the upstream's chunks are large enough to need no gathering (registry.pump
            gathers a request body's small ones)."""
            assert writer is not None
            await asyncio.gather(
                writer.write(chunk), loop.run_in_executor(None, hasher.update, chunk)
            )
            if metrics.active is not None:
                metrics.active.proxy_pulled_bytes.labels("blob").inc(len(chunk))

        try:
            writer = await storage.writer(incoming)
            # One chunk is written and hashed while the next is read and the previous one
            # goes to the client: the last one only when the digest is verified.
            try:
                async for chunk in self._response.content.iter_any():
                    received += len(chunk)
                    if self.size is not None and received > self.size:
                        raise _bad_blob(digest, "sent more bytes than it announced")
                    if held is not None:
                        await self._give(held)
                    held = chunk
                    if pending is not None:
                        await pending
                    pending = asyncio.ensure_future(absorb(chunk))
                if pending is not None:
                    await pending
            finally:
                if pending is not None and not pending.done():
                    with contextlib.suppress(BaseException):
                        await asyncio.shield(pending)
            if self.size is not None and received != self.size:
                raise _bad_blob(digest, f"sent {received} of {self.size} bytes")
            if hasher.hexdigest() != digest.hex:
                raise _bad_blob(digest, "sent content that does not match the digest")
            await writer.close()
            writer = None
            if not await repo.cache.registry.blobs.publish(incoming, digest):
                await storage.delete_if_present(incoming)  # someone else's copy is as good
                await repo.cache.registry.blobs.keep(digest)
            await repo.local.blobs.link(digest)
            if held is not None:
                await self._give(held)
            await self._give(self._END)
            log.info("cached %s in %s (%d bytes)", digest, repo.route.local_name, received)
            self.done.set_result(None)
        except BaseException as exc:
            error = exc if isinstance(exc, RegistryError) else _upstream_broke(repo, exc)
            if writer is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(writer.abort())
            with contextlib.suppress(Exception):
                await asyncio.shield(storage.delete_if_present(incoming))
            log.warning("fetching %s for %s failed: %s", digest, repo.route.local_name, error)
            self._tell(error)  # even if the queue is full: a slow client must hear of it
            if not self.done.done():
                self.done.set_exception(error)
                self.done.exception()  # retrieved: nobody may be waiting
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            self._response.release()
            await self._hold.__aexit__(None, None, None)


def _is_tag(value: object) -> bool:
    """A valid tag name: what an upstream lists is passed on only if it is one."""
    if not isinstance(value, str):
        return False
    try:
        validate_tag(value)
    except RegistryError:
        return False
    return True


_DESCRIPTOR_FIELDS = ("mediaType", "digest", "size", "artifactType", "annotations")


def _descriptor(raw: dict[str, Any]) -> dict[str, Any]:
    """An upstream's descriptor, passed on with only the fields a referrers index has, and only
    if its digest and size are well formed (the upstream is not trusted either)."""
    try:
        Digest.parse(str(raw.get("digest")))
    except RegistryError:
        return {}
    if not isinstance(raw.get("size"), int) or not isinstance(raw.get("mediaType"), str):
        return {}
    return {k: raw[k] for k in _DESCRIPTOR_FIELDS if k in raw}


def _interrupted(digest: Digest) -> RegistryError:
    return RegistryError(
        ErrorCode.UNAVAILABLE,
        "fetching the blob from the upstream was interrupted",
        {"digest": str(digest)},
    )


def _bad_blob(digest: Digest, reason: str) -> RegistryError:
    return RegistryError(
        ErrorCode.BLOB_UNKNOWN,
        f"the upstream {reason}; nothing was cached",
        {"digest": str(digest)},
        status=502,
    )


def _upstream_broke(repo: ProxiedRepository, exc: BaseException) -> RegistryError:
    return upstream_failed(
        UpstreamError(repo.client.name, "unavailable", f"{type(exc).__name__}: {exc}"),
        "this blob",
    )
