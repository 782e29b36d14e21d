"""The version check: ``GET /v2/`` (end-1)."""

from __future__ import annotations

from aiohttp import web

from dockyard.auth.access import Need, requires
from dockyard.http.responses import json_response


@requires(Need.AUTHENTICATED)
async def version_check(request: web.Request) -> web.Response:
    """The registry speaks the v2 API."""
    return json_response({})


def routes(prefix: str) -> list[web.AbstractRouteDef]:
    return [web.get(prefix + "/v2/", version_check), web.get(prefix + "/v2", version_check)]
