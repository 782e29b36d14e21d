"""Space used, from the metadata index: ``GET /dockyard/api/v1/usage[?n=&last=&q=]``.

Every caller gets a page of the repositories they may pull (as the repository list), each with
its bytes, uploads in progress and the quotas that hold it, and those quotas' usage beside their
limits: a team sees how close it is to the quota it pushes against. An administrator also gets
the whole registry's usage and every configured quota, whether or not it holds a repository of
the page."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from dockyard.api.v1.common import ROOT, index_of, last_of, page_response, page_size
from dockyard.auth.access import Identity, Need, requires
from dockyard.auth.middleware import identity_of
from dockyard.http.request import CONFIG_KEY
from dockyard.registry.index import Index, Usage
from dockyard.registry.quotas import in_scope


def usage_json(usage: Usage, limit: int | None) -> dict[str, Any]:
    return {
        "scope": usage.scope,
        "limit": limit,
        "bytes": usage.bytes,
        "blobs": usage.blobs,
        "repositories": usage.repositories,
        "uploading": usage.uploading,
    }


class _Scopes:
    """Each scope's usage read once per request, however many repositories of the page it
    holds."""

    def __init__(self, index: Index) -> None:
        self.index = index
        self.read: dict[str, Usage] = {}

    async def of(self, scope: str) -> Usage:
        if scope not in self.read:
            self.read[scope] = await self.index.usage(scope)
        return self.read[scope]


@requires(Need.CATALOG)
async def usage(request: web.Request) -> web.Response:
    n = page_size(request)
    body, more, last = await usage_report(
        request, identity_of(request), n, last_of(request), request.query.get("q", "")
    )
    return page_response(request, body, n, more, last)


async def usage_report(
    request: web.Request, identity: Identity, n: int, after: str | None, query: str
) -> tuple[dict[str, Any], bool, str | None]:
    """The usage body for ``identity`` (this route's, and the web UI's usage page): a page of
    ``n`` repositories after ``after`` whose names hold ``query``; whether more follow, and
    the name the page ends at."""
    admin = identity.is_admin
    index = index_of(request)
    quotas = [(q.scope, q.limit) for q in request.app[CONFIG_KEY].quotas]

    def visible(name: str) -> bool:
        return query in name and identity.lists(name)

    found = await index.repositories(after, n + 1, visible) if n else []
    page = found[:n]
    scopes = _Scopes(index)
    repositories = []
    for summary in page:
        own = await scopes.of(summary.name)  # a repository is a scope of its own
        repositories.append(
            {
                "name": summary.name,
                "tags": summary.tags,
                "manifests": summary.manifests,
                "size": summary.size,
                "blobs": own.blobs,
                "uploading": own.uploading,
                "quotas": [scope for scope, _ in quotas if in_scope(scope, summary.name)],
            }
        )
    # Administrators see what each repository alone holds (others would learn that content
    # they cannot see shares their layers).
    unique = await index.unique_bytes(s.name for s in page) if admin else {}
    for entry in repositories:
        entry["unique"] = unique.get(entry["name"])
    named = {scope for entry in repositories for scope in entry["quotas"]}
    shown = [(scope, limit) for scope, limit in quotas if admin or scope in named]
    # Read from tallies, never counted per request (with Redis a count would hold it).
    await index.tally([*(["*"] if admin else []), *(scope for scope, _ in shown)])
    body: dict[str, Any] = {
        "admin": admin,
        "total": usage_json(await scopes.of("*"), None) if admin else None,
        "quotas": [usage_json(await scopes.of(scope), limit) for scope, limit in shown],
        "repositories": repositories,
    }
    return body, len(found) > n, page[-1].name if page else None


def routes(prefix: str) -> list[web.AbstractRouteDef]:
    return [web.get(f"{prefix}{ROOT}/usage", usage)]
