"""What the handlers share: the registry on the application, the parameters every resource
parses (repository, digest, numbers in the query) and the request body, streamed."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator

from aiohttp import web

from dockyard.errors import ErrorCode, RegistryError
from dockyard.http.request import CONFIG_KEY
from dockyard.oci.digest import Digest
from dockyard.registry.proxy import ProxiedRepository, PullThroughCache
from dockyard.registry.repository import Registry, Repository

REGISTRY_KEY = web.AppKey("registry", Registry)
#: the pull-through cache, on an application whose configuration has ``proxy`` upstreams
PROXY_KEY = web.AppKey("proxy", PullThroughCache)

#: Set (by api.protocol) on a request whose client holds its body back until invited
#: (``Expect: 100-continue``); CONTINUE_SENT once the invitation went out (see send_continue).
EXPECTS_CONTINUE = web.RequestKey("expects_continue", bool)
CONTINUE_SENT = web.RequestKey("continue_sent", bool)


def registry_of(request: web.Request) -> Registry:
    return request.app[REGISTRY_KEY]


def proxied_of(request: web.Request) -> ProxiedRepository | None:
    """The proxied repository the request names (see upstream.routing: a prefix, containerd's
    ``ns=``, a default upstream), or None for a local repository."""
    cache = request.app.get(PROXY_KEY)
    if cache is None:
        return None
    route = cache.route(request.match_info["name"], request.query.get("ns"))
    return cache.repository(route) if route is not None else None


def repository_of(request: web.Request) -> Repository:
    """The repository to read: for a proxied name, the one that caches it."""
    proxied = proxied_of(request)
    if proxied is not None:
        return proxied.local
    return registry_of(request).repository(request.match_info["name"])


def cache_headers(stale: bool) -> dict[str, str]:
    """A cached answer served because the upstream could not be asked (stale-if-error): said
    in RFC 9211's ``Cache-Status`` and RFC 7234's ``Warning: 110``."""
    if not stale:
        return {}
    return {
        "Cache-Status": "dockyard; hit; detail=stale-upstream-unavailable",
        "Warning": '110 dockyard "Response is Stale"',
    }


def writable_repository_of(request: web.Request) -> Repository:
    """The repository to change; a proxied name is refused as registry:2 refuses writes to a
    cache (405 UNSUPPORTED)."""
    if proxied_of(request) is not None:
        raise RegistryError(
            ErrorCode.UNSUPPORTED,
            "this repository is a pull-through cache of an upstream registry: it cannot be "
            "pushed to or deleted from",
            {"name": request.match_info["name"]},
        )
    return registry_of(request).repository(request.match_info["name"])


def digest_param(request: web.Request, key: str = "digest") -> Digest:
    return Digest.parse(request.match_info[key])


def require_delete(request: web.Request) -> None:
    if not registry_of(request).delete_enabled:
        raise RegistryError(
            ErrorCode.UNSUPPORTED,
            "deletes are disabled (set storage.delete.enabled to true)",
        )


_QUERY_INTEGER = re.compile(r"[0-9]{1,18}")  # ASCII digits (str.isdigit takes '²'), int64


def int_query(request: web.Request, key: str) -> int | None:
    text = request.query.get(key)
    if text is None or text == "":
        return None
    if not _QUERY_INTEGER.fullmatch(text):
        raise RegistryError(
            ErrorCode.PAGINATION_NUMBER_INVALID,
            f"{key} must be a non-negative integer below 10^18",
            {key: text},
        )
    return int(text)


async def send_continue(request: web.Request) -> None:
    """Invite the body a client holds back with ``Expect: 100-continue``. Called when a handler
    starts reading the body, so only after authentication and the handler's own checks: aiohttp
    would invite it on arrival, and an anonymous client would send gigabytes to hear 401."""
    if request.get(EXPECTS_CONTINUE) and not request.get(CONTINUE_SENT):
        request[CONTINUE_SENT] = True
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the response proper has not started (as aiohttp does)


async def body_stream(request: web.Request) -> AsyncIterator[bytes]:
    """The request body as it arrives (chunked or not), never buffered whole.

    A body that delivers no byte for ``http.limits.bodyidletimeout`` is abandoned: the request
    fails with 408 and the connection is closed, so a stalled client holds nothing for long,
    while a slow link that keeps moving finishes, however long it takes. (The timeout is per
    read; reads return everything that arrived, a few hundred KiB at speed, so it costs
    microseconds per megabyte.)"""
    await send_continue(request)
    content = request.content
    idle = request.app[CONFIG_KEY].http.limits.bodyidletimeout
    while True:
        try:
            async with asyncio.timeout(idle):
                chunk = await content.readany()
        except TimeoutError:
            raise RegistryError(
                ErrorCode.BLOB_UPLOAD_INVALID,
                f"no data received for {idle:g} s (http.limits.bodyidletimeout); request abandoned",
                status=408,
                headers={"Connection": "close"},
            ) from None
        if not chunk:
            return
        yield chunk
        del chunk  # not kept alive while the next read waits (a stalled client's last read)


def content_length(request: web.Request) -> int | None:
    """The declared body length; None for a chunked (streamed) body."""
    if "Transfer-Encoding" in request.headers:
        return None
    return request.content_length
