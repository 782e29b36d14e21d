"""Tag lists: ``GET /v2/<name>/tags/list[?n=&last=]`` (end-8a/b)."""

from __future__ import annotations

from urllib.parse import urlencode

from aiohttp import web

from dockyard.api.base import cache_headers, int_query, proxied_of, repository_of
from dockyard.auth.access import Need, requires
from dockyard.errors import ErrorCode, RegistryError
from dockyard.http.responses import json_response


def next_link(path: str, n: int, last: str) -> str:
    """RFC 5988 ``Link`` to the next page, relative as registry:2 sends it."""
    return f'<{path}?{urlencode({"n": n, "last": last})}>; rel="next"'


@requires(Need.PULL)
async def list_tags(request: web.Request) -> web.Response:
    n = int_query(request, "n")
    headers: dict[str, str] = {}
    proxied = proxied_of(request)
    if proxied is not None:
        page, stale = await proxied.tags(n, request.query.get("last"))
        headers |= cache_headers(stale)
        name = request.match_info["name"]
    else:
        repo = repository_of(request)
        if not await repo.exists():
            raise RegistryError(ErrorCode.NAME_UNKNOWN, detail={"name": repo.name})
        page = await repo.tags.page(n, request.query.get("last"))
        name = repo.name
    if page.more and n is not None:
        headers["Link"] = next_link(request.path, n, page.items[-1])
    return json_response({"name": name, "tags": page.items}, headers=headers)


def routes(prefix: str) -> list[web.AbstractRouteDef]:
    return [web.get(prefix + "/v2/{name:.+}/tags/list", list_tags)]
