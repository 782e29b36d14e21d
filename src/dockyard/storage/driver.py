"""The storage driver interface: bytes at paths, nothing about registries.

A driver provides the primitives of :class:`StorageDriver` and nothing else is required of it.
What only some backends can do is an optional *capability*, each its own small Protocol below
(exclusive create, no-overwrite move, touch, locks, redirects, sendfile, clean-up of partial
uploads); a *fast path* is an optional, faster way to do something the store can also build from
the primitives. Everything the registry model uses is built on top in one place,
:class:`dockyard.storage.store.Store`, which also validates every path: drivers trust theirs.

A driver declares a capability or a fast path by having its method: each Protocol is
``runtime_checkable`` and the store looks once, when it wraps the driver (so hot paths test
nothing). Having the method *is* the declaration, so it cannot drift from the code the way a
separate list of capability names could, and a type checker holds the method to the Protocol's
signature. A driver that lacks something simply does not define the method (not one that says
"unsupported" when called).

A driver maps its backend's failures onto the exceptions below at one boundary, so the registry
model never sees an ``OSError`` or a botocore error. Paths are absolute, '/'-separated, and built
only by ``registry.layout``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Generator
from dataclasses import dataclass
from typing import Any, BinaryIO, Literal, Protocol, TypeVar, runtime_checkable

T = TypeVar("T")


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


class Unsupported(StorageError):
    """The driver lacks a capability the operation needs (and nothing safe replaces it)."""

    def __init__(self, driver: str, capability: str) -> None:
        self.driver = driver
        self.capability = capability
        super().__init__(f"the {driver} storage driver has no {capability}")


@dataclass(frozen=True, slots=True)
class Child:
    """A name found in a directory by :meth:`StorageDriver.list`."""

    name: str
    is_dir: bool


@dataclass(frozen=True, slots=True)
class Entry:
    """A path found by a walk of a tree (``Store.walk``)."""

    path: str
    is_dir: bool


@dataclass(frozen=True, slots=True)
class ScannedFile:
    """A file found by a scan (``Store.scan``): its path, size and time as a stat gives them,
    and its content when the scan was asked to read it (None when it was not, or when the file
    is too big to read whole)."""

    path: str
    size: int
    modified: float
    content: bytes | None = None


@dataclass(frozen=True, slots=True)
class FileInfo:
    path: str
    size: int
    #: modification time, seconds since the epoch
    modified: float
    is_dir: bool


@dataclass(frozen=True, slots=True)
class Version:
    """What identifies one state of a directory's list of names on a filesystem: its device and
    inode (a directory removed and made again is another one) and its modification and change
    times in nanoseconds (creating, removing or renaming an entry sets both). ``now_ns`` is the
    clock those times come from, read just before the stat (``registry.listing`` needs it to
    tell a time that is surely past from one still in the current clock tick)."""

    key: tuple[int, int, int, int]
    mtime_ns: int
    now_ns: int


@dataclass(frozen=True, slots=True)
class LocalFile:
    """A file open for reading on the local filesystem (for zero-copy ``sendfile``), and its
    size when it was opened. Whoever receives it closes ``file``."""

    file: BinaryIO
    size: int


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


# -- the primitives ---------------------------------------------------------------------------


class StorageDriver(Protocol):
    """What every backend provides. Every method raises :class:`PathNotFound` for a missing
    path (where it says so) and :class:`StorageError` for anything else."""

    name: str

    def reader(self, path: str, offset: int = 0, length: int | None = None) -> AsyncIterator[bytes]:
        """Stream ``length`` bytes (to the end when None) from ``offset``; nothing from an
        offset at or past the end. PathNotFound if missing (raised on the first iteration)."""
        ...

    async def writer(self, path: str) -> FileWriter:
        """A writer for a new version of the file at ``path`` (see FileWriter): parents are
        created, the content appears whole on ``close``. Memory held is bounded by the driver
        (a part size on object storage), not by the file's size."""
        ...

    async def stat(self, path: str) -> FileInfo:
        """Size and time of a file, or ``is_dir`` for a directory. PathNotFound if missing."""
        ...

    async def list(self, path: str) -> list[Child]:
        """A directory's direct children, unsorted. PathNotFound if the directory does not
        exist."""
        ...

    async def delete(self, path: str) -> None:
        """Delete a file or a whole directory tree. PathNotFound if missing."""
        ...

    async def move(self, source: str, dest: str) -> None:
        """Move a file, replacing ``dest`` and creating its parents, keeping the file's
        modification time (as a rename does: garbage collection reads it again after moving a
        file aside). PathNotFound if ``source`` is missing."""
        ...

    async def close(self) -> None:
        """Release connections and threads; the driver is not used afterwards."""
        ...


# -- capabilities -----------------------------------------------------------------------------


@runtime_checkable
class ExclusiveCreate(Protocol):
    async def write_new(self, path: str, data: bytes) -> bool:
        """Create the file with ``data`` only if it does not exist yet (atomically: of two
        writers exactly one wins; the file appears whole). True if this call created it."""
        ...


