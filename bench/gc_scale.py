"""Garbage collection at scale: ``dockyard gc`` against ``registry garbage-collect`` (a
benchmark, not a test; issue 18, scenario 1).

    python -m bench.gc_scale --quick                        # 10k blobs, warm only (< 1 minute)
    python -m bench.gc_scale --sizes 10k,100k,1M --cold 10k,100k
    python -m bench.gc_scale --base /tmp/base/src            # and another checkout's src (A/B)
    python -m bench.gc_scale --sizes 100k --json gc.json --output gc.md

For each size it writes one store directly in registry:2's filesystem layout (paths from
``registry.layout``): ``--repos`` repositories ``org-NN/app-NNNN``, each holding images (an OCI
manifest, its own config, 1-5 layers of its own and 0-2 from a pool shared by all repositories;
a tag per image), until the store holds the requested number of blobs. Every tenth image is
"deleted" the way registry:2 leaves one: its blobs and layer links stay, its revision link and tag
are gone, so about a tenth of the blobs are unreferenced and the sweep has work. Every file's time
is 30 days old, so Dockyard's grace period (24 h, the default it runs with) protects nothing: both
collectors run with their defaults and must find the same candidates (checked).

Both run ``--dry-run`` on the same store (nothing changes, so both see identical input), each
as its own process with its full output written to a file: ``docker-registry garbage-collect
--dry-run CONFIG`` and ``python -m dockyard gc --dry-run CONFIG``. Time is wall clock of the
process; peak memory is the larger of the process's own peak (``wait4``'s ``ru_maxrss``, its
VmHWM) and the sum of VmHWM over its process tree sampled every 250 ms. Warm: one unmeasured run
of each first, then ``--repeat`` runs each, alternating, median reported. Cold (only on a
disk-backed directory, ``--disk-dir``, default $TMPDIR or /tmp: tmpfs has no cache to drop):
``sync; echo 3 > /proc/sys/vm/drop_caches`` (needs root) before every run. Sizes in ``--cold``
are written on that disk and measured warm there too; the others go to ``--warm-dir`` (default
/dev/shm). Ratios are registry:2's time (memory) over Dockyard's, from the same run; the machine
is shared, so read ratios, not absolute times.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the bench package

import bench  # puts the test harness on sys.path; bench.ROOT
from bench.machine import first_line, fstype
from bench.procstat import hwm_kib, process_tree
from dockyard.oci.digest import Digest
from dockyard.registry import layout
from harness.registry2 import REGISTRY2

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
DAY = 86400.0
#: every file's time: far older than Dockyard's default grace period (24 h + the touch interval)
AGE = 30 * DAY
#: one image in this many is deleted (blobs and layer links left, as registry:2 leaves them)
DELETED_EVERY = 10
#: the issue's targets: registry:2's time over Dockyard's
TARGET_WARM = 5.0
TARGET_COLD = 2.0
REGISTRY2_LABEL = "registry:2"


def parse_count(text: str) -> int:
    """``10k``, ``1M``, ``250000`` -> a count."""
    text = text.strip().lower().replace("_", "")
    scale = {"k": 1_000, "m": 1_000_000}.get(text[-1:], 1)
    return int(float(text.rstrip("km")) * scale)


def label_count(n: int) -> str:
    if n >= 1_000_000 and n % 1_000_000 == 0:
        return f"{n // 1_000_000}M"
    if n >= 1_000 and n % 1_000 == 0:
        return f"{n // 1_000}k"
    return str(n)


# -- the store ------------------------------------------------------------------------------------


@dataclass
class Written:
    """What one writer wrote (summed over the writers)."""

    blobs: int = 0
    files: int = 0
    images: int = 0
    deleted_images: int = 0
    #: blobs only deleted images used: what both collectors must find
    unreferenced: int = 0

    def add(self, other: Written) -> None:
        for name, value in vars(other).items():
            setattr(self, name, getattr(self, name) + value)


class Writer:
    """Plain system calls under ``root``; each path one of ``registry.layout``'s. Every file
    gets the same old time, set on its descriptor before it is closed (one call, not a stat)."""

    def __init__(self, root: str, mtime: float) -> None:
        self.root = root
        self.times = (mtime, mtime)
        self.made: set[str] = set()
        self.written = Written()

    def write(self, path: str, data: bytes) -> None:
        full = self.root + path
        directory = full.rpartition("/")[0]
        if directory not in self.made:
            os.makedirs(directory, exist_ok=True)
            self.made.add(directory)
        fd = os.open(full, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, data)
            os.utime(fd, self.times)
        finally:
            os.close(fd)
        self.written.files += 1

    def blob(self, data: bytes) -> dict[str, Any]:
        hexpart = hashlib.sha256(data).hexdigest()
        self.write(layout.blob_data(Digest("sha256", hexpart)), data)
        self.written.blobs += 1
        return {"digest": f"sha256:{hexpart}", "size": len(data)}

    def link(self, path: str, digest: str) -> None:
        self.write(path, digest.encode())


def digest_of(descriptor: dict[str, Any]) -> Digest:
    return Digest("sha256", descriptor["digest"][7:])


def shared_layer(n: int) -> bytes:
    return b"\x1f\x8b shared base layer %d" % n


def write_image(
    w: Writer, repo: str, number: int, pool: list[dict[str, Any]], deleted: bool
) -> None:
    """One image in ``repo``: its own layers and config, some pool layers, the manifest, the
    layer links; unless ``deleted``, its revision link and a tag."""
    # Deterministic without a shared random generator (each writer process has its own).
    seed = int.from_bytes(hashlib.sha256(f"{repo}/{number}".encode()).digest()[:4], "big")
    own = [
        w.blob(b"\x1f\x8b %s image %d layer %d" % (repo.encode(), number, i))
        for i in range(1 + seed % 5)
    ]
    shared = [pool[(seed >> (8 + 8 * i)) % len(pool)] for i in range((seed >> 4) % 3)]
    layers = list({d["digest"]: d for d in [*shared, *own]}.values())
    config = w.blob(
        json.dumps(
            {
                "architecture": "amd64",
                "os": "linux",
                "config": {"Env": [f"BUILD={repo}:{number}"], "Cmd": ["/app"]},
                "rootfs": {"type": "layers", "diff_ids": [d["digest"] for d in layers]},
            }
        ).encode()
    )
    manifest = w.blob(
        json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, **config},
                "layers": [{"mediaType": OCI_LAYER, **d} for d in layers],
            }
        ).encode()
    )
    for d in [config, *layers]:
        w.link(layout.layer_link(repo, digest_of(d)), d["digest"])
    w.written.images += 1
    if deleted:
        w.written.deleted_images += 1
        w.written.unreferenced += 2 + len(own)  # its manifest, config and own layers
        return
    digest = digest_of(manifest)
    tag = f"v{number}"
    w.link(layout.revision_link(repo, digest), manifest["digest"])
    w.link(layout.tag_current_link(repo, tag), manifest["digest"])
    w.link(layout.tag_index_link(repo, tag, digest), manifest["digest"])


def repo_name(i: int) -> str:
    return f"org-{i // 100:02d}/app-{i:04d}"


def write_part(args: tuple[str, list[int], int, int, float]) -> Written:
    """One writer process: images round-robin over its repositories until it has written
    ``target`` blobs."""
    root, repos, pool_size, target, mtime = args
    w = Writer(root, mtime)
    pool = [
        {
            "digest": "sha256:" + hashlib.sha256(shared_layer(n)).hexdigest(),
            "size": len(shared_layer(n)),
        }
        for n in range(pool_size)
    ]
    number = 0
    while w.written.blobs < target:
        repo = repo_name(repos[number % len(repos)])
        write_image(w, repo, number, pool, deleted=number % DELETED_EVERY == DELETED_EVERY - 1)
        number += 1
    return w.written


def write_store(root: Path, blobs: int, repos: int, jobs: int) -> Written:
    """About ``blobs`` blobs (each writer stops at the end of an image) in ``repos``
    repositories, written by ``jobs`` processes, each its own repositories."""
    mtime = time.time() - AGE
    pool_size = max(10, min(1000, blobs // 100))
    w = Writer(str(root), mtime)
    for n in range(pool_size):
        w.blob(shared_layer(n))
    total = w.written
    jobs = max(1, min(jobs, repos))
    share = (blobs - pool_size) // jobs
    parts = [(str(root), list(range(j, repos, jobs)), pool_size, share, mtime) for j in range(jobs)]
    if jobs == 1:
        results = [write_part(parts[0])]
    else:
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            results = pool.map(write_part, parts)
    for result in results:
        total.add(result)
    return total


# -- running the collectors -----------------------------------------------------------------------


@dataclass
class Run:
    """One measured run of one collector."""

    blobs: int
    repos: int
    server: str
    cache: str  # warm | cold
    seconds: float
    #: user + system CPU time of the collector (and its children): steadier than the wall
    #: clock on a machine others load
    cpu_s: float
    peak_mib: float
    candidates: int
    storage: str


@dataclass
class Collector:
    label: str
    command: list[str]
    env: dict[str, str]
    #: the lines of its output that name a deletion candidate blob
    candidate: re.Pattern[str]
    runs: list[Run] = field(default_factory=list)


def collectors(config: Path, sources: list[tuple[str, str]]) -> list[Collector]:
    found = [
        Collector(
            REGISTRY2_LABEL,
            [REGISTRY2 or "docker-registry", "garbage-collect", "--dry-run", str(config)],
            dict(os.environ),
            re.compile(r"blob eligible for deletion"),
        )
    ]
    for label, src in sources:
        found.append(
            Collector(
                label,
                [sys.executable, "-m", "dockyard", "gc", "--dry-run", str(config)],
                {**os.environ, "PYTHONPATH": src},
                re.compile(r"^would remove blob "),
            )
        )
    return found


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def can_drop_caches() -> bool:
    return os.access("/proc/sys/vm/drop_caches", os.W_OK)


def measure(collector: Collector, out: Path) -> tuple[float, float, float, int]:
    """Run it once: (seconds, CPU seconds, peak MiB, candidate blobs it reported)."""
    peak = 0
    done = threading.Event()

    with open(out, "wb") as sink:
        started = time.perf_counter()
        proc = subprocess.Popen(
            collector.command, stdout=sink, stderr=subprocess.STDOUT, env=collector.env
        )

        def sample() -> None:
            # The tree's sum (a collector that forks would be counted whole); cheap enough at
            # four scans a second not to disturb the run.
            nonlocal peak
            while not done.wait(0.25):
                peak = max(peak, hwm_kib(process_tree(proc.pid)))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        done.set()
        sampler.join()
    if proc.returncode != 0:
        tail = out.read_text(errors="replace")[-2000:]
        raise SystemExit(f"{collector.label} failed ({proc.returncode}):\n{tail}")
    peak = max(peak, usage.ru_maxrss)  # KiB on Linux
    with open(out, errors="replace") as f:
        candidates = sum(1 for line in f if collector.candidate.search(line))
    return seconds, usage.ru_utime + usage.ru_stime, peak / 1024, candidates


def config_for(root: Path, config: Path) -> None:
    # One file both read: registry:2's configuration, which Dockyard takes as it is.
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: info\n"
        f"storage:\n  filesystem:\n    rootdirectory: {root}\n  delete:\n    enabled: true\n"
        "http:\n  addr: 127.0.0.1:0\n  secret: gc-bench\n"
    )


def bench_size(
    blobs: int,
    repos: int,
    where: Path,
    cold: bool,
    repeat: int,
    jobs: int,
    sources: list[tuple[str, str]],
    keep: bool,
) -> tuple[list[Run], dict[str, Any]]:
    work = Path(tempfile.mkdtemp(prefix="dockyard-bench-gc-", dir=where))
    try:
        t0 = time.perf_counter()
        written = write_store(work / "data", blobs, repos, jobs)
        info = {**asdict(written), "repos": repos, "write_s": round(time.perf_counter() - t0, 1)}
        storage = fstype(work)
        info["storage"] = f"{storage} ({where})"
        print(
            f"{label_count(blobs)}: wrote {written.blobs} blobs, {written.files} files in "
            f"{info['write_s']} s on {storage}; {written.unreferenced} unreferenced",
            file=sys.stderr,
        )
        config = work / "config.yml"
        config_for(work / "data", config)
        runs: list[Run] = []
        everyone = collectors(config, sources)
        modes = ["warm", "cold"] if cold else ["warm"]
        for mode in modes:
            if mode == "warm" and storage != "tmpfs":
                # Unmeasured: fills the page cache. (On tmpfs the store is the page cache, and
                # main() compiled the sources already.)
                for c in everyone:
                    measure(c, work / "out.txt")
            for _ in range(repeat):
                for c in everyone:
                    if mode == "cold":
                        drop_caches()
                    seconds, cpu, peak, candidates = measure(c, work / "out.txt")
                    if candidates != written.unreferenced:
                        raise SystemExit(
                            f"{c.label} found {candidates} candidates, the store has "
                            f"{written.unreferenced} unreferenced blobs"
                        )
                    run = Run(
                        written.blobs, repos, c.label, mode, seconds, cpu, peak, candidates, storage
                    )
                    runs.append(run)
                    print(
                        f"  {mode:<4} {c.label:<16} {seconds:7.2f} s {cpu:7.2f} s CPU "
                        f"{peak:7.1f} MiB",
                        file=sys.stderr,
                    )
        return runs, info
    finally:
        if keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


# -- the report -----------------------------------------------------------------------------------


def summarize(runs: list[Run]) -> list[dict[str, Any]]:
    """Median per (blobs, cache, server), with the ratios against registry:2's."""
    groups: dict[tuple[int, str, str], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.blobs, run.cache, run.server), []).append(run)
    rows = []
    for (blobs, cache, server), group in groups.items():
        rows.append(
            {
                "blobs": blobs,
                "repos": group[0].repos,
                "storage": group[0].storage,
                "cache": cache,
                "server": server,
                "runs": len(group),
                "seconds": statistics.median(r.seconds for r in group),
                "cpu_s": statistics.median(r.cpu_s for r in group),
                "peak_mib": statistics.median(r.peak_mib for r in group),
            }
        )
    for row in rows:
        ref = next(
            r
            for r in rows
            if r["server"] == REGISTRY2_LABEL
            and r["blobs"] == row["blobs"]
            and r["cache"] == row["cache"]
        )
        row["speedup"] = ref["seconds"] / row["seconds"]
        row["cpu_speedup"] = ref["cpu_s"] / row["cpu_s"]
        row["memory_ratio"] = row["peak_mib"] / ref["peak_mib"]
    return rows


