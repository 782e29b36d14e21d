"""The pump that copies a request body into storage while hashing it: bytes are written and
hashed in the order they came, one write at a time, whatever the timing of client and storage."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator

import pytest

from dockyard.registry import pump as pump_module
from dockyard.registry.pump import FIRST_BUFFER, IO_BUFFER, pump


class SlowWriter:
    """A writer that takes longer than the pump's pause timer per write (S3 under load), and
    fails the test if two writes overlap."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.data = bytearray()
        self.busy = False
        self.overlapped = False

    @property
    def size(self) -> int:
        return len(self.data)

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.busy:
            self.overlapped = True
        self.busy = True
        try:
            copy = bytes(data)  # the bytes as they were when the write began
            await asyncio.sleep(self.seconds)
            self.data += copy
        finally:
            self.busy = False

    async def close(self) -> None:
        pass

    async def abort(self) -> None:
        pass


async def body_of(content: bytes, piece: int) -> AsyncIterator[bytes]:
    for start in range(0, len(content), piece):
        yield content[start : start + piece]
        await asyncio.sleep(0)


def test_a_write_slower_than_the_pause_timer_is_never_overlapped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The timer fires while the pump waits for a slow write with a full buffer: that flush
    # must queue behind the write in flight, not start beside it (it did: on S3 two parts got
    # the same number and the stored blob differed from the digest it was verified against).
    monkeypatch.setattr(pump_module, "PAUSE", 0.05)
    content = os.urandom(IO_BUFFER * 4 + 12345)
    writer = SlowWriter(seconds=0.2)
    hasher = hashlib.sha256()

    async def go() -> int:
        return await pump(body_of(content, 64 * 1024), writer, hasher)  # type: ignore[arg-type]

    assert asyncio.run(go()) == len(content)
    assert not writer.overlapped
    assert bytes(writer.data) == content
    assert hasher.hexdigest() == hashlib.sha256(content).hexdigest()


def test_a_client_that_pauses_gets_its_partial_buffer_written_in_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(pump_module, "PAUSE", 0.05)
    content = os.urandom(300_000)
    writer = SlowWriter(seconds=0.01)
    hasher = hashlib.sha256()

    async def pausing() -> AsyncIterator[bytes]:
        for start in range(0, len(content), 100_000):
            yield content[start : start + 100_000]
            await asyncio.sleep(0.2)  # longer than the pause: each piece is written out alone

    async def go() -> int:
        return await pump(pausing(), writer, hasher)  # type: ignore[arg-type]

    assert asyncio.run(go()) == len(content)
    assert not writer.overlapped
    assert bytes(writer.data) == content
    assert hasher.hexdigest() == hashlib.sha256(content).hexdigest()


class BufferRecorder(SlowWriter):
    """Records the buffers the pump handed over (memoryviews of them)."""

    def __init__(self) -> None:
        super().__init__(seconds=0)
        self.buffers: list[bytearray] = []

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        assert isinstance(data, memoryview) and isinstance(data.obj, bytearray)
        self.buffers.append(data.obj)
        await super().write(data)


def test_a_small_body_holds_a_small_buffer_and_a_large_one_reuses_two() -> None:
    """Memory per upload: a small layer (most of a push) does not pin IO_BUFFER-sized buffers;
    a large body is copied through two IO_BUFFER buffers used in turn, whatever its size."""
    small, large = BufferRecorder(), BufferRecorder()
    small_body = os.urandom(10_000)
    large_body = os.urandom(IO_BUFFER * 12 + 5)

    async def go() -> None:
        assert await pump(body_of(small_body, 4096), small, None) == len(small_body)  # type: ignore[arg-type]
        assert await pump(body_of(large_body, 256 * 1024), large, None) == len(large_body)  # type: ignore[arg-type]

    asyncio.run(go())
    assert bytes(small.data) == small_body and bytes(large.data) == large_body
    assert [len(b) for b in small.buffers] == [FIRST_BUFFER]
    sizes = [len(b) for b in large.buffers]
    assert max(sizes) == IO_BUFFER and sizes == sorted(sizes)
    assert len({id(b) for b in large.buffers if len(b) == IO_BUFFER}) <= 2
