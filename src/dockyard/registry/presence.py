"""Which servers are running on this storage, for immediate garbage collection.

``dockyard gc --grace 0`` deletes everything no manifest references at once, without the grace
period and the stamps that make the online collector safe (registry.gc). That is only safe while
no server accepts pushes. registry:2 documents the same for its collector and checks nothing;
Dockyard checks:

- Every server process (every worker) records its *presence* in storage,
  ``/dockyard/instances/<id>``: writable or read-only, host, pid, address, when it started, how
  often it refreshes the record, and which blob descriptor cache it uses. It rewrites the record
  every ``storage.maintenance.presence.interval`` (default 15 s) and deletes it when it stops.
  A record not refreshed for ``STALE_INTERVALS`` intervals belongs to a server that died (a
  ``kill -9``, a lost machine) and counts for nothing. With ``redis.addr`` configured the
  record is also kept in Redis (a key that expires when the record would go stale); a server
  found in either place counts.
- The immediate collector's *marker* is its garbage-collection lease (registry.lease), taken
  with the purpose ``immediate``: created exclusively, renewed while the collection runs, removed
  at its end (or expired, if the collector died).

The handshake. The collector first writes its marker, then reads the presences, and refuses if
any writable server is alive (or if any server uses the Redis cache and the collector does not,
since it could not forget what it deletes). A writable server first writes its presence, then
reads the marker, and accepts pushes and deletes only while its last such check found no
immediate collection, and for at most ``VALID_INTERVALS`` intervals after it began writing that
presence (dockyard.heartbeat). Whichever of the two goes second sees the other: if the
server read the marker before the collector wrote it, the server's presence was already written
when the collector read the presences, so the collector refuses; otherwise the server sees the
marker and refuses writes until the collection is over. A server whose record the collector
found stale has not refreshed it for ``STALE_INTERVALS`` intervals, so by its own clock its
permission to write ran out ``STALE_INTERVALS - VALID_INTERVALS`` intervals before. Staleness is
measured in storage time (the record's modification time against that of the marker just
written), so the clocks of the collector's and the servers' machines need not agree.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any, Literal

from dockyard.registry import layout
from dockyard.registry.cache import read_epoch
from dockyard.registry.lease import LeaseState, read_lease
from dockyard.storage.driver import PathNotFound, StorageError
from dockyard.storage.store import Store

#: a record not refreshed for this many of its intervals belongs to a server that is gone
STALE_INTERVALS = 4
#: a writable server accepts writes for this many intervals after it began writing the presence
#: its last check of the marker followed (fewer than STALE_INTERVALS: it stops well before a
#: collector would take its record for that of a dead server)
VALID_INTERVALS = 2
#: object storage keeps times in whole seconds
TIME_RESOLUTION = 1.0
#: the purpose an immediate collection's garbage-collection lease carries: its marker
IMMEDIATE = "immediate"
#: the lease the collector holds (one collection at a time, immediate or not)
GC_LEASE = "gc"

Mode = Literal["writable", "read-only"]


@dataclass(frozen=True, slots=True)
class Presence:
    """One server process's record."""

    id: str
    mode: Mode
    host: str
    #: the worker's process id (with several workers, each has its own record)
    pid: int
    addr: str
    started: float
    interval: float
    #: the blob descriptor cache it answers from: "redis" or "none"
    cache: str

    @property
    def writable(self) -> bool:
        return self.mode == "writable"

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> Presence:
        raw = json.loads(data)
        return cls(
            id=str(raw["id"]),
            mode="read-only" if raw["mode"] == "read-only" else "writable",
            host=str(raw["host"]),
            pid=int(raw["pid"]),
            addr=str(raw.get("addr", "")),
            started=float(raw["started"]),
            interval=float(raw["interval"]),
            cache=str(raw.get("cache", "none")),
        )

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started))
        return (
            f"{self.mode} server on {self.host} (http.addr {self.addr or '?'}, "
            f"pid {self.pid}, started {started})"
        )


def new_presence(mode: Mode, addr: str, interval: float, cache: str) -> Presence:
    """This process's record, under a fresh id."""
    host = socket.gethostname()
    safe_host = re.sub(r"[^A-Za-z0-9.-]", "_", host)[:64] or "host"
    pid = os.getpid()
    return Presence(
        id=f"{safe_host}-{pid}-{uuid.uuid4().hex[:8]}",
        mode=mode,
        host=host,
        pid=pid,
        addr=addr,
        started=time.time(),
        interval=interval,
        cache=cache,
    )


def stale_after(presence: Presence) -> float:
    """Seconds without a refresh after which the record counts as that of a dead server."""
    return STALE_INTERVALS * presence.interval + TIME_RESOLUTION


@dataclass(frozen=True, slots=True)
class Sighting:
    """A record as the collector found it: ``age`` seconds since its last refresh (storage
    time; None when it was found only in Redis, where it expires by itself)."""

    presence: Presence
    age: float | None

    @property
    def alive(self) -> bool:
        return self.age is None or self.age <= stale_after(self.presence)

    def describe(self) -> str:
        seen = "seen in redis" if self.age is None else f"last seen {self.age:.0f} s ago"
        return f"{self.presence.describe()}, {seen}"


