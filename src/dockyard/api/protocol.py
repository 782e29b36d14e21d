"""The HTTP/1 connection under the application: what aiohttp does before routing a request, or
instead of it, made to answer the way the rest of the API does.

aiohttp answers some requests itself, before any middleware runs:

- ``Expect: 100-continue`` gets ``100 Continue`` as soon as the request is routed, before
  authentication: an anonymous client is invited to send its whole body only to hear 401. The
  header is taken from aiohttp here, and ``base.send_continue`` sends the invitation when a
  handler starts reading the body. Other expectations are ignored, as RFC 9110 allows.
- A request it cannot parse (a malformed request line or header, a request line or header field
  larger than ``http.limits.maxheaderbytes``) got a ``text/plain`` answer naming aiohttp's
  version and a traceback at level error in the log, with the start of the offending header
  (perhaps a password) in it. Here it gets an OCI error body (431 for an oversized header), the
  usual headers, and only a debug line: the access log records the request.
- A request line without a version is HTTP/0.9 to aiohttp, which answered ``HTTP/0.9 200`` (and
  ``HTTP/2.0`` in an HTTP/1 request line got an ``HTTP/2.0`` answer). Both are refused here on
  an HTTP/1.1 status line with 400, and the connection closed.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import hdrs, web
from aiohttp.http import HttpVersion, HttpVersion10, HttpVersion11, RawRequestMessage
from aiohttp.http_exceptions import (
    BadStatusLine,
    HttpProcessingError,
    InvalidURLError,
    LineTooLong,
)
from aiohttp.web_protocol import ERROR as UNPARSABLE_REQUEST
from aiohttp.web_protocol import RequestHandler
from multidict import CIMultiDict, CIMultiDictProxy

from dockyard.api.base import EXPECTS_CONTINUE
from dockyard.errors import ErrorCode, RegistryError
from dockyard.http.request import CONFIG_KEY
from dockyard.http.responses import error_response, set_common_headers

log = logging.getLogger("dockyard.api")

#: On a request whose request line named no HTTP/1.x version: what it named.
REFUSED_VERSION = web.RequestKey("refused_version", HttpVersion)


def refusal(exc: HttpProcessingError, max_header_bytes: int) -> RegistryError:
    """The answer to a request aiohttp could not parse. Never quotes the request: the part that
    failed may be a header carrying credentials."""
    if isinstance(exc, LineTooLong):
        return RegistryError(
            ErrorCode.UNSUPPORTED,
            f"a request line or header field is larger than {max_header_bytes} bytes "
            "(http.limits.maxheaderbytes)",
            status=431,
        )
    if isinstance(exc, BadStatusLine):
        return RegistryError(ErrorCode.UNSUPPORTED, "malformed request line", status=400)
    if isinstance(exc, InvalidURLError):
        return RegistryError(ErrorCode.UNSUPPORTED, "malformed request target", status=400)
    return RegistryError(ErrorCode.UNSUPPORTED, "malformed request header", status=400)


def version_refusal(version: HttpVersion) -> RegistryError:
    # 400 rather than 505: a 5xx says the server failed (the access log and alerting count
    # them), and this is the client's doing.
    if version < HttpVersion10:
        reason = "the request line has no HTTP version (HTTP/0.9 is not supported)"
    else:
        reason = f"HTTP/{version.major}.{version.minor} is not supported (HTTP/1.0 and 1.1 are)"
    return RegistryError(ErrorCode.UNSUPPORTED, reason, status=400)


def protocol_error_response(
    error: RegistryError, extra_headers: dict[str, list[str]]
) -> web.Response:
    """An error answered below the application (no middleware and no response signal runs
    for it): the same body and headers as the application's, and the connection closed."""
    response = error_response(error)
    set_common_headers(response, extra_headers)
    response.force_close()
    return response


def _expects_continue(message: RawRequestMessage) -> bool:
    if message.version != HttpVersion11:  # RFC 9110: ignored from HTTP/1.0 clients
        return False
    expectations = ",".join(message.headers.getall(hdrs.EXPECT)).split(",")
    return any(e.strip().lower() == "100-continue" for e in expectations)


