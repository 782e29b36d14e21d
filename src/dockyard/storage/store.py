"""The one place everything the registry model needs from storage is built on a driver's
primitives and capabilities (storage/driver.py), and the one place paths are validated.

Each operation is implemented once: with the driver's capability or fast path where it has one,
else generically from the primitives where that is safe (reading or writing a whole file, a walk,
leaving empty directories to a backend that has none), else refused with :class:`Unsupported`
(exclusive create, no-overwrite move and touch cannot be built safely from reads and writes).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any, BinaryIO, TypeVar

from dockyard import tracing
from dockyard.metrics import timed_action
from dockyard.storage.driver import (
    CAPABILITIES,
    FAST_PATHS,
    AtomicMove,
    Child,
    DirectoryVersions,
    EmptyDirs,
    Entry,
    ExclusiveCreate,
    FastListings,
    FastRead,
    FastScan,
    FastWalk,
    FastWrite,
    FileInfo,
    FileWriter,
    InvalidPath,
    ListingSteps,
    Lock,
    Locks,
    NoOverwriteMove,
    PartialUploads,
    PathNotFound,
    Redirects,
    ScannedFile,
    Sendfile,
    StorageDriver,
    Touch,
    Unsupported,
    Version,
)

T = TypeVar("T")


def _path(store: Store, path: str, *_: object) -> dict[str, str]:
    """A storage span's attributes: the backend and the path (the first argument)."""
    return {"dockyard.storage.driver": store.name, "dockyard.storage.path": path}


