"""What a workload group is: its sizes (``Params``), what it measures (``Metric``) and the
``Suite`` protocol the runner drives.

A suite groups the measurements that share set-up (the 1 GiB blob is uploaded, then downloaded;
an image is pushed, then pulled). The runner starts both servers for each suite on fresh
storage, restarts them before each measurement (so VmHWM covers that measurement only) and
calls, for every round and each server in turn, :meth:`Suite.run`, which returns one value.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.servers import Server

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


@dataclass(frozen=True)
class Params:
    quick: bool
    rounds: int
    blob_bytes: int
    large_layers: int
    large_layer_bytes: int
    small_layers: int
    small_layer_min: int
    small_layer_max: int
    http_seconds: int
    connections: int
    wrk_threads: int
    big_bytes: int  # 0: skipped
    big_rounds: int
    catalog_repos: int
    big_tags: int
    list_requests: int
    #: ab (HEAD) stops after this many requests, or after ``http_seconds``, whichever is first
    head_requests: int = 50_000_000
    restart_each: bool = True  # restart the servers before each workload (fresh VmHWM)
    catalog_tmpfs: bool = True  # the catalog stores on /dev/shm (see CatalogSuite.prepare)

    @classmethod
    def full(
        cls,
        rounds: int,
        big_gib: float,
        big_rounds: int,
        wrk_threads: int,
        catalog_tmpfs: bool,
        seconds: int = 10,
    ) -> Params:
        return cls(
            quick=False,
            rounds=rounds,
            blob_bytes=1 * GiB,
            large_layers=4,
            large_layer_bytes=256 * MiB,
            small_layers=64,
            small_layer_min=16 * KiB,
            small_layer_max=64 * KiB,
            http_seconds=seconds,
            connections=32,
            wrk_threads=wrk_threads,
            big_bytes=int(big_gib * GiB),
            big_rounds=big_rounds,
            catalog_repos=10_000,
            big_tags=100_000,
            list_requests=3,
            catalog_tmpfs=catalog_tmpfs,
        )

    @classmethod
    def smoke(cls, wrk_threads: int, catalog_tmpfs: bool) -> Params:
        """``--quick``: the same code paths with tiny sizes, one round, no 16 GiB upload."""
        return cls(
            quick=True,
            rounds=1,
            blob_bytes=8 * MiB,
            large_layers=4,
            large_layer_bytes=2 * MiB,  # above 1 MiB: the same generator as the full run
            small_layers=8,
            small_layer_min=16 * KiB,
            small_layer_max=64 * KiB,
            http_seconds=1,
            connections=32,
            wrk_threads=wrk_threads,
            big_bytes=0,
            big_rounds=1,
            catalog_repos=200,
            big_tags=1_000,
            list_requests=1,
            head_requests=500,  # a fraction of a second (with 32 connections): CI's CPU
            restart_each=False,  # Dockyard takes a second or two to start: keep under a minute
            catalog_tmpfs=catalog_tmpfs,
        )


@dataclass(frozen=True)
class Metric:
    key: str
    title: str
    unit: str
    higher_is_better: bool
    target: float | None = None  # wanted speed-up (Dockyard over registry:2)
    target_text: str = "—"
    memory_limit_mb: float | None = None  # wanted peak RSS of Dockyard (MB = 10^6 bytes)
    timeline: bool = False  # keep the memory samples to show whether RSS stays flat


def size_text(n: int) -> str:
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


class Suite:
    """A group of workloads that share set-up; the runner calls these methods in this order
    (``run`` once per metric, round and server, the only one measured)."""

    key = ""
    title = ""
    metrics: list[Metric]

    def __init__(self, params: Params, work: Path) -> None:
        self.params = params
        self.work = work
        self.notes: list[str] = []

    @property
    def htpasswd(self) -> Path | None:
        """The htpasswd file both servers use in this suite (None: no authentication)."""
        return None

    @property
    def authorization(self) -> str | None:
        return None

    @property
    def extra_config(self) -> dict[str, Any]:
        """Configuration both servers get on top of the common one."""
        return {}

    def rounds(self, metric: Metric) -> int:
        return self.params.rounds

    def storage(self, slug: str) -> Path:
        """Where a server keeps its data in this suite."""
        return self.work / slug / "data"

    def prepare(self) -> None:
        """Client-side preparation, once, before the servers start (not measured)."""

    def populate(self, root: Path) -> None:
        """Write a server's storage directly, before it starts (not measured)."""

    def setup(self, server: Server) -> None:
        """Through the API, after start-up, before the first measurement (not measured)."""

    def before_round(self, metric: Metric, round_no: int) -> None:
        """Client-side preparation shared by both servers in a round (not measured)."""

    def run(self, metric: Metric, server: Server, round_no: int) -> float:
        raise NotImplementedError

    def after_run(self, metric: Metric, server: Server, round_no: int) -> None:
        """Clean-up after one measured run (not measured)."""

    def cleanup(self) -> None:
        remove_tree(self.work)


def remove_tree(path: Path) -> None:
    """``rm -rf`` (much faster than shutil.rmtree on a store of many small files)."""
    subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=False)


def settle() -> None:
    """Write dirty pages back, so one run's writeback does not slow the next one down."""
    os.sync()
