"""Contract cases for the optional capabilities: each checks what the driver does with it or,
for a driver declared without it, that the store reports it absent and refuses or does the safe
generic thing."""

from __future__ import annotations

import asyncio
import os
import time

import pytest
import requests

from dockyard.errors import ConfigError
from dockyard.registry.configured import checked_store
from dockyard.storage.driver import (
    ExclusiveCreate,
    Locks,
    NoOverwriteMove,
    PartialUploads,
    PathNotFound,
    Redirects,
    Sendfile,
    StorageDriver,
    Touch,
    Unsupported,
)
from dockyard.storage.s3 import MIN_PART
from dockyard.storage.store import LocalRange, Store, StreamedRange

from .base import Bare, ContractBase, run


class CapabilityCases(ContractBase):
    def test_write_new_has_one_winner(self, store: Store) -> None:
        async def go() -> None:
            results = await asyncio.gather(
                *(store.write_new("/lock", bytes([i]) * 100) for i in range(8))
            )
            assert sorted(results) == [False] * 7 + [True]
            winner = results.index(True)
            assert await store.read("/lock") == bytes([winner]) * 100

        assert store.has(ExclusiveCreate) == (ExclusiveCreate in self.capabilities)
        if ExclusiveCreate not in self.capabilities:
            with pytest.raises(Unsupported):
                run(store.write_new("/lock", b"x"))
            return
        run(go())

    def test_touch(self, store: Store) -> None:
        async def go() -> None:
            await store.write("/lock", b"x")
            before = (await store.stat("/lock")).modified
            await asyncio.sleep(1.1)  # object stores keep times to the second
            await store.touch("/lock")
            assert (await store.stat("/lock")).modified > before
            assert await store.read("/lock") == b"x"
            with pytest.raises(PathNotFound):
                await store.touch("/missing")

        assert store.has(Touch) == (Touch in self.capabilities)
        if Touch not in self.capabilities:
            with pytest.raises(Unsupported):
                run(store.touch("/lock"))
            return
        run(go())

    def test_move_new_never_replaces(self, store: Store) -> None:
        async def go() -> None:
            await store.write("/m/src", b"new")
            assert await store.move_new("/m/src", "/m/deep/dst") is True
            assert await store.read("/m/deep/dst") == b"new"
            with pytest.raises(PathNotFound):
                await store.stat("/m/src")
            await store.write("/m/src2", b"other")
            assert await store.move_new("/m/src2", "/m/deep/dst") is False
            assert await store.read("/m/deep/dst") == b"new"  # the existing file stays
            assert await store.read("/m/src2") == b"other"  # and so does the source
            with pytest.raises(PathNotFound):
                await store.move_new("/m/missing", "/m/x")

        assert store.has(NoOverwriteMove) == (NoOverwriteMove in self.capabilities)
        if NoOverwriteMove not in self.capabilities:
            with pytest.raises(Unsupported):
                run(store.move_new("/m/src", "/m/dst"))
            return
        run(go())

    def test_concurrent_move_new_lands_one_whole_source(self, store: Store) -> None:
        """Movers racing to one destination: at least one succeeds and the destination holds
        one source whole; where the backend makes the moves exclusive (``exclusive_moves``),
        exactly one succeeds and it is the winner's bytes (moto and Ceph RGW before Squid
        ignore If-None-Match on copies: S3Driver.move_new says why that is harmless)."""

        async def go() -> None:
            for i in range(6):
                await store.write(f"/c/src{i}", bytes([i]) * 1000)
            results = await asyncio.gather(
                *(store.move_new(f"/c/src{i}", "/c/dst") for i in range(6))
            )
            assert results.count(True) >= 1
            data = await store.read("/c/dst")
            assert data in [bytes([i]) * 1000 for i in range(6)]
            if self.exclusive_moves:
                assert results.count(True) == 1
                assert data == bytes([results.index(True)]) * 1000

        if NoOverwriteMove in self.capabilities:
            run(go())
        else:
            assert not store.has(NoOverwriteMove)

    def test_lock(self, store: Store) -> None:
        async def go() -> None:
            await store.write("/u/startedat", b"now")

        run(go())
        first = store.lock("/u/startedat")
        assert store.has(Locks) == (Locks in self.capabilities)
        if Locks not in self.capabilities:
            assert first is None
            return
        second = store.lock("/u/startedat")
        assert first is not None and second is not None
        assert first.acquire() is True
        assert second.acquire() is False  # held, even within one process
        first.release()
        assert second.acquire() is True
        second.release()
        missing = store.lock("/u/missing")
        assert missing is not None
        with pytest.raises(PathNotFound):
            missing.acquire()

    def test_open_range(self, store: Store) -> None:
        """A local file for zero-copy sendfile where the driver has one, else a started
        stream; either way exactly the range."""
        data = os.urandom(300_000)

        async def go() -> None:
            await store.write("/blob", data)
            for offset, length in ((0, len(data)), (5, 100), (len(data) - 1, 1), (0, 0)):
                opened = await store.open_range("/blob", offset, length)
                assert (opened.offset, opened.length) == (offset, length)
                if Sendfile in self.capabilities:
                    assert isinstance(opened, LocalRange)
                    got = os.pread(opened.file.fileno(), length, offset)
                    opened.close()
                else:
                    assert isinstance(opened, StreamedRange)
                    got = b"".join([chunk async for chunk in opened])
                assert got == data[offset : offset + length]
            streamed = await store.open_range("/blob", 10, 20)
            if isinstance(streamed, StreamedRange):
                await streamed.close()  # a stream given up before its end
            else:
                streamed.close()

        assert store.has(Sendfile) == (Sendfile in self.capabilities)
        run(go())

    def test_redirect_url(self, store: Store) -> None:
        async def go() -> tuple[str | None, str | None]:
            await store.write("/blob", b"content")
            return await store.redirect_url("/blob"), await store.redirect_url("/blob", "HEAD")

        url, head = run(go())
        assert store.has(Redirects) == (Redirects in self.capabilities)
        if Redirects not in self.capabilities:
            assert url is None and head is None
            return
        assert url is not None and head is not None
        assert requests.get(url, timeout=10).content == b"content"
        assert requests.head(head, timeout=10).status_code == 200

    def test_purge_partial(self, store: Store) -> None:
        """An unfinished writer (its process died) leaves nothing, or something purging
        finds and removes."""

        async def go() -> None:
            w = await store.writer("/p/1/chunk")
            await w.write(os.urandom(MIN_PART + 1))  # one part up on object storage
            found = await store.purge_partial("/p", time.time() + 60, dry_run=True)
            if PartialUploads not in self.capabilities:
                assert found == []
                assert await store.purge_partial("/p", time.time() + 60, dry_run=False) == []
                await w.abort()
                return
            assert len(found) == 1 and "/p/1/chunk" in found[0]
            assert await store.purge_partial("/p", time.time() + 60, dry_run=False) == found
            assert await store.purge_partial("/p", time.time() + 60, dry_run=True) == []
            await w.abort()

        assert store.has(PartialUploads) == (PartialUploads in self.capabilities)
        run(go())

    def test_without_capabilities(self, driver: StorageDriver) -> None:
        """Over the primitives alone, the store refuses what cannot be built safely and does
        the safe thing for the rest; the registry refuses such a driver at start-up."""
        bare = Store(Bare(driver, capabilities=False))  # type: ignore[arg-type]
        assert bare.capabilities == frozenset() and bare.fast_paths == frozenset()

        async def go() -> None:
            await bare.write("/x/file", b"data")
            for refused in (
                bare.write_new("/x/new", b"1"),
                bare.move_new("/x/file", "/x/other"),
                bare.touch("/x/file"),
            ):
                with pytest.raises(Unsupported, match=driver.name):
                    await refused
            assert bare.lock("/x/file") is None
            assert await bare.redirect_url("/x/file") is None
            assert await bare.purge_partial("/", time.time(), dry_run=True) == []
            opened = await bare.open_range("/x/file", 1, 2)
            assert isinstance(opened, StreamedRange)
            assert b"".join([chunk async for chunk in opened]) == b"at"
            await bare.remove_empty_dir("/x")
            assert await bare.read("/x/file") == b"data"

        run(go())
        with pytest.raises(ConfigError, match=f"the {driver.name} storage driver lacks"):
            checked_store(Bare(driver, capabilities=False))  # type: ignore[arg-type]
