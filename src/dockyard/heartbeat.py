"""This server process's presence in storage, and the write gate that goes with it.

Every worker records its presence (``/dockyard/instances/<id>``, registry.presence) before it
starts listening and refreshes it in the background, so that an immediate garbage collection
(``dockyard gc --grace 0``) can tell whether a writable server is running. Each worker records
its own rather than one per ``dockyard serve``: a worker can only gate its own requests on what
it has itself written and checked, and a record per worker needs no coordination between them.

On a writable server each refresh is the server's half of the handshake: write the presence,
then look for an immediate collection's marker. Pushes and deletes are accepted only while the
last refresh found none, and for at most ``VALID_INTERVALS`` intervals after it began (so a
server that cannot refresh its record stops writing before a collector would count it as
dead). Otherwise they are refused with 503 and ``Retry-After``, and reads go on: a collection
takes minutes, longer than clients and proxies hold a request open, and a registry that answers
pulls meanwhile is worth more than one that makes every push wait. While refused, the server
looks again every second, so writes resume as soon as the collection ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from typing import Any

from aiohttp import web

from dockyard.auth.access import Need, need_of
from dockyard.config import Config
from dockyard.errors import ErrorCode, RegistryError
from dockyard.http.responses import Handler
from dockyard.registry.cache import redis_from_config
from dockyard.registry.presence import (
    VALID_INTERVALS,
    Presence,
    PresenceRecords,
    immediate_collection,
    new_presence,
)
from dockyard.storage.driver import StorageError
from dockyard.storage.store import Store

log = logging.getLogger("dockyard.server")

#: how long start-up waits for the first refresh before serving anyway (writes refused until
#: a refresh succeeds)
FIRST_BEAT_TIMEOUT = 10.0
#: how often a server refusing writes looks again
RETRY_INTERVAL = 1.0
#: what a refused client is told to wait (seconds): collections take minutes
RETRY_AFTER = 10


class Heartbeat:
    def __init__(self, records: PresenceRecords, presence: Presence) -> None:
        self.records = records
        self.presence = presence
        self.interval = presence.interval
        #: writes are accepted while time.monotonic() is below this
        self._writes_until = -math.inf
        #: the holder of the immediate collection that holds writes back, if one does
        self._held_by: str | None = None
        self._redis_failed = False
        self._last_began = time.monotonic()
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def for_config(cls, config: Config, storage: Store, cache_kind: str) -> Heartbeat:
        maintenance = config.storage.maintenance
        presence = new_presence(
            "read-only" if maintenance.readonly.enabled else "writable",
            config.http.addr,
            maintenance.presence.interval,
            cache_kind,
        )
        redis = redis_from_config(config) if config.redis.addr else None
        return cls(PresenceRecords(storage, redis), presence)

    def accepting_writes(self) -> bool:
        return self.presence.writable and time.monotonic() < self._writes_until

    async def beat(self) -> None:
        """Refresh the presence; on a writable server, then look for the marker. StorageError
        if storage could not be written or read (writes stay allowed only until the last
        successful refresh's permission runs out). The Redis copy comes last: it is not part of
        the handshake."""
        began = self._last_began = time.monotonic()
        await self.records.write(self.presence)
        if self.presence.writable:
            await self._look_for_marker(began)
        await self._mirror_in_redis()

    async def _look_for_marker(self, began: float) -> None:
        marker = await immediate_collection(self.records.storage)
        if marker is not None:
            self._writes_until = -math.inf
            if self._held_by != marker.holder:
                log.warning(
                    "an immediate garbage collection is running: pushes and deletes are "
                    "refused until it ends",
                    extra={"fields": {"holder": marker.holder}},
                )
            self._held_by = marker.holder
            return
        self._writes_until = began + VALID_INTERVALS * self.interval
        if self._held_by is not None:
            log.info("the immediate garbage collection ended: pushes and deletes accepted")
            self._held_by = None

    async def _mirror_in_redis(self) -> None:
        """Best effort: the record in storage is the one the handshake relies on."""
        try:
            await self.records.write_redis(self.presence)
        except Exception as exc:
            if not self._redis_failed:
                log.warning("cannot record this server's presence in redis: %s", exc)
            self._redis_failed = True
        else:
            self._redis_failed = False

    async def _beat_forever(self, failing: bool) -> None:
        while True:
            # A writable server refusing writes looks again soon, to resume as soon as it can.
            soon = self.presence.writable and (failing or not self.accepting_writes())
            period = min(self.interval, RETRY_INTERVAL) if soon else self.interval
            # At a fixed rate: a slow refresh must not eat into the next one's permission.
            await asyncio.sleep(max(0.0, self._last_began + period - time.monotonic()))
            try:
                await self.beat()
                if failing:
                    log.info("this server's presence is recorded in storage again")
                failing = False
            except (StorageError, OSError) as exc:
                if not failing:
                    log.warning(
                        "cannot record this server's presence in storage (pushes and deletes "
                        "are refused once its last record is %.0f s old): %s",
                        VALID_INTERVALS * self.interval,
                        exc,
                    )
                failing = True
            except Exception:  # a bug must not stop the refreshes for good
                log.exception("recording this server's presence failed")
                failing = True

    async def start(self) -> None:
        """Record the presence (and do the handshake) before serving, then keep it fresh."""
        failing = False
        try:
            await asyncio.wait_for(self.beat(), FIRST_BEAT_TIMEOUT)
        except (StorageError, OSError, TimeoutError) as exc:
            failing = True
            log.warning(
                "cannot record this server's presence in storage; %s: %s",
                "pushes and deletes are refused until it can"
                if self.presence.writable
                else "retrying",
                exc,
            )
        self._task = asyncio.create_task(self._beat_forever(failing))

    async def stop(self) -> None:
        """Stop refreshing and withdraw the record (after the last request has finished)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(StorageError, OSError, TimeoutError):
            await asyncio.wait_for(self.records.withdraw(self.presence), 5.0)
        redis: Any = self.records.redis
        if redis is not None:
            with contextlib.suppress(Exception):
                await redis.aclose()

    @web.middleware
    async def write_gate(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Pushes and deletes only while :meth:`accepting_writes` (installed on writable
        servers; read-only ones refuse them anyway)."""
        need = need_of(request.match_info.handler)
        if (
            need in (Need.PUSH, Need.DELETE)
            and request.method not in ("GET", "HEAD")
            and not self.accepting_writes()
        ):
            if self._held_by is not None:
                message = (
                    "an immediate garbage collection is running (dockyard gc --grace 0); "
                    "pushes and deletes are accepted again when it ends"
                )
            else:
                message = (
                    "this server cannot record its presence in storage, which immediate "
                    "garbage collection relies on; pushes and deletes are refused until it can"
                )
            raise RegistryError(
                ErrorCode.UNAVAILABLE,
                message,
                status=503,
                headers={"Retry-After": str(RETRY_AFTER)},
            )
        return await handler(request)
