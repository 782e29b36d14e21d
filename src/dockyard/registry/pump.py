"""Copying a request body into storage while hashing it, in bounded memory.

Reading, hashing and writing overlap: while one buffer is hashed (in C, without the GIL) and
written on worker threads, the event loop gathers the next one. Buffers are written in
``IO_BUFFER`` steps, large enough that the per-step overhead vanishes; and a partial buffer is
written out as soon as the client pauses (``PAUSE`` seconds without a byte), so a stalled or
slow client never makes the server hold a buffer for it. At most two buffers are alive at any
moment, whatever the size of the body, and at full speed the same two are used throughout.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from dockyard.storage.driver import FileWriter

#: bytes gathered from the request before one write+hash step (at full speed)
IO_BUFFER = 1024 * 1024
#: the first buffer of a body: most layers and every manifest are smaller than IO_BUFFER
FIRST_BUFFER = 64 * 1024
#: seconds without new bytes after which a partial buffer is written out
PAUSE = 0.5


class _Pump:
    def __init__(self, writer: FileWriter, hasher: Any | None) -> None:
        self.writer = writer
        self.hasher = hasher
        #: the buffer being filled (None until bytes come) and how much of it is filled
        self.buffer: bytearray | None = None
        self.filled = 0
        #: a full buffer whose write has finished, filled next instead of a new one
        self.spare: bytearray | None = None
        #: the size of the next new buffer: doubled each time one fills, up to IO_BUFFER, so
        #: that a small layer (most of a push) holds a buffer its size, not two of IO_BUFFER
        self.size = FIRST_BUFFER
        self.pending: asyncio.Future[None] | None = None
        self.loop = asyncio.get_running_loop()
        self.last_data = self.loop.time()
        self.timer: asyncio.TimerHandle | None = self.loop.call_later(PAUSE, self.tick)

    def take(self, chunk: memoryview) -> memoryview:
        """Copy what fits of ``chunk`` into the buffer; return the rest. Buffers are allocated
        once at their full size and reused: growing one per chunk, with glibc serving large
        blocks from fresh mappings (worker.release_freed_memory_promptly), cost a page fault
        and a zeroed page per 4 KiB received, most of an upload's CPU time."""
        if self.buffer is None:
            if self.spare is not None and len(self.spare) == self.size:
                self.buffer = self.spare
            else:
                self.buffer = bytearray(self.size)
            self.spare, self.filled = None, 0
        n = min(len(chunk), len(self.buffer) - self.filled)
        self.buffer[self.filled : self.filled + n] = chunk[:n]
        self.filled += n
        return chunk[n:]

    @property
    def full(self) -> bool:
        return self.buffer is not None and self.filled == len(self.buffer)

    def flush(self, *, recycle: bool = True) -> None:
        """Start writing (and hashing) the buffer, after whatever is being written now: writes
        and hash updates must happen in the order the bytes came, one at a time (a writer, an
        S3 multipart upload above all, is not safe for concurrent writes). ``recycle``: keep
        the buffer for reuse once written (not when the client paused: then it is let go)."""
        if self.buffer is None or not self.filled:
            return
        if self.full:  # the body keeps coming: the next buffer may be larger
            self.size = min(IO_BUFFER, self.size * 2)
        data, filled, self.buffer, self.filled = self.buffer, self.filled, None, 0
        self.pending = asyncio.ensure_future(self._write(self.pending, data, filled, recycle))

    async def _write(
        self, previous: asyncio.Future[None] | None, data: bytearray, filled: int, recycle: bool
    ) -> None:
        if previous is not None:
            await previous
        # Not released explicitly: if this is cancelled, a thread may still be hashing it.
        view = memoryview(data)[:filled]
        steps: list[Any] = [self.writer.write(view)]
        if self.hasher is not None:
            steps.append(self.loop.run_in_executor(None, self.hasher.update, view))
        await asyncio.gather(*steps)
        if recycle and filled == len(data):
            self.spare = data

    def tick(self) -> None:
        """Timer: a client that paused with a partial buffer gets it written out now, and the
        server holds no buffer for it while it waits."""
        if self.filled and self.loop.time() - self.last_data >= PAUSE:
            self.flush(recycle=False)
            self.spare = None
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
            rest = state.take(memoryview(chunk))
            while True:
                if state.full:
                    await state.settle()  # back-pressure: one buffer in flight, one filling
                    state.flush()
                if not rest:
                    break
                rest = state.take(rest)
            del chunk, rest  # copied: not kept alive while the next read waits
        state.stop()
        state.flush()
        await state.settle()
    finally:
        state.stop()
        pending, state.pending = state.pending, None
        if pending is not None and not pending.done():
            with contextlib.suppress(BaseException):
                await asyncio.shield(pending)
    return received
