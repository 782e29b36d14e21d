"""The repository catalog: ``GET /v2/_catalog[?n=&last=]``."""

from __future__ import annotations

from aiohttp import web

from dockyard.api.base import int_query, registry_of
from dockyard.api.tags import next_link
from dockyard.auth.access import Need, requires
from dockyard.auth.middleware import identity_of
from dockyard.http.request import CONFIG_KEY
from dockyard.http.responses import json_response


@requires(Need.CATALOG)
async def catalog(request: web.Request) -> web.Response:
    n = int_query(request, "n")
    limit = request.app[CONFIG_KEY].catalog.maxentries
    if n is None or n > limit:
        n = limit
    identity = identity_of(request)
    page = await registry_of(request).catalog(n, request.query.get("last"), identity.lists)
    headers = {}
    if page.more:
        headers["Link"] = next_link(request.path, n, page.items[-1])
    return json_response({"repositories": page.items}, headers=headers)


def routes(prefix: str) -> list[web.AbstractRouteDef]:
    return [web.get(prefix + "/v2/_catalog", catalog)]
