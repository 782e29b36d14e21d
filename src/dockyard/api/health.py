"""``GET /debug/health``: registry:2's health endpoint, for compose healthchecks and load
balancers. 200 ``{}`` when storage can be written and read, 503 with the failing check
otherwise. No authentication (it reveals nothing), and a result is reused for a second so the
endpoint cannot be used to hammer storage."""

from __future__ import annotations

import time

from aiohttp import web

from dockyard.api.base import json_response
from dockyard.registry.repository import Registry
from dockyard.storage.driver import StorageError

HEALTH_PATH = "/debug/health"


class HealthCheck:
    CACHE_SECONDS = 1.0

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.name = f"storagedriver_{registry.driver.name}"
        self._checked = float("-inf")
        self._failure: str | None = None

    async def failures(self) -> dict[str, str]:
        if time.monotonic() - self._checked > self.CACHE_SECONDS:
            try:
                await self.registry.check_storage()
                self._failure = None
            except (StorageError, OSError) as exc:
                self._failure = str(exc)
            self._checked = time.monotonic()
        return {} if self._failure is None else {self.name: self._failure}


HEALTH_KEY = web.AppKey("health", HealthCheck)


async def health(request: web.Request) -> web.Response:
    failures = await request.app[HEALTH_KEY].failures()
    return json_response(failures, status=503 if failures else 200)


def routes(prefix: str) -> list[web.AbstractRouteDef]:
    return [web.get(prefix + HEALTH_PATH, health)]
