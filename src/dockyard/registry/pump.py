"""Copying a request body into storage while hashing it, in bounded memory.

Reading, hashing and writing overlap: while one buffer is hashed (in C, without the GIL) and
written on worker threads, the event loop gathers the next one. Buffers are written in
``IO_BUFFER`` steps, large enough that the per-step overhead vanishes; and a partial buffer is
written out as soon as the client pauses (``PAUSE`` seconds without a byte), so a stalled or
slow client never makes the server hold a buffer for it. At most two buffers are alive at any
moment, whatever the size of the body.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from dockyard.storage.driver import FileWriter

#: bytes gathered from the request before one write+hash step
IO_BUFFER = 1024 * 1024
#: seconds without new bytes after which a partial buffer is written out
PAUSE = 0.5


class _Pump:
    def __init__(self, writer: FileWriter, hasher: Any | None) -> None:
        self.writer = writer
        self.hasher = hasher
        self.buffer = bytearray()
        self.pending: asyncio.Future[None] | None = None
        self.loop = asyncio.get_running_loop()
        self.last_data = self.loop.time()
        self.timer: asyncio.TimerHandle | None = self.loop.call_later(PAUSE, self.tick)

    def flush(self) -> None:
        """Start writing (and hashing) the buffer, after whatever is being written now: writes
        and hash updates must happen in the order the bytes came, one at a time (a writer, an
        S3 multipart upload above all, is not safe for concurrent writes)."""
        if not self.buffer:
            return
        data, self.buffer = self.buffer, bytearray()
        self.pending = asyncio.ensure_future(self._write(self.pending, data))

    async def _write(self, previous: asyncio.Future[None] | None, data: bytearray) -> None:
        if previous is not None:
            await previous
        steps: list[Any] = [self.writer.write(data)]
        if self.hasher is not None:
            steps.append(self.loop.run_in_executor(None, self.hasher.update, data))
        await asyncio.gather(*steps)

    def tick(self) -> None:
        """Timer: a client that paused with a partial buffer gets it written out now."""
        if self.buffer and self.loop.time() - self.last_data >= PAUSE:
            self.flush()
        self.timer = self.loop.call_later(PAUSE, self.tick)

    def stop(self) -> None:
        """Stop the timer (and drop the references that would keep this object in a cycle)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    async def settle(self) -> None:
        """Wait for the writes started so far, including any the timer starts meanwhile; never
        leave one running behind the caller's back (it may abort the writer next).

        ``pending`` stays set while it is awaited, so that a flush by the timer meanwhile (the
        loop reads nothing while it waits here, so a write slower than ``PAUSE`` lets the timer
        fire with a full buffer) is chained after it. Clearing it first let that flush start a
        second write beside the one in flight: on S3 both took the same part number, and the
        stored bytes differed from the bytes hashed."""
        while self.pending is not None:
            pending = self.pending
            await pending
            if self.pending is pending:
                self.pending = None


async def pump(body: AsyncIterator[bytes], writer: FileWriter, hasher: Any | None) -> int:
    """Copy ``body`` into ``writer``, hashing it on the way when ``hasher`` is given; return the
    number of bytes received."""
    state = _Pump(writer, hasher)
    received = 0
    try:
        async for chunk in body:
            received += len(chunk)
            state.last_data = state.loop.time()
            state.buffer += chunk
            del chunk  # copied: not kept alive while the next read waits
            if len(state.buffer) >= IO_BUFFER:
                await state.settle()  # back-pressure: one buffer in flight, one filling
                state.flush()
        state.stop()
        if state.buffer:
            state.flush()
        await state.settle()
    finally:
        state.stop()
        pending, state.pending = state.pending, None
        if pending is not None and not pending.done():
            with contextlib.suppress(BaseException):
                await asyncio.shield(pending)
    return received
