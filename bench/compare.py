"""Dockyard against registry:2, side by side, in one run (a benchmark, not a test).

    python bench/compare.py                 # full: 3 rounds, 1 GiB blob, 16 GiB upload, ...
    python bench/compare.py --quick         # smoke: same code paths, tiny sizes, 1 round
    python bench/compare.py --rounds 5 --big-gib 4 --output results.md
    python bench/compare.py --s3            # a subset on S3: Ceph RGW, one bucket per server

For each workload it starts registry:2 (``docker-registry serve``) and Dockyard (``python -m
dockyard serve``, default worker count) with the same configuration on separate fresh storage,
runs the workload against each in turn for several rounds (alternating which goes first) and
prints, per workload, the median for each server, Dockyard's speed-up (>1: Dockyard faster) and
each server's peak memory (the sum of VmRSS over its processes, sampled every 100 ms).
docs/performance.md describes the workloads and the targets.

With ``--s3`` it brings up Ceph RGW (``tests/rgw/rgw-up.sh``: one monitor, one in-memory OSD and
radosgw, on loopback), gives each server its own bucket with the same ``storage.s3`` section
(and ``storage.redirect.disable: true``, so downloads go through the servers) and runs the 1 GiB
upload and download, the skopeo push and pull of the 4 x 256 MiB image and HEAD of a manifest.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import http.client
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from servers import (
    TICKS,
    BenchError,
    Dockyard,
    MemorySample,
    MemorySampler,
    Registry2,
    Server,
    free_port,
    hwm_kib,
    kill_all,
    require_binaries,
)
from workloads import (
    SUITE_KEYS,
    BlobSuite,
    Metric,
    Params,
    RequestsSuite,
    SkopeoSuite,
    Suite,
    remove_tree,
    size_text,
    suites,
)

REGISTRY2, DOCKYARD = "registry:2", "Dockyard"
BINARIES = {
    "docker-registry": "docker-registry",
    "curl": "curl",
    "skopeo": "skopeo",
    "wrk": "wrk",
    "ab": "apache2-utils",
    "htpasswd": "apache2-utils",
}
RGW_BINARIES = {  # binary -> Debian package
    "radosgw": "radosgw",
    "ceph-mon": "ceph-mon",
    "ceph-osd": "ceph-osd",
    "ceph": "ceph-common",
    "radosgw-admin": "ceph-common",
    "monmaptool": "ceph-common",
}
S3_SUITE_KEYS = ["blob", "large", "requests"]
MB = 1_000_000


# -- results ------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """One server's measurements of one workload."""

    values: list[float] = field(default_factory=list)
    error: str | None = None
    peak_rss_kib: int = 0
    peak_pss_kib: int = 0
    hwm_kib: int | None = None
    processes: int = 0
    foreign_cores: float | None = None  # the most CPU others took during one run (>= 2 s)
    timelines: list[list[MemorySample]] = field(default_factory=list)
    server_cores: list[float] = field(default_factory=list)  # --s3: the server's CPU per run
    rgw_cores: list[float] = field(default_factory=list)  # --s3: RGW's CPU per run

    @property
    def median(self) -> float | None:
        return statistics.median(self.values) if self.values and not self.error else None


@dataclass
class Result:
    suite: Suite
    metric: Metric
    outcomes: dict[str, Outcome] = field(
        default_factory=lambda: {REGISTRY2: Outcome(), DOCKYARD: Outcome()}
    )

    @property
    def speedup(self) -> float | None:
        r2, dy = self.outcomes[REGISTRY2].median, self.outcomes[DOCKYARD].median
        if not r2 or not dy:
            return None
        return dy / r2 if self.metric.higher_is_better else r2 / dy

    @property
    def met(self) -> str:
        metric = self.metric
        if metric.memory_limit_mb is not None:
            dockyard = self.outcomes[DOCKYARD]
            if dockyard.error or not dockyard.peak_rss_kib:
                return "—"
            below = dockyard.peak_rss_kib * 1024 < metric.memory_limit_mb * MB
            growth = max((rss_growth_kib(t) for t in dockyard.timelines), default=0)
            flat = growth < 10 * 1024
            return "yes" if below and flat else "no"
        if metric.target is None or self.speedup is None:
            return "—"
        return "yes" if self.speedup >= metric.target else "no"


def rss_growth_kib(timeline: list[MemorySample]) -> int:
    """Peak ΣRSS in the second half of a run minus the peak in the first half."""
    if len(timeline) < 4:
        return 0
    end = timeline[-1].t
    first = max(s.rss_kib for s in timeline if s.t <= end / 2)
    second = max(s.rss_kib for s in timeline if s.t > end / 2)
    return second - first


# -- formatting ---------------------------------------------------------------------------------


