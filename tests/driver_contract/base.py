"""The contract's shared parts: helpers, the declarations a driver's test class makes, and
the stores the cases run on."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import pytest

from dockyard.registry.configured import checked_store
from dockyard.storage.driver import AtomicMove, StorageDriver
from dockyard.storage.store import Store


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


async def collect(stream: AsyncIterator[bytes]) -> bytes:
    return b"".join([chunk async for chunk in stream])


PRIMITIVES = ("reader", "writer", "stat", "list", "delete", "move", "close")
#: the members of every capability Protocol in storage/driver.py
CAPABILITY_MEMBERS = (
    "write_new",
    "move_new",
    "touch",
    "atomic_move",
    "lock",
    "redirect_url",
    "open_local",
    "purge_partial",
    "remove_empty_dir",
    "directory_version",
)


class Bare:
    """A driver's primitives (and, with ``capabilities``, its capabilities) and nothing else:
    the store then builds everything else itself."""

    def __init__(self, driver: StorageDriver, *, capabilities: bool) -> None:
        self.name = driver.name
        members = PRIMITIVES + (CAPABILITY_MEMBERS if capabilities else ())
        for member in members:
            if hasattr(driver, member):
                setattr(self, member, getattr(driver, member))


def every_operation(store: Store, bad: str) -> list[Callable[[], object]]:
    """Each of the store's operations on ``bad`` (as a source and as a destination)."""
    return [
        lambda: store.read(bad),
        lambda: store.write(bad, b"x"),
        lambda: store.write_new(bad, b"x"),
        lambda: store.stat(bad),
        lambda: store.list(bad),
        lambda: store.delete(bad),
        lambda: store.delete_if_present(bad),
        lambda: store.move(bad, "/ok"),
        lambda: store.move("/ok", bad),
        lambda: store.move_new(bad, "/ok"),
        lambda: store.move_new("/ok", bad),
        lambda: store.touch(bad),
        lambda: store.walk(bad, lambda name: True),
        lambda: store.remove_empty_dir(bad),
        lambda: store.writer(bad),
        lambda: store.redirect_url(bad),
        lambda: store.open_range(bad, 0, 1),
        lambda: store.purge_partial(bad, time.time(), True),
        lambda: store.reader(bad),
        lambda: store.lock(bad),
    ]


class ContractBase:
    """What every part of the contract shares: the declarations a driver's test class makes,
    and the stores the cases use."""

    #: the optional capabilities (storage.driver) the driver has; it must lack all others
    capabilities: frozenset[type] = frozenset()
    #: the fast paths it offers
    fast_paths: frozenset[type] = frozenset()
    #: whether the backend makes concurrent no-overwrite moves exclusive (see S3Driver.move_new)
    exclusive_moves = True

    @pytest.fixture
    def store(self, driver: StorageDriver) -> Store:
        return Store(driver)

    @pytest.fixture(params=["fast paths", "from primitives"])
    def any_store(self, request: pytest.FixtureRequest, driver: StorageDriver) -> Store:
        if request.param == "fast paths":
            return Store(driver)
        return Store(Bare(driver, capabilities=True))  # type: ignore[arg-type]

    def test_declares_its_capabilities(self, driver: StorageDriver, store: Store) -> None:
        assert store.capabilities == self.capabilities
        assert store.fast_paths == self.fast_paths
        assert store.atomic_move == (AtomicMove in self.capabilities)
        assert checked_store(driver).capabilities == self.capabilities  # the registry runs on it
