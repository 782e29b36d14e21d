"""Contract cases for the primitives and for what the store derives from them (whole-file
reads and writes, walks, empty directories, path validation)."""

from __future__ import annotations

import asyncio
import os

import pytest

from dockyard.storage.driver import (
    Child,
    DirectoryVersions,
    EmptyDirs,
    InvalidPath,
    PathNotFound,
    StorageDriver,
    Touch,
)
from dockyard.storage.s3 import MIN_PART
from dockyard.storage.store import Store

from .base import ContractBase, collect, every_operation, run


class PrimitiveCases(ContractBase):
    def test_write_read_overwrite(self, any_store: Store) -> None:
        async def go() -> None:
            store = any_store
            await store.write("/a/b/file", b"one")
            assert await store.read("/a/b/file") == b"one"
            await store.write("/a/b/file", b"two!")
            assert await store.read("/a/b/file") == b"two!"
            info = await store.stat("/a/b/file")
            assert info.size == 4 and not info.is_dir
            assert (await store.stat("/a/b")).is_dir
            await store.write("/a/empty", b"")
            assert await store.read("/a/empty") == b""

        run(go())

    def test_missing_paths(self, store: Store) -> None:
        async def go() -> None:
            for call in (
                store.read("/nope"),
                store.stat("/nope"),
                store.list("/nope"),
                store.delete("/nope"),
                store.move("/nope", "/x"),
                store.open_range("/nope", 0, 1),
            ):
                with pytest.raises(PathNotFound):
                    await call
            with pytest.raises(PathNotFound):
                await collect(store.reader("/nope"))
            assert await store.delete_if_present("/nope") is False

        run(go())

    def test_list_children(self, driver: StorageDriver, store: Store) -> None:
        async def go() -> None:
            await store.write("/d/x", b"1")
            await store.write("/d/y/z", b"2")
            assert sorted(await store.list("/d")) == ["x", "y"]
            children = await driver.list("/d")
            assert sorted(children, key=lambda c: c.name) == [Child("x", False), Child("y", True)]

        run(go())

    def test_move_replaces_and_creates_parents(self, store: Store) -> None:
        async def go() -> None:
            await store.write("/src", b"new")
            await store.write("/deep/dst", b"old")
            await store.move("/src", "/deep/dst")
            assert await store.read("/deep/dst") == b"new"
            await store.write("/src2", b"x")
            await store.move("/src2", "/other/tree/dst")
            assert await store.read("/other/tree/dst") == b"x"
            with pytest.raises(PathNotFound):
                await store.stat("/src")

        run(go())

    def test_move_keeps_the_modification_time(self, store: Store) -> None:
        """Garbage collection moves a file aside and reads its time again (registry/gc.py): a
        move must carry the time over, as a rename does, and a later touch must count."""

        async def go() -> None:
            await store.write("/old", b"x")
            before = (await store.stat("/old")).modified
            await asyncio.sleep(1.1)
            await store.move("/old", "/aside")
            assert abs((await store.stat("/aside")).modified - before) < 1.0
            if Touch in self.capabilities:
                await store.touch("/aside")
                assert (await store.stat("/aside")).modified > before

        run(go())

    def test_delete_tree(self, store: Store) -> None:
        async def go() -> None:
            await store.write("/t/a/b", b"1")
            await store.write("/t/c", b"2")
            await store.delete("/t")
            with pytest.raises(PathNotFound):
                await store.stat("/t")
            await store.write("/t/d", b"3")
            assert await store.delete_if_present("/t/d") is True

        run(go())

    def test_reader_offsets(self, store: Store) -> None:
        data = os.urandom(3 * 1024 * 1024 + 17)

        async def go() -> None:
            await store.write("/big", data)
            assert await collect(store.reader("/big")) == data
            assert await collect(store.reader("/big", 1000)) == data[1000:]
            assert await collect(store.reader("/big", 5, 2_000_000)) == data[5:2_000_005]
            assert await collect(store.reader("/big", len(data))) == b""
            assert await collect(store.reader("/big", 7, 0)) == b""

        run(go())

    def test_writer_appears_whole_on_close(self, store: Store) -> None:
        data = os.urandom(2 * MIN_PART + 12_345)  # several parts on object storage

        async def go() -> None:
            await store.write("/w/file", b"old")
            w = await store.writer("/w/file")
            for i in range(0, len(data), 700_000):
                await w.write(data[i : i + 700_000])
            assert w.size == len(data)
            assert await store.read("/w/file") == b"old"  # nothing visible before close
            await w.close()
            assert await collect(store.reader("/w/file")) == data
            w = await store.writer("/w/new/deep/file")
            await w.write(b"x")
            await w.close()
            assert await store.read("/w/new/deep/file") == b"x"
            w = await store.writer("/w/empty")
            await w.close()
            assert await store.read("/w/empty") == b""

        run(go())

    def test_aborted_writer_leaves_nothing(self, store: Store) -> None:
        async def go() -> None:
            w = await store.writer("/a/file")
            await w.write(os.urandom(MIN_PART + 10))  # a part uploaded on object storage
            await w.abort()
            with pytest.raises(PathNotFound):
                await store.stat("/a/file")
            await store.write("/a/kept", b"kept")
            w = await store.writer("/a/kept")
            await w.write(b"GARBAGE")
            await w.abort()
            assert await store.read("/a/kept") == b"kept"

        run(go())

    def test_concurrent_atomic_writes(self, any_store: Store) -> None:
        """Readers racing writers see one whole version, never a torn or empty file."""
        versions = [bytes([i]) * 65536 for i in range(1, 9)]

        async def go() -> None:
            await any_store.write("/race", versions[0])

            async def writer() -> None:
                for v in versions * 4:
                    await any_store.write("/race", v)

            async def reader() -> None:
                for _ in range(64):
                    data = await any_store.read("/race")
                    assert data in versions

            await asyncio.gather(writer(), writer(), reader(), reader())

        run(go())

    # -- derived operations -------------------------------------------------------------------

    def test_walk_skips_refused_directories(self, any_store: Store) -> None:
        async def go() -> None:
            for path in ("/r/a/_layers/x", "/r/a/_manifests/y", "/r/b/c/_uploads/z", "/r/d"):
                await any_store.write(path, b"1")
            entries = await any_store.walk("/r", lambda name: not name.startswith("_"))
            found = {(e.path, e.is_dir) for e in entries}
            assert found == {
                ("/r/a", True),
                ("/r/a/_layers", True),
                ("/r/a/_manifests", True),
                ("/r/b", True),
                ("/r/b/c", True),
                ("/r/b/c/_uploads", True),
                ("/r/d", False),
            }
            assert await any_store.walk("/missing", lambda name: True) == []

        run(go())

    def test_remove_empty_dir(self, any_store: Store) -> None:
        """Empty directories go (on object storage they vanish with their last key by
        themselves); a directory with anything in it stays."""

        async def go() -> None:
            store = any_store
            assert store.has(EmptyDirs) == (EmptyDirs in self.capabilities)
            await store.write("/e/gone/f", b"1")
            await store.write("/e/kept/f", b"2")
            await store.delete("/e/gone/f")
            await store.remove_empty_dir("/e/gone")
            with pytest.raises(PathNotFound):
                await store.stat("/e/gone")
            await store.remove_empty_dir("/e/kept")
            assert await store.read("/e/kept/f") == b"2"
            await store.remove_empty_dir("/e/never")

        run(go())

    def test_directory_version(self, any_store: Store) -> None:
        """Where a driver has directory versions, creating or removing an entry changes the
        version (a listing cached under it is then never served again); rewriting a file below
        an entry does not (the names are the same). Without them, None."""

        async def go() -> None:
            store = any_store
            await store.write("/v/d/a/f", b"1")
            if DirectoryVersions not in self.capabilities:
                assert await store.directory_version("/v/d") is None
                return
            first = await store.directory_version("/v/d")
            assert first is not None and first.now_ns >= first.mtime_ns - 10**9
            await store.write("/v/d/a/f", b"2")
            assert (same := await store.directory_version("/v/d")) is not None
            assert same.key == first.key
            # Past the filesystem clock's tick (a change within it may leave the times as they
            # were: registry.listing does not trust such a version).
            await asyncio.sleep(0.05)
            await store.write("/v/d/b/f", b"1")
            added = await store.directory_version("/v/d")
            assert added is not None and added.key != first.key
            await asyncio.sleep(0.05)
            await store.delete("/v/d/b")
            assert (removed := await store.directory_version("/v/d")) is not None
            assert removed.key != added.key
            with pytest.raises(PathNotFound):
                await store.directory_version("/v/missing")
            with pytest.raises(PathNotFound):
                await store.directory_version("/v/d/a/f")

        run(go())

    def test_rejects_escaping_paths(self, store: Store) -> None:
        """Validated once, by the store, for every operation and every driver."""

        async def go() -> None:
            for bad in ("relative", "/a/../../etc/passwd", "/a/./b", "/a\0b", "/a/.."):
                for call in every_operation(store, bad):
                    with pytest.raises(InvalidPath):
                        result = call()
                        if asyncio.iscoroutine(result):
                            await result

        run(go())