def fmt_value(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    if unit == "s":
        if value < 1:
            return f"{value:.3f}"
        return f"{value:.2f}" if value < 10 else f"{value:.1f}"
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def fmt_speedup(speedup: float | None, target: float | None) -> str:
    if speedup is None:
        return "—"
    text = f"{speedup:.2f}x"
    # 0.998 would print as 1.00 next to a missed target of 1: show the digit that decides
    if target is not None and (float(text[:-1]) >= target) != (speedup >= target):
        text = f"{speedup:.3f}x"
    return text


def fmt_outcome(outcome: Outcome, unit: str) -> str:
    if outcome.error:
        return "error"
    text = fmt_value(outcome.median, unit)
    if len(outcome.values) > 1 and outcome.median:
        spread = (max(outcome.values) - min(outcome.values)) / 2 / outcome.median * 100
        text += f" ±{spread:.0f}%"
    return text


def mib(kib: int | None) -> str:
    return "—" if not kib else f"{kib / 1024:,.0f} MiB"


def table(header: list[str], rows: list[list[str]], align: str) -> str:
    lines = ["| " + " | ".join(header) + " |"]
    lines.append("|" + "|".join(":---" if a == "l" else "---:" for a in align) + "|")
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def results_table(results: list[Result]) -> str:
    rows = []
    for i, res in enumerate(results, 1):
        r2, dy = res.outcomes[REGISTRY2], res.outcomes[DOCKYARD]
        speedup = res.speedup
        rows.append(
            [
                str(i),
                res.metric.title,
                res.metric.unit,
                fmt_outcome(r2, res.metric.unit),
                fmt_outcome(dy, res.metric.unit),
                fmt_speedup(speedup, res.metric.target),
                res.metric.target_text,
                res.met,
                mib(r2.peak_rss_kib),
                mib(dy.peak_rss_kib) + (f" ({dy.processes} proc.)" if dy.processes else ""),
            ]
        )
    header = [
        "#",
        "workload",
        "unit",
        "registry:2 (median)",
        "Dockyard (median)",
        "Dockyard speed-up",
        "target",
        "met",
        "registry:2 peak RSS",
        "Dockyard peak ΣRSS",
    ]
    return table(header, rows, "lllrrrllrr")


def memory_table(results: list[Result]) -> str:
    rows = []
    for i, res in enumerate(results, 1):
        r2, dy = res.outcomes[REGISTRY2], res.outcomes[DOCKYARD]
        rows.append(
            [
                str(i),
                res.metric.title,
                mib(r2.peak_rss_kib),
                mib(r2.hwm_kib),
                mib(dy.peak_rss_kib),
                mib(dy.hwm_kib),
                mib(dy.peak_pss_kib),
                fmt_cores(res),
            ]
        )
    header = [
        "#",
        "workload",
        "registry:2 peak RSS",
        "registry:2 VmHWM",
        "Dockyard peak ΣRSS",
        "Dockyard ΣVmHWM",
        "Dockyard peak ΣPSS",
        "other CPU (cores)",
    ]
    return table(header, rows, "llrrrrrr")


def cpu_table(results: list[Result]) -> str:
    """--s3: where the CPU went during the runs (medians over the rounds, in cores)."""

    def cores(values: list[float]) -> str:
        return f"{statistics.median(values):.2f}" if values else "—"

    rows = []
    for i, res in enumerate(results, 1):
        r2, dy = res.outcomes[REGISTRY2], res.outcomes[DOCKYARD]
        rows.append(
            [
                str(i),
                res.metric.title,
                cores(r2.server_cores),
                cores(r2.rgw_cores),
                cores(dy.server_cores),
                cores(dy.rgw_cores),
            ]
        )
    header = [
        "#",
        "workload",
        "registry:2 CPU",
        "RGW CPU, registry:2 runs",
        "Dockyard CPU",
        "RGW CPU, Dockyard runs",
    ]
    return table(header, rows, "llrrrr")


def timeline_notes(results: list[Result]) -> list[str]:
    notes = []
    for res in results:
        if not res.metric.timeline:
            continue
        for name, outcome in res.outcomes.items():
            for timeline in outcome.timelines:
                if len(timeline) < 2:
                    continue
                end = timeline[-1].t
                points = []
                for frac in (0.1, 0.25, 0.5, 0.75, 0.9):
                    s = min(timeline, key=lambda s, f=frac: abs(s.t - f * end))
                    points.append(f"{frac:.0%} {s.rss_kib / 1024:.0f}")
                notes.append(
                    f"{res.metric.title}, {name}: ΣRSS (MiB) over {end:.0f} s at "
                    + ", ".join(points)
                    + f"; peak {max(s.rss_kib for s in timeline) / 1024:.0f}; "
                    f"second half vs first half {rss_growth_kib(timeline) / 1024:+.1f} MiB"
                )
    return notes


def foreign_cores(res: Result) -> float | None:
    values = [o.foreign_cores for o in res.outcomes.values() if o.foreign_cores is not None]
    return max(values) if values else None


def fmt_cores(res: Result) -> str:
    cores = foreign_cores(res)
    return "—" if cores is None else f"{cores:.2f}"


def noise_notes(results: list[Result], threshold: float = 0.1) -> list[str]:
    noisy = [
        f"#{i} ({fmt_cores(res)})"
        for i, res in enumerate(results, 1)
        if (foreign_cores(res) or 0.0) >= threshold
    ]
    if not noisy:
        return []
    return [
        "Possible noise: other processes used CPU during some runs of workloads "
        + ", ".join(noisy)
        + " (cores, see the last column above)."
    ]


def error_notes(results: list[Result]) -> list[str]:
    return [
        f"{res.metric.title}, {name}: {outcome.error}"
        for res in results
        for name, outcome in res.outcomes.items()
        if outcome.error
    ]


# -- the machine --------------------------------------------------------------------------------


def _first_line(args: list[str]) -> str:
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=20, check=False)
    except OSError:
        return "?"
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else "?"


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def _mem_total() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    return "?"