def _traced(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return tracing.traced(f"storage.{name}", _path, expected=(PathNotFound,))


#: concurrent listings in a generic walk (one delimited listing per directory on object storage)
WALK_CONCURRENCY = 16


def check_path(path: str) -> str:
    """``path`` if it is absolute and cannot escape the store (no ``.`` or ``..`` segment, no
    NUL); InvalidPath otherwise."""
    if not path.startswith("/") or "/../" in path + "/" or "/./" in path + "/" or "\0" in path:
        raise InvalidPath(path)
    return path


@dataclass(slots=True)
class LocalRange:
    """``length`` bytes from ``offset`` of an open local file, to send with zero-copy
    ``sendfile``. Whoever takes it closes ``file``."""

    file: BinaryIO
    offset: int
    length: int

    def close(self) -> None:
        self.file.close()


class StreamedRange:
    """``length`` bytes from ``offset`` of a file, as a stream already started (so a missing
    file was reported before anything is sent). Iterate it once, or ``close`` it."""

    def __init__(self, first: bytes, rest: AsyncIterator[bytes], offset: int, length: int) -> None:
        self._first = first
        self._rest = rest
        self.offset = offset
        self.length = length

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self._first:
            first, self._first = self._first, b""
            yield first
        async for chunk in self._rest:
            yield chunk

    async def close(self) -> None:
        """Stop the stream early (releasing its connection)."""
        aclose = getattr(self._rest, "aclose", None)
        if aclose is not None:
            await aclose()


class Store:
    """A driver with everything derived from it. The registry model holds one of these, never
    a driver."""

    def __init__(self, driver: StorageDriver) -> None:
        self._driver = driver
        self.name = driver.name
        #: the optional capabilities the driver has (keys of storage.driver.CAPABILITIES)
        self.capabilities = frozenset(c for c in CAPABILITIES if isinstance(driver, c))
        #: the fast paths it offers (keys of storage.driver.FAST_PATHS)
        self.fast_paths = frozenset(f for f in FAST_PATHS if isinstance(driver, f))
        #: True when a move is one atomic step (see driver.AtomicMove)
        self.atomic_move = isinstance(driver, AtomicMove)
        # Each capability and fast path, looked up once: hot paths test only for None.
        self._exclusive = driver if isinstance(driver, ExclusiveCreate) else None
        self._no_overwrite = driver if isinstance(driver, NoOverwriteMove) else None
        self._touch = driver if isinstance(driver, Touch) else None
        self._locks = driver if isinstance(driver, Locks) else None
        self._redirects = driver if isinstance(driver, Redirects) else None
        self._sendfile = driver if isinstance(driver, Sendfile) else None
        self._partial = driver if isinstance(driver, PartialUploads) else None
        self._empty_dirs = driver if isinstance(driver, EmptyDirs) else None
        self._versions = driver if isinstance(driver, DirectoryVersions) else None
        self._fast_read = driver if isinstance(driver, FastRead) else None
        self._fast_write = driver if isinstance(driver, FastWrite) else None
        self._fast_walk = driver if isinstance(driver, FastWalk) else None
        self._fast_listings = driver if isinstance(driver, FastListings) else None
        self._fast_scan = driver if isinstance(driver, FastScan) else None

    def has(self, capability: type) -> bool:
        return capability in self.capabilities

    def missing(self, capabilities: Iterable[type]) -> list[str]:
        """The names of those of ``capabilities`` the driver lacks."""
        return [CAPABILITIES[c] for c in capabilities if c not in self.capabilities]

    def _unsupported(self, capability: type) -> Unsupported:
        return Unsupported(self.name, CAPABILITIES[capability])

    async def close(self) -> None:
        await self._driver.close()

    # -- primitives, validated ------------------------------------------------------------
    @_traced("stat")
    @timed_action("Stat")
    async def stat(self, path: str) -> FileInfo:
        """Size and time of a file, or ``is_dir`` for a directory. PathNotFound if missing."""
        return await self._driver.stat(check_path(path))

    @_traced("list")
    @timed_action("List")
    async def list(self, path: str) -> list[str]:
        """Names of a directory's direct children, unsorted. PathNotFound if missing."""
        return [child.name for child in await self._driver.list(check_path(path))]

    @_traced("delete")
    @timed_action("Delete")
    async def delete(self, path: str) -> None:
        """Delete a file or a whole directory tree. PathNotFound if missing."""
        await self._driver.delete(check_path(path))

    async def delete_if_present(self, path: str) -> bool:
        """Delete a file or tree; False if there was nothing to delete."""
        try:
            await self.delete(path)
        except PathNotFound:
            return False
        return True

    @_traced("move")
    @timed_action("Move")
    async def move(self, source: str, dest: str) -> None:
        """Move a file, replacing ``dest`` (see StorageDriver.move). PathNotFound if
        ``source`` is missing."""
        await self._driver.move(check_path(source), check_path(dest))

    def reader(self, path: str, offset: int = 0, length: int | None = None) -> AsyncIterator[bytes]:
        """Stream the file's bytes (see StorageDriver.reader)."""
        return self._driver.reader(check_path(path), offset, length)

    @_traced("writer")
    async def writer(self, path: str) -> FileWriter:
        """A writer whose content appears whole at ``path`` on close (see FileWriter)."""
        return await self._driver.writer(check_path(path))

    # -- whole small files ------------------------------------------------------------------
    @_traced("read")
    @timed_action("GetContent")
    async def read(self, path: str) -> bytes:
        """The whole content of a small file (links, manifests). PathNotFound if missing."""
        check_path(path)
        if self._fast_read is not None:
            return await self._fast_read.read_file(path)
        return b"".join([chunk async for chunk in self._driver.reader(path)])

    @_traced("write")
    @timed_action("PutContent")
    async def write(self, path: str, data: bytes) -> None:
        """Replace the file's content atomically: readers see the old or the new bytes, never a
        mix or a prefix. Parent directories are created."""
        check_path(path)
        if self._fast_write is not None:
            await self._fast_write.write_file(path, data)
            return
        writer = await self._driver.writer(path)
        try:
            await writer.write(data)
            await writer.close()
        except BaseException:
            await asyncio.shield(writer.abort())
            raise

    @_traced("write_new")
    @timed_action("PutContent")
    async def write_new(self, path: str, data: bytes) -> bool:
        """Create the file only if it does not exist yet: of two writers exactly one wins and
        the file appears whole. True if this call created it."""
        check_path(path)
        if self._exclusive is None:
            raise self._unsupported(ExclusiveCreate)
        return await self._exclusive.write_new(path, data)

    # -- moves and times --------------------------------------------------------------------
    @_traced("move_new")
    @timed_action("Move")
    async def move_new(self, source: str, dest: str) -> bool:
        """Move unless ``dest`` exists: True if moved, False (``source`` left) if not; an
        existing file is never replaced (see driver.NoOverwriteMove). PathNotFound if
        ``source`` is missing."""
        check_path(source)
        check_path(dest)
        if self._no_overwrite is None:
            raise self._unsupported(NoOverwriteMove)
        return await self._no_overwrite.move_new(source, dest)

    @_traced("touch")
    @timed_action("Touch")
    async def touch(self, path: str) -> None:
        """Set the file's modification time to now. PathNotFound if missing."""
        check_path(path)
        if self._touch is None:
            raise self._unsupported(Touch)
        await self._touch.touch(path)

    # -- trees ------------------------------------------------------------------------------
    @_traced("walk")
    @timed_action("Walk")
    async def walk(self, path: str, descend: Callable[[str], bool]) -> list[Entry]:
        """Every file and directory below ``path``, at any depth; a directory is entered only
        if ``descend(name)`` says so (it is listed either way). Empty when ``path`` is missing.
        ``descend`` must be pure: a driver may call it on another thread."""
        check_path(path)
        if self._fast_walk is not None:
            return await self._fast_walk.walk(path, descend)
        return await self._walk_levels(path, lambda entry: descend(entry.path.rsplit("/", 1)[-1]))

    async def _walk_levels(self, path: str, descend: Callable[[Entry], bool]) -> list[Entry]:
        """The generic walk: level by level, several listings at once; a directory ``descend``
        refuses is listed but never entered. Empty when ``path`` is missing."""
        limit = asyncio.Semaphore(WALK_CONCURRENCY)

        async def children(directory: str) -> list[Entry]:
            async with limit:
                try:
                    found = await self._driver.list(directory)
                except PathNotFound:
                    return []
            base = directory.rstrip("/")
            return [Entry(f"{base}/{child.name}", child.is_dir) for child in found]

        entries: list[Entry] = []
        level = [path]
        while level:
            batches = await asyncio.gather(*(children(d) for d in level))
            level = []
            for batch in batches:
                entries.extend(batch)
                level.extend(e.path for e in batch if e.is_dir and descend(e))
        return entries

    @_traced("stat_many")
    @timed_action("Stat")
    async def stat_many(self, paths: list[str]) -> list[FileInfo | None]:
        """What :meth:`stat` says of each of ``paths``, in order, None for one missing: in one
        call where the driver can (a filesystem, one thread), else several stats at once."""
        for path in paths:
            check_path(path)
        if self._fast_scan is not None:
            return await self._fast_scan.stat_many(paths)
        limit = asyncio.Semaphore(WALK_CONCURRENCY)

        async def one(path: str) -> FileInfo | None:
            async with limit:
                try:
                    return await self._driver.stat(path)
                except PathNotFound:
                    return None

        return list(await asyncio.gather(*(one(p) for p in paths)))

    @_traced("read_many")
    @timed_action("GetContent")
    async def read_many(self, paths: list[str]) -> list[ScannedFile | None]:
        """The whole content of each of ``paths`` (small files: links, manifests) with its size
        and time, in order, None for one missing: in one call where the driver can (a
        filesystem, one thread), else several reads at once."""
        for path in paths:
            check_path(path)
        if self._fast_scan is not None:
            return await self._fast_scan.read_many(paths)
        limit = asyncio.Semaphore(WALK_CONCURRENCY)

        async def one(path: str) -> ScannedFile | None:
            async with limit:
                try:
                    content = await self.read(path)
                    info = await self._driver.stat(path)
                except PathNotFound:
                    return None
            return ScannedFile(path, info.size, info.modified, content)

        return list(await asyncio.gather(*(one(p) for p in paths)))

    @_traced("scan")
    @timed_action("Walk")
    async def scan(
        self,
        path: str,
        descend: Callable[[str], bool],
        include: Callable[[str], bool],
        read: bool = False,
    ) -> list[ScannedFile]:
        """Every file below ``path`` whose name ``include`` accepts, with its size and time
        (and, with ``read``, its content when it is small: links, manifests). A directory is
        entered only if ``descend(its path)`` says so (``path`` itself always is). A file gone
        between the listing and its stat is left out; empty when ``path`` is missing. What the
        walk, a stat and a read of each file would give, without a call per file where the
        driver has a scan (one thread on a filesystem, instead of an await per file).
        ``descend`` and ``include`` must be pure: a driver may call them on another thread."""
        check_path(path)
        if self._fast_scan is not None:
            return await self._fast_scan.scan(path, descend, include, read)
        # Generic: the walk (``descend`` takes paths here), then a read and a stat of each
        # file, several at once.
        entries = await self._walk_levels(path, lambda entry: descend(entry.path))
        files = [e.path for e in entries if not e.is_dir and include(e.path.rsplit("/", 1)[-1])]
        limit = asyncio.Semaphore(WALK_CONCURRENCY)

        async def one(file: str) -> ScannedFile | None:
            async with limit:
                try:
                    content = await self.read(file) if read else None
                    info = await self.stat(file)
                except PathNotFound:
                    return None
            if info.is_dir:
                return None
            return ScannedFile(file, info.size, info.modified, content)

        found = await asyncio.gather(*(one(f) for f in files))
        return [f for f in found if f is not None]

    # Traced with the backend only: the argument is a generator, not a path.
    @tracing.traced(
        "storage.drive_listings", lambda store, *_: {"dockyard.storage.driver": store.name}
    )
    @timed_action("Walk")
    async def drive_listings(self, steps: ListingSteps[T]) -> T:
        """Run ``steps``, a generator that yields batches of directories to list and is sent
        back their children (None for a directory that is missing, or a file), in order, until
        it returns; return what it returns. A walk that decides as it goes where to go next
        (``registry.listing.catalog_page``). A driver with the fast path runs it all on one
        thread; otherwise each batch is listed concurrently. ``steps`` must then be pure (it
        may run on another thread) and yield only paths it built from validated ones and
        listed names."""
        if self._fast_listings is not None:
            return await self._fast_listings.drive_listings(steps)
        limit = asyncio.Semaphore(WALK_CONCURRENCY)

        async def children(directory: str) -> list[Child] | None:
            async with limit:
                try:
                    return await self._driver.list(check_path(directory))
                except PathNotFound:
                    return None

        try:
            batch = next(steps)
            while True:
                batch = steps.send(list(await asyncio.gather(*(children(d) for d in batch))))
        except StopIteration as done:
            return done.value

    @_traced("remove_empty_dir")
    async def remove_empty_dir(self, path: str) -> None:
        """Remove a directory if it is empty; do nothing otherwise. A backend whose directories
        vanish with their last file has nothing to remove."""
        check_path(path)
        if self._empty_dirs is not None:
            await self._empty_dirs.remove_empty_dir(path)

    # -- what only some backends have -------------------------------------------------------
    @_traced("directory_version")
    @timed_action("Stat")
    async def directory_version(self, path: str) -> Version | None:
        """The directory's version (see driver.Version), or None where the backend has no
        directory times (object storage) or cannot trust a stat to see every writer's latest
        change (a network filesystem). PathNotFound if missing."""
        check_path(path)
        if self._versions is None:
            return None
        return await self._versions.directory_version(path)

    def lock(self, path: str) -> Lock | None:
        """An advisory lock on the existing file ``path``, or None where the backend has none
        (object storage)."""
        check_path(path)
        return None if self._locks is None else self._locks.lock(path)

    @_traced("redirect_url")
    @timed_action("URLFor")
    async def redirect_url(self, path: str, method: str = "GET") -> str | None:
        """Where a client can fetch the file directly, or None (no redirects here)."""
        check_path(path)
        if self._redirects is None:
            return None
        return await self._redirects.redirect_url(path, method)

    @_traced("open_range")
    async def open_range(self, path: str, offset: int, length: int) -> LocalRange | StreamedRange:
        """``length`` bytes of the file from ``offset``: an open local file where the driver
        has one (zero-copy sendfile), else a started stream. PathNotFound now, not while the
        bytes are being sent, when the file is missing."""
        check_path(path)
        if self._sendfile is not None:
            local = await self._sendfile.open_local(path)
            return LocalRange(local.file, offset, length)
        stream = self._driver.reader(path, offset, length)
        try:
            first = await anext(stream, b"")
        except BaseException:
            await StreamedRange(b"", stream, offset, length).close()
            raise
        return StreamedRange(first, stream, offset, length)

    @_traced("purge_partial")
    async def purge_partial(self, path: str, before: float, dry_run: bool) -> list[str]:
        """Remove what unfinished writes below ``path`` started before ``before`` left aside in
        the backend; a backend without partial uploads never leaves anything aside."""
        check_path(path)
        if self._partial is None:
            return []
        return await self._partial.purge_partial(path, before, dry_run)
