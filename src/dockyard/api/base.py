"""What every handler shares: app state keys, the error middleware (the one place an error
becomes an OCI JSON body), common headers, URL building behind proxies, and request parsing."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from dockyard.auth.access import Need, need_of, requires
from dockyard.clientaddress import TrustedProxies, canonical
from dockyard.config import Config
from dockyard.errors import ErrorCode, RegistryError
from dockyard.oci.digest import Digest
from dockyard.registry.repository import Registry, Repository
from dockyard.storage.driver import StorageError

log = logging.getLogger("dockyard.api")

REGISTRY_KEY = web.AppKey("registry", Registry)
CONFIG_KEY = web.AppKey("config", Config)

API_VERSION_HEADER = ("Docker-Distribution-API-Version", "registry/2.0")
#: where client_address_middleware leaves the caller's address on the request
CLIENT_ADDRESS = web.RequestKey("client_address", str)
#: On every response instead of aiohttp's ``Python/3.x aiohttp/3.y``: versions help only those
#: looking for a known hole.
SERVER_HEADER = ("Server", "Dockyard")
JSON = "application/json; charset=utf-8"

#: Set (by api.protocol) on a request whose client holds its body back until invited
#: (``Expect: 100-continue``); CONTINUE_SENT once the invitation went out (see send_continue).
EXPECTS_CONTINUE = "dockyard.expects_continue"
CONTINUE_SENT = "dockyard.continue_sent"

#: An error answered before the request body was read (a 401 before an upload, a 413 part-way
#: through a manifest) closes the connection; before closing, at most this much of the unread
#: body is read and discarded, for at most this long, so that the client is reading the answer
#: rather than a connection reset. aiohttp alone would go on reading for 10 s.
UNREAD_BODY_DRAIN_BYTES = 256 * 1024
UNREAD_BODY_DRAIN_SECONDS = 1.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def registry_of(request: web.Request) -> Registry:
    return request.app[REGISTRY_KEY]


def repository_of(request: web.Request) -> Repository:
    return registry_of(request).repository(request.match_info["name"])


def digest_param(request: web.Request, key: str = "digest") -> Digest:
    return Digest.parse(request.match_info[key])


def json_response(
    body: Any, status: int = 200, headers: dict[str, str] | None = None, content_type: str = JSON
) -> web.Response:
    return web.Response(
        body=json.dumps(body, separators=(",", ":")).encode(),
        status=status,
        headers={"Content-Type": content_type, **(headers or {})},
    )


def error_response(error: RegistryError) -> web.Response:
    return json_response(error.to_json(), status=error.status, headers=error.headers)


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


# -- URLs ------------------------------------------------------------------------------------


def base_url(request: web.Request) -> str:
    """Scheme and host for absolute ``Location`` headers, derived as registry:2 does:
    ``http.host`` if configured, else ``X-Forwarded-Proto`` / ``Forwarded: proto=`` / the
    connection's TLS for the scheme, and ``X-Forwarded-Host`` (first entry) / ``Forwarded:
    host=`` / ``Host`` for the host, with ``X-Forwarded-Port`` when the host has no port.
    Empty with ``http.relativeurls``."""
    http = request.app[CONFIG_KEY].http
    if http.relativeurls:
        return ""
    if http.host:
        return http.host
    headers = request.headers
    forwarded = _parse_forwarded(headers.get("Forwarded", ""))
    scheme = (_first(headers.get("X-Forwarded-Proto")) or forwarded.get("proto") or "").lower()
    if scheme not in ("http", "https"):
        scheme = "https" if request.secure else "http"
    host = _first(headers.get("X-Forwarded-Host")) or forwarded.get("host") or request.host
    if not is_valid_host(host):
        # Whatever a client sent is not echoed into Location (a response splitting or phishing
        # aid); a relative Location is valid HTTP, and every client resolves it against the
        # URL it just used.
        return ""
    port = _first(headers.get("X-Forwarded-Port"))
    if _PORT.fullmatch(port) and not _has_port(host):
        host = f"{host}:{port}"
    return f"{scheme}://{host}"


_PORT = re.compile(r"[0-9]{1,5}")
_HOST_NAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


def is_valid_host(host: str) -> bool:
    """``host[:port]`` as RFC 3986 has it, strictly: DNS-style names (with ``_``, as compose
    service names have), IPv4, or a bracketed IPv6 literal; a port of 1 to 5 digits."""
    if not host or len(host) > 260:  # a 253-character name, a final '.', ':' and 5 digits
        return False
    name, port = host, ""
    if host.startswith("["):
        literal, bracket, port = host[1:].partition("]")
        if not bracket or (port and not port.startswith(":")):
            return False
        try:
            ipaddress.IPv6Address(literal)
        except ValueError:
            return False
        port = port[1:] if port else ""
        return not port or bool(_PORT.fullmatch(port))
    if ":" in host:
        name, _, port = host.partition(":")
        if not _PORT.fullmatch(port):
            return False
    labels = name[:-1].split(".") if name.endswith(".") else name.split(".")
    return all(_HOST_NAME.fullmatch(label) for label in labels)


def _first(value: str | None) -> str:
    return value.split(",", 1)[0].strip() if value else ""


def _has_port(host: str) -> bool:
    if host.startswith("["):
        return "]:" in host
    return ":" in host


def _parse_forwarded(value: str) -> dict[str, str]:
    """The first element of an RFC 7239 ``Forwarded`` header, as a dict."""
    out: dict[str, str] = {}
    first = value.split(",", 1)[0]
    for pair in first.split(";"):
        if "=" in pair:
            k, v = pair.split("=", 1)
            out[k.strip().lower()] = v.strip().strip('"')
    return out


def url_for(request: web.Request, path: str) -> str:
    """Absolute (or relative) URL of ``/v2/...`` under the configured prefix."""
    return f"{base_url(request)}{request.app[CONFIG_KEY].http.prefix}{path}"


# -- middleware and signals -----------------------------------------------------------------------


def client_address(request: web.BaseRequest) -> str:
    """The caller's address, for limits and logs (see dockyard.clientaddress). Before the
    middleware below has run (a request too malformed to reach it), the TCP peer."""
    return request.get(CLIENT_ADDRESS) or canonical(request.remote or "")


def client_address_middleware(trusted: TrustedProxies) -> web.Middleware:
    """Decides the caller's address once per request: the peer, or what ``trusted`` proxies
    forwarded."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        forwarded = request.headers.getall("X-Forwarded-For", []) if trusted else []
        request[CLIENT_ADDRESS] = trusted.client(request.remote or "", forwarded)
        return await handler(request)

    return middleware


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        response = await handler(request)
    except RegistryError as exc:
        return await _answer_error(request, exc)
    except web.HTTPException as exc:
        return await _answer_error(request, _from_http_exception(exc))
    except HttpProcessingError as exc:
        # A body that broke off midway (client went away, bad chunked encoding).
        log.info("request body failed: %s %s: %s", request.method, request.path, exc.message)
        return await _answer_error(
            request,
            RegistryError(ErrorCode.BLOB_UPLOAD_INVALID, f"request body failed: {exc.message}"),
        )
    except ConnectionResetError:
        raise
    except StorageError:
        log.exception("storage failure on %s %s", request.method, request.path)
        return await _answer_error(request, RegistryError(ErrorCode.UNKNOWN, "storage failure"))
    except Exception:
        log.exception("unexpected failure on %s %s", request.method, request.path)
        return await _answer_error(request, RegistryError(ErrorCode.UNKNOWN))
    if request.can_read_body:
        # Answered without taking the body (an upload start that ignores one): the connection
        # cannot carry another request until the rest arrives, which it need not. aiohttp reads
        # and discards it for at most UNREAD_BODY_DRAIN_SECONDS (its lingering time, set in
        # worker.py), then closes.
        response.force_close()
    return response


