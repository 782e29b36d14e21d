"""The UI's first page: the repositories the visitor may pull, searchable and sortable, a page
at a time from the metadata index (a page costs the page, not the registry)."""

from __future__ import annotations

from aiohttp import web

from dockyard.api.v1.common import index_of
from dockyard.errors import ErrorCode, RegistryError
from dockyard.registry.records import RepositoryKey
from dockyard.ui.core import identity_or_login, render

#: repositories per page
PAGE = 50
SORTS = {"name": "Name", "tags": "Tags", "size": "Size", "pushed": "Last push"}
#: the direction a column sorts in when first clicked: biggest and newest first
FIRST_DESCENDING = {"tags", "size", "pushed"}
MAX_QUERY = 256


async def repositories(request: web.Request) -> web.Response:
    identity = identity_or_login(request)
    query = request.query.get("q", "")[:MAX_QUERY]
    sort = request.query.get("sort", "name")
    if sort not in SORTS:
        sort = "name"
    order = request.query.get("order", "desc" if sort in FIRST_DESCENDING else "asc")
    descending = order == "desc"
    after = None
    if request.query.get("after"):
        try:
            after = RepositoryKey.decode(request.query["after"], sort)
        except ValueError:
            raise RegistryError(
                ErrorCode.PAGINATION_NUMBER_INVALID, "this page link is not valid", status=400
            ) from None

    index = index_of(request)
    found = await index.repositories_sorted(
        sort, descending, after, PAGE + 1, identity.lists, contains=query
    )
    page = found[:PAGE]
    more = len(found) > PAGE
    next_after = RepositoryKey.of(page[-1], sort).encode() if more and page else None
    return render(
        request,
        "repositories.html",
        repositories=page,
        query=query,
        sort=sort,
        order="desc" if descending else "asc",
        sorts=SORTS,
        first_descending=FIRST_DESCENDING,
        next_after=next_after,
        first_page=after is None,
    )


def routes(root: str) -> list[web.AbstractRouteDef]:
    return [web.get(f"{root}/", repositories)]
