"""What is known of a request before any handler runs: the configuration it is served under,
who sent it (the caller's address, decided once per request) and the URLs the client sees
(``Location`` headers and the token realm, behind proxies and under ``http.prefix``)."""

from __future__ import annotations

import functools
import ipaddress
import re

from aiohttp import web

from dockyard.clientaddress import TrustedProxies, canonical
from dockyard.config import Config
from dockyard.http.responses import Handler

CONFIG_KEY = web.AppKey("config", Config)

#: where client_address_middleware leaves the caller's address on the request
CLIENT_ADDRESS = web.RequestKey("client_address", str)
#: the request's trace id (32 hex digits), when tracing is on (see dockyard.tracing)
TRACE_ID = web.RequestKey("trace_id", str)


# -- the caller ------------------------------------------------------------------------------


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


@functools.lru_cache(maxsize=1024)  # bounded: hosts come from clients
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
    """Absolute (or relative) URL of ``path`` (``/v2/...``, ``/auth/token``) under the
    configured prefix."""
    return f"{base_url(request)}{request.app[CONFIG_KEY].http.prefix}{path}"