class PresenceRecords:
    """The records in storage, mirrored in Redis when a client is given."""

    def __init__(self, storage: Store, redis: Any | None = None) -> None:
        self.storage = storage
        self.redis = redis

    async def _redis_key(self, presence_id: str) -> str:
        return f"dockyard:{await read_epoch(self.storage)}:instance:{presence_id}"

    async def write(self, presence: Presence) -> None:
        """Record (or refresh) ``presence`` in storage; StorageError if that failed."""
        await self.storage.write(layout.instance(presence.id), presence.to_json())

    async def write_redis(self, presence: Presence) -> None:
        """Refresh the Redis copy (nothing without a client); raises what the client raises."""
        if self.redis is None:
            return
        key = await self._redis_key(presence.id)
        await self.redis.set(key, presence.to_json(), px=int(stale_after(presence) * 1000))

    async def withdraw(self, presence: Presence) -> None:
        """Remove the record (a server stopping). Best effort in Redis, where it expires."""
        with contextlib.suppress(PathNotFound):
            await self.storage.delete(layout.instance(presence.id))
        if self.redis is not None:
            with contextlib.suppress(Exception):
                await self.redis.delete(await self._redis_key(presence.id))

    async def sightings(self, now: float) -> list[Sighting]:
        """Every record, with its age at ``now`` (storage time). Raises StorageError when a
        configured Redis cannot be read: servers may be recorded only there."""
        found: dict[str, Sighting] = {}
        try:
            names = await self.storage.list(layout.instances_dir())
        except PathNotFound:
            names = []
        for name in names:
            path = layout.instance(name)
            try:
                info = await self.storage.stat(path)
                presence = Presence.from_json(await self.storage.read(path))
            except PathNotFound:
                continue  # withdrawn meanwhile
            except (ValueError, KeyError, TypeError):
                continue  # not a record (a partial write cannot happen: writes are atomic)
            found[presence.id] = Sighting(presence, max(0.0, now - info.modified))
        if self.redis is not None:
            try:
                prefix = f"dockyard:{await read_epoch(self.storage)}:instance:"
                keys = [key async for key in self.redis.scan_iter(match=f"{prefix}*")]
                values = await self.redis.mget(keys) if keys else []
            except Exception as exc:
                raise StorageError(
                    f"cannot read the servers' presences from redis: {exc}; an immediate "
                    "collection needs them"
                ) from exc
            for value in values:
                if value is None:
                    continue
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    presence = Presence.from_json(value)
                    # alive while the key lives, whatever storage says
                    found[presence.id] = Sighting(presence, None)
        return sorted(found.values(), key=lambda s: (s.presence.host, s.presence.started))

    async def remove_stale(self, sighting: Sighting) -> None:
        """Drop the record of a dead server (it is rewritten if that server was only stalled:
        it then finds the marker before it writes anything else)."""
        with contextlib.suppress(PathNotFound):
            await self.storage.delete(layout.instance(sighting.presence.id))


async def immediate_collection(storage: Store) -> LeaseState | None:
    """The marker of an immediate collection in progress, if there is one."""
    state = await read_lease(storage, GC_LEASE)
    if state is None or state.purpose != IMMEDIATE or state.expires <= time.time():
        return None
    return state


READ_ONLY_HOW = (
    "storage.maintenance.readonly.enabled: true, or REGISTRY_STORAGE_MAINTENANCE_READONLY_ENABLED"
    "=true"
)


class ImmediateCollectionRefused(Exception):
    """An immediate collection must not run now; the message says why and what to do."""

    def __init__(self, reason: str, sightings: list[Sighting], advice: str) -> None:
        self.reason = reason
        self.sightings = sightings
        self.advice = advice
        lines = [reason, *(f"  {s.describe()}" for s in sightings), advice]
        super().__init__("\n".join(lines))


def check_immediate(sightings: list[Sighting], cache_kind: str) -> None:
    """Raise ImmediateCollectionRefused if a writable server is alive, or if a live server
    answers from the Redis cache and this collector (``cache_kind``) cannot forget in it."""
    writers = [s for s in sightings if s.alive and s.presence.writable]
    if writers:
        raise ImmediateCollectionRefused(
            "an immediate collection (--grace 0) cannot run while a writable server uses "
            f"this storage; {len(writers)} running:",
            writers,
            "Stop them, or restart them read-only "
            f"({READ_ONLY_HOW}); run this again; then restart them writable. Read-only "
            "servers may keep serving. A server that died without stopping counts as "
            f"stopped once its record is {STALE_INTERVALS} refresh intervals old. (Or collect "
            "online, with a grace period above zero, while they serve.)",
        )
    if cache_kind != "redis":
        cached = [s for s in sightings if s.alive and s.presence.cache == "redis"]
        if cached:
            raise ImmediateCollectionRefused(
                "these servers answer blob requests from the Redis cache, which this "
                "collection is not configured to use:",
                cached,
                "Run it with the servers' configuration (storage.cache.blobdescriptor: redis "
                "and their redis section), so that it forgets every blob it deletes: "
                "otherwise they would still report those blobs as present.",
            )
