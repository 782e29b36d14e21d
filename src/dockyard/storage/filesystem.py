"""Filesystem driver: registry:2's ``storage.filesystem`` (``rootdirectory``, ``maxthreads``).

Blocking calls (filesystem_calls.py) run on a bounded thread pool (registry:2's ``maxthreads``,
default 100) so a slow disk never stalls the event loop; metadata calls run inline. Whole-file
writes go to a temporary file in the same directory and are renamed into place, so a reader sees
the old or the new content and never a prefix.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, TypeVar

from dockyard.storage import filesystem_calls as calls
from dockyard.storage.driver import (
    Child,
    Entry,
    FileInfo,
    ListingSteps,
    LocalFile,
    PathNotFound,
    ScannedFile,
    StorageError,
    Version,
)

T = TypeVar("T")

READ_CHUNK = 1024 * 1024

#: Filesystems whose directory times a stat reads from the kernel every writer goes through, so
#: it sees the latest change at once. On a network filesystem a client may answer a stat from
#: its attribute cache (NFS: up to ``acdirmax``, 60 s by default) while another host has added a
#: tag: there ``directory_version`` gives None and tag lists are listed every time.
LOCAL_FILESYSTEMS = frozenset(
    {"ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "overlay", "zfs", "f2fs", "bcachefs"}
)


class FilesystemDriver:
    """Primitives; capabilities: exclusive create, no-overwrite move (hard links), touch, atomic
    move (rename), locks (flock), sendfile, empty directories, directory versions (a stat); fast
    paths: small reads inline on the event loop, one-step atomic writes, a walk and a scan on one
    thread, a walk deciding as it goes (``drive_listings``) on one thread."""

    name = "filesystem"
    atomic_move: Literal[True] = True

    def __init__(self, root: str, *, max_threads: int = 100, fsync: bool = False) -> None:
        self.root = os.path.abspath(root)
        self.fsync = fsync
        self._pool = ThreadPoolExecutor(max_workers=max_threads, thread_name_prefix="fs")
        #: whether ``root`` is on a local filesystem (LOCAL_FILESYSTEMS), found on first use
        self._local: bool | None = None

    # -- the one place OSError becomes a driver error ------------------------------------
    async def _run(self, path: str, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, fn, *args)
        except FileNotFoundError:
            raise PathNotFound(path) from None
        except NotADirectoryError:
            raise PathNotFound(path) from None
        except OSError as exc:
            raise StorageError(f"{path}: {exc}") from exc

    def _inline(self, path: str, fn: Callable[..., T], *args: Any) -> T:
        """Run a metadata call (stat, utime, reading a small file) on the event loop itself.
        On a local filesystem these are page-cache hits costing microseconds, far less than a
        hop to the thread pool and back; anything that can take long (big reads, writes,
        directory listings, renames) goes to the pool."""
        try:
            return fn(*args)
        except (FileNotFoundError, NotADirectoryError):
            raise PathNotFound(path) from None
        except OSError as exc:
            raise StorageError(f"{path}: {exc}") from exc

    def _full(self, path: str) -> str:
        return self.root + path  # validated by the store (storage.store.check_path)

    # -- primitives ------------------------------------------------------------------------
    async def stat(self, path: str) -> FileInfo:
        st = self._inline(path, os.stat, self._full(path))
        return FileInfo(path=path, size=st.st_size, modified=st.st_mtime, is_dir=calls.isdir(st))

    async def list(self, path: str) -> list[Child]:
        return await self._run(path, calls.list_children, self._full(path))

    async def move(self, source: str, dest: str) -> None:
        await self._run(source, calls.move, self._full(source), self._full(dest))

    async def delete(self, path: str) -> None:
        await self._run(path, calls.delete, self._full(path))

    async def reader(
        self, path: str, offset: int = 0, length: int | None = None
    ) -> AsyncIterator[bytes]:
        f = await self._run(path, open, self._full(path), "rb")
        try:
            if offset:
                f.seek(offset)
            remaining = length
            while remaining is None or remaining > 0:
                size = READ_CHUNK if remaining is None else min(READ_CHUNK, remaining)
                chunk = await self._run(path, f.read, size)
                if not chunk:
                    break
                if remaining is not None:
                    remaining -= len(chunk)
                yield chunk
        finally:
            f.close()

    async def writer(self, path: str) -> FilesystemWriter:
        full = self._full(path)
        tmp, f = await self._run(path, calls.open_temp, full)
        return FilesystemWriter(self, path, full, tmp, f)

    async def close(self) -> None:
        self._pool.shutdown(wait=False)

    # -- capabilities ----------------------------------------------------------------------
    async def write_new(self, path: str, data: bytes) -> bool:
        return await self._run(path, calls.write_new, self._full(path), data, self.fsync)

    async def move_new(self, source: str, dest: str) -> bool:
        return await self._run(source, calls.move_new, self._full(source), self._full(dest))

    async def touch(self, path: str) -> None:
        self._inline(path, os.utime, self._full(path))

    def lock(self, path: str) -> FileLock:
        return FileLock(path, self._full(path))

    async def open_local(self, path: str) -> LocalFile:
        return await self._run(path, calls.open_local, self._full(path))

    async def remove_empty_dir(self, path: str) -> None:
        await self._run(path, calls.rmdir_if_empty, self._full(path))

    async def directory_version(self, path: str) -> Version | None:
        if self._local is None:
            self._local = calls.filesystem_type(self.root) in LOCAL_FILESYSTEMS
        if not self._local:
            return None
        # The clock first: a change after it is stamped no earlier than it less one tick.
        now = time.time_ns()
        st = self._inline(path, os.stat, self._full(path))
        if not calls.isdir(st):
            raise PathNotFound(path)
        return Version((st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns), st.st_mtime_ns, now)

    # -- fast paths ------------------------------------------------------------------------
    async def read_file(self, path: str) -> bytes:
        full = self._full(path)
        data = self._inline(path, calls.read_small_file, full)
        if data is None:
            return await self._run(path, calls.read_file, full)
        return data

    async def write_file(self, path: str, data: bytes) -> None:
        await self._run(path, calls.write_atomic, self._full(path), data, self.fsync)

    async def walk(self, path: str, descend: Callable[[str], bool]) -> list[Entry]:
        return await self._run(path, calls.walk, self._full(path), len(self.root), descend)

    async def drive_listings(self, steps: ListingSteps[T]) -> T:
        return await self._run("/", calls.drive_listings, self.root, steps)

    async def scan(
        self,
        path: str,
        descend: Callable[[str], bool],
        include: Callable[[str], bool],
        read: bool,
    ) -> list[ScannedFile]:
        # The whole subtree in one pool call: a hop per file costs more than the stat itself.
        return await self._run(
            path, calls.scan, self._full(path), len(self.root), descend, include, read
        )

    async def stat_many(self, paths: list[str]) -> list[FileInfo | None]:
        if not paths:
            return []
        return await self._run(paths[0], calls.stat_many, self.root, paths)

    async def read_many(self, paths: list[str]) -> list[ScannedFile | None]:
        if not paths:
            return []
        return await self._run(paths[0], calls.read_many, self.root, paths)


class FilesystemWriter:
    """Writes a temporary file beside the destination; ``close`` renames it into place, so the
    file appears whole or not at all."""

    def __init__(self, driver: FilesystemDriver, path: str, full: str, tmp: str, f: Any) -> None:
        self._driver = driver
        self._path = path
        self._full = full
        self._tmp = tmp
        self._file = f
        self._size = 0

    @property
    def size(self) -> int:
        return self._size

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        await self._driver._run(self._path, self._file.write, data)
        self._size += len(data)

    async def close(self) -> None:
        await self._driver._run(
            self._path, calls.finish_temp, self._file, self._tmp, self._full, self._driver.fsync
        )

    async def abort(self) -> None:
        await self._driver._run(self._path, calls.discard_temp, self._file, self._tmp)


class FileLock:
    """An advisory lock on an existing file (``flock``), tried without waiting. The kernel
    releases it when the descriptor closes — on ``release``, or when the process dies — so it
    can never outlive its holder, and it never expires under one."""

    def __init__(self, path: str, full: str) -> None:
        self._path = path
        self._full = full
        self._fd: int | None = None

    def acquire(self) -> bool:
        """True if this call took the lock; False if another holder has it. PathNotFound if the
        file is missing."""
        try:
            fd = os.open(self._full, os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            raise PathNotFound(self._path) from None
        except OSError as exc:
            raise StorageError(f"{self._path}: cannot open to lock: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except OSError as exc:
            os.close(fd)
            raise StorageError(f"{self._path}: cannot lock: {exc}") from exc
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
