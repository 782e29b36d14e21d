"""Graceful shutdown: finish in-flight requests, including their request bodies.

aiohttp's own shutdown marks every connection closing first and from then on drops incoming
bytes, so an upload whose body is still arriving stalls until the timeout. Instead Dockyard
stops accepting connections, lets every running request finish (answering with
``Connection: close`` so keep-alive clients go away), and only then closes what is idle.
"""

from __future__ import annotations

import asyncio
import contextlib

from aiohttp import web

from dockyard.http.responses import Handler


class InFlight:
    def __init__(self) -> None:
        self.count = 0
        self.stopping = False
        self._idle = asyncio.Event()
        self._idle.set()

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.count += 1
        self._idle.clear()
        try:
            return await handler(request)
        finally:
            self.count -= 1
            if self.count == 0:
                self._idle.set()

    async def on_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        if self.stopping:
            response.force_close()

    async def drain(self, seconds: float) -> bool:
        """Wait until no request is running (True) or ``seconds`` pass (False)."""
        self.stopping = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), seconds)
        return self.count == 0
