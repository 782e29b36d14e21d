"""Filesystem driver: registry:2's ``storage.filesystem`` (``rootdirectory``, ``maxthreads``).

Blocking calls run on a bounded thread pool (registry:2's ``maxthreads``, default 100) so a slow
disk never stalls the event loop. Whole-file writes go to a temporary file in the same directory
and are renamed into place, so a reader sees the old or the new content and never a prefix.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import shutil
import stat
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from dockyard.storage.driver import Entry, FileInfo, InvalidPath, PathNotFound, StorageError

T = TypeVar("T")

READ_CHUNK = 1024 * 1024


class FilesystemDriver:
    name = "filesystem"
    atomic_move = True

    def __init__(self, root: str, *, max_threads: int = 100, fsync: bool = False) -> None:
        self.root = os.path.abspath(root)
        self.fsync = fsync
        self._pool = ThreadPoolExecutor(max_workers=max_threads, thread_name_prefix="fs")

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
        if not path.startswith("/") or "/../" in path + "/" or "/./" in path + "/" or "\0" in path:
            raise InvalidPath(path)
        return self.root + path

    # -- small files -----------------------------------------------------------------------
    async def read(self, path: str) -> bytes:
        full = self._full(path)
        data = self._inline(path, _read_small_file, full)
        if data is None:
            return await self._run(path, _read_file, full)
        return data

    async def write(self, path: str, data: bytes) -> None:
        full = self._full(path)
        await self._run(path, _write_atomic, full, data, self.fsync)

    async def write_new(self, path: str, data: bytes) -> bool:
        full = self._full(path)
        return await self._run(path, _write_new, full, data, self.fsync)

    async def touch(self, path: str) -> None:
        full = self._full(path)
        self._inline(path, os.utime, full)

    async def stat(self, path: str) -> FileInfo:
        full = self._full(path)
        st = self._inline(path, os.stat, full)
        return FileInfo(path=path, size=st.st_size, modified=st.st_mtime, is_dir=_isdir(st))

    async def list(self, path: str) -> list[str]:
        full = self._full(path)
        return await self._run(path, os.listdir, full)

    async def walk(self, path: str, descend: Callable[[str], bool]) -> list[Entry]:
        full = self._full(path)
        return await self._run(path, _walk, full, len(self.root), descend)

    async def move(self, source: str, dest: str) -> None:
        src, dst = self._full(source), self._full(dest)
        await self._run(source, _move, src, dst)

    async def delete(self, path: str) -> None:
        full = self._full(path)
        await self._run(path, _delete, full)

    async def remove_empty_dir(self, path: str) -> None:
        full = self._full(path)
        await self._run(path, _rmdir_if_empty, full)

    # -- streams ---------------------------------------------------------------------------
    async def reader(
        self, path: str, offset: int = 0, length: int | None = None
    ) -> AsyncIterator[bytes]:
        full = self._full(path)
        f = await self._run(path, open, full, "rb")
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
        tmp, f = await self._run(path, _open_temp, full)
        return FilesystemWriter(self, path, full, tmp, f)

    async def move_new(self, source: str, dest: str) -> bool:
        src, dst = self._full(source), self._full(dest)
        return await self._run(source, _move_new, src, dst)

    def lock(self, path: str) -> FileLock | None:
        return FileLock(self._full(path))

    async def redirect_url(self, path: str, method: str = "GET") -> str | None:
        return None

    def local_path(self, path: str) -> str | None:
        return self._full(path)

    async def purge_partial(self, path: str, before: float, dry_run: bool) -> list[str]:
        return []  # appends go straight into the file: nothing is ever left aside

    async def close(self) -> None:
        self._pool.shutdown(wait=False)


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
            self._path, _finish_temp, self._file, self._tmp, self._full, self._driver.fsync
        )

    async def abort(self) -> None:
        await self._driver._run(self._path, _discard_temp, self._file, self._tmp)


class FileLock:
    """An advisory lock on an existing file (``flock``), tried without waiting. The kernel
    releases it when the descriptor closes — on ``release``, or when the process dies — so it
    can never outlive its holder, and it never expires under one."""

    def __init__(self, full: str) -> None:
        self._full = full
        self._fd: int | None = None

    def acquire(self) -> bool:
        """True if this call took the lock; False if another holder has it. PathNotFound if the
        file is missing."""
        try:
            fd = os.open(self._full, os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            raise PathNotFound(self._full) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except OSError as exc:
            os.close(fd)
            raise StorageError(f"{self._full}: cannot lock: {exc}") from exc
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _isdir(st: os.stat_result) -> bool:
    return stat.S_ISDIR(st.st_mode)


#: files up to this size are read on the event loop (links, most manifests)
INLINE_READ_LIMIT = 64 * 1024


def _read_file(full: str) -> bytes:
    with open(full, "rb") as f:
        return f.read()


def _read_small_file(full: str) -> bytes | None:
    """The content of a small file, or None when it is too big to read inline."""
    fd = os.open(full, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if os.fstat(fd).st_size > INLINE_READ_LIMIT:
            return None
        chunks = []
        while chunk := os.read(fd, INLINE_READ_LIMIT + 1):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


#: attempts for writers whose parent directory a concurrent cleanup may remove in between
_DIR_RACE_ATTEMPTS = 5


def _write_atomic(full: str, data: bytes, fsync: bool) -> None:
    directory = os.path.dirname(full)
    for attempt in range(_DIR_RACE_ATTEMPTS):
        os.makedirs(directory, exist_ok=True)
        tmp = f"{full}.tmp-{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                if fsync:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, full)
            return
        except FileNotFoundError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if attempt == _DIR_RACE_ATTEMPTS - 1:
                raise
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


def _write_new(full: str, data: bytes, fsync: bool) -> bool:
    """Written to a temporary file, then hard-linked into place: the link fails if the name
    exists, so the file appears complete or not at all, and only once."""
    for attempt in range(_DIR_RACE_ATTEMPTS):
        os.makedirs(os.path.dirname(full), exist_ok=True)
        tmp = f"{full}.tmp-{uuid.uuid4().hex}"
        try:
            with open(tmp, "xb") as f:
                f.write(data)
                if fsync:
                    f.flush()
                    os.fsync(f.fileno())
            try:
                os.link(tmp, full)
            except FileExistsError:
                return False
            return True
        except FileNotFoundError:
            if attempt == _DIR_RACE_ATTEMPTS - 1:
                raise
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    raise AssertionError("unreachable")


def _walk(full: str, root_length: int, descend: Callable[[str], bool]) -> list[Entry]:
    """One pass of os.scandir per directory, all on one pool thread."""
    found: list[Entry] = []
    pending = [full]
    while pending:
        directory = pending.pop()
        try:
            entries = list(os.scandir(directory))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            is_dir = entry.is_dir(follow_symlinks=False)
            found.append(Entry(entry.path[root_length:], is_dir))
            if is_dir and descend(entry.name):
                pending.append(entry.path)
    return found


def _move(src: str, dst: str) -> None:
    for attempt in range(_DIR_RACE_ATTEMPTS):
        if not os.path.exists(src):
            raise FileNotFoundError(errno.ENOENT, "no such file", src)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        try:
            os.replace(src, dst)
            return
        except FileNotFoundError:
            if attempt == _DIR_RACE_ATTEMPTS - 1:
                raise


def _rmdir_if_empty(full: str) -> None:
    with contextlib.suppress(FileNotFoundError, OSError):
        os.rmdir(full)


def _delete(full: str) -> None:
    if os.path.isdir(full) and not os.path.islink(full):
        shutil.rmtree(full)
    else:
        os.unlink(full)


def _open_temp(full: str) -> tuple[str, Any]:
    directory = os.path.dirname(full)
    for attempt in range(_DIR_RACE_ATTEMPTS):
        os.makedirs(directory, exist_ok=True)
        tmp = f"{full}.tmp-{uuid.uuid4().hex}"
        try:
            return tmp, open(tmp, "xb")  # closed by the writer
        except FileNotFoundError:
            if attempt == _DIR_RACE_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


def _finish_temp(f: Any, tmp: str, full: str, fsync: bool) -> None:
    try:
        f.flush()
        if fsync:
            os.fsync(f.fileno())
    finally:
        f.close()
    try:
        _move(tmp, full)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _discard_temp(f: Any, tmp: str) -> None:
    try:
        f.close()
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _move_new(src: str, dst: str) -> bool:
    """Give ``src`` the name ``dst`` unless ``dst`` exists: a hard link fails if the name is
    taken, so of two movers exactly one wins and an existing file is never replaced."""
    for attempt in range(_DIR_RACE_ATTEMPTS):
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        try:
            os.link(src, dst)
        except FileExistsError:
            return False
        except FileNotFoundError:
            if not os.path.exists(src) or attempt == _DIR_RACE_ATTEMPTS - 1:
                raise
            continue  # a concurrent clean-up removed the destination's directory: again
        os.unlink(src)
        return True
    raise AssertionError("unreachable")