@runtime_checkable
class NoOverwriteMove(Protocol):
    async def move_new(self, source: str, dest: str) -> bool:
        """Move a file only if ``dest`` does not exist: True if moved; False (``source`` left as
        it is) if ``dest`` exists. Never replaces an existing file: of two movers to the same
        ``dest`` exactly one wins where the backend has a conditional create (a hard link on a
        filesystem; a conditional copy on object storage — where the backend ignores the
        condition, the later of two simultaneous movers may rewrite the file, see s3.py).
        PathNotFound if ``source`` is missing."""
        ...


@runtime_checkable
class Touch(Protocol):
    async def touch(self, path: str) -> None:
        """Set the file's modification time to now. PathNotFound if missing. (Garbage
        collection reads it as "last used".)"""
        ...


@runtime_checkable
class AtomicMove(Protocol):
    """A marker: ``move`` is one atomic step (a rename), so a touch either lands before it or
    fails. Drivers whose move is a copy and a delete (object storage) leave it undefined, and
    ``registry.blobs.stamp`` confirms each touch a moment later. With it, ``move`` also takes a
    directory and everything in it in that one step (a repository delete relies on it to make
    a repository disappear at once: ``registry.deletion``)."""

    atomic_move: Literal[True]


@runtime_checkable
class Locks(Protocol):
    def lock(self, path: str) -> Lock:
        """An advisory lock on the existing file ``path`` (taken by ``acquire``)."""
        ...


@runtime_checkable
class Redirects(Protocol):
    async def redirect_url(self, path: str, method: str) -> str | None:
        """A time-limited URL a client can fetch the file from directly (``method`` GET or
        HEAD; a presigned URL on object storage), or None when the operator disabled
        redirects."""
        ...


@runtime_checkable
class Sendfile(Protocol):
    async def open_local(self, path: str) -> LocalFile:
        """Open the file for zero-copy reads. PathNotFound if missing."""
        ...


@runtime_checkable
class PartialUploads(Protocol):
    async def purge_partial(self, path: str, before: float, dry_run: bool) -> list[str]:
        """Remove what unfinished writes below ``path`` that started before ``before`` (epoch
        seconds) left aside in the backend (abandoned multipart uploads on object storage), and
        return a description of each."""
        ...


@runtime_checkable
class DirectoryVersions(Protocol):
    async def directory_version(self, path: str) -> Version | None:
        """The directory's :class:`Version` (one stat). PathNotFound if missing. Only a backend
        whose directories have modification times that change with their entries has it (a
        filesystem; object storage has no directories); None where those times may be read from
        a cache that lags other writers (a network filesystem)."""
        ...


@runtime_checkable
class EmptyDirs(Protocol):
    """The backend keeps a directory after its last file is gone (a filesystem; on object
    storage a prefix vanishes with its last key)."""

    async def remove_empty_dir(self, path: str) -> None:
        """Remove a directory if it is empty; do nothing otherwise. Writers racing with it
        still succeed: they recreate parents."""
        ...


# -- fast paths (the store has a generic way to do each) -----------------------------------


@runtime_checkable
class FastRead(Protocol):
    async def read_file(self, path: str) -> bytes:
        """The whole content of a small file. PathNotFound if missing."""
        ...


@runtime_checkable
class FastWrite(Protocol):
    async def write_file(self, path: str, data: bytes) -> None:
        """Replace the file's content atomically, as a writer would (parents created)."""
        ...


@runtime_checkable
class FastWalk(Protocol):
    async def walk(self, path: str, descend: Callable[[str], bool]) -> list[Entry]:
        """What ``Store.walk`` returns (see there); ``descend`` may be called on another
        thread."""
        ...


@runtime_checkable
class FastScan(Protocol):
    async def scan(
        self,
        path: str,
        descend: Callable[[str], bool],
        include: Callable[[str], bool],
        read: bool,
    ) -> list[ScannedFile]:
        """What ``Store.scan`` returns (see there); ``descend`` and ``include`` may be called
        on another thread."""
        ...

    async def stat_many(self, paths: list[str]) -> list[FileInfo | None]:
        """What ``Store.stat_many`` returns (see there)."""
        ...

    async def read_many(self, paths: list[str]) -> list[ScannedFile | None]:
        """What ``Store.read_many`` returns (see there)."""
        ...


#: directories to list, each answered with its children (None: missing, or not a directory)
ListingSteps = Generator[list[str], list["list[Child] | None"], T]


@runtime_checkable
class FastListings(Protocol):
    async def drive_listings(self, steps: ListingSteps[Any]) -> Any:
        """What ``Store.drive_listings`` returns (see there), all listings on one thread:
        ``steps`` runs there too."""
        ...


#: every optional capability, as named in messages and in ``Store.capabilities``
CAPABILITIES: dict[type, str] = {
    ExclusiveCreate: "exclusive create",
    NoOverwriteMove: "no-overwrite move",
    Touch: "touch",
    AtomicMove: "atomic move",
    Locks: "locks",
    Redirects: "redirect URLs",
    Sendfile: "sendfile",
    PartialUploads: "partial-upload clean-up",
    EmptyDirs: "empty directories",
    DirectoryVersions: "directory versions",
}
#: every fast path
FAST_PATHS: dict[type, str] = {
    FastRead: "inline reads",
    FastWrite: "one-step writes",
    FastWalk: "walk",
    FastListings: "listings on one thread",
    FastScan: "scan",
}
