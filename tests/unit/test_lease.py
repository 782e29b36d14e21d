"""The storage lease behind "one garbage collection at a time": exclusive, renewed in the
background while held, and reported lost when someone else took it over."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from dockyard.registry import layout
from dockyard.registry.lease import Lease, LeaseBusy, read_lease
from dockyard.storage.filesystem import FilesystemDriver
from dockyard.storage.store import Store


def test_lease_is_exclusive_renewed_and_lost_when_taken(tmp_path: Path) -> None:
    storage = Store(FilesystemDriver(str(tmp_path), max_threads=4))
    path = tmp_path / layout.lease("gc").lstrip("/")

    def expires() -> float:
        return json.loads(path.read_text())["expires"]

    async def until(condition: Callable[[], bool], seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not condition():
            assert time.monotonic() < deadline, "did not happen in time"
            await asyncio.sleep(0.01)

    async def go() -> None:
        # A lifetime long enough that a loaded machine does not let it lapse between steps;
        # the test waits for each renewal rather than sleeping for a guessed time.
        async with Lease(storage, "gc", ttl=3.0) as lease:
            with pytest.raises(LeaseBusy):
                await Lease(storage, "gc").acquire()
            first = expires()
            await until(lambda: expires() > first, 3.0)  # renewed in the background
            lease.check()
            # A holder that lost its lease (it lapsed and another took it) must stop. Taken
            # right after a renewal, so that the next one (a third of the lifetime away) reads
            # the new holder rather than racing with this write.
            path.write_text(json.dumps({"holder": "other:1", "expires": time.time() + 60}))
            await until(lambda: lease._lost is not None, 3.0)
            with pytest.raises(LeaseBusy):
                lease.check()
        # Leaving does not remove a lease this holder no longer owns.
        assert json.loads(path.read_text())["holder"] == "other:1"
        await storage.close()

    asyncio.run(go())


def test_lease_carries_its_purpose_and_its_holder_stops_when_it_could_not_renew(
    tmp_path: Path,
) -> None:
    storage = Store(FilesystemDriver(str(tmp_path), max_threads=4))

    async def go() -> None:
        assert await read_lease(storage, "gc") is None
        lease = Lease(storage, "gc", ttl=0.3, purpose="immediate")
        await lease.acquire()  # held without the background renewal
        state = await read_lease(storage, "gc")
        assert state is not None
        assert (state.holder, state.purpose) == (lease.holder, "immediate")
        assert abs(state.taken - time.time()) < 5
        lease.check()
        await asyncio.sleep(0.35)
        # Past the expiry it wrote, others may take it over: the holder must stop by itself.
        with pytest.raises(LeaseBusy):
            lease.check()
        await lease.renew()  # nobody took it: renewing makes it the holder's again
        lease.check()
        renewed = await read_lease(storage, "gc")
        assert renewed is not None and renewed.purpose == "immediate"
        await lease.release()
        assert await read_lease(storage, "gc") is None
        await storage.close()

    asyncio.run(go())
