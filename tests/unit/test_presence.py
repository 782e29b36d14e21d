"""Server presences and the handshake with an immediate garbage collection
(registry/presence.py, heartbeat.py), step by step on a filesystem driver: whichever of a
starting writable server and an immediate collector goes second sees the other."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dockyard.heartbeat import Heartbeat
from dockyard.registry import layout
from dockyard.registry.cache import redis_client
from dockyard.registry.lease import Lease
from dockyard.registry.presence import (
    GC_LEASE,
    IMMEDIATE,
    ImmediateCollectionRefused,
    Presence,
    PresenceRecords,
    check_immediate,
    immediate_collection,
    new_presence,
    stale_after,
)
from dockyard.storage.driver import StorageError
from dockyard.storage.filesystem import FilesystemDriver
from dockyard.storage.store import Store
from harness import free_port


def writable(interval: float = 15.0, cache: str = "none") -> Presence:
    return new_presence("writable", "127.0.0.1:5000", interval, cache)


def read_only(interval: float = 15.0, cache: str = "none") -> Presence:
    return new_presence("read-only", "127.0.0.1:5001", interval, cache)


async def collector_check(records: PresenceRecords, cache_kind: str = "none") -> None:
    """What an immediate collector does once its marker is written: read the presences, refuse
    if a writable server is alive."""
    check_immediate(await records.sightings(time.time()), cache_kind)


def test_a_writable_server_seeing_the_marker_refuses_writes_until_it_is_gone(
    tmp_path: Path,
) -> None:
    storage = Store(FilesystemDriver(str(tmp_path), max_threads=4))
    records = PresenceRecords(storage)

    async def go() -> None:
        marker = Lease(storage, GC_LEASE, purpose=IMMEDIATE)
        await marker.acquire()  # the collection began first
        server = Heartbeat(records, writable(interval=0.5))
        await server.beat()
        assert (tmp_path / layout.instance(server.presence.id).lstrip("/")).is_file()
        assert not server.accepting_writes()
        await marker.release()  # the collection ended
        await server.beat()
        assert server.accepting_writes()
        # An online collection's lease holds nothing back...
        async with Lease(storage, GC_LEASE):
            await server.beat()
            assert server.accepting_writes()
        # ...nor the marker of an immediate collector that died long ago (it expired).
        lease = tmp_path / layout.lease(GC_LEASE).lstrip("/")
        lease.write_text(
            json.dumps({"holder": "dead:1", "expires": time.time() - 1, "purpose": IMMEDIATE})
        )
        await server.beat()
        assert server.accepting_writes()
        await storage.close()

    asyncio.run(go())


def test_whichever_goes_second_sees_the_other(tmp_path: Path) -> None:
    storage = Store(FilesystemDriver(str(tmp_path), max_threads=4))
    records = PresenceRecords(storage)

    async def go() -> None:
        # The server first (its presence, then no marker): the collector refuses.
        server = Heartbeat(records, writable())
        await server.beat()
        assert server.accepting_writes()
        marker = Lease(storage, GC_LEASE, purpose=IMMEDIATE)
        await marker.acquire()
        with pytest.raises(ImmediateCollectionRefused):
            await collector_check(records)
        await marker.release()
        await server.stop()  # withdraws its record

        # Interleaved: the server's presence, the collector's marker, the collector's look,
        # the server's look. Both see the other; both hold back.
        late = Heartbeat(records, writable())
        await records.write(late.presence)
        await marker.acquire()
        with pytest.raises(ImmediateCollectionRefused):
            await collector_check(records)
        assert await immediate_collection(storage) is not None
        await marker.release()
        await late.stop()

        # The collector first: it finds nobody; the server then finds the marker.
        await marker.acquire()
        await collector_check(records)
        starting = Heartbeat(records, writable())
        await starting.beat()
        assert not starting.accepting_writes()
        await marker.release()
        await storage.close()

    asyncio.run(go())


def test_permission_to_write_runs_out_without_a_refresh(tmp_path: Path) -> None:
    storage = Store(FilesystemDriver(str(tmp_path), max_threads=4))

    async def go() -> None:
        server = Heartbeat(PresenceRecords(storage), writable(interval=0.1))
        assert not server.accepting_writes()  # nothing recorded yet
        await server.beat()
        assert server.accepting_writes()
        await asyncio.sleep(0.25)  # two intervals: long before its record would count as dead
        assert not server.accepting_writes()
        assert stale_after(server.presence) > 0.25
        await storage.close()

    asyncio.run(go())


def test_stale_and_read_only_records_do_not_block(tmp_path: Path) -> None:
    storage = Store(FilesystemDriver(str(tmp_path), max_threads=4))
    records = PresenceRecords(storage)

    async def go() -> None:
        dead = writable(interval=1.0)
        await records.write(dead)
        record = tmp_path / layout.instance(dead.id).lstrip("/")
        old = time.time() - stale_after(dead) - 1
        os.utime(record, (old, old))  # a kill -9: never refreshed, never withdrawn
        await records.write(read_only())
        sightings = await records.sightings(time.time())
        assert {s.presence.id: s.alive for s in sightings}[dead.id] is False
        await collector_check(records)
        # The same record refreshed a moment ago blocks.
        await records.write(dead)
        with pytest.raises(ImmediateCollectionRefused):
            await collector_check(records)
        await storage.close()

    asyncio.run(go())


def test_refusal_names_the_servers_and_says_how_to_proceed(tmp_path: Path) -> None:
    storage = Store(FilesystemDriver(str(tmp_path), max_threads=4))
    records = PresenceRecords(storage)

    async def go() -> None:
        server = writable()
        await records.write(server)
        await records.write(read_only())
        with pytest.raises(ImmediateCollectionRefused) as refused:
            await collector_check(records)
        message = str(refused.value)
        assert [s.presence.id for s in refused.value.sightings] == [server.id]
        assert f"writable server on {server.host}" in message
        assert f"pid {server.pid}" in message and "127.0.0.1:5000" in message
        assert "127.0.0.1:5001" not in message  # read-only servers may keep serving
        assert "storage.maintenance.readonly.enabled: true" in message
        assert "REGISTRY_STORAGE_MAINTENANCE_READONLY_ENABLED=true" in message
        await storage.close()

    asyncio.run(go())


def test_servers_caching_in_redis_need_a_collector_that_forgets_there(tmp_path: Path) -> None:
    storage = Store(FilesystemDriver(str(tmp_path), max_threads=4))
    records = PresenceRecords(storage)

    async def go() -> None:
        await records.write(read_only(cache="redis"))
        with pytest.raises(ImmediateCollectionRefused) as refused:
            await collector_check(records, cache_kind="none")
        assert "storage.cache.blobdescriptor: redis" in str(refused.value)
        await collector_check(records, cache_kind="redis")
        await storage.close()

    asyncio.run(go())


@pytest.fixture
def redis_db(redis_addr: str) -> Iterator[str]:
    from harness import flush_redis

    flush_redis(redis_addr)
    yield redis_addr
    flush_redis(redis_addr)


def test_presences_in_redis_count_too(tmp_path: Path, redis_db: str) -> None:
    storage = Store(FilesystemDriver(str(tmp_path), max_threads=4))

    async def go() -> None:
        client = redis_client(redis_db, "", "", 0, socket_timeout=2)
        records = PresenceRecords(storage, client)
        server = Heartbeat(records, writable(interval=1.0))
        await server.beat()
        # Found in Redis alone (its storage record lost), it still counts.
        await storage.delete(layout.instance(server.presence.id))
        sightings = await records.sightings(time.time())
        assert [(s.presence.id, s.age, s.alive) for s in sightings] == [
            (server.presence.id, None, True)
        ]
        with pytest.raises(ImmediateCollectionRefused):
            await collector_check(records)
        await server.stop()  # withdrawn from both
        assert await records.sightings(time.time()) == []
        # A configured Redis that cannot be read: the collector cannot know who runs.
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        dead = redis_client(f"127.0.0.1:{free_port()}", "", "", 0, retry=Retry(NoBackoff(), 0))
        with pytest.raises(StorageError, match="redis"):
            await PresenceRecords(storage, dead).sightings(time.time())
        await dead.aclose()
        await storage.close()

    asyncio.run(go())
