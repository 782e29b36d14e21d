"""The storage driver contract. Every driver joins by providing a ``driver`` fixture; the
filesystem driver is the first. Teardown checks nothing was left behind."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from dockyard.storage.driver import InvalidPath, PathNotFound, StorageDriver
from dockyard.storage.filesystem import FilesystemDriver


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


async def collect(stream: AsyncIterator[bytes]) -> bytes:
    return b"".join([chunk async for chunk in stream])


class DriverContract:
    """Shared cases; subclasses provide the ``driver`` fixture."""

    def test_write_read_overwrite(self, driver: StorageDriver) -> None:
        async def go() -> None:
            await driver.write("/a/b/file", b"one")
            assert await driver.read("/a/b/file") == b"one"
            await driver.write("/a/b/file", b"two!")
            assert await driver.read("/a/b/file") == b"two!"
            info = await driver.stat("/a/b/file")
            assert info.size == 4 and not info.is_dir
            assert (await driver.stat("/a/b")).is_dir

        run(go())

    def test_missing_paths(self, driver: StorageDriver) -> None:
        async def go() -> None:
            for call in (
                driver.read("/nope"),
                driver.stat("/nope"),
                driver.list("/nope"),
                driver.delete("/nope"),
                driver.move("/nope", "/x"),
            ):
                with pytest.raises(PathNotFound):
                    await call
            with pytest.raises(PathNotFound):
                await collect(driver.reader("/nope"))

        run(go())

    def test_list_children(self, driver: StorageDriver) -> None:
        async def go() -> None:
            await driver.write("/d/x", b"1")
            await driver.write("/d/y/z", b"2")
            assert sorted(await driver.list("/d")) == ["x", "y"]

        run(go())

    def test_move_replaces_and_creates_parents(self, driver: StorageDriver) -> None:
        async def go() -> None:
            await driver.write("/src", b"new")
            await driver.write("/deep/dst", b"old")
            await driver.move("/src", "/deep/dst")
            assert await driver.read("/deep/dst") == b"new"
            await driver.write("/src2", b"x")
            await driver.move("/src2", "/other/tree/dst")
            assert await driver.read("/other/tree/dst") == b"x"
            with pytest.raises(PathNotFound):
                await driver.stat("/src")

        run(go())

    def test_delete_tree(self, driver: StorageDriver) -> None:
        async def go() -> None:
            await driver.write("/t/a/b", b"1")
            await driver.write("/t/c", b"2")
            await driver.delete("/t")
            with pytest.raises(PathNotFound):
                await driver.stat("/t")

        run(go())

    def test_reader_offsets(self, driver: StorageDriver) -> None:
        data = os.urandom(3 * 1024 * 1024 + 17)

        async def go() -> None:
            await driver.write("/big", data)
            assert await collect(driver.reader("/big")) == data
            assert await collect(driver.reader("/big", 1000)) == data[1000:]
            assert await collect(driver.reader("/big", 5, 2_000_000)) == data[5:2_000_005]
            assert await collect(driver.reader("/big", len(data))) == b""

        run(go())

    def test_writer_append_close_abort(self, driver: StorageDriver) -> None:
        async def go() -> None:
            w = await driver.writer("/up/data", append=True)
            assert w.size == 0
            await w.write(b"hello ")
            await w.close()
            w = await driver.writer("/up/data", append=True)
            assert w.size == 6
            await w.write(b"world")
            assert w.size == 11
            await w.close()
            w = await driver.writer("/up/data", append=True)
            await w.write(b"GARBAGE")
            await w.abort()
            assert await driver.read("/up/data") == b"hello world"
            w = await driver.writer("/up/data", append=False)
            await w.write(b"x")
            await w.close()
            assert await driver.read("/up/data") == b"x"

        run(go())

    def test_rejects_escaping_paths(self, driver: StorageDriver) -> None:
        async def go() -> None:
            for bad in ("relative", "/a/../../etc/passwd", "/a/./b", "/a\0b"):
                with pytest.raises(InvalidPath):
                    await driver.read(bad)

        run(go())

    def test_write_new_and_touch(self, driver: StorageDriver) -> None:
        async def go() -> None:
            results = await asyncio.gather(
                *(driver.write_new("/lock", bytes([i]) * 100) for i in range(8))
            )
            assert sorted(results) == [False] * 7 + [True]
            winner = results.index(True)
            assert await driver.read("/lock") == bytes([winner]) * 100
            before = (await driver.stat("/lock")).modified
            await asyncio.sleep(0.02)
            await driver.touch("/lock")
            assert (await driver.stat("/lock")).modified > before
            with pytest.raises(PathNotFound):
                await driver.touch("/missing")

        run(go())

    def test_concurrent_atomic_writes(self, driver: StorageDriver) -> None:
        """Readers racing writers see one whole version, never a torn or empty file."""
        versions = [bytes([i]) * 65536 for i in range(1, 9)]

        async def go() -> None:
            await driver.write("/race", versions[0])

            async def writer() -> None:
                for v in versions * 4:
                    await driver.write("/race", v)

            async def reader() -> None:
                for _ in range(64):
                    data = await driver.read("/race")
                    assert data in versions

            await asyncio.gather(writer(), writer(), reader(), reader())

        run(go())


class TestFilesystemDriver(DriverContract):
    @pytest.fixture
    def driver(self, tmp_path: Path) -> Iterator[FilesystemDriver]:
        d = FilesystemDriver(str(tmp_path / "root"), max_threads=8)
        yield d
        d.close()
        # No temporary files may be left behind by atomic writes.
        leftovers = [p for p in (tmp_path / "root").rglob("*") if ".tmp-" in p.name]
        assert not leftovers

    def test_local_path(self, driver: FilesystemDriver, tmp_path: Path) -> None:
        run(driver.write("/x/y", b"1"))
        path = driver.local_path("/x/y")
        assert path == str(tmp_path / "root" / "x" / "y")
        assert Path(path).read_bytes() == b"1"