async def _answer_error(request: web.Request, error: RegistryError) -> web.StreamResponse:
    response = error_response(error)
    if not request.can_read_body:
        return response
    # The body was not read, or not all of it (401 before an upload, 413 inside a manifest):
    # answer, drain a little, and close, rather than read the rest of what may be gigabytes.
    response.force_close()
    try:
        await response.prepare(request)
        await response.write_eof()
        if not request.get(EXPECTS_CONTINUE) or request.get(CONTINUE_SENT):
            await _drain(request)  # otherwise the client waits for us: nothing is coming
    except ConnectionError:
        pass
    request.protocol.force_close()  # now, not after aiohttp's 10 s of lingering
    return response


async def _drain(request: web.Request) -> None:
    budget = UNREAD_BODY_DRAIN_BYTES
    try:
        async with asyncio.timeout(UNREAD_BODY_DRAIN_SECONDS):
            while budget > 0:
                chunk = await request.content.readany()
                if not chunk:
                    return
                budget -= len(chunk)
    except (TimeoutError, HttpProcessingError, web.RequestPayloadError):
        pass


def _from_http_exception(exc: web.HTTPException) -> RegistryError:
    if exc.status == 405:
        return RegistryError(
            ErrorCode.UNSUPPORTED, f"method not allowed on {exc.reason}", status=405
        )
    if exc.status == 404:
        return RegistryError(ErrorCode.UNSUPPORTED, "no such endpoint", status=404)
    if exc.status == 413:
        return RegistryError(ErrorCode.SIZE_INVALID, "request body too large", status=413)
    return RegistryError(ErrorCode.UNKNOWN, exc.reason, status=exc.status)


