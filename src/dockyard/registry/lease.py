"""A lease in storage: one holder at a time across every worker and instance sharing it
(one garbage collection at a time). Taken by creating the lease file exclusively (a conditional
PUT on object storage); a lease whose holder stopped renewing it expires and can be taken over.
While held as a context manager it is renewed in the background every third of its lifetime, so
a long holder keeps it; if a renewal finds the lease gone or taken, or the holder could not renew
it before it expired, ``check`` raises from then on and the holder must stop changing anything.

A lease may carry a ``purpose`` that others read with :func:`read_lease`: an immediate garbage
collection's lease is the marker writable servers look for (registry.presence)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
import uuid
from dataclasses import dataclass
from types import TracebackType

from dockyard.registry import layout
from dockyard.storage.driver import PathNotFound, StorageError
from dockyard.storage.store import Store


class LeaseBusy(Exception):
    def __init__(self, name: str, holder: str, expires: float) -> None:
        self.holder = holder
        self.expires = expires
        super().__init__(
            f"{name} is held by {holder} for another {max(0, int(expires - time.time()))} s"
        )


@dataclass(frozen=True, slots=True)
class LeaseState:
    """What a lease file says: who holds it, until when (epoch seconds), and what for."""

    holder: str
    expires: float
    purpose: str = ""
    #: when its holder took it (epoch seconds; 0 if unknown)
    taken: float = 0.0


async def read_lease(storage: Store, name: str) -> LeaseState | None:
    """The lease's current state; None when nobody holds it. An unreadable file counts as an
    expired lease (so it can be taken over)."""
    try:
        state = json.loads(await storage.read(layout.lease(name)))
        return LeaseState(
            holder=str(state["holder"]),
            expires=float(state["expires"]),
            purpose=str(state.get("purpose", "")),
            taken=float(state.get("taken", 0.0)),
        )
    except PathNotFound:
        return None
    except (ValueError, KeyError, TypeError, AttributeError):
        return LeaseState("unreadable lease", 0.0)


class Lease:
    def __init__(self, storage: Store, name: str, ttl: float = 600.0, *, purpose: str = "") -> None:
        self.storage = storage
        self.name = name
        self.path = layout.lease(name)
        self.ttl = ttl
        self.purpose = purpose
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.taken = 0.0
        self._renewer: asyncio.Task[None] | None = None
        self._lost: BaseException | None = None
        #: the expiry the last successful write gave the lease (this holder's clock)
        self._expires = 0.0

    def _body(self, expires: float) -> bytes:
        state: dict[str, object] = {"holder": self.holder, "expires": expires}
        if self.purpose:
            state |= {"purpose": self.purpose, "taken": self.taken}
        return json.dumps(state).encode()

    async def _current(self) -> tuple[str, float] | None:
        state = await read_lease(self.storage, self.name)
        return None if state is None else (state.holder, state.expires)

    async def acquire(self) -> None:
        for _ in range(3):
            self.taken = time.time()
            expires = self.taken + self.ttl
            if await self.storage.write_new(self.path, self._body(expires)):
                self._expires = expires
                return
            current = await self._current()
            if current is None:
                continue
            holder, expires = current
            if expires > time.time():
                raise LeaseBusy(self.name, holder, expires)
            # Expired: its holder died. Remove it and race for it again.
            await self.storage.delete_if_present(self.path)
        current = await self._current()
        raise LeaseBusy(self.name, *(current or ("another process", time.time())))

    async def renew(self) -> None:
        current = await self._current()
        if current is None or current[0] != self.holder:
            raise LeaseBusy(self.name, current[0] if current else "nobody", 0.0)
        expires = time.time() + self.ttl
        await self.storage.write(self.path, self._body(expires))
        self._expires = expires

    async def release(self) -> None:
        current = await self._current()
        if current is not None and current[0] == self.holder:
            await self.storage.delete_if_present(self.path)

    def check(self) -> None:
        """Raise if the background renewal found the lease lost, or if it could not renew it
        in time: past the expiry it last wrote, others may take it over (or, for an immediate
        collection's lease, writable servers may resume writing)."""
        if self._lost is not None:
            raise LeaseBusy(self.name, "another holder (this one's lease lapsed)", 0.0)
        if time.time() >= self._expires:
            raise LeaseBusy(self.name, "nobody (this holder could not renew it in time)", 0.0)

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
