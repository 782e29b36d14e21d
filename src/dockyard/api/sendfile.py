"""Zero-copy blob responses.

aiohttp's ``FileResponse`` relies on ``loop.sendfile``, which uvloop does not implement (it falls
back to read-and-write through Python). This response drives ``os.sendfile`` itself on a
duplicate of the connection's socket descriptor, waiting for writability through the event loop,
so it is zero-copy and non-blocking under either loop. Connections without a plain socket (TLS)
fall back to streaming reads from a thread.
"""

from __future__ import annotations

import asyncio
import os
from typing import IO, Any

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

#: bytes per sendfile call; the socket buffer bounds what one call moves anyway
SENDFILE_CHUNK = 16 * 1024 * 1024
FALLBACK_CHUNK = 1024 * 1024


class SendfileResponse(web.StreamResponse):
    """Serve ``count`` bytes of an open file from ``offset``. The file is closed when done."""

    def __init__(
        self,
        fileobj: IO[bytes],
        offset: int,
        count: int,
        *,
        status: int = 200,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(status=status, headers=headers)
        self._file = fileobj
        self._offset = offset
        self._count = count
        self._sent = 0
        self.content_length = count

    @property
    def body_length(self) -> int:
        """Headers plus the bytes sent straight to the socket (for the access log)."""
        return super().body_length + self._sent

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        try:
            writer = await super().prepare(request)
            if request.method == "HEAD" or self._count == 0 or writer is None:
                return writer
            transport = request.transport
            if transport is None:
                raise ConnectionResetError("connection lost")
            sock = transport.get_extra_info("socket")
            if sock is None or transport.get_extra_info("sslcontext") is not None:
                await self._copy(writer)
            else:
                await _wait_flushed(transport)
                self._sent = await _sendfile(sock.fileno(), self._file, self._offset, self._count)
            await super().write_eof()
            return writer
        finally:
            self._file.close()

    async def _copy(self, writer: AbstractStreamWriter) -> None:
        loop = asyncio.get_running_loop()
        self._file.seek(self._offset)
        remaining = self._count
        while remaining > 0:
            chunk = await loop.run_in_executor(
                None, self._file.read, min(FALLBACK_CHUNK, remaining)
            )
            if not chunk:
                raise ConnectionResetError("blob shrank while being served")
            remaining -= len(chunk)
            await writer.write(chunk)


async def _wait_flushed(transport: Any) -> None:
    # The headers were written through the transport; they must be on the wire before bytes go
    # straight to the socket behind its back. They are tiny, so this almost never waits.
    while transport.get_write_buffer_size():
        if transport.is_closing():
            raise ConnectionResetError("connection lost")
        await asyncio.sleep(0.001)


async def _sendfile(sock_fd: int, fileobj: IO[bytes], offset: int, count: int) -> int:
    """Send ``count`` bytes of the file from ``offset``; return the byte count."""
    loop = asyncio.get_running_loop()
    total = count
    fd = os.dup(sock_fd)
    file_fd = fileobj.fileno()
    try:
        while count > 0:
            try:
                sent = os.sendfile(fd, file_fd, offset, min(count, SENDFILE_CHUNK))
            except BlockingIOError:
                await _writable(loop, fd)
                continue
            except InterruptedError:
                continue
            except (BrokenPipeError, ConnectionError) as exc:
                raise ConnectionResetError(str(exc)) from exc
            if sent == 0:
                raise ConnectionResetError("blob shrank while being served")
            offset += sent
            count -= sent
    finally:
        os.close(fd)
    return total


async def _writable(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    waiter = loop.create_future()

    def ready() -> None:
        if not waiter.done():
            waiter.set_result(None)

    loop.add_writer(fd, ready)
    try:
        await waiter
    finally:
        loop.remove_writer(fd)