_ENCODED_SEPARATOR = re.compile(r"%(?:2f|5c)", re.IGNORECASE)


def encoded_separator_middleware(prefix: str) -> web.Middleware:
    """``%2F`` (or ``%5C``) in a ``/v2`` path is refused with NAME_INVALID: aiohttp's router
    decodes it, so ``/v2/a%2Fb/...`` would name the repository ``a/b``, a name the path never
    spelled. Refused before authentication, so no token scope is ever checked against one."""
    v2 = prefix + "/v2/"

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.raw_path.partition("?")[0]
        if path.startswith(v2) and _ENCODED_SEPARATOR.search(path):
            raise RegistryError(
                ErrorCode.NAME_INVALID,
                "an encoded '/' or '\\' (%2F, %5C) in the path is not a separator",
            )
        return await handler(request)

    return middleware


@web.middleware
async def read_only_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """``storage.maintenance.readonly``: pulls work; pushes and deletes get 405, as registry:2
    answers them (it unregisters those methods), with an UNSUPPORTED body saying why."""
    need = need_of(request.match_info.handler)
    if need in (Need.PUSH, Need.DELETE) and request.method not in ("GET", "HEAD"):
        raise RegistryError(
            ErrorCode.UNSUPPORTED,
            "the registry is in read-only mode (storage.maintenance.readonly.enabled)",
            status=405,
        )
    return await handler(request)


def set_common_headers(response: web.StreamResponse, extra: dict[str, list[str]]) -> None:
    """The API version, the neutral Server header, and ``http.headers``."""
    response.headers[API_VERSION_HEADER[0]] = API_VERSION_HEADER[1]
    response.headers[SERVER_HEADER[0]] = SERVER_HEADER[1]
    for name, values in extra.items():
        if name.lower() == SERVER_HEADER[0].lower():  # http.headers may name the server
            response.headers.popall(name, None)
        for value in values:
            response.headers.add(name, value)


def add_common_headers(extra: dict[str, list[str]]) -> Callable[..., Awaitable[None]]:
    async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
        set_common_headers(response, extra)

    return on_prepare


@requires(Need.AUTHENTICATED)
async def version_check(request: web.Request) -> web.Response:
    """end-1: ``GET /v2/`` — the registry speaks the v2 API."""
    return json_response({})
