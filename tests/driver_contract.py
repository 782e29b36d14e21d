"""The storage driver contract: cases every driver must pass. A driver joins by subclassing
``DriverContract`` with a ``driver`` fixture (tests/unit/test_storage_driver.py for the
filesystem, tests/unit/test_s3_driver.py for S3 on moto, tests/e2e/test_s3_rgw.py for S3 on
Ceph RGW)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator

import pytest

from dockyard.config import S3Config
from dockyard.storage.driver import InvalidPath, PathNotFound, StorageDriver
from dockyard.storage.s3 import MIN_PART, S3Driver
from s3support import S3Endpoint


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

    def test_writer_appears_whole_on_close(self, driver: StorageDriver) -> None:
        data = os.urandom(2 * MIN_PART + 12_345)  # several parts on object storage

        async def go() -> None:
            await driver.write("/w/file", b"old")
            w = await driver.writer("/w/file")
            for i in range(0, len(data), 700_000):
                await w.write(data[i : i + 700_000])
            assert w.size == len(data)
            assert await driver.read("/w/file") == b"old"  # nothing visible before close
            await w.close()
            assert await collect(driver.reader("/w/file")) == data
            w = await driver.writer("/w/new/deep/file")
            await w.write(b"x")
            await w.close()
            assert await driver.read("/w/new/deep/file") == b"x"
            w = await driver.writer("/w/empty")
            await w.close()
            assert await driver.read("/w/empty") == b""

        run(go())

    def test_aborted_writer_leaves_nothing(self, driver: StorageDriver) -> None:
        async def go() -> None:
            w = await driver.writer("/a/file")
            await w.write(os.urandom(MIN_PART + 10))  # a part uploaded on object storage
            await w.abort()
            with pytest.raises(PathNotFound):
                await driver.stat("/a/file")
            await driver.write("/a/kept", b"kept")
            w = await driver.writer("/a/kept")
            await w.write(b"GARBAGE")
            await w.abort()
            assert await driver.read("/a/kept") == b"kept"

        run(go())

    def test_move_new_never_replaces(self, driver: StorageDriver) -> None:
        async def go() -> None:
            await driver.write("/m/src", b"new")
            assert await driver.move_new("/m/src", "/m/deep/dst") is True
            assert await driver.read("/m/deep/dst") == b"new"
            with pytest.raises(PathNotFound):
                await driver.stat("/m/src")
            await driver.write("/m/src2", b"other")
            assert await driver.move_new("/m/src2", "/m/deep/dst") is False
            assert await driver.read("/m/deep/dst") == b"new"  # the existing file stays
            assert await driver.read("/m/src2") == b"other"  # and so does the source
            with pytest.raises(PathNotFound):
                await driver.move_new("/m/missing", "/m/x")

        run(go())

    def test_concurrent_move_new_has_one_winner(self, driver: StorageDriver) -> None:
        async def go() -> None:
            for i in range(6):
                await driver.write(f"/c/src{i}", bytes([i]) * 1000)
            results = await asyncio.gather(
                *(driver.move_new(f"/c/src{i}", "/c/dst") for i in range(6))
            )
            assert results.count(True) >= 1
            data = await driver.read("/c/dst")
            assert data in [bytes([i]) * 1000 for i in range(6)]
            if self.exclusive_moves:
                assert results.count(True) == 1
                assert data == bytes([results.index(True)]) * 1000

        run(go())

    #: whether the backend makes concurrent no-overwrite moves exclusive (see S3Driver.move_new)
    exclusive_moves = True

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
            await asyncio.sleep(1.1)  # object stores keep times to the second
            await driver.touch("/lock")
            assert (await driver.stat("/lock")).modified > before
            with pytest.raises(PathNotFound):
                await driver.touch("/missing")

        run(go())

    def test_move_keeps_the_modification_time(self, driver: StorageDriver) -> None:
        """Garbage collection moves a file aside and reads its time again (registry/gc.py): a
        move must carry the time over, as a rename does, and a later touch must count."""

        async def go() -> None:
            await driver.write("/old", b"x")
            before = (await driver.stat("/old")).modified
            await asyncio.sleep(1.1)
            await driver.move("/old", "/aside")
            assert abs((await driver.stat("/aside")).modified - before) < 1.0
            await driver.touch("/aside")
            assert (await driver.stat("/aside")).modified > before

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


MiB = 1024 * 1024


def make_driver(endpoint: S3Endpoint, bucket: str, **settings: object) -> S3Driver:
    """A driver on ``endpoint`` with the smallest parts S3 allows; ``settings`` are more
    ``storage.s3`` keys."""
    config = S3Config.model_validate(
        endpoint.storage_config(bucket, chunksize=MIN_PART, **settings)
    )
    return S3Driver(config)


class S3Contract(DriverContract):
    """Contract plus S3-only cases; subclasses provide ``endpoint``."""

    # moto and Ceph RGW before Squid ignore If-None-Match on copies (S3Driver.move_new says why
    # that is harmless for content-addressed blobs)
    exclusive_moves = False

    @pytest.fixture
    def driver(
        self, endpoint: S3Endpoint, s3_bucket_factory: Callable[[S3Endpoint], str]
    ) -> Iterator[S3Driver]:
        d = make_driver(endpoint, s3_bucket_factory(endpoint), rootdirectory="/prefix")
        yield d
        run(d.close())

    def test_keys_are_the_layout_under_rootdirectory(
        self, driver: S3Driver, endpoint: S3Endpoint
    ) -> None:
        run(driver.write("/docker/registry/v2/blobs/x", b"1"))
        keys = [
            o["Key"] for o in endpoint.client().list_objects_v2(Bucket=driver.bucket)["Contents"]
        ]
        assert keys == ["prefix/docker/registry/v2/blobs/x"]

    def test_large_move_uses_part_copies(self, endpoint: S3Endpoint, s3_bucket_factory) -> None:  # type: ignore[no-untyped-def]
        driver = make_driver(
            endpoint,
            s3_bucket_factory(endpoint),
            multipartcopythresholdsize=MIN_PART,
            multipartcopychunksize=MIN_PART,
        )
        data = os.urandom(3 * MIN_PART + 1)

        async def go() -> None:
            await driver.write("/a", data)
            before = (await driver.stat("/a")).modified
            await asyncio.sleep(1.1)  # LastModified has one-second resolution
            await driver.touch("/a")
            assert (await driver.stat("/a")).modified > before
            await driver.move("/a", "/b")
            assert await collect(driver.reader("/b")) == data
            with pytest.raises(PathNotFound):
                await driver.stat("/a")
            await driver.close()

        run(go())

    def test_delete_directory_aborts_its_multipart_uploads(
        self, driver: S3Driver, endpoint: S3Endpoint
    ) -> None:
        async def go() -> None:
            await driver.write("/u/1/startedat", b"now")
            w = await driver.writer("/u/1/chunks/c")
            await w.write(os.urandom(MIN_PART + 1))  # a writer still running: one part up
            assert await driver.multipart_uploads("/u")
            await driver.delete("/u/1")
            assert not await driver.multipart_uploads("/u")
            with pytest.raises(PathNotFound):
                await driver.stat("/u/1/startedat")

        run(go())

    def test_purge_partial_aborts_only_old_uploads(
        self, driver: S3Driver, endpoint: S3Endpoint
    ) -> None:
        async def go() -> None:
            w = await driver.writer("/u/2/data")
            await w.write(os.urandom(MIN_PART))  # one part, then the process dies
            assert len(await driver.multipart_uploads("/")) == 1
            if endpoint.kind != "moto":  # moto reports every upload as started in 2010
                assert await driver.purge_partial("/", time.time() - 3600, dry_run=False) == []
            found = await driver.purge_partial("/", time.time() + 60, dry_run=True)
            assert len(found) == 1 and "/u/2/data" in found[0]
            assert len(await driver.purge_partial("/", time.time() + 60, dry_run=False)) == 1
            assert await driver.multipart_uploads("/") == []

        run(go())

    def test_presigned_url(self, driver: S3Driver) -> None:
        import requests

        async def go() -> str | None:
            await driver.write("/blob", b"content")
            return await driver.redirect_url("/blob", "GET")

        url = run(go())
        assert url is not None and "X-Amz-Signature" in url
        assert requests.get(url, timeout=10).content == b"content"

    def test_walk_skips_refused_directories(self, driver: StorageDriver) -> None:
        async def go() -> None:
            for path in ("/r/a/_layers/x", "/r/a/_manifests/y", "/r/b/c/_uploads/z", "/r/d"):
                await driver.write(path, b"1")
            entries = await driver.walk("/r", lambda name: not name.startswith("_"))
            found = {(e.path, e.is_dir) for e in entries}
            assert ("/r/a/_layers", True) in found
            assert ("/r/b/c/_uploads", True) in found
            assert ("/r/d", False) in found
            assert not any(p.startswith("/r/a/_layers/") for p, _ in found)

        run(go())
