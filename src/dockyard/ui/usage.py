"""The usage page: space per repository the visitor may pull (from the JSON API's usage
report), the quotas that hold them against their limits, and what the last garbage collection
found to reclaim; drawn as bars in inline SVG (no script)."""

from __future__ import annotations

from aiohttp import web

from dockyard.api.base import registry_of
from dockyard.api.v1.usage import usage_report
from dockyard.registry.gc import last_run
from dockyard.ui.core import identity_or_login, render

PAGE = 50
#: the chart's bars, at most
CHART_BARS = 20


async def usage(request: web.Request) -> web.Response:
    identity = identity_or_login(request)
    query = request.query.get("q", "")[:256]
    after = request.query.get("after") or None
    body, more, last = await usage_report(request, identity, PAGE, after, query)
    repositories = body["repositories"]
    biggest = sorted(repositories, key=lambda r: r["size"], reverse=True)[:CHART_BARS]
    scale = max((r["size"] for r in biggest), default=0) or 1
    gc = await last_run(registry_of(request).storage) if identity.is_admin else None
    return render(
        request,
        "usage.html",
        report=body,
        chart=[(r["name"], r["size"], r["size"] / scale) for r in biggest],
        query=query,
        next_after=last if more else None,
        first_page=after is None,
        gc=gc,
    )


def routes(root: str) -> list[web.AbstractRouteDef]:
    return [web.get(f"{root}/usage", usage)]
