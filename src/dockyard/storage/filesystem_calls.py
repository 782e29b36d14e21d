"""The blocking calls behind the filesystem driver (storage/filesystem.py), each run on its
thread pool or, for metadata, inline on the event loop. They raise ``OSError``; the driver maps
it at its one boundary."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import uuid
from collections.abc import Callable, Generator
from typing import Any, TypeVar

from dockyard.storage.driver import Child, Entry, FileInfo, LocalFile, ScannedFile

T = TypeVar("T")


def isdir(st: os.stat_result) -> bool:
    return stat.S_ISDIR(st.st_mode)


#: files up to this size are read on the event loop (links, most manifests)
INLINE_READ_LIMIT = 64 * 1024


def list_children(full: str) -> list[Child]:
    with os.scandir(full) as entries:
        return [Child(e.name, e.is_dir(follow_symlinks=False)) for e in entries]


def open_local(full: str) -> LocalFile:
    f = open(full, "rb")  # noqa: SIM115 - the LocalFile's receiver closes it
    try:
        return LocalFile(f, os.fstat(f.fileno()).st_size)
    except BaseException:
        f.close()
        raise


def read_file(full: str) -> bytes:
    with open(full, "rb") as f:
        return f.read()


def read_small_file(full: str) -> bytes | None:
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
DIR_RACE_ATTEMPTS = 5


def makedirs(directory: str) -> None:
    """``os.makedirs(exist_ok=True)`` that survives a parent being removed while it makes the
    levels below it (``mkdir`` fails with ENOENT then): a clean-up of empty directories, or a
    repository delete renaming the repository's directories away. It makes them again."""
    for attempt in range(DIR_RACE_ATTEMPTS):
        try:
            os.makedirs(directory, exist_ok=True)
            return
        except FileNotFoundError:
            if attempt == DIR_RACE_ATTEMPTS - 1:
                raise


def write_atomic(full: str, data: bytes, fsync: bool) -> None:
    directory = os.path.dirname(full)
    for attempt in range(DIR_RACE_ATTEMPTS):
        makedirs(directory)
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
            if attempt == DIR_RACE_ATTEMPTS - 1:
                raise
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


def write_new(full: str, data: bytes, fsync: bool) -> bool:
    """Written to a temporary file, then hard-linked into place: the link fails if the name
    exists, so the file appears complete or not at all, and only once."""
    for attempt in range(DIR_RACE_ATTEMPTS):
        makedirs(os.path.dirname(full))
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
            if attempt == DIR_RACE_ATTEMPTS - 1:
                raise
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    raise AssertionError("unreachable")


def walk(full: str, root_length: int, descend: Callable[[str], bool]) -> list[Entry]:
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


def scan(
    full: str,
    root_length: int,
    descend: Callable[[str], bool],
    include: Callable[[str], bool],
    read: bool,
) -> list[ScannedFile]:
    """The files below ``full`` that ``include`` accepts (by name), each with one stat (and
    with ``read``, an open, fstat and read of the same inode, so size, time and content agree),
    all on one pool thread; directories entered when ``descend`` accepts their path (relative
    to the root). A file removed between the listing and its stat is skipped, as a walk
    followed by a stat would skip it."""
    found: list[ScannedFile] = []
    pending = [full]
    while pending:
        directory = pending.pop()
        try:
            entries = os.scandir(directory)
        except (FileNotFoundError, NotADirectoryError):
            continue
        with entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    if descend(entry.path[root_length:]):
                        pending.append(entry.path)
                    continue
                if not include(entry.name):
                    continue
                content = None
                try:
                    if read:
                        content, st = _read_with_stat(entry.path)
                    else:
                        st = entry.stat()  # follows a symlink, as the driver's stat does
                except (FileNotFoundError, NotADirectoryError):
                    continue
                if stat.S_ISDIR(st.st_mode):  # a symlink to a directory: not a file
                    continue
                found.append(
                    ScannedFile(entry.path[root_length:], st.st_size, st.st_mtime, content)
                )
    return found


def stat_many(root: str, paths: list[str]) -> list[FileInfo | None]:
    """A stat of each of ``paths`` (under ``root``), None for one missing, in one pool call."""
    out: list[FileInfo | None] = []
    for path in paths:
        try:
            st = os.stat(root + path)
        except (FileNotFoundError, NotADirectoryError):
            out.append(None)
            continue
        out.append(FileInfo(path, st.st_size, st.st_mtime, stat.S_ISDIR(st.st_mode)))
    return out


