"""Open connections per client address (``http.limits.connectionsperaddress``), counted across
every worker of the instance.

The count lives in a table shared by the workers (dockyard.sharedmem): one row per client
address (IPv6 by its /64), one counter column per worker. A worker adds to and takes from its
own column only, and a worker that is started again (after a crash) first zeroes its column:
the connections its predecessor counted died with it. A row is free again when all its
counters are zero.

The address is the TCP peer: a connection is admitted before any request, so forwarding
headers are not known yet. Trusted proxies (``http.trustedproxies``) are exempt, since all the
clients behind them share their address.

When every slot of an address's bucket is held by other addresses with open connections, the
new connection is let in uncounted (and a warning logged). Buckets are chosen by a salted hash,
so that takes on the order of the table's size (32,768) distinct addresses holding connections
at once: a distributed flood a per-address limit cannot stop anyway, while refusing would turn
a full bucket into a denial of service for whoever lands in it.

Loaded by the supervising parent (which creates the table), so it imports no HTTP stack.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass

from dockyard.clientaddress import TrustedProxies, limit_key
from dockyard.sharedmem import SharedTable

log = logging.getLogger("dockyard.server")

_TAG = struct.Struct("<Q")
_COUNT = struct.Struct("<I")

#: a connection that was refused
REFUSED = -1


class ConnectionTable(SharedTable):
    """Open connections per address and worker, shared across ``fork``."""

    WAYS = 16
    DEFAULT_SLOTS = 32768

    def __init__(self, workers: int, slots: int = DEFAULT_SLOTS) -> None:
        if workers < 1:
            raise ValueError("at least one worker")
        self.workers = workers
        self._row = struct.Struct(f"<Q{workers}I")
        super().__init__(slots, self._row.size, self.WAYS)
        self.uncounted = 0

    def _counter(self, slot: int, worker: int) -> int:
        return slot + _TAG.size + worker * _COUNT.size

    def count(self, key: str) -> int:
        """Connections open from ``key`` (an address as limit_key gives it)."""
        bucket, tag = self.locate(key)
        with self.locked():
            for slot in self.bucket_slots(bucket):
                row = self._row.unpack_from(self.memory, slot)
                if row[0] == tag:
                    return sum(row[1:])
        return 0

    def acquire(self, key: str, worker: int, limit: int) -> int | None:
        """Count a new connection from ``key`` on ``worker``: the slot it is counted in, REFUSED
        when ``key`` already holds ``limit`` connections, or None when it could not be counted
        (the bucket is full)."""
        bucket, tag = self.locate(key)
        with self.locked():
            free = None
            for slot in self.bucket_slots(bucket):
                row = self._row.unpack_from(self.memory, slot)
                total = sum(row[1:])
                if row[0] == tag:
                    if total >= limit:
                        return REFUSED
                    return self._add(slot, worker, 1)
                if free is None and total == 0:
                    free = slot
            if free is None:
                self.uncounted += 1
                if self.uncounted == 1 or self.uncounted % 10_000 == 0:
                    log.warning(
                        "the connection table is full: a connection is not counted",
                        extra={"fields": {"uncounted": self.uncounted, "slots": self.slots}},
                    )
                return None
            _TAG.pack_into(self.memory, free, tag)
            return self._add(free, worker, 1)

    def release(self, slot: int, worker: int) -> None:
        with self.locked():
            self._add(slot, worker, -1)

    def _add(self, slot: int, worker: int, delta: int) -> int:
        at = self._counter(slot, worker)
        (value,) = _COUNT.unpack_from(self.memory, at)
        _COUNT.pack_into(self.memory, at, max(0, value + delta))
        return slot

    def reset_worker(self, worker: int) -> None:
        """Forget every connection ``worker`` counted (it is being started again)."""
        with self.locked():
            for slot in range(0, self.size, self.slot_size):
                at = self._counter(slot, worker)
                if _COUNT.unpack_from(self.memory, at)[0]:
                    _COUNT.pack_into(self.memory, at, 0)


@dataclass(frozen=True)
class Admitted:
    """A connection let in: where it is counted (None: exempt or uncounted)."""

    slot: int | None


class ConnectionLimiter:
    """One worker's view of the limit: admit a peer, release it when its connection ends."""

    def __init__(
        self, table: ConnectionTable, worker: int, limit: int, trusted: TrustedProxies
    ) -> None:
        self.table = table
        self.worker = worker
        self.limit = limit
        self.trusted = trusted

    def admit(self, peer: str) -> Admitted | None:
        """None if ``peer`` already holds its limit of connections."""
        if not peer or self.trusted.trusts(peer):
            return Admitted(None)
        slot = self.table.acquire(limit_key(peer), self.worker, self.limit)
        if slot == REFUSED:
            return None
        return Admitted(slot)

    def release(self, admitted: Admitted) -> None:
        if admitted.slot is not None:
            self.table.release(admitted.slot, self.worker)
