"""Fixed-size tables in memory shared by every worker of one instance.

A table is created once, in the supervising parent before the workers fork, and each worker
inherits the same pages. Its memory is an anonymous file (``memfd``) mapped shared, so it never
grows and is gone when the last process holding it exits.

Changes are made under a POSIX record lock (``fcntl.lockf``) on that file. Such a lock belongs
to the process that holds it, and the kernel drops it when that process dies, so a worker
killed in the middle of an update (the OOM killer, a crash) cannot leave the table locked for
the others; a semaphore from ``multiprocessing`` would stay taken. Critical sections are a
handful of struct reads and writes on one bucket, so the event loop waits microseconds.

Keys are hashed with a random salt made at start-up and known only to this instance (BLAKE2b
keyed with it): which bucket a key lands in, and which keys share one, cannot be predicted or
aimed at from outside. A key is found by its 64-bit tag inside one bucket of a few slots;
what a table does when a bucket is full is its own policy (see its docstring).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import mmap
import os
import secrets
import tempfile
import threading
from collections.abc import Iterator

SALT_BYTES = 16


def _anonymous_file(size: int) -> int:
    """A descriptor of a ``size``-byte zero-filled file nothing else can open."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("dockyard-table", os.MFD_CLOEXEC)
    else:  # pragma: no cover - Linux always has memfd_create
        with tempfile.TemporaryFile() as f:
            fd = os.dup(f.fileno())
    os.ftruncate(fd, size)
    return fd


class SharedTable:
    """``buckets`` of ``ways`` slots of ``slot_size`` bytes, shared across ``fork``."""

    def __init__(self, slots: int, slot_size: int, ways: int) -> None:
        if slots < ways:
            raise ValueError("a table needs at least one bucket")
        self.ways = ways
        self.buckets = slots // ways
        self.slot_size = slot_size
        self.size = self.buckets * ways * slot_size
        self._fd = _anonymous_file(self.size)
        self._map = mmap.mmap(self._fd, self.size, mmap.MAP_SHARED)
        self._salt = secrets.token_bytes(SALT_BYTES)
        # Record locks exclude other processes only; threads of one process take this first.
        self._threads = threading.Lock()

    @property
    def slots(self) -> int:
        return self.buckets * self.ways

    @property
    def memory(self) -> mmap.mmap:
        return self._map

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        with self._threads:
            fcntl.lockf(self._fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.lockf(self._fd, fcntl.LOCK_UN)

    def locate(self, key: str) -> tuple[int, int]:
        """(offset of the key's bucket, the key's tag); a tag is never 0, which marks a free
        slot."""
        digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), key=self._salt).digest()
        bucket = int.from_bytes(digest[:8], "little") % self.buckets
        tag = int.from_bytes(digest[8:16], "little") or 1
        return bucket * self.ways * self.slot_size, tag

    def bucket_slots(self, bucket_offset: int) -> range:
        """The offsets of the slots of the bucket at ``bucket_offset``."""
        return range(bucket_offset, bucket_offset + self.ways * self.slot_size, self.slot_size)

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)
