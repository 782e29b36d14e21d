"""The Redis blob descriptor cache (registry/cache.py) on a real redis-server: it answers from
Redis only what storage confirmed, forgets before every deletion, ignores entries of a wiped
store, and degrades to storage when Redis is flushed or gone."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_model import digest_of, upload

from dockyard.errors import RegistryError
from dockyard.oci.digest import Digest
from dockyard.registry import layout
from dockyard.registry.cache import RedisCache, redis_client
from dockyard.registry.gc import GarbageCollector
from dockyard.registry.repository import Registry
from dockyard.storage.driver import StorageError
from dockyard.storage.filesystem import FilesystemDriver
from dockyard.storage.store import Store
from harness import free_port


def cached_registry(root: Path, addr: str, ttl: float = 3600) -> Registry:
    storage = Store(FilesystemDriver(str(root), max_threads=4))
    cache = RedisCache(redis_client(addr, "", "", 0, socket_timeout=1), storage, ttl=ttl)
    return Registry(storage, secret="s", delete_enabled=True, cache=cache)


@pytest.fixture
def redis_db(redis_addr: str) -> Iterator[str]:
    from harness import flush_redis

    flush_redis(redis_addr)
    yield redis_addr
    flush_redis(redis_addr)


def keys(addr: str) -> list[str]:
    import redis

    host, port = addr.rsplit(":", 1)
    return sorted(k.decode() for k in redis.Redis(host=host, port=int(port)).keys("*"))


def test_storage_fills_the_cache_and_answers_come_from_it(tmp_path: Path, redis_db: str) -> None:
    registry = cached_registry(tmp_path, redis_db)

    async def go() -> None:
        d = await upload(registry, "app", b"layer bytes")
        assert keys(redis_db) == []  # an upload does not fill it: only a confirmed read does
        info = await registry.repository("app").blobs.stat(d)
        assert info.size == len(b"layer bytes")
        found = keys(redis_db)
        assert len(found) == 2 and any(f":link:app:{d}" in k for k in found)
        # The answer now comes from Redis: no storage read of the link (moved away to prove it).
        link = tmp_path / layout.layer_link("app", d).lstrip("/")
        link.rename(tmp_path / "elsewhere")
        assert (await registry.repository("app").blobs.stat(d)).size == info.size
        link.parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "elsewhere").rename(link)
        # Another repository never gets an answer from app's entry.
        with pytest.raises(RegistryError):
            await registry.repository("other").blobs.stat(d)

    asyncio.run(go())


def test_deletions_forget_first(
    tmp_path: Path, redis_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unlink and a collection's removals drop the cache entry before they touch storage:
    whenever storage is asked to delete or move anything of the blob, Redis no longer answers
    for it."""
    registry = cached_registry(tmp_path, redis_db, ttl=3600)
    cache = registry.blobs.cache
    watched: list[Digest] = []
    answered: list[tuple[str, int | None]] = []  # (operation, what the cache said meanwhile)
    for operation in ("delete", "delete_if_present", "move"):

        async def watch(*args: Any, _operation: str = operation, **kwargs: Any) -> Any:
            for digest in watched:
                if any(digest.hex in str(arg) for arg in args):
                    answered.append((_operation, await cache.linked_size("app", digest)))
            return await getattr(Store, _operation)(registry.storage, *args, **kwargs)

        monkeypatch.setattr(registry.storage, operation, watch)

    async def go() -> None:
        d = await upload(registry, "app", b"to be unlinked")
        blobs = registry.repository("app").blobs
        await blobs.stat(d)
        assert await cache.linked_size("app", d) is not None
        watched.append(d)
        await blobs.unlink(d)
        assert answered and all(size is None for _, size in answered), answered
        with pytest.raises(RegistryError):
            await blobs.stat(d)

        # Garbage collection: an unreferenced, old blob is swept and forgotten.
        kept = await upload(registry, "app", b"swept by gc")
        await blobs.stat(kept)
        assert await cache.linked_size("app", kept) is not None
        await registry.storage.touch(layout.blob_data(kept))
        old = time.time() - 10 * 86400
        data = tmp_path / layout.blob_data(kept).lstrip("/")
        link = tmp_path / layout.layer_link("app", kept).lstrip("/")
        for path in (data, link):
            os.utime(path, (old, old))
        watched[:], answered[:] = [kept], []
        report = await GarbageCollector(
            registry.storage, grace=60, touch_interval=15, cache=registry.blobs.cache
        ).run()
        assert report.blobs_removed >= 1
        assert answered and all(size is None for _, size in answered), answered
        with pytest.raises(RegistryError):
            await blobs.stat(kept)

    asyncio.run(go())