def render(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| blobs | repos | cache | storage | collector | seconds | CPU s | peak MiB "
        "| speed-up vs registry:2 | CPU speed-up | memory vs registry:2 |",
        "|---:|---:|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in sorted(
        rows,
        key=lambda r: (
            r["cache"] != "warm",
            r["blobs"],
            r["server"] != REGISTRY2_LABEL,
            r["server"],
        ),
    ):
        lines.append(
            f"| {row['blobs']:,} | {row['repos']:,} | {row['cache']} | {row['storage']} | "
            f"{row['server']} | {row['seconds']:.2f} | {row['cpu_s']:.2f} | "
            f"{row['peak_mib']:.0f} | {row['speedup']:.2f}x | {row['cpu_speedup']:.2f}x | "
            f"{row['memory_ratio']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Seconds and peak memory against the blob count, a line per collector and cache state
    (log-log). Needs matplotlib, which only this uses (not a dependency of the project)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    lines: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        lines.setdefault((row["server"], row["cache"]), []).append(row)
    for (server, cache), points in sorted(lines.items()):
        points.sort(key=lambda r: r["blobs"])
        x = [r["blobs"] for r in points]
        style = "-o" if cache == "warm" else "--s"
        label = f"{server}, {cache}"
        left.plot(x, [r["seconds"] for r in points], style, label=label)
        right.plot(x, [r["peak_mib"] for r in points], style, label=label)
    left.set(xscale="log", yscale="log", xlabel="blobs", ylabel="seconds (median)")
    right.set(xscale="log", xlabel="blobs", ylabel="peak RSS, MiB")
    left.set_title("garbage collection time (dry run)")
    right.set_title("peak memory")
    for ax in (left, right):
        ax.grid(True, which="both", alpha=0.3)
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def machine() -> dict[str, Any]:
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
    commit = first_line(["git", "-C", str(bench.ROOT), "rev-parse", "--short", "HEAD"])
    src_diff = subprocess.run(
        ["git", "-C", str(bench.ROOT), "diff", "HEAD", "--", "src"],
        capture_output=True,
        check=False,
    ).stdout
    return {
        "cpu": f"{cpu}, {os.cpu_count()} cores",
        "memory_gib": round(int(mem) / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "registry2": first_line([REGISTRY2 or "docker-registry", "--version"]),
        "commit": commit,
        # what of src/ was uncommitted when it ran (other engineers share the tree)
        "src_uncommitted_sha256": hashlib.sha256(src_diff).hexdigest()[:12] if src_diff else "",
        "load_before": Path("/proc/loadavg").read_text().split()[0],
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="10k blobs, warm, 1 run (< 1 min)")
    parser.add_argument("--sizes", default="10k,100k", help="blob counts (default 10k,100k)")
    parser.add_argument(
        "--cold", default="", help="of --sizes, those also measured cold, on --disk-dir"
    )
    parser.add_argument("--repos", type=int, default=1000, help="repositories (default 1000)")
    parser.add_argument("--repeat", type=int, default=3, help="measured runs each (median)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="writer processes")
    parser.add_argument("--warm-dir", type=Path, help="store for warm-only sizes (/dev/shm)")
    parser.add_argument("--disk-dir", type=Path, help="store for --cold sizes ($TMPDIR, /tmp)")
    parser.add_argument(
        "--base",
        action="append",
        default=[],
        metavar="[LABEL=]SRC",
        help="also run another checkout's src directory (repeatable)",
    )
    parser.add_argument(
        "--no-tree",
        action="store_true",
        help="run only the --base sources, not this tree's src (e.g. a snapshot of it, so "
        "that edits made while it runs do not mix into the runs)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the stores")
    parser.add_argument("--output", type=Path, help="also write the markdown table here")
    parser.add_argument("--json", type=Path, help="every run and the medians, as JSON")
    parser.add_argument("--plot", type=Path, help="a PNG of time and memory (matplotlib)")
    parser.add_argument(
        "--from",
        dest="sources_json",
        type=Path,
        nargs="+",
        help="run nothing: the table (and --plot) from the --json files of earlier runs",
    )
    args = parser.parse_args()
    if args.sources_json:
        rows = [row for f in args.sources_json for row in json.loads(f.read_text())["summary"]]
        print(render(rows))
        if args.plot:
            plot(rows, args.plot)
        return 0
    if REGISTRY2 is None:
        print("docker-registry (registry:2) is not installed", file=sys.stderr)
        return 2
    sizes = [10_000] if args.quick else [parse_count(s) for s in args.sizes.split(",") if s]
    cold = set() if args.quick else {parse_count(s) for s in args.cold.split(",") if s}
    repeat = 1 if args.quick else args.repeat
    if cold and not can_drop_caches():
        print("cold runs need root (drop_caches): measuring warm only", file=sys.stderr)
        cold = set()
    sources = [] if args.no_tree else [("dockyard", str(bench.ROOT / "src"))]
    for spec in args.base:
        label, _, src = spec.rpartition("=")
        sources.insert(len(sources) - (0 if args.no_tree else 1), (label or "base", src))
    for _, src in sources:  # so that no measured run compiles them
        subprocess.run([sys.executable, "-m", "compileall", "-q", src], check=False)
    warm_dir = args.warm_dir or (Path("/dev/shm") if Path("/dev/shm").is_dir() else None)
    disk_dir = args.disk_dir or Path(tempfile.gettempdir())
    info: dict[str, Any] = {"machine": machine(), "sources": dict(sources), "stores": {}}
    runs: list[Run] = []
    for blobs in sizes:
        where = disk_dir if blobs in cold else warm_dir
        if where is None:
            where = Path(tempfile.gettempdir())
        need = blobs * 3 * 4096 * 1.2  # ~2.4 files a blob, a 4 KiB block each, and directories
        if shutil.disk_usage(where).free < need:
            print(f"{label_count(blobs)}: not enough space in {where}, skipped", file=sys.stderr)
            continue
        size_runs, store = bench_size(
            blobs, args.repos, where, blobs in cold, repeat, args.jobs, sources, args.keep
        )
        runs.extend(size_runs)
        info["stores"][label_count(blobs)] = store
    rows = summarize(runs)
    report = render(rows)
    print(report)
    if args.output:
        args.output.write_text(report)
    if args.json:
        args.json.write_text(
            json.dumps({"info": info, "summary": rows, "runs": [asdict(r) for r in runs]}, indent=1)
            + "\n"
        )
    if args.plot:
        plot(rows, args.plot)
    for row in rows:
        target = TARGET_WARM if row["cache"] == "warm" else TARGET_COLD
        if row["server"] != REGISTRY2_LABEL and row["speedup"] < target:
            print(
                f"{label_count(row['blobs'])} {row['cache']} {row['server']}: "
                f"{row['speedup']:.2f}x registry:2's speed, target {target:.0f}x",
                file=sys.stderr,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
