"""The two servers under test, started with equivalent configurations, and their memory.

Both are started in their own session (so a Ctrl-C in the terminal reaches only the harness,
which then stops them) and killed as a whole process group if they do not stop in time.
Memory is read from ``/proc``: the sum over a server's process tree (Dockyard forks workers) of
VmRSS, VmHWM and Pss, sampled every 100 ms by one thread while a measurement runs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

HTTP_SECRET = "dockyard-bench-shared-secret"
REALM = "dockyard-bench"


class BenchError(Exception):
    """A workload or a server failed; the message says what happened."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- configuration ------------------------------------------------------------------------------


def server_config(
    root: Path, port: int, htpasswd: Path | None, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The one configuration both servers get (registry:2's ``config.yml`` keys)."""
    config: dict[str, Any] = {
        "version": 0.1,
        "log": {"level": "warn", "accesslog": {"disabled": True}},
        "storage": {
            "filesystem": {"rootdirectory": str(root)},
            "delete": {"enabled": True},
        },
        "http": {
            "addr": f"127.0.0.1:{port}",
            "secret": HTTP_SECRET,
            "draintimeout": "5s",
        },
    }
    if htpasswd is not None:
        config["auth"] = {"htpasswd": {"realm": REALM, "path": str(htpasswd)}}
    config.update(extra or {})
    return config


# -- the servers --------------------------------------------------------------------------------


@dataclass
class Server:
    """One registry process (and its children) on loopback, restartable on the same storage."""

    name: str
    work: Path  # config, log
    root: Path  # storage
    htpasswd: Path | None = None
    authorization: str | None = None  # the header clients send (with htpasswd)
    extra_config: dict[str, Any] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    # subclasses
    def command(self, config_path: Path) -> list[str]:
        raise NotImplementedError

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def log_path(self) -> Path:
        return self.work / f"{self.slug}.log"

    @property
    def slug(self) -> str:
        return "registry2" if self.name == "registry:2" else self.name.lower()

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def start(self, timeout: float = 120.0) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        self.root.mkdir(parents=True, exist_ok=True)
        config_path = self.work / f"{self.slug}.yml"
        config_path.write_text(
            yaml.safe_dump(server_config(self.root, self.port, self.htpasswd, self.extra_config))
        )
        with open(self.log_path, "ab") as log:
            log.write(f"--- start {self.starts + 1} ---\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.command(config_path),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        STARTED.append(self.proc)
        self.starts += 1
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        import http.client

        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(
                    f"{self.name} exited with {self.proc.returncode} at start-up:\n"
                    + self.log_tail()
                )
            with contextlib.suppress(OSError, http.client.HTTPException):
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                try:
                    conn.request("GET", "/v2/")
                    status = conn.getresponse().status
                finally:
                    conn.close()
                if status in (200, 401):
                    return
            time.sleep(0.05)
        raise BenchError(f"{self.name} did not answer on {self.host} within {timeout:.0f}s")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 20.0) -> None:
        proc = self.proc
        if proc is None:
            return
        try:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout)
        finally:
            # Whatever is left of the group (workers of a parent that was killed, or anything
            # when this stop was itself interrupted) goes too.
            kill_group(proc)
            self.proc = None

    def restart(self) -> None:
        """A fresh process on the same storage: VmHWM then covers only what follows."""
        self.stop()
        self.start()

    def pids(self) -> list[int]:
        if self.proc is None:
            return []
        return process_tree(self.proc.pid)


#: every server process started, so that none outlives the harness
STARTED: list[subprocess.Popen[bytes]] = []


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)


def kill_all() -> None:
    """Last resort at exit: SIGKILL the process group of every server still running."""
    for proc in STARTED:
        if proc.returncode is None:
            kill_group(proc)


@dataclass
class Registry2(Server):
    binary: str = "docker-registry"

    def command(self, config_path: Path) -> list[str]:
        return [self.binary, "serve", str(config_path)]


@dataclass
class Dockyard(Server):
    def command(self, config_path: Path) -> list[str]:
        # No --workers: the default (the number of CPUs) is what is being measured.
        return [sys.executable, "-m", "dockyard", "serve", str(config_path)]


