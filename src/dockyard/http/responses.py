"""Responses: the one place a :class:`~dockyard.errors.RegistryError` becomes the OCI error body,
JSON bodies, and the headers every response carries."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from dockyard.errors import RegistryError

#: a request handler, or what a middleware hands the request on to
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

API_VERSION_HEADER = ("Docker-Distribution-API-Version", "registry/2.0")
#: On every response instead of aiohttp's ``Python/3.x aiohttp/3.y``: versions help only those
#: looking for a known hole.
SERVER_HEADER = ("Server", "Dockyard")
JSON = "application/json; charset=utf-8"


def json_body(body: Any) -> bytes:
    """Compact JSON, as registry:2 sends it."""
    return json.dumps(body, separators=(",", ":")).encode()


def json_response(
    body: Any, status: int = 200, headers: dict[str, str] | None = None, content_type: str = JSON
) -> web.Response:
    return web.Response(
        body=json_body(body),
        status=status,
        headers={"Content-Type": content_type, **(headers or {})},
    )


def error_body(error: RegistryError) -> bytes:
    """``{"errors": [{"code", "message", "detail"}]}``: what every error answer carries, also
    those written below aiohttp (api.admission)."""
    return json_body(error.to_json())


def error_response(error: RegistryError) -> web.Response:
    return web.Response(
        body=error_body(error),
        status=error.status,
        headers={"Content-Type": JSON, **error.headers},
    )


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
    """An ``on_response_prepare`` signal handler setting :func:`set_common_headers`."""

    async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
        set_common_headers(response, extra)

    return on_prepare