def _without_expect(message: RawRequestMessage) -> RawRequestMessage:
    headers = CIMultiDict(message.headers)
    headers.popall(hdrs.EXPECT, None)
    return message._replace(
        headers=CIMultiDictProxy(headers),
        raw_headers=tuple((n, v) for n, v in message.raw_headers if n.lower() != b"expect"),
    )


class RegistryProtocol(RequestHandler):
    """aiohttp's connection handler, with the answers to unparsable requests made OCI-shaped."""

    __slots__ = ("_extra_headers",)

    def __init__(self, manager: web.Server, *, extra_headers: dict[str, list[str]], **kwargs: Any):
        super().__init__(manager, **kwargs)
        self._extra_headers = extra_headers

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status < 500 and isinstance(exc, HttpProcessingError):
            # The client's fault, and frequent on an open port (scanners, TLS to plain HTTP).
            log.debug(
                "refused an unparsable request",
                extra={"fields": {"remote": request.remote, "reason": type(exc).__name__}},
            )
            error = refusal(exc, self.max_field_size)
        elif isinstance(exc, ConnectionError):
            # The client went away mid-request (the error middleware lets this through).
            log.debug("client went away", extra={"fields": {"remote": request.remote}})
            error = RegistryError(ErrorCode.UNKNOWN, "connection lost", status=status)
        else:
            # Ours: the application's middlewares answer everything else, so this is a bug.
            self.log_exception("Error handling request from %s", request.remote, exc_info=exc)
            error = RegistryError(ErrorCode.UNKNOWN, status=status)
        if request.writer.output_size > 0:
            raise ConnectionError("response already started, cannot send an error instead")
        return protocol_error_response(error, self._extra_headers)


class RegistryServer(web.Server):
    """aiohttp's server (connection factory), making :class:`RegistryProtocol` connections and
    vetting each request before the application sees it."""

    def __init__(
        self,
        handler: Any,
        *,
        request_factory: Any,
        extra_headers: dict[str, list[str]],
        **kwargs: Any,
    ) -> None:
        super().__init__(self._handle, request_factory=self._make_request, **kwargs)
        self._app_handler = handler
        self._app_request_factory = request_factory
        self._extra_headers = extra_headers

    def __call__(self) -> RegistryProtocol:
        return RegistryProtocol(
            self, loop=self._loop, extra_headers=self._extra_headers, **self._kwargs
        )

    def _make_request(
        self,
        message: RawRequestMessage,
        payload: Any,
        protocol: RequestHandler,
        writer: Any,
        task: asyncio.Task[None],
    ) -> web.BaseRequest:
        refused_version = None
        if message is UNPARSABLE_REQUEST:
            # aiohttp's stand-in for what it could not parse says HTTP/1.0; answer as 1.1.
            message = message._replace(version=HttpVersion11)
        elif message.version not in (HttpVersion10, HttpVersion11):
            refused_version = message.version
            message = message._replace(version=HttpVersion11, should_close=True)
        expects_continue = False
        if hdrs.EXPECT in message.headers:
            expects_continue = _expects_continue(message)
            message = _without_expect(message)
        request = self._app_request_factory(message, payload, protocol, writer, task)
        if expects_continue:
            request[EXPECTS_CONTINUE] = True
        if refused_version is not None:
            request[REFUSED_VERSION] = refused_version
        return request

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        refused_version = request.get(REFUSED_VERSION)
        if refused_version is not None:
            return protocol_error_response(version_refusal(refused_version), self._extra_headers)
        return await self._app_handler(request)


class RegistryRunner(web.AppRunner):
    """``web.AppRunner`` serving its application through :class:`RegistryServer`."""

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()  # starts and freezes the application
        config = self.app.get(CONFIG_KEY)
        return RegistryServer(
            plain.request_handler,
            request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            extra_headers=config.http.headers if config is not None else {},
            # what AppRunner and the application gave the plain server: the handler's settings
            **plain._kwargs,
        )