# -- memory -------------------------------------------------------------------------------------


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants (from each process's PPid in ``/proc``)."""
    parents: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces and parentheses
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(parents.get(pid, []))
    return tree


def _status_kib(pid: int, *fields: str) -> dict[str, int]:
    out = dict.fromkeys(fields, 0)
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in out:
                    out[key] = int(line.split()[1])
    except (OSError, ValueError):
        pass
    return out


def _pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


@dataclass
class MemorySample:
    t: float  # seconds since the track started
    rss_kib: int  # sum of VmRSS over the process tree
    pss_kib: int  # sum of Pss


def sample(pids: list[int]) -> tuple[int, int]:
    rss = sum(_status_kib(pid, "VmRSS")["VmRSS"] for pid in pids)
    pss = sum(_pss_kib(pid) for pid in pids)
    return rss, pss


def hwm_kib(pids: list[int]) -> int:
    """Sum of VmHWM (each process's own peak RSS, since it started) over the tree."""
    return sum(_status_kib(pid, "VmHWM")["VmHWM"] for pid in pids)


def _busy_ticks() -> int:
    """CPU time spent by the whole machine (everything but idle and iowait), in ticks."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return user + nice + system + irq + softirq + steal


def _process_ticks(pid: int) -> int:
    """utime + stime + cutime + cstime: the process and its reaped children."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return 0
    fields = stat[stat.rindex(b")") + 2 :].split()
    return sum(int(x) for x in fields[11:15])


def cpu_snapshot() -> tuple[int, int]:
    """(CPU ticks of the machine, CPU ticks of this harness and everything it started): the
    difference over a run is what other processes (and kernel threads) took meanwhile."""
    ours = sum(_process_ticks(pid) for pid in process_tree(os.getpid()))
    return _busy_ticks(), ours


TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Track:
    """Memory samples of one server during one measured run, and the CPU others took."""

    server: Server
    started: float = field(default_factory=time.monotonic)
    samples: list[MemorySample] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)
    pids_at: float = 0.0
    cpu_at_start: tuple[int, int] = field(default_factory=cpu_snapshot)
    #: CPU used by processes this harness did not start, on average, in cores (None: the run
    #: was too short for the 10 ms granularity of the counters to say anything)
    foreign_cores: float | None = None

    def finish(self) -> None:
        busy, ours = cpu_snapshot()
        elapsed = time.monotonic() - self.started
        foreign = (busy - self.cpu_at_start[0]) - (ours - self.cpu_at_start[1])
        if elapsed >= 2.0:
            self.foreign_cores = max(0.0, foreign / TICKS / elapsed)

    def take(self) -> None:
        now = time.monotonic()
        if now - self.pids_at > 1.0 or not self.pids:  # workers seldom change: rescan each 1 s
            self.pids = self.server.pids()
            self.pids_at = now
        rss, pss = sample(self.pids)
        if rss:
            self.samples.append(MemorySample(now - self.started, rss, pss))

    @property
    def peak_rss_kib(self) -> int:
        return max((s.rss_kib for s in self.samples), default=0)

    @property
    def peak_pss_kib(self) -> int:
        return max((s.pss_kib for s in self.samples), default=0)


class MemorySampler:
    """One thread that samples every active track every ``interval`` seconds."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self._tracks: list[Track] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                tracks = list(self._tracks)
            for track in tracks:
                track.take()

    @contextlib.contextmanager
    def track(self, server: Server) -> Iterator[Track]:
        track = Track(server)
        track.take()
        with self._lock:
            self._tracks.append(track)
        try:
            yield track
        finally:
            with self._lock:
                self._tracks.remove(track)
            track.take()
            track.finish()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)


def require_binaries(names: dict[str, str]) -> list[str]:
    """The missing ones among ``{binary: Debian package}``, as messages."""
    return [
        f"{binary} (Debian package {package})"
        for binary, package in names.items()
        if shutil.which(binary) is None
    ]
