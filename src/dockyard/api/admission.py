"""Admission of connections: a client address over ``http.limits.connectionsperaddress`` is
answered before any request is parsed, and the connection closed.

The hook is the protocol factory the listening socket is served with (``AdmissionSite``):
each connection gets an ``Admission`` protocol, which asks the limiter (dockyard.connections)
and then either hands the connection to aiohttp's own request handler, forwarding every
protocol callback, or writes a fixed 429 itself. The answer is raw bytes because no request
exists yet to answer through the error middleware; its body is still the one every error gets
(dockyard.http.responses). With TLS the connection is admitted once its handshake is done.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_server import Server

from dockyard.connections import Admitted, ConnectionLimiter
from dockyard.errors import ErrorCode, RegistryError
from dockyard.http.responses import API_VERSION_HEADER, error_body

log = logging.getLogger("dockyard.server")

#: how long a refused connection is kept open for the client to read the answer (closing a
#: socket with unread request bytes sends a reset, which can destroy the answer in flight)
LINGER_SECONDS = 2.0


def refusal(limit: int) -> bytes:
    """The whole HTTP response a refused connection gets."""
    error = RegistryError(
        ErrorCode.TOOMANYREQUESTS,
        f"too many connections from your address (http.limits.connectionsperaddress: {limit})",
        {"limit": limit},
    )
    body = error_body(error)
    head = (
        "HTTP/1.1 429 Too Many Requests\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n"
        f"{API_VERSION_HEADER[0]}: {API_VERSION_HEADER[1]}\r\n"
        "\r\n"
    )
    return head.encode("ascii") + body


def _peer_host(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and peer and isinstance(peer[0], str):
        return peer[0]
    return ""  # a unix socket: no address to count


class Admission(asyncio.Protocol):
    """One connection: refused, or passed through to aiohttp's RequestHandler."""

    def __init__(self, server: Server, limiter: ConnectionLimiter, answer: bytes) -> None:
        self._server = server
        self._limiter = limiter
        self._answer = answer
        self._admitted: Admitted | None = None
        self._handler: RequestHandler | None = None
        self._linger: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._admitted = self._limiter.admit(_peer_host(transport))
        if self._admitted is None:
            self._refuse(transport)
            return
        self._handler = self._server()
        self._handler.connection_made(transport)

    def _refuse(self, transport: Any) -> None:
        log.info(
            "connection refused: too many from one address",
            extra={"fields": {"remote": _peer_host(transport), "limit": self._limiter.limit}},
        )
        transport.write(self._answer)
        if transport.can_write_eof():
            transport.write_eof()
        # Wait for the client to close after reading (or give up): see LINGER_SECONDS.
        self._linger = asyncio.get_running_loop().call_later(LINGER_SECONDS, transport.close)

    def data_received(self, data: bytes) -> None:
        if self._handler is not None:
            self._handler.data_received(data)
        # refused: whatever the client sends is discarded

    def eof_received(self) -> bool | None:
        if self._handler is not None:
            return self._handler.eof_received()
        return None  # refused: the client has read the answer; close

    def pause_writing(self) -> None:
        if self._handler is not None:
            self._handler.pause_writing()

    def resume_writing(self) -> None:
        if self._handler is not None:
            self._handler.resume_writing()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._linger is not None:
            self._linger.cancel()
        if self._admitted is not None:
            self._limiter.release(self._admitted)
            self._admitted = None
        if self._handler is not None:
            self._handler.connection_lost(exc)
            self._handler = None


class AdmissionSite(web.BaseSite):
    """``web.SockSite``, with every connection going through ``Admission`` first."""

    def __init__(
        self,
        runner: web.BaseRunner,
        sock: socket.socket,
        limiter: ConnectionLimiter,
        *,
        ssl_context: Any = None,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context)
        self._sock = sock
        self._limiter = limiter
        self._answer = refusal(limiter.limit)

    @property
    def name(self) -> str:
        host, port = self._sock.getsockname()[:2]
        return f"{'https' if self._ssl_context else 'http'}://{host}:{port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None

        def protocol() -> Admission:
            return Admission(server, self._limiter, self._answer)

        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            protocol, sock=self._sock, ssl=self._ssl_context, backlog=self._backlog
        )
