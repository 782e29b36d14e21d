"""``GET /debug/health``: registry:2's health endpoint, for compose healthchecks and load
balancers. 200 ``{}`` when storage can be written and read, 503 naming the failing check
otherwise. No authentication, so it says nothing more than which check failed: the error (paths,
bucket names, an S3 endpoint's message) goes to the log, once each time the state changes, and
stays on :class:`HealthCheck` for a listener that is not public. A result is reused for a second
so the endpoint cannot be used to hammer storage."""

from __future__ import annotations

import logging
import time

from aiohttp import web

from dockyard.http.responses import json_response
from dockyard.registry.repository import Registry
from dockyard.storage.driver import StorageError

HEALTH_PATH = "/debug/health"

#: What the public endpoint says about a failing check.
FAILED = "failed"

log = logging.getLogger("dockyard.health")


class HealthCheck:
    CACHE_SECONDS = 1.0

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.name = f"storagedriver_{registry.storage.name}"
        self._checked = float("-inf")
        self._failure: str | None = None

    async def failures(self) -> dict[str, str]:
        """The failing checks, by name, each with its error text: for operators only."""
        if time.monotonic() - self._checked > self.CACHE_SECONDS:
            try:
                await self.registry.check_storage()
                failure = None
            except (StorageError, OSError) as exc:
                failure = str(exc) or type(exc).__name__
            self._checked = time.monotonic()
            self._record(failure)
        return {} if self._failure is None else {self.name: self._failure}

    async def failed_checks(self) -> list[str]:
        """The names of the failing checks, which is all the public endpoint shows."""
        return list(await self.failures())

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