def read_many(root: str, paths: list[str]) -> list[ScannedFile | None]:
    """The whole content and the stat (of the same inode) of each of ``paths`` (under
    ``root``), None for one missing, in one pool call."""
    out: list[ScannedFile | None] = []
    for path in paths:
        try:
            fd = os.open(root + path, os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            out.append(None)
            continue
        try:
            st = os.fstat(fd)
            chunks = []
            while chunk := os.read(fd, max(st.st_size + 1, 4096)):
                chunks.append(chunk)
        finally:
            os.close(fd)
        out.append(ScannedFile(path, st.st_size, st.st_mtime, b"".join(chunks)))
    return out


def _read_with_stat(full: str) -> tuple[bytes | None, os.stat_result]:
    """The file's content (None when it is over INLINE_READ_LIMIT) and its stat."""
    fd = os.open(full, os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if st.st_size > INLINE_READ_LIMIT or stat.S_ISDIR(st.st_mode):
            return None, st
        # One read: the size is known, and a file is never written in place (replaced whole by
        # a rename), so what fstat saw is what there is; a second read would only find the end.
        return os.read(fd, INLINE_READ_LIMIT + 1), st
    finally:
        os.close(fd)


def move(src: str, dst: str) -> None:
    for attempt in range(DIR_RACE_ATTEMPTS):
        if not os.path.exists(src):
            raise FileNotFoundError(errno.ENOENT, "no such file", src)
        makedirs(os.path.dirname(dst))
        try:
            os.replace(src, dst)
            return
        except FileNotFoundError:
            if attempt == DIR_RACE_ATTEMPTS - 1:
                raise


def rmdir_if_empty(full: str) -> None:
    with contextlib.suppress(FileNotFoundError, OSError):
        os.rmdir(full)


def delete(full: str) -> None:
    if os.path.isdir(full) and not os.path.islink(full):
        shutil.rmtree(full)
    else:
        os.unlink(full)


def open_temp(full: str) -> tuple[str, Any]:
    directory = os.path.dirname(full)
    for attempt in range(DIR_RACE_ATTEMPTS):
        makedirs(directory)
        tmp = f"{full}.tmp-{uuid.uuid4().hex}"
        try:
            return tmp, open(tmp, "xb")  # closed by the writer
        except FileNotFoundError:
            if attempt == DIR_RACE_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


def finish_temp(f: Any, tmp: str, full: str, fsync: bool) -> None:
    try:
        f.flush()
        if fsync:
            os.fsync(f.fileno())
    finally:
        f.close()
    try:
        move(tmp, full)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def discard_temp(f: Any, tmp: str) -> None:
    try:
        f.close()
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def move_new(src: str, dst: str) -> bool:
    """Give ``src`` the name ``dst`` unless ``dst`` exists: a hard link fails if the name is
    taken, so of two movers exactly one wins and an existing file is never replaced."""
    for attempt in range(DIR_RACE_ATTEMPTS):
        makedirs(os.path.dirname(dst))
        try:
            os.link(src, dst)
        except FileExistsError:
            return False
        except FileNotFoundError:
            if not os.path.exists(src) or attempt == DIR_RACE_ATTEMPTS - 1:
                raise
            continue  # a concurrent clean-up removed the destination's directory: again
        os.unlink(src)
        return True
    raise AssertionError("unreachable")


def list_or_none(full: str) -> list[Child] | None:
    try:
        return list_children(full)
    except (FileNotFoundError, NotADirectoryError):
        return None


def drive_listings(root: str, steps: Generator[list[str], list[list[Child] | None], T]) -> T:
    """Answer each batch of directories ``steps`` yields with their listings (os.scandir), all
    on this one thread: no hop to the event loop and back per directory."""
    try:
        batch = next(steps)
        while True:
            batch = steps.send([list_or_none(root + path) for path in batch])
    except StopIteration as done:
        return done.value


def filesystem_type(path: str) -> str:
    """The type of the filesystem mounted nearest above ``path`` (from /proc/self/mounts);
    "" when unknown."""
    path = os.path.realpath(path)
    best, found = "", ""
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                fields = line.split()
                if len(fields) < 3:
                    continue
                # Mount points escape spaces and such as octal (\040).
                mount = fields[1].encode().decode("unicode_escape")
                inside = path == mount or path.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) >= len(best):
                    best, found = mount, fields[2]
    except OSError:
        return ""
    return found
