"""A lease in storage: one holder at a time across every worker and instance sharing it
(one garbage collection at a time). Taken by creating the lease file exclusively (a conditional
PUT on object storage); a lease whose holder stopped renewing it expires and can be taken over.
While held as a context manager it is renewed in the background every third of its lifetime, so
a long holder keeps it; if a renewal finds the lease gone or taken, ``check`` raises from then
on and the holder must stop changing anything."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
import uuid
from types import TracebackType

from dockyard.registry import layout
from dockyard.registry.blobs import delete_if_present
from dockyard.storage.driver import PathNotFound, StorageDriver, StorageError


class LeaseBusy(Exception):
    def __init__(self, name: str, holder: str, expires: float) -> None:
        self.holder = holder
        self.expires = expires
        super().__init__(
            f"{name} is held by {holder} for another {max(0, int(expires - time.time()))} s"
        )


class Lease:
    def __init__(self, driver: StorageDriver, name: str, ttl: float = 600.0) -> None:
        self.driver = driver
        self.name = name
        self.path = layout.lease(name)
        self.ttl = ttl
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._renewer: asyncio.Task[None] | None = None
        self._lost: BaseException | None = None

    def _body(self) -> bytes:
        return json.dumps({"holder": self.holder, "expires": time.time() + self.ttl}).encode()

    async def _current(self) -> tuple[str, float] | None:
        try:
            state = json.loads(await self.driver.read(self.path))
            return str(state["holder"]), float(state["expires"])
        except PathNotFound:
            return None
        except (ValueError, KeyError, TypeError):
            return "unreadable lease", 0.0

    async def acquire(self) -> None:
        for _ in range(3):
            if await self.driver.write_new(self.path, self._body()):
                return
            current = await self._current()
            if current is None:
                continue
            holder, expires = current
            if expires > time.time():
                raise LeaseBusy(self.name, holder, expires)
            # Expired: its holder died. Remove it and race for it again.
            await delete_if_present(self.driver, self.path)
        current = await self._current()
        raise LeaseBusy(self.name, *(current or ("another process", time.time())))

    async def renew(self) -> None:
        current = await self._current()
        if current is None or current[0] != self.holder:
            raise LeaseBusy(self.name, current[0] if current else "nobody", 0.0)
        await self.driver.write(self.path, self._body())

    async def release(self) -> None:
        current = await self._current()
        if current is not None and current[0] == self.holder:
            await delete_if_present(self.driver, self.path)

    def check(self) -> None:
        """Raise if the background renewal found the lease lost."""
        if self._lost is not None:
            raise LeaseBusy(self.name, "another holder (this one's lease lapsed)", 0.0)

    async def _keep_renewed(self) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                await self.renew()
            except LeaseBusy as exc:
                self._lost = exc
                return
            except StorageError:  # a passing storage error: the next attempt may work
                continue

    async def __aenter__(self) -> Lease:
        await self.acquire()
        self._renewer = asyncio.create_task(self._keep_renewed())
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
        await self.release()
