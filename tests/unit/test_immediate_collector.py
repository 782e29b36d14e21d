"""Immediate garbage collection (``GarbageCollector(immediate=True)``, ``gc --grace 0``) on the
registry model: everything unreferenced goes at once, stamps or not, and only when no writable
server is recorded as running."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest
from test_model import upload

from dockyard.registry import layout
from dockyard.registry.gc import GarbageCollector
from dockyard.registry.presence import (
    ImmediateCollectionRefused,
    PresenceRecords,
    new_presence,
    stale_after,
)
from dockyard.registry.repository import Registry
from dockyard.storage.filesystem import FilesystemDriver
from dockyard.storage.store import Store

#: the server's default touch interval: a blob used within the hour is not stamped again
HOUR = 3600.0


def registry(root: Path) -> Registry:
    storage = Store(FilesystemDriver(str(root), max_threads=4))
    return Registry(storage, secret="s", delete_enabled=True)


def collector(reg: Registry, **options: bool) -> GarbageCollector:
    return GarbageCollector(reg.storage, grace=0, touch_interval=HOUR, **options)


def test_everything_unreferenced_goes_at_once(tmp_path: Path) -> None:
    reg = registry(tmp_path)

    async def go() -> None:
        fresh = await upload(reg, "app", b"uploaded a second ago")
        stamped = await upload(reg, "app", b"read during the collection")
        data = tmp_path / layout.blob_data(stamped).lstrip("/")
        later = time.time() + 100  # a stamp newer than the collection's start
        os.utime(data, (later, later))
        # An online collection with no grace keeps what was used within the touch interval.
        online = await collector(reg).run()
        assert online.blobs_removed == 0 and online.blobs_recent == 2
        report = await collector(reg, immediate=True).run()
        assert report.immediate and report.blobs_removed == 2 and report.links_removed == 2
        for digest in (fresh, stamped):
            assert not await reg.blobs.exists(digest)
            assert not (tmp_path / layout.layer_link("app", digest).lstrip("/")).exists()
        assert "immediate collection" in report.summary()
        await reg.storage.close()

    asyncio.run(go())
    assert not [p for p in tmp_path.rglob("*") if ".gc-" in p.name]  # nothing set aside


def test_refused_before_deleting_anything_while_a_writable_server_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reg = registry(tmp_path)
    records = PresenceRecords(reg.storage)

    async def go() -> None:
        garbage = await upload(reg, "app", b"garbage")
        server = new_presence("writable", ":5000", 15.0, "none")
        await records.write(server)
        lease = tmp_path / layout.lease("gc").lstrip("/")
        lease_written = []
        real_write_new = reg.storage.write_new

        async def watch(path: str, data: bytes) -> bool:
            lease_written.append(path)
            return await real_write_new(path, data)

        with monkeypatch.context() as patched:
            patched.setattr(reg.storage, "write_new", watch)
            with pytest.raises(ImmediateCollectionRefused):
                await collector(reg, immediate=True, presences=records).run()
        assert await reg.blobs.exists(garbage)
        # Refused before the marker was written: the running server's writes were never held.
        assert lease_written == [] and not lease.exists()
        # A dry run reports what would go, and that the real thing would be refused.
        dry = await collector(reg, immediate=True, dry_run=True).run()
        assert dry.blobs_removed == 1 and await reg.blobs.exists(garbage)
        assert len(dry.warnings) == 1 and "writable server" in dry.warnings[0]
        # The server died without withdrawing its record: once stale, it counts for nothing
        # and the collection removes the record.
        record = tmp_path / layout.instance(server.id).lstrip("/")
        old = time.time() - stale_after(server) - 1
        os.utime(record, (old, old))
        await records.write(new_presence("read-only", ":5001", 15.0, "none"))
        report = await collector(reg, immediate=True).run()
        assert report.blobs_removed == 1 and report.stale_presences == 1
        assert not record.exists()
        assert not await reg.blobs.exists(garbage)
        await reg.storage.close()

    asyncio.run(go())


def test_a_server_starting_between_the_first_look_and_the_marker_is_seen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reg = registry(tmp_path)
    records = PresenceRecords(reg.storage)
    starting = new_presence("writable", ":5000", 15.0, "none")
    real_write_new = reg.storage.write_new

    async def server_registers_first(path: str, data: bytes) -> bool:
        if path == layout.lease("gc"):
            await records.write(starting)  # its presence lands just before the marker
        return await real_write_new(path, data)

    async def go() -> None:
        garbage = await upload(reg, "app", b"garbage")
        monkeypatch.setattr(reg.storage, "write_new", server_registers_first)
        with pytest.raises(ImmediateCollectionRefused) as refused:
            await collector(reg, immediate=True, presences=records).run()
        assert [s.presence.id for s in refused.value.sightings] == [starting.id]
        assert await reg.blobs.exists(garbage)
        assert not (tmp_path / layout.lease("gc").lstrip("/")).exists()
        await reg.storage.close()

    asyncio.run(go())