def _os_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    return platform.system()


def _dockyard_version() -> str:
    from importlib.metadata import version

    repo = Path(__file__).resolve().parent.parent
    rev = _first_line(["git", "-C", str(repo), "describe", "--always", "--dirty"])
    return f"{version('dockyard')} (git {rev})"


def _code_fingerprint() -> str:
    """What the servers run: the committed tree of src/ plus any uncommitted change to it."""
    repo = str(Path(__file__).resolve().parent.parent)
    tree = _first_line(["git", "-C", repo, "rev-parse", "HEAD:src"])
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        diff = subprocess.run(
            ["git", "-C", repo, "diff", "HEAD", "--", "src"],
            capture_output=True,
            timeout=20,
            check=False,
        ).stdout
        return f"{tree} {hashlib.sha256(diff).hexdigest()}"
    return tree


def _filesystem(path: Path) -> str:
    found = _first_line(["findmnt", "-n", "-o", "FSTYPE,SOURCE", "--target", str(path)])
    return " on ".join(found.split())


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def machine_description(workdir: Path) -> dict[str, str]:
    wrk = _first_line(["wrk", "--version"]).split(" [")[0]
    return {
        "CPU": f"{_cpu_model()}, {os.cpu_count()} cores",
        "memory": _mem_total(),
        "OS": f"{_os_name()}, kernel {platform.release()}",
        "Python": platform.python_version(),
        "registry:2": _first_line(["docker-registry", "--version"]),
        "Dockyard": f"{_dockyard_version()}, {os.cpu_count()} workers (the default)",
        "clients": ", ".join(
            [
                _first_line(["curl", "--version"]).split(" (")[0],
                wrk.split(" Copyright")[0],
                _first_line(["skopeo", "--version"]),
                "ab " + _first_line(["ab", "-V"]).split("Version ")[-1].split(" ")[0].rstrip(","),
            ]
        ),
        "storage": f"{workdir} ({_filesystem(workdir)})",
    }


# -- S3: Ceph RGW -------------------------------------------------------------------------------

RGW_SCRIPTS = Path(__file__).resolve().parent.parent / "tests" / "rgw"
RGW_ACCESS_KEY, RGW_SECRET_KEY = "testkey", "testsecret"  # made by rgw-up.sh
#: Ceph options on top of rgw-up.sh's ceph.conf (CEPH_ARGS): an in-memory OSD big enough for the
#: GiB-sized workloads, and RGW's garbage collection within seconds instead of hours, so the
#: memory of deleted objects and of the copies made by moves comes back during the run.
RGW_CEPH_ARGS = [
    f"--memstore_device_bytes={16 * 1024**3}",
    "--rgw_gc_obj_min_wait=10",
    "--rgw_gc_processor_period=10",
]


