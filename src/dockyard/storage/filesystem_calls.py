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
from collections.abc import Callable
from typing import Any

from dockyard.storage.driver import Child, Entry, LocalFile


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
