"""The storage driver interface: bytes at paths, nothing about registries.

Paths are absolute, '/'-separated, and built only by ``registry.layout``. A driver maps its
backend's failures onto the exceptions below at one boundary, so the registry model never sees an
``OSError`` or a botocore error.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol


class StorageError(Exception):
    """A storage backend failed in a way the registry cannot turn into a client error."""


class PathNotFound(StorageError):
    def __init__(self, path: str) -> None:
        self.path = path
        super().__init__(f"path not found: {path}")


class InvalidPath(StorageError):
    def __init__(self, path: str) -> None:
        self.path = path
        super().__init__(f"invalid storage path: {path!r}")


@dataclass(frozen=True, slots=True)
class Entry:
    """A name found by :meth:`StorageDriver.walk`."""

    path: str
    is_dir: bool


@dataclass(frozen=True, slots=True)
class FileInfo:
    path: str
    size: int
    #: modification time, seconds since the epoch
    modified: float
    is_dir: bool


class FileWriter(Protocol):
    """A new file being written. Nothing is visible at its path until ``close`` returns; then
    the whole content is, at once (a reader sees the old file or the new one, never a prefix).
    ``abort`` drops everything."""

    @property
    def size(self) -> int:
        """Bytes written so far."""
        ...

    async def write(self, data: bytes | bytearray | memoryview) -> None: ...

    async def close(self) -> None:
        """Make the file visible at its path, replacing what was there."""
        ...

    async def abort(self) -> None:
        """Drop what was written; the path is left as it was."""
        ...


class Lock(Protocol):
    """An exclusive advisory lock on a file, tried without waiting, released by ``release`` or
    when the process holding it dies (never by a timeout)."""

    def acquire(self) -> bool:
        """True if taken; False if another holder has it. PathNotFound if the file is missing."""
        ...

    def release(self) -> None: ...


class StorageDriver(Protocol):
    """What the registry model needs from a backend. Every method raises :class:`PathNotFound`
    for a missing path (where it says so) and :class:`StorageError` for anything else."""

    name: str
    #: True when ``move`` is one atomic step (a rename): a touch either precedes it or fails.
    #: False on object storage (copy, then delete), where registry.blobs.stamp confirms touches.
    atomic_move: bool

    async def read(self, path: str) -> bytes:
        """The whole content of a small file (links, manifests). PathNotFound if missing."""
        ...

    async def write(self, path: str, data: bytes) -> None:
        """Replace the file's content atomically: readers see the old or the new bytes, never a
        mix or a prefix. Parent directories are created."""
        ...

    async def stat(self, path: str) -> FileInfo:
        """Size and time of a file, or ``is_dir`` for a directory. PathNotFound if missing."""
        ...

    async def list(self, path: str) -> list[str]:
        """Names (not paths) of a directory's direct children, unsorted. PathNotFound if the
        directory does not exist."""
        ...

    async def write_new(self, path: str, data: bytes) -> bool:
        """Create the file with ``data`` only if it does not exist yet (atomically: of two
        writers exactly one wins). True if this call created it."""
        ...

    async def touch(self, path: str) -> None:
        """Set the file's modification time to now. PathNotFound if missing. (Garbage
        collection reads it as "last used".)"""
        ...

    async def move(self, source: str, dest: str) -> None:
        """Move a file, replacing ``dest``; atomic where the backend allows (a rename on a
        filesystem). PathNotFound if ``source`` is missing."""
        ...

    async def move_new(self, source: str, dest: str) -> bool:
        """Move a file only if ``dest`` does not exist: True if moved; False (``source`` left as
        it is) if ``dest`` exists. Never replaces an existing file: of two movers to the same
        ``dest`` exactly one wins where the backend has a conditional create (a hard link on a
        filesystem; a conditional copy on object storage — where the backend ignores the
        condition, the later of two simultaneous movers may rewrite the file, see s3.py).
        PathNotFound if ``source`` is missing."""
        ...

    async def delete(self, path: str) -> None:
        """Delete a file or a whole directory tree. PathNotFound if missing."""
        ...

    async def remove_empty_dir(self, path: str) -> None:
        """Remove a directory if it is empty; do nothing otherwise (or on backends without
        directories). Writers racing with it still succeed: they recreate parents."""
        ...

    async def walk(self, path: str, descend: Callable[[str], bool]) -> list[Entry]:
        """Every file and directory below ``path``, at any depth; a directory is entered only
        if ``descend(name)`` says so (it is listed either way). Empty when ``path`` is missing.
        ``descend`` must be pure: a driver may call it on another thread."""
        ...

    def reader(self, path: str, offset: int = 0, length: int | None = None) -> AsyncIterator[bytes]:
        """Stream ``length`` bytes (to the end when None) from ``offset``. PathNotFound if
        missing (raised on the first iteration)."""
        ...

    async def writer(self, path: str) -> FileWriter:
        """A writer for a new version of the file at ``path`` (see FileWriter): parents are
        created, the content appears whole on ``close``. Memory held is bounded by the driver
        (a part size on object storage), not by the file's size."""
        ...

    def lock(self, path: str) -> Lock | None:
        """An advisory lock on the existing file ``path``, or None where the backend has none
        (object storage)."""
        ...

    async def redirect_url(self, path: str, method: str = "GET") -> str | None:
        """A time-limited URL a client can fetch the file from directly (a presigned URL on
        object storage), or None when the driver has none or redirects are disabled."""
        ...

    async def purge_partial(self, path: str, before: float, dry_run: bool) -> list[str]:
        """Remove what unfinished writes below ``path`` that started before ``before`` (epoch
        seconds) left behind, and return a description of each: abandoned multipart uploads on
        object storage; nothing on a filesystem."""
        ...

    async def close(self) -> None:
        """Release connections and threads; the driver is not used afterwards."""
        ...

    def local_path(self, path: str) -> str | None:
        """A path on the local filesystem holding this file, for zero-copy ``sendfile``; None for
        backends that have none."""
        ...