def cpu_ticks(pids: list[int]) -> int:
    """utime + stime (+ those of reaped children) of the processes, in clock ticks."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        total += sum(int(x) for x in stat[stat.rindex(b")") + 2 :].split()[11:15])
    return total


class RGW:
    """Ceph RGW brought up by ``tests/rgw/rgw-up.sh`` in ``directory`` (one monitor, one memstore
    OSD, radosgw; no cephx, loopback only) and stopped by ``rgw-down.sh``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = 0
        self.started_in = 0.0
        self._client: object | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        mon_port, self.port = free_port(), free_port()
        while self.port == mon_port:
            self.port = free_port()
        env = {**os.environ, "CEPH_ARGS": " ".join(RGW_CEPH_ARGS)}
        t0 = time.monotonic()
        # Output to a file, not a pipe: the daemons the script starts would hold a pipe open.
        log_path = self.directory / "rgw-up.log"
        with open(log_path, "wb") as log:
            try:
                result = subprocess.run(
                    [
                        str(RGW_SCRIPTS / "rgw-up.sh"),
                        str(self.directory),
                        str(mon_port),
                        str(self.port),
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    timeout=240,
                    check=False,
                )
                failed = f"exited with {result.returncode}" if result.returncode else ""
            except subprocess.TimeoutExpired:
                failed = "did not finish in 240 s"
        if failed:
            raise BenchError(f"rgw-up.sh {failed}: {log_path.read_text(errors='replace')[-1500:]}")
        self._restart_radosgw(env)
        self.started_in = time.monotonic() - t0

    def _restart_radosgw(self, env: dict[str, str]) -> None:
        """radosgw again, with TCP_NODELAY on its sockets. Without it every GET of a small
        object waits about 40 ms (the response goes out in two segments: Nagle's algorithm
        holds the second until the client's delayed ACK), which would swamp what is measured:
        8.5 instead of 49 ms per GET here. The option holds a space, which CEPH_ARGS cannot
        carry, and rgw-up.sh starts every daemon at once: hence the restart."""
        pid_file = self.directory / "run" / "client.rgw.a.pid"
        pid = int(pid_file.read_text().strip())
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
            time.sleep(0.1)
        frontends = f"beast endpoint=127.0.0.1:{self.port} tcp_nodelay=1"
        with open(self.directory / "radosgw-restart.log", "wb") as log:
            config = str(self.directory / "ceph.conf")
            restarted = subprocess.run(
                ["radosgw", "-c", config, "-n", "client.rgw.a", "--rgw_frontends", frontends],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                timeout=120,
                check=False,
            )
        if restarted.returncode:
            raise BenchError(f"radosgw restart exited with {restarted.returncode}")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, http.client.HTTPException):
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                try:
                    conn.request("GET", "/")
                    if conn.getresponse().status == 200:
                        return
                finally:
                    conn.close()
            time.sleep(0.2)
        raise BenchError(f"radosgw did not answer on {self.port} after its restart")

    def stop(self) -> None:
        subprocess.run(
            [str(RGW_SCRIPTS / "rgw-down.sh"), str(self.directory)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=120,
            check=False,
        )

    def pids(self) -> list[int]:
        """The monitor, the OSD and radosgw."""
        found = []
        for pid_file in sorted((self.directory / "run").glob("*.pid")):
            with contextlib.suppress(OSError, ValueError):
                found.append(int(pid_file.read_text().strip()))
        return found

    def rss_mib(self) -> float:
        kib = 0
        for pid in self.pids():
            with contextlib.suppress(OSError, ValueError), open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        kib += int(line.split()[1])
        return kib / 1024

    def client(self):  # type: ignore[no-untyped-def]
        """A botocore S3 client (botocore comes with Dockyard's aiobotocore)."""
        if self._client is None:
            import botocore.session
            from botocore.config import Config

            self._client = botocore.session.get_session().create_client(
                "s3",
                region_name="us-east-1",
                endpoint_url=self.url,
                aws_access_key_id=RGW_ACCESS_KEY,
                aws_secret_access_key=RGW_SECRET_KEY,
                config=Config(
                    signature_version="s3v4",
                    s3={"addressing_style": "path"},
                    request_checksum_calculation="when_required",
                    response_checksum_validation="when_required",
                ),
            )
        return self._client

    def storage(self, bucket: str) -> dict[str, object]:
        """The ``storage`` section both servers get: registry:2's ``storage.s3`` keys (their
        defaults otherwise: 10 MiB chunks, 32 MiB multipart copies), deletes, no redirects."""
        return {
            "s3": {
                "accesskey": RGW_ACCESS_KEY,
                "secretkey": RGW_SECRET_KEY,
                "region": "us-east-1",
                "regionendpoint": self.url,
                "bucket": bucket,
                "secure": False,
                "v4auth": True,
            },
            "delete": {"enabled": True},
            "redirect": {"disable": True},
        }

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def _keys(self, bucket: str, prefix: str) -> list[str]:
        keys = []
        paginator = self.client().get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            keys += [o["Key"] for o in page.get("Contents", [])]
        return keys

    def _delete_keys(self, bucket: str, keys: list[str]) -> None:
        for i in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[i : i + 1000]]
            self.client().delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})

    def purge_repository(self, bucket: str, repo: str) -> None:
        """Delete a repository and every blob it links, behind the server's back (to keep the
        in-memory OSD small; nothing else in these workloads shares those blobs)."""
        base = f"docker/registry/v2/repositories/{repo}/"
        keys = self._keys(bucket, base)
        linked = re.compile(r"/(?:_layers|_manifests/revisions)/sha256/([0-9a-f]{64})/link$")
        digests = {m.group(1) for k in keys if (m := linked.search(k))}
        for hexa in digests:
            keys += self._keys(bucket, f"docker/registry/v2/blobs/sha256/{hexa[:2]}/{hexa}/")
        self._delete_keys(bucket, keys)

    def delete_bucket(self, name: str) -> None:
        """Abort the unfinished multipart uploads, delete every object and the bucket."""
        s3 = self.client()
        for page in s3.get_paginator("list_multipart_uploads").paginate(Bucket=name):
            for upload in page.get("Uploads", []):
                s3.abort_multipart_upload(
                    Bucket=name, Key=upload["Key"], UploadId=upload["UploadId"]
                )
        self._delete_keys(name, self._keys(name, ""))
        s3.delete_bucket(Bucket=name)


