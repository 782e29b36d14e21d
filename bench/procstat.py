"""Memory and CPU of process trees, read from ``/proc``.

Memory: the sum over a server's process tree (Dockyard forks workers) of VmRSS, VmHWM and Pss,
sampled every 100 ms by one thread while a measurement runs. CPU: clock ticks of processes, and
of the whole machine, to tell what other processes took during a run.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol


class Measured(Protocol):
    """What is sampled: a server, whose process tree may change (workers restart)."""

    def pids(self) -> list[int]: ...


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


def rss_kib(pids: list[int]) -> int:
    """Sum of VmRSS over the processes."""
    return sum(_status_kib(pid, "VmRSS")["VmRSS"] for pid in pids)


def sample(pids: list[int]) -> tuple[int, int]:
    return rss_kib(pids), sum(_pss_kib(pid) for pid in pids)


def hwm_kib(pids: list[int]) -> int:
    """Sum of VmHWM (each process's own peak RSS, since it started) over the tree."""
    return sum(_status_kib(pid, "VmHWM")["VmHWM"] for pid in pids)


def _busy_ticks() -> int:
    """CPU time spent by the whole machine (everything but idle and iowait), in ticks."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return user + nice + system + irq + softirq + steal


def cpu_ticks(pids: list[int]) -> int:
    """utime + stime + cutime + cstime (the processes and their reaped children), in clock
    ticks."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        total += sum(int(x) for x in stat[stat.rindex(b")") + 2 :].split()[11:15])
    return total


def cpu_snapshot() -> tuple[int, int]:
    """(CPU ticks of the machine, CPU ticks of this harness and everything it started): the
    difference over a run is what other processes (and kernel threads) took meanwhile."""
    return _busy_ticks(), cpu_ticks(process_tree(os.getpid()))


TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Track:
    """Memory samples of one server during one measured run, and the CPU others took."""

    server: Measured
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
    def track(self, server: Measured) -> Iterator[Track]:
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
