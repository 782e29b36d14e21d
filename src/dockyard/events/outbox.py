"""The outbox: one append-only file of events, one line of JSON each, shared by the workers of
an instance, and per endpoint a small state file saying how far it has been delivered.

Layout of the directory (``notifications.outbox.directory``, by default
``<rootdirectory>/dockyard/events``)::

    outbox.jsonl          the events, in the order they were written (O_APPEND, whole lines)
    delivery.lock         flock'd by the one process of the instance that delivers
    reclaimed             offset below which the file's space was given back (a hole)
    endpoints/<name>.json delivery state: offset of the next event, counts, last error
    endpoints/<name>.replay  a replay asked for by ``dockyard events replay`` (an offset)

Every worker opens the file with ``O_APPEND`` and writes a batch of whole lines in one
``write``, so lines of concurrent writers never interleave; push, mount and delete events are
``fdatasync``'d before the request's response is sent. Offsets never change: space of events
every endpoint has received is given back by punching a hole (``fallocate``), which reads as
NUL bytes, so readers skip those.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dockyard.config import Config

OUTBOX = "outbox.jsonl"
LOCK = "delivery.lock"
RECLAIMED = "reclaimed"
ENDPOINTS = "endpoints"

_READ_CHUNK = 256 * 1024


def outbox_directory(config: Config) -> str:
    """``notifications.outbox.directory``, else ``<rootdirectory>/dockyard/events`` with
    filesystem storage, else ``/var/lib/dockyard/events``."""
    if config.notifications.outbox.directory:
        return config.notifications.outbox.directory
    if config.storage.filesystem is not None:
        return os.path.join(config.storage.filesystem.rootdirectory, "dockyard", "events")
    return "/var/lib/dockyard/events"


@dataclass
class EndpointState:
    """How far an endpoint has been delivered, and how it has been going (for the CLI)."""

    offset: int = 0
    delivered: int = 0
    dropped: int = 0
    #: consecutive failed attempts (0 after a success)
    failures: int = 0
    #: every failed attempt since the endpoint was first configured (for the metrics)
    failed_attempts: int = 0
    last_error: str = ""
    last_error_at: str = ""
    last_success_at: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class Outbox:
    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.path = os.path.join(directory, OUTBOX)
        self._fd: int | None = None

    # -- writing ---------------------------------------------------------------------------

    def open(self) -> None:
        os.makedirs(os.path.join(self.directory, ENDPOINTS), exist_ok=True)
        created = not os.path.exists(self.path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if created:
            _fsync_dir(self.directory)

    def append(self, events: list[dict[str, Any]], durable: bool) -> None:
        """Write ``events`` as whole lines in one write; ``durable``: on disk when this
        returns. Blocking: call it in a thread."""
        data = b"".join(json.dumps(e, separators=(",", ":")).encode() + b"\n" for e in events)
        self.append_lines(data, durable)

    def append_lines(self, data: bytes, durable: bool) -> None:
        """Write whole lines (``data`` ends with a newline) in one write, as :meth:`append`."""
        if self._fd is None:
            self.open()
        assert self._fd is not None
        view = memoryview(data)
        while view:
            # One write for a regular file in O_APPEND mode lands whole; loop only for the
            # (theoretical) short write.
            written = os.write(self._fd, view)
            view = view[written:]
        if durable:
            os.fdatasync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # -- reading ---------------------------------------------------------------------------

    def size(self) -> int:
        try:
            return os.stat(self.path).st_size
        except FileNotFoundError:
            return 0

    def read(self, offset: int, limit: int = _READ_CHUNK) -> list[tuple[int, bytes]]:
        """Complete lines from ``offset``: ``(offset after the line, line)``; a line still
        being written (no newline yet) is left for later."""
        try:
            with open(self.path, "rb") as f:
                f.seek(offset)
                data = f.read(limit)
                while data and b"\n" not in data:  # one line longer than the limit
                    more = f.read(limit)
                    if not more:
                        break
                    data += more
        except FileNotFoundError:
            return []
        lines = []
        position = offset
        for line in data.split(b"\n")[:-1]:
            position += len(line) + 1
            line = line.lstrip(b"\0")
            if line:
                lines.append((position, line))
        if not lines and data.count(b"\n"):  # only NULs (a reclaimed hole) were read
            return [(offset + data.rindex(b"\n") + 1, b"")]
        return lines

    def events(self, offset: int = 0) -> Any:
        """Every ``(offset after, event)`` from ``offset`` on (for the CLI)."""
        while True:
            lines = self.read(offset, 1024 * 1024)
            if not lines:
                return
            for end, line in lines:
                offset = end
                if line:
                    with contextlib.suppress(ValueError):
                        yield end - len(line) - 1, json.loads(line)

    def line_start_after(self, position: int) -> int:
        """The offset of the first line that starts at or after ``position``."""
        if position <= 0:
            return 0
        with open(self.path, "rb") as f:
            f.seek(position - 1)
            while True:
                chunk = f.read(_READ_CHUNK)
                if not chunk:
                    return self.size()
                index = chunk.find(b"\n")
                if index >= 0:
                    return f.tell() - len(chunk) + index + 1

    def count_lines(self, start: int, end: int) -> int:
        count = 0
        try:
            with open(self.path, "rb") as f:
                f.seek(start)
                remaining = end - start
                while remaining > 0:
                    chunk = f.read(min(remaining, 1024 * 1024))
                    if not chunk:
                        break
                    remaining -= len(chunk)
                    count += chunk.count(b"\n")
        except FileNotFoundError:
            return 0
        return count

    # -- state -----------------------------------------------------------------------------

    def reclaimed(self) -> int:
        try:
            with open(os.path.join(self.directory, RECLAIMED)) as f:
                return int(f.read().strip() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def reclaim(self, upto: int) -> None:
        """Give back the space of everything before ``upto`` (every endpoint is past it)."""
        if upto <= self.reclaimed():
            return
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            _punch_hole(fd, upto)
        finally:
            os.close(fd)
        _write_atomic(os.path.join(self.directory, RECLAIMED), str(upto).encode())

    def state_path(self, name: str, suffix: str = ".json") -> str:
        return os.path.join(self.directory, ENDPOINTS, name + suffix)

    def load_state(self, name: str) -> EndpointState:
        """The endpoint's delivery state; for an endpoint that has none yet, delivery starts
        with the events the outbox still holds."""
        try:
            with open(self.state_path(name)) as f:
                data = json.load(f)
        except (FileNotFoundError, ValueError):
            return EndpointState(offset=self.reclaimed())
        known = {k: v for k, v in data.items() if k in EndpointState.__dataclass_fields__}
        return EndpointState(**known)

    def save_state(self, name: str, state: EndpointState) -> None:
        """Atomic (rename), not fsync'd: after a crash an endpoint may get a few events again
        (at-least-once), never miss one."""
        _write_atomic(self.state_path(name), json.dumps(asdict(state)).encode())

    def request_replay(self, name: str, offset: int) -> None:
        _write_atomic(self.state_path(name, ".replay"), str(offset).encode())

    def replay_pending(self, name: str) -> bool:
        return os.path.exists(self.state_path(name, ".replay"))

    def take_replay(self, name: str) -> int | None:
        path = self.state_path(name, ".replay")
        try:
            with open(path) as f:
                offset = int(f.read().strip())
        except (FileNotFoundError, ValueError):
            return None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return offset


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc: Any = None


def _punch_hole(fd: int, length: int) -> None:
    """Best effort: a file system without hole punching keeps the space."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, 0, length)
