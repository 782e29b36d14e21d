"""A layer's file list: read from the blob through the model (dockyard.registry.layer_listing:
gzip, zstd or plain tar; bounded in bytes, entries and time; made once and kept), shown a page
at a time, with names escaped; each user may have only so many layers listed per minute."""

from __future__ import annotations

from aiohttp import web

from dockyard.api.base import REGISTRY_KEY
from dockyard.config import Config
from dockyard.errors import ErrorCode, RegistryError
from dockyard.http.request import client_address
from dockyard.oci.digest import Digest
from dockyard.registry.layer_listing import (
    LayerListings,
    ListingBusy,
    ListingLimiter,
    ListingLimits,
    printable,
    unsafe_path,
)
from dockyard.ui.core import render, state_of, visible_repository, visitor_of

#: entries per page
PAGE = 500
MAX_QUERY = 256


def listings_for(app: web.Application, config: Config) -> LayerListings:
    """One per worker: its memory cache and its share of the rate limit (``ui.layers``)."""
    bounds = config.ui.layers
    limits = ListingLimits(
        max_entries=bounds.maxentries,
        max_decompressed_bytes=bounds.maxbytes,
        max_seconds=bounds.timeout,
    )
    limiter = ListingLimiter(per_minute=bounds.perminute, burst=min(5, bounds.perminute))
    return LayerListings(app[REGISTRY_KEY].storage, limits, limiter)


async def layer(request: web.Request) -> web.Response:
    repo = visible_repository(request)
    digest = Digest.parse(request.match_info["digest"])
    info = await repo.blobs.stat(digest)  # linked to this repository, or BLOB_UNKNOWN
    visitor = visitor_of(request)
    listings: LayerListings = state_of(request).layers
    try:
        listing = await listings.listing(
            repo.blobs, digest, info.size, user=visitor.user or client_address(request)
        )
    except ListingBusy as busy:
        raise RegistryError(
            ErrorCode.TOOMANYREQUESTS,
            str(busy),
            status=429,
            headers={"Retry-After": str(max(1, round(busy.retry_after)))},
        ) from None
    query = request.query.get("q", "")[:MAX_QUERY]
    entries = [e for e in listing.entries if query in e.path] if query else listing.entries
    try:
        page = max(0, int(request.query.get("page", "0")))
    except ValueError:
        page = 0
    shown = entries[page * PAGE : (page + 1) * PAGE]
    return render(
        request,
        "layer.html",
        name=repo.name,
        digest=digest,
        size=info.size,
        listing=listing,
        entries=shown,
        matched=len(entries),
        query=query,
        page=page,
        pages=max(1, -(-len(entries) // PAGE)),
        printable=printable,
        unsafe_path=unsafe_path,
    )


def routes(root: str, name_pattern: str) -> list[web.AbstractRouteDef]:
    return [web.get(f"{root}/r/{{name:{name_pattern}}}/-/layer/{{digest}}", layer)]
