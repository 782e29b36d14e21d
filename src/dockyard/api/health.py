"""``GET /debug/health``: registry:2's health endpoint, for compose healthchecks and load
balancers. 200 ``{}`` when storage can be written and read, 503 naming the failing check
otherwise. No authentication, so it says nothing more than which check failed: the error (paths,
bucket names, an S3 endpoint's message) goes to the log, once each time the state changes, and
stays on :class:`HealthCheck` for a listener that is not public. A result is reused for a second
so the endpoint cannot be used to hammer storage. ``health.storagedriver`` makes the check
periodic with a failure threshold (registry:2's semantics), or turns it off. The debug server
(``http.debug.addr``, api/metrics.py) shows each failing check with its error."""

from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import web

from dockyard.config import HealthStorageDriverConfig
from dockyard.http.responses import json_response
from dockyard.registry.repository import Registry
from dockyard.storage.driver import StorageError

HEALTH_PATH = "/debug/health"

#: What the public endpoint says about a failing check.
FAILED = "failed"

log = logging.getLogger("dockyard.health")


class HealthCheck:
    """The storage check (registry:2's ``storagedriver_<driver>``), configured by
    ``health.storagedriver``: asked for (default), periodic with a threshold, or off."""

    CACHE_SECONDS = 1.0

    def __init__(self, registry: Registry, config: HealthStorageDriverConfig | None = None) -> None:
        self.registry = registry
        self.config = config or HealthStorageDriverConfig()
        self.name = f"storagedriver_{registry.storage.name}"
        self._checked = float("-inf")
        self._failure: str | None = None
        #: failures in a row of the periodic check, and the last one's error
        self._failed_in_row = 0
        self._task: asyncio.Task[None] | None = None

    @property
    def periodic(self) -> bool:
        return self.config.enabled is True

    async def failures(self) -> dict[str, str]:
        """The failing checks, by name, each with its error text: for operators only."""
        if self.config.enabled is None and time.monotonic() - self._checked > self.CACHE_SECONDS:
            failure = await self._check()
            self._checked = time.monotonic()
            self._record(failure)
        return {} if self._failure is None else {self.name: self._failure}

    async def failed_checks(self) -> list[str]:
        """The names of the failing checks, which is all the public endpoint shows."""
        return list(await self.failures())

    async def _check(self) -> str | None:
        try:
            await self.registry.check_storage()
        except (StorageError, OSError) as exc:
            return str(exc) or type(exc).__name__
        return None

    async def check_once(self) -> None:
        """One run of the periodic check: the state turns failed only after ``threshold``
        failures in a row (registry:2's PeriodicThresholdChecker), passing at once."""
        failure = await self._check()
        if failure is None:
            self._failed_in_row = 0
            self._record(None)
            return
        self._failed_in_row += 1
        if self._failed_in_row >= max(1, self.config.threshold):
            self._record(failure)

    async def _run(self) -> None:
        while True:
            await self.check_once()
            await asyncio.sleep(self.config.interval)

    async def start(self) -> None:
        if self.periodic and self._task is None:
            self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def _record(self, failure: str | None) -> None:
        if (failure is None) == (self._failure is None):
            self._failure = failure  # no change of state: logged already
            return
        self._failure = failure
        if failure is not None:
            log.warning(
                "health check failed", extra={"fields": {"check": self.name, "error": failure}}
            )
        else:
            log.info("health check passes again", extra={"fields": {"check": self.name}})


HEALTH_KEY = web.AppKey("health", HealthCheck)


async def health(request: web.Request) -> web.Response:
    failed = await request.app[HEALTH_KEY].failed_checks()
    return json_response({name: FAILED for name in failed}, status=503 if failed else 200)


def routes(prefix: str) -> list[web.AbstractRouteDef]:
    return [web.get(prefix + HEALTH_PATH, health)]
