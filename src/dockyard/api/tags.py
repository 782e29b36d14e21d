"""Tag lists: ``GET /v2/<name>/tags/list[?n=&last=]`` (end-8a/b)."""

from __future__ import annotations

from urllib.parse import urlencode

from aiohttp import web

from dockyard.api.base import int_query, repository_of
from dockyard.auth.access import Need, requires
from dockyard.errors import ErrorCode, RegistryError
from dockyard.http.responses import json_response
from dockyard.registry.repository import paginate


def next_link(path: str, n: int, last: str) -> str:
    """RFC 5988 ``Link`` to the next page, relative as registry:2 sends it."""
    return f'<{path}?{urlencode({"n": n, "last": last})}>; rel="next"'


@requires(Need.PULL)
async def list_tags(request: web.Request) -> web.Response:
    repo = repository_of(request)
    if not await repo.exists():
        raise RegistryError(ErrorCode.NAME_UNKNOWN, detail={"name": repo.name})
    n = int_query(request, "n")
    page = paginate(await repo.tags.all(), n, request.query.get("last"))
    headers = {}
    if page.more and n is not None:
        headers["Link"] = next_link(request.path, n, page.items[-1])
    return json_response({"name": repo.name, "tags": page.items}, headers=headers)


def routes(prefix: str) -> list[web.AbstractRouteDef]:
    return [web.get(prefix + "/v2/{name:.+}/tags/list", list_tags)]