def test_a_wiped_store_never_sees_old_entries(tmp_path: Path, redis_db: str) -> None:
    first = cached_registry(tmp_path / "one", redis_db)

    async def fill() -> Digest:
        d = await upload(first, "app", b"was here")
        await first.repository("app").blobs.stat(d)
        return d

    d = asyncio.run(fill())
    shutil.rmtree(tmp_path / "one")  # storage reset under a Redis that still holds entries
    second = cached_registry(tmp_path / "one", redis_db)

    async def look() -> None:
        with pytest.raises(RegistryError):
            await second.repository("app").blobs.stat(d)

    asyncio.run(look())


@pytest.mark.slow
def test_flushed_or_unreachable_redis_degrades_to_storage(tmp_path: Path, redis_db: str) -> None:
    from harness import flush_redis

    registry = cached_registry(tmp_path, redis_db)

    async def go() -> None:
        d = await upload(registry, "app", b"still served")
        await registry.repository("app").blobs.stat(d)
        flush_redis(redis_db)
        assert (await registry.repository("app").blobs.stat(d)).size == len(b"still served")

    asyncio.run(go())

    dead = cached_registry(tmp_path, f"127.0.0.1:{free_port()}")

    async def without_redis() -> None:
        d = digest_of(b"still served")
        started = time.monotonic()
        for _ in range(20):
            assert (await dead.repository("app").blobs.stat(d)).size == len(b"still served")
        assert time.monotonic() - started < 5  # one failed connect, then a pause, not 20
        d2 = await upload(dead, "app", b"pushed while redis is down")
        assert (await dead.repository("app").blobs.stat(d2)).size > 0
        # A deletion that cannot reach Redis does not happen.
        with pytest.raises(StorageError):
            await dead.repository("app").blobs.unlink(d2)
        assert await dead.repository("app").blobs.is_linked(d2)

    asyncio.run(without_redis())


def test_a_reader_racing_a_deletion_cannot_cache_it_again(tmp_path: Path, redis_db: str) -> None:
    """A reader that confirmed the link and the blob in storage just before they were deleted
    writes its entry just after the deletion forgot them: the tombstone the deletion left keeps
    the entry out (an immediate collection looks at no stamps, so nothing else would)."""
    registry = cached_registry(tmp_path, redis_db, ttl=3600)

    async def go() -> None:
        blobs = registry.repository("app").blobs
        cache = registry.blobs.cache
        d = await upload(registry, "app", b"confirmed, then deleted")
        size = (await blobs.stat(d)).size  # the reader's storage check...
        await cache.forget_blob(d)  # ...the collector forgets and deletes...
        await registry.storage.delete(layout.blob_data(d))
        await cache.remember("app", d, size)  # ...and the reader writes its entry late
        assert await cache.linked_size("app", d) is None
        with pytest.raises(RegistryError):
            await blobs.stat(d)
        # The same for a link removed while its blob stays (an unlink).
        other = await upload(registry, "app", b"unlinked")
        size = (await blobs.stat(other)).size
        await blobs.unlink(other)
        await cache.remember("app", other, size)
        assert await cache.linked_size("app", other) is None
        # Other blobs are cached as before.
        third = await upload(registry, "app", b"untouched")
        await blobs.stat(third)
        assert await cache.linked_size("app", third) == len(b"untouched")

    asyncio.run(go())


def test_an_immediate_collection_forgets_what_it_deletes(tmp_path: Path, redis_db: str) -> None:
    """Cached a moment ago, so neither the entry nor the blob's stamp is old: an immediate
    collection still takes the blob, and Redis no longer answers for it."""
    registry = cached_registry(tmp_path, redis_db, ttl=3600)

    async def go() -> None:
        blobs = registry.repository("app").blobs
        d = await upload(registry, "app", b"unreferenced, cached")
        await blobs.stat(d)
        assert await registry.blobs.cache.linked_size("app", d) is not None
        report = await GarbageCollector(
            registry.storage,
            grace=0,
            touch_interval=3600,
            cache=registry.blobs.cache,
            immediate=True,
        ).run()
        assert report.blobs_removed == 1
        assert await registry.blobs.cache.linked_size("app", d) is None
        with pytest.raises(RegistryError):
            await blobs.stat(d)

    asyncio.run(go())