class Registry2S3(Registry2):
    """registry:2 without AWS_CA_BUNDLE in its environment: its S3 driver fails on it (this
    machine sets it). ``env`` execs the registry, which keeps the process id."""

    def command(self, config_path: Path) -> list[str]:
        return ["env", "-u", "AWS_CA_BUNDLE", *super().command(config_path)]


class S3Suite(Suite):
    """What the S3 suites get from the runner: the RGW and each server's bucket."""

    rgw: RGW
    buckets: dict[str, str]  # server name -> bucket


class S3BlobSuite(BlobSuite, S3Suite):
    """The 1 GiB upload and download. Each server keeps only its latest upload (the download
    reads that one): the in-memory OSD holds every byte stored."""

    def after_run(self, metric: Metric, server: Server, round_no: int) -> None:
        super().after_run(metric, server, round_no)
        if metric is self.upload and round_no > 0:
            self.rgw.purge_repository(self.buckets[server.name], f"bench/blob-{round_no - 1}")


class S3SkopeoSuite(SkopeoSuite, S3Suite):
    """skopeo push and pull of the 4 x 256 MiB image; each round's image is deleted from the
    bucket once that server has been pulled from."""

    def after_run(self, metric: Metric, server: Server, round_no: int) -> None:
        super().after_run(metric, server, round_no)
        if metric is self.pull:
            self.rgw.purge_repository(self.buckets[server.name], f"bench/{self.key}-{round_no}")


class S3RequestsSuite(RequestsSuite, S3Suite):
    """HEAD of a manifest by tag only (ab, as the filesystem run)."""

    def __init__(self, params: Params, work: Path) -> None:
        super().__init__(params, work, auth=False)
        self.title = "HEAD manifest"
        self.metrics = [self.head]


def s3_suites(params: Params, work: Path, only: set[str] | None) -> list[Suite]:
    large_label = f"{params.large_layers} x {size_text(params.large_layer_bytes)} layers"
    all_suites: list[Suite] = [
        S3BlobSuite(params, work / "blob"),
        S3SkopeoSuite(
            params,
            work / "large",
            "large",
            [params.large_layer_bytes] * params.large_layers,
            large_label,
            "large",
        ),
        S3RequestsSuite(params, work / "requests"),
    ]
    return [s for s in all_suites if not only or s.key in only]


def s3_description(rgw: RGW, workdir: Path) -> dict[str, str]:
    version = _first_line(["radosgw", "--version"]).split(" (")[0]
    return {
        "storage": f"S3: {version} RGW at {rgw.url} (radosgw with the beast frontend and"
        " `tcp_nodelay=1`, one monitor, one in-memory (memstore) OSD; on this machine, plain"
        " http on loopback),"
        f" one bucket per server and group; client files in {workdir} ({_filesystem(workdir)})",
    }


# -- running ------------------------------------------------------------------------------------


class Runner:
    def __init__(self, params: Params, workdir: Path, sampler: MemorySampler) -> None:
        self.params = params
        self.workdir = workdir
        self.sampler = sampler
        self.results: list[Result] = []
        self.loads: list[float] = []
        self.notes: list[str] = []
        self.live: list[Server] = []
        self.keep = False  # keep each group's work directory (--keep)
        self.rgw: RGW | None = None  # --s3: the servers store into buckets on this RGW
        self.buckets: list[str] = []  # the current group's buckets

    def log(self, text: str) -> None:
        print(text, flush=True)

    def run_suite(self, suite: Suite) -> None:
        suite.work.mkdir(parents=True, exist_ok=True)
        self.loads.append(loadavg())
        self.log(f"== {suite.title} (1-min load average {self.loads[-1]:.2f})")
        results = [Result(suite, metric) for metric in suite.metrics]
        self.results += results
        try:
            self._run_suite(suite, results)
        finally:
            for server in self.live:
                server.stop()
            self.live.clear()
            self.notes += suite.notes
            if not self.keep:
                suite.cleanup()
            if self.rgw is not None:
                for bucket in self.buckets:
                    try:
                        self.rgw.delete_bucket(bucket)
                    except Exception as e:
                        self.log(f"   could not delete bucket {bucket}: {e}")
                self.buckets.clear()

    def _run_suite(self, suite: Suite, results: list[Result]) -> None:
        t0 = time.monotonic()
        suite.prepare()
        servers: list[Server] = []
        registry2_class = Registry2 if self.rgw is None else Registry2S3
        for cls, name in ((registry2_class, REGISTRY2), (Dockyard, DOCKYARD)):
            slug = "registry2" if name == REGISTRY2 else "dockyard"
            extra_config = suite.extra_config
            if self.rgw is not None:
                # Its own bucket for each server, the same storage section otherwise.
                assert isinstance(suite, S3Suite)
                bucket = f"bench-{suite.key}-{slug}-{os.urandom(4).hex()}"
                self.buckets.append(self.rgw.create_bucket(bucket))
                suite.rgw = self.rgw
                suite.buckets = {**getattr(suite, "buckets", {}), name: bucket}
                extra_config = {**extra_config, "storage": self.rgw.storage(bucket)}
            server = cls(
                name=name,
                work=suite.work / slug,
                root=suite.storage(slug),
                htpasswd=suite.htpasswd,
                authorization=suite.authorization,
                extra_config=extra_config,
            )
            suite.populate(server.root)
            servers.append(server)
        if self.rgw is not None:
            self.log(f"   RGW (mon, OSD, radosgw): ΣRSS {self.rgw.rss_mib():.0f} MiB")
        self.log(f"   prepared in {time.monotonic() - t0:.1f} s")
        broken: dict[str, str] = {}
        for server in servers:
            self.live.append(server)
            try:
                t0 = time.monotonic()
                server.start()
                suite.setup(server)
                self.log(f"   {server.name} started and set up in {time.monotonic() - t0:.1f} s")
            except BenchError as e:
                broken[server.name] = f"start/set-up failed: {e}"
                self.log(f"   {server.name}: {broken[server.name]}")
        for result in results:
            self._run_metric(suite, result, servers, dict(broken))

    def _run_metric(
        self, suite: Suite, result: Result, servers: list[Server], failed: dict[str, str]
    ) -> None:
        metric = result.metric
        self.log(f"-- {metric.title}")
        for server in servers:
            if server.name in failed or not (self.params.restart_each or not server.alive()):
                continue
            try:
                server.restart()  # VmHWM from here on belongs to this workload
            except BenchError as e:
                failed[server.name] = f"restart failed: {e}"
        for round_no in range(suite.rounds(metric)):
            try:
                suite.before_round(metric, round_no)
            except BenchError as e:
                for server in servers:
                    failed.setdefault(server.name, f"preparing round {round_no + 1}: {e}")
                break
            order = servers if round_no % 2 == 0 else servers[::-1]
            for server in order:
                if server.name in failed:
                    continue
                outcome = result.outcomes[server.name]
                rgw_pids = self.rgw.pids() if self.rgw is not None else []
                server_pids = server.pids()
                cpu_before = (cpu_ticks(server_pids), cpu_ticks(rgw_pids), time.monotonic())
                with self.sampler.track(server) as track:
                    try:
                        value = suite.run(metric, server, round_no)
                    except BenchError as e:
                        failed[server.name] = str(e)
                        value = None
                if self.rgw is not None:
                    # Servers and RGW: CPU in cores over the run; RGW is not "other CPU" here.
                    seconds = max(time.monotonic() - cpu_before[2], 1e-3)
                    server_ticks = cpu_ticks(sorted({*server_pids, *server.pids()}))
                    rgw_cores = (cpu_ticks(rgw_pids) - cpu_before[1]) / TICKS / seconds
                    outcome.server_cores.append((server_ticks - cpu_before[0]) / TICKS / seconds)
                    outcome.rgw_cores.append(rgw_cores)
                    if track.foreign_cores is not None:
                        track.foreign_cores = max(0.0, track.foreign_cores - rgw_cores)
                with contextlib.suppress(BenchError, OSError):
                    suite.after_run(metric, server, round_no)
                outcome.peak_rss_kib = max(outcome.peak_rss_kib, track.peak_rss_kib)
                outcome.peak_pss_kib = max(outcome.peak_pss_kib, track.peak_pss_kib)
                outcome.processes = max(outcome.processes, len(track.pids))
                if track.foreign_cores is not None:
                    outcome.foreign_cores = max(outcome.foreign_cores or 0.0, track.foreign_cores)
                if metric.timeline:
                    outcome.timelines.append(track.samples)
                if value is None:
                    alive = "" if server.alive() else " (the server is no longer running)"
                    failed[server.name] += alive
                    self.log(f"   round {round_no + 1} {server.name}: ERROR {failed[server.name]}")
                    tail = server.log_tail(10)
                    if tail:
                        self.log("   " + tail.replace("\n", "\n   "))
                    continue
                outcome.values.append(value)
                self.log(
                    f"   round {round_no + 1} {server.name:10} {fmt_value(value, metric.unit):>10}"
                    f" {metric.unit:6} peak ΣRSS {track.peak_rss_kib / 1024:6.0f} MiB"
                )
        for server in servers:
            outcome = result.outcomes[server.name]
            if server.name in failed:
                outcome.error = failed[server.name]
            elif server.alive():
                outcome.hwm_kib = hwm_kib(server.pids())
        speedup = result.speedup
        if speedup is not None:
            self.log(f"   Dockyard speed-up {speedup:.2f}x (target {metric.target_text})")


def report(
    results: list[Result],
    machine: dict[str, str],
    runner: Runner,
    args: argparse.Namespace,
    elapsed: float,
    interrupted: bool,
) -> str:
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    mode = "quick (smoke)" if args.quick else "full"
    rounds = runner.params.rounds
    on = " on S3 (Ceph RGW)" if runner.rgw is not None else ""
    big = runner.params.big_bytes and runner.rgw is None
    lines = [
        f"## Dockyard vs registry:2{on} — {mode} run, {when}",
        "",
        f"`{' '.join(['python', 'bench/compare.py', *sys.argv[1:]])}`: {rounds} round(s)"
        + (f" ({runner.params.big_rounds} for the big upload)" if big else "")
        + f", medians; took {elapsed / 60:.1f} min."
        + (" **Interrupted: partial results.**" if interrupted else ""),
        "",
    ]
    if runner.rgw is not None:
        lines += [
            "Both servers get the same `storage` section, each with its own bucket on the same"
            " RGW: `s3: {accesskey, secretkey, region: us-east-1, regionendpoint:"
            f" {runner.rgw.url}, bucket, secure: false, v4auth: true}}` (registry:2's defaults"
            " otherwise: 10 MiB chunks, multipart copies above 32 MiB), `delete: {enabled: true}`"
            " and **`redirect: {disable: true}`: blob downloads go through the servers**, not"
            " straight to RGW. registry:2 runs without `AWS_CA_BUNDLE` (its S3 driver fails on"
            " it), Dockyard with the machine's environment (which sets it). RGW runs on the same"
            " machine and shares its cores with the servers and the clients.",
            "",
        ]
    lines += [f"- {key}: {value}" for key, value in machine.items()]
    if runner.loads:
        lines.append(f"- 1-min load average at the start: {runner.loads[0]:.2f}")
    lines += [
        "",
        "Speed-up: Dockyard's throughput / registry:2's (MiB/s, req/s), or registry:2's time /"
        " Dockyard's (s); >1 means Dockyard is faster. ± is half the range over the rounds."
        " Peak RSS: the largest sum of VmRSS over the server's processes, sampled every 100 ms"
        " during the workload (Dockyard: the parent and its forked children).",
        "",
        results_table(results),
        "",
        "Memory and noise detail: VmHWM is summed over the processes at the end of the workload"
        + (
            " (each server is restarted before each workload, so it covers start-up and that"
            " workload)"
            if runner.params.restart_each
            else " (--quick does not restart the servers between the workloads of a group)"
        )
        + "; PSS shares the pages common to Dockyard's forked processes among them instead of"
        " counting them once per process. Other CPU: the most CPU time that processes this"
        " harness did not start (and kernel threads, including those writing back the"
        " harness's own files) used during one run of the workload, in cores on average over"
        " that run (— when every run was shorter than 2 s); well above 0 means the numbers of"
        " that row may be disturbed.",
        "",
        memory_table(results),
    ]
    if runner.rgw is not None:
        lines += [
            "",
            "CPU during the runs, in cores on average over each run (median over the rounds):"
            " the server's processes, and RGW's (monitor, OSD, radosgw; excluded from 'other"
            " CPU' above). The clients (curl, skopeo, ab) take the rest.",
            "",
            cpu_table(results),
        ]
    notes = timeline_notes(results) + noise_notes(results) + error_notes(results) + runner.notes
    if notes:
        lines += ["", "Notes:", ""] + [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one round (CI smoke)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per workload (default 3)")
    parser.add_argument(
        "--big-gib", type=float, default=16, help="size of the big upload in GiB (default 16)"
    )
    parser.add_argument(
        "--big-rounds", type=int, default=1, help="rounds of the big upload (default 1)"
    )
    parser.add_argument(
        "--only",
        help=f"comma-separated workload groups to run: {','.join(SUITE_KEYS)} "
        f"(with --s3: {','.join(S3_SUITE_KEYS)})",
    )
    parser.add_argument(
        "--s3",
        action="store_true",
        help="on S3 instead of the filesystem: bring up Ceph RGW (tests/rgw/rgw-up.sh), one "
        "bucket per server, and run the 1 GiB blob, 4 x 256 MiB skopeo and HEAD manifest "
        "workloads",
    )
    parser.add_argument(
        "--catalog-on-disk",
        action="store_true",
        help="keep the catalog stores in the work directory, not on /dev/shm",
    )
    parser.add_argument(
        "--seconds", type=int, default=10, help="duration of each HTTP load run (default 10)"
    )
    parser.add_argument("--wrk-threads", type=int, default=1, help="wrk threads (default 1)")
    parser.add_argument("--output", type=Path, help="also write the markdown report here")
    parser.add_argument("--json", type=Path, help="write every measured value here")
    parser.add_argument("--workdir", type=Path, help="where temporary data goes (default $TMPDIR)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary data and logs")
    args = parser.parse_args()
    if min(args.rounds, args.big_rounds, args.seconds, args.wrk_threads) < 1 or args.big_gib <= 0:
        parser.error("--rounds, --big-rounds, --seconds, --wrk-threads and --big-gib must be > 0")
    if args.only:
        keys = S3_SUITE_KEYS if args.s3 else SUITE_KEYS
        unknown = set(args.only.split(",")) - set(keys)
        if unknown:
            parser.error(f"--only: unknown {', '.join(sorted(unknown))}; use {keys}")
    return args


def _terminate(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    args = parse_args()
    missing = require_binaries({**BINARIES, **(RGW_BINARIES if args.s3 else {})})
    try:
        import dockyard  # noqa: F401
    except ImportError:
        missing.append("the dockyard package (pip install -e .)")
    if args.s3:
        try:
            import botocore  # noqa: F401
        except ImportError:
            missing.append("botocore (pip install -e .: it comes with aiobotocore)")
    if missing:
        print("compare.py: missing: " + "; ".join(missing), file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    # Ctrl-C stops the run cleanly even when started with SIGINT ignored (`cmd &` in a script).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if args.quick:
        params = Params.smoke(args.wrk_threads, not args.catalog_on_disk)
    else:
        params = Params.full(
            args.rounds,
            args.big_gib,
            args.big_rounds,
            args.wrk_threads,
            not args.catalog_on_disk,
            args.seconds,
        )
    workdir = Path(tempfile.mkdtemp(prefix="dockyard-bench-", dir=args.workdir))
    machine = machine_description(workdir)
    code_at_start = _code_fingerprint()
    if loadavg() > 0.5:
        print(f"warning: 1-min load average is {loadavg():.2f}; the machine is not idle")
    sampler = MemorySampler(0.1)
    runner = Runner(params, workdir, sampler)
    runner.keep = args.keep
    only = set(args.only.split(",")) if args.only else None
    interrupted = False
    started = time.monotonic()
    rgw: RGW | None = None
    failed_setup = ""
    try:
        if args.s3:
            # Admin sockets live in DIR/run: a Unix socket path has at most 107 bytes.
            rgw_dir = workdir / "rgw"
            if len(str(rgw_dir / "run" / "client.rgw.a.asok")) > 100:
                rgw_dir = Path(tempfile.mkdtemp(prefix="rgw-", dir="/tmp"))
            rgw_dir.mkdir(parents=True, exist_ok=True)
            rgw = RGW(rgw_dir)
            print("== bringing up Ceph RGW (tests/rgw/rgw-up.sh)", flush=True)
            rgw.start()
            runner.rgw = rgw
            print(f"   RGW at {rgw.url} in {rgw.started_in:.1f} s", flush=True)
            machine.update(s3_description(rgw, workdir))
            chosen = s3_suites(params, workdir, only)
        else:
            chosen = suites(params, workdir, only)
        for suite in chosen:
            runner.run_suite(suite)
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: stopping the servers", file=sys.stderr)
    except BenchError as e:
        failed_setup = str(e)
        print(f"compare.py: {e}", file=sys.stderr)
    finally:
        for server in runner.live:
            server.stop()
        kill_all()
        sampler.close()
        if rgw is not None:
            rgw.stop()
            if not args.keep:
                remove_tree(rgw.directory)
        if args.keep:
            print(f"kept {workdir}")
        else:
            remove_tree(workdir)
    if failed_setup:
        return 1
    elapsed = time.monotonic() - started
    if _code_fingerprint() != code_at_start:
        # The servers are restarted for every workload: later rows ran the newer code.
        runner.notes.append(
            f"Dockyard's code (src/) changed during the run: {machine['Dockyard']} at the"
            f" start, {_dockyard_version()} at the end; later rows ran the newer code."
        )
    text = report(runner.results, machine, runner, args, elapsed, interrupted)
    print()
    print(text)
    if args.output:
        args.output.write_text(text)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": machine,
                    "storage": "s3" if rgw is not None else "filesystem",
                    "results": [
                        {
                            "group": res.suite.key,
                            "workload": res.metric.key,
                            "title": res.metric.title,
                            "unit": res.metric.unit,
                            "speedup": res.speedup,
                            "servers": {
                                name: {
                                    "values": o.values,
                                    "error": o.error,
                                    "peak_rss_kib": o.peak_rss_kib,
                                    "peak_pss_kib": o.peak_pss_kib,
                                    "hwm_kib": o.hwm_kib,
                                    **(
                                        {"server_cores": o.server_cores, "rgw_cores": o.rgw_cores}
                                        if rgw is not None
                                        else {}
                                    ),
                                }
                                for name, o in res.outcomes.items()
                            },
                        }
                        for res in runner.results
                    ],
                },
                indent=1,
            )
        )
    if interrupted:
        return 130
    return 1 if error_notes(runner.results) else 0


if __name__ == "__main__":
    sys.exit(main())
