"""Dockyard against registry:2 under many concurrent clients (issue 18, scenarios 3, 4, 5).

    python -m bench.load_scale              # full run: 11.8 min on 2 busy cores (load 10)
    python -m bench.load_scale --quick      # smoke run: tiny sizes, 1 round: 1.3 min there,
                                            # 0.5 min without s3 (RGW's start-up is the rest)
    python -m bench.load_scale --only pulls,pushes --output load.md --json load.json --plot load.png

Scenarios (docs/benchmarks.md describes them and the results):

- ``pulls`` (3): 200 clients pull at once, all the same image, then each a different one. Each
  image is a Docker schema 2 manifest, a config and 3 layers of 1-4 MiB, written in registry:2's
  layout on disk before the servers start (one copy, hard-linked into the second server's root,
  so both read the same page-cached files). A pull is what docker does: the manifest GET with
  docker's ``Accept`` header, then the config and layer GETs, at most 3 at a time.
- ``sweep``: the different-images pull at 1, 10, 50 and 200 clients and the push below at 1,
  10 and 50 (the plot: throughput and p99 against concurrency).
- ``pushes`` (4): 50 clients push at once, each an image of 3 shared base layers, 1 small layer
  of its own, a config and a manifest, like a CI fleet: HEAD of each blob first (skipped if it
  is there), else POST + PATCH (the whole blob) + PUT ``?digest=``, layers in parallel (docker
  uploads up to 5 at a time), then the config, then the manifest. Either each to a repository
  of its own, or each to a tag of its own in one repository (fresh every round, so every round
  starts with 50 clients uploading the same base layers into one repository). Every push is
  checked afterwards (manifest GET by tag, HEAD of each blob): errors must be zero.
- ``s3`` (5): the pulls of scenario 3 with both servers on S3 (Ceph RGW, one bucket each,
  written directly in the layout) and a Redis each (``storage.cache.blobdescriptor: redis`` and
  ``redis.addr``), blob downloads through the servers (``storage.redirect.disable: true``); then
  the same with redirects (307 to RGW), as a side figure for each server on its own.

The clients are asyncio (aiohttp) in this process, separate from the servers: one session per
simulated client with a connection pool of its own (3 connections for a pull, 5 for a push, as
docker) and a source address of its own (127.0.1.x), as machines of a fleet; ``--one-address``
puts them all on 127.0.0.1 (behind one NAT), where Dockyard's default
``http.limits.connectionsperaddress: 256`` answers 429 beyond 256 connections. Memory: VmRSS
(and Pss) of every process of each server's tree every 100 ms during a run; the peak of the
sum, and each process's own peak. CPU: the server tree's CPU time over the
run, in cores.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yarl

from bench import ROOT
from bench.clients import MANIFEST_ACCEPT
from bench.machine import code_fingerprint, dockyard_version, first_line, loadavg
from bench.machine import machine_description as base_machine
from bench.procstat import TICKS, cpu_ticks, rss_kib, sample
from bench.results import DOCKYARD, REGISTRY2
from bench.servers import BenchError, Dockyard, Registry2, Server, kill_all
from harness.client import DOCKER_MANIFEST, sha256
from harness.store import V2, blob_data

KiB, MiB = 1024, 1024 * 1024
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
SCENARIOS = ["pulls", "sweep", "pushes", "s3"]


# -- sizes --------------------------------------------------------------------------------------


@dataclass
class Params:
    images: int = 200  # different images (and pulls per run)
    pull_clients: int = 200
    layers: int = 3
    layer_min: int = 1 * MiB
    layer_max: int = 4 * MiB
    push_clients: int = 50
    base_layers: tuple[int, ...] = (4 * MiB, 2 * MiB, 1 * MiB)
    unique_min: int = 32 * KiB
    unique_max: int = 256 * KiB
    rounds: int = 3
    s3_rounds: int = 2
    s3_redirect_rounds: int = 1
    pull_levels: tuple[int, ...] = (1, 10, 50, 200)
    push_levels: tuple[int, ...] = (1, 10, 50)

    @classmethod
    def quick(cls) -> Params:
        return cls(
            images=20,
            pull_clients=20,
            layer_min=64 * KiB,
            layer_max=256 * KiB,
            push_clients=10,
            base_layers=(256 * KiB, 128 * KiB, 64 * KiB),
            unique_min=4 * KiB,
            unique_max=16 * KiB,
            rounds=1,
            s3_rounds=1,
            s3_redirect_rounds=1,
            pull_levels=(1, 20),
            push_levels=(1, 10),
        )


# -- content ------------------------------------------------------------------------------------


class Content:
    """Pseudo-random blobs, fast and reproducible: slices of one 16 MiB pool, each made unique
    by a 32-byte header derived from a label (so the same label gives both servers the same
    bytes, and nothing dedups by accident)."""

    def __init__(self, seed: int = 18) -> None:
        self.pool = random.Random(seed).randbytes(16 * MiB)

    def blob(self, label: str, size: int) -> bytes:
        head = hashlib.sha256(label.encode()).digest()
        offset = int.from_bytes(head[:3], "big") % (len(self.pool) - size)
        return (head + self.pool[offset : offset + size - len(head)])[:size]


@dataclass(frozen=True)
class Blob:
    digest: str
    size: int
    media_type: str


@dataclass
class Image:
    repo: str
    tag: str
    config: Blob
    layers: list[Blob]
    manifest: bytes
    data: dict[str, bytes] = field(default_factory=dict, repr=False)  # only for pushes

    @property
    def digest(self) -> str:
        return sha256(self.manifest)

    @property
    def blobs(self) -> list[Blob]:
        return [self.config, *self.layers]

    @property
    def pull_bytes(self) -> int:
        return len(self.manifest) + sum(b.size for b in self.blobs)


def docker_manifest(config: Blob, layers: list[Blob]) -> bytes:
    """Docker's image manifest (schema 2): what docker pushes."""

    def desc(b: Blob) -> dict[str, Any]:
        return {"mediaType": b.media_type, "size": b.size, "digest": b.digest}

    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST,
            "config": desc(config),
            "layers": [desc(b) for b in layers],
        },
        indent=3,
    ).encode()


def make_image(
    content: Content, repo: str, tag: str, layers: list[tuple[str, int]], keep: bool
) -> Image:
    """An image of the ``(label, size)`` layers; ``keep`` keeps the bytes (pushes), else they
    are made again when written (pull stores are GiB-sized)."""
    data: dict[str, bytes] = {}
    blobs = []
    for label, size in layers:
        raw = content.blob(label, size)
        blob = Blob(sha256(raw), size, DOCKER_LAYER)
        blobs.append(blob)
        if keep:
            data[blob.digest] = raw
    config_raw = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [b.digest for b in blobs]},
            "config": {"Labels": {"bench": f"{repo}:{tag}"}},
        }
    ).encode()
    config = Blob(sha256(config_raw), len(config_raw), DOCKER_CONFIG)
    data[config.digest] = config_raw
    return Image(repo, tag, config, blobs, docker_manifest(config, blobs), data)


def pull_images(p: Params, content: Content) -> tuple[list[Image], dict[str, tuple[str, int]]]:
    """The pull store's images (``pull/app-NNN:latest``) and where each blob's bytes come from
    (digest -> (label, size))."""
    rng = random.Random(3)
    images, sources = [], {}
    for i in range(p.images):
        layers = []
        for j in range(p.layers):
            size = rng.randrange(p.layer_min, p.layer_max + 1, KiB)
            layers.append((f"pull-{i}-{j}", size))
        image = make_image(content, f"pull/app-{i:03d}", "latest", layers, keep=False)
        for (label, size), blob in zip(layers, image.layers, strict=True):
            sources[blob.digest] = (label, size)
        images.append(image)
    return images, sources


def layout_entries(
    images: list[Image], content: Content, sources: dict[str, tuple[str, int]]
) -> Iterator[tuple[str, bytes]]:
    """Every file of registry:2's layout for ``images`` (paths relative to the v2 root)."""
    for image in images:
        repo = f"repositories/{image.repo}"
        for blob in image.blobs:
            raw = image.data.get(blob.digest)
            if raw is None:
                raw = content.blob(*sources[blob.digest])
            yield blob_data(blob.digest), raw
            yield (
                f"{repo}/_layers/sha256/{blob.digest.removeprefix('sha256:')}/link",
                (blob.digest.encode()),
            )
        digest, hexa = image.digest, image.digest.removeprefix("sha256:")
        yield blob_data(digest), image.manifest
        link = digest.encode()
        yield f"{repo}/_manifests/revisions/sha256/{hexa}/link", link
        yield f"{repo}/_manifests/tags/{image.tag}/current/link", link
        yield f"{repo}/_manifests/tags/{image.tag}/index/sha256/{hexa}/link", link


def write_disk_store(root: Path, entries: Iterator[tuple[str, bytes]]) -> int:
    total = 0
    for rel, data in entries:
        path = root / V2 / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        total += len(data)
    return total


def write_bucket_store(
    client: Any, buckets: list[str], entries: Iterator[tuple[str, bytes]]
) -> int:
    """The same layout as objects, into each bucket (8 uploads at a time)."""
    total = 0
    with ThreadPoolExecutor(8) as pool:
        futures = []
        for rel, data in entries:
            total += len(data)
            for bucket in buckets:
                futures.append(
                    pool.submit(client.put_object, Bucket=bucket, Key=f"{V2}/{rel}", Body=data)
                )
            if len(futures) > 64:  # bound what is held in memory
                for f in futures:
                    f.result()
                futures = []
        for f in futures:
            f.result()
    return total


# -- memory and CPU of a server during a run ----------------------------------------------------


class TreeSampler:
    """VmRSS of each process of a server's tree every 100 ms (Pss of the whole tree too), in a
    thread: the peak of the sums, each process's own peak, and the tree's CPU over the run."""

    def __init__(self, server: Server, interval: float = 0.1) -> None:
        self.server = server
        self.interval = interval
        self.peak_rss_kib = 0
        self.peak_pss_kib = 0
        self.per_process: dict[int, int] = {}
        self.root = server.proc.pid if server.proc else 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._pids: list[int] = []
        self._cpu0 = 0
        self._t0 = 0.0
        self.cores = 0.0

    def _take(self) -> None:
        rss = {pid: rss_kib([pid]) for pid in self._pids}
        total = sum(rss.values())
        self.peak_rss_kib = max(self.peak_rss_kib, total)
        self.peak_pss_kib = max(self.peak_pss_kib, sample(self._pids)[1])
        for pid, kib in rss.items():
            self.per_process[pid] = max(self.per_process.get(pid, 0), kib)

    def _run(self) -> None:
        last_scan = 0.0
        while not self._stop.wait(self.interval):
            if time.monotonic() - last_scan > 1.0:  # workers seldom change: rescan each 1 s
                self._pids = self.server.pids()
                last_scan = time.monotonic()
            self._take()

    def __enter__(self) -> TreeSampler:
        self._pids = self.server.pids()
        self._cpu0 = cpu_ticks(self._pids)
        self._t0 = time.monotonic()
        self._take()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(2)
        self._take()
        elapsed = time.monotonic() - self._t0
        if elapsed > 0:
            self.cores = (cpu_ticks(self.server.pids()) - self._cpu0) / TICKS / elapsed

    def processes(self) -> list[tuple[str, int]]:
        """(role, peak KiB) of each process: the root first (Dockyard's supervisor)."""
        out = []
        for pid, kib in sorted(self.per_process.items(), key=lambda kv: kv[0] != self.root):
            if pid == self.root:
                role = "supervisor" if len(self.per_process) > 1 else "server"
            else:
                role = "worker"
            out.append((role, kib))
        return out


# -- what a run measured ------------------------------------------------------------------------


@dataclass
class Run:
    scenario: str
    server: str
    clients: int
    round_no: int
    ops: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    wall: float = 0.0
    payload: int = 0  # bytes pulled or pushed
    latencies: list[float] = field(default_factory=list)
    skipped_uploads: int = 0  # pushes: blobs the HEAD found
    peak_rss_kib: int = 0
    peak_pss_kib: int = 0
    processes: list[tuple[str, int]] = field(default_factory=list)
    cores: float = 0.0
    client_cores: float = 0.0  # this process (the clients): near 1 would mean client-bound

    @property
    def ops_per_s(self) -> float:
        return self.ops / self.wall if self.wall else 0.0

    @property
    def mib_per_s(self) -> float:
        return self.payload / MiB / self.wall if self.wall else 0.0


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), -(-len(ordered) * q // 100)))
    return ordered[int(rank) - 1]


@dataclass
class Summary:
    """One server's runs of one scenario: medians of throughput over the rounds, latency
    percentiles over every operation of every round, the sums of errors, the peaks of memory."""

    runs: list[Run]

    def _median(self, attr: str) -> float | None:
        values = [getattr(r, attr) for r in self.runs]
        return statistics.median(values) if values else None

    @property
    def ops_per_s(self) -> float | None:
        return self._median("ops_per_s")

    @property
    def mib_per_s(self) -> float | None:
        return self._median("mib_per_s")

    @property
    def cores(self) -> float | None:
        return self._median("cores")

    @property
    def client_cores(self) -> float | None:
        return self._median("client_cores")

    @property
    def latencies(self) -> list[float]:
        return [x for r in self.runs for x in r.latencies]

    @property
    def p50_ms(self) -> float | None:
        v = percentile(self.latencies, 50)
        return None if v is None else v * 1000

    @property
    def p99_ms(self) -> float | None:
        v = percentile(self.latencies, 99)
        return None if v is None else v * 1000

    @property
    def errors(self) -> int:
        return sum(r.errors for r in self.runs)

    @property
    def ops(self) -> int:
        return sum(r.ops for r in self.runs)

    @property
    def peak_rss_mib(self) -> float:
        return max((r.peak_rss_kib for r in self.runs), default=0) / 1024

    @property
    def peak_pss_mib(self) -> float:
        return max((r.peak_pss_kib for r in self.runs), default=0) / 1024

    @property
    def processes(self) -> list[tuple[str, float]]:
        """Each process's peak over the rounds (matched by position: root first)."""
        width = max((len(r.processes) for r in self.runs), default=0)
        out = []
        for i in range(width):
            found = [r.processes[i] for r in self.runs if len(r.processes) > i]
            out.append((found[0][0], max(kib for _, kib in found) / 1024))
        return out


# -- the clients --------------------------------------------------------------------------------


class Failed(Exception):
    pass


def _expect(r: aiohttp.ClientResponse, status: int, what: str) -> None:
    if r.status != status:
        raise Failed(f"{what}: HTTP {r.status} (wanted {status})")


async def _drain(r: aiohttp.ClientResponse) -> int:
    n = 0
    async for chunk in r.content.iter_any():
        n += len(chunk)
    return n


async def pull_one(session: aiohttp.ClientSession, base: str, image: Image) -> int:
    """docker's pull of one image: the manifest, then its blobs, at most 3 at a time (the
    session's pool has 3 connections, docker's max-concurrent-downloads). Sizes are checked,
    digests not (the client would spend the CPU the servers need)."""
    url = f"{base}/v2/{image.repo}/manifests/{image.tag}"
    async with session.get(url, headers={"Accept": MANIFEST_ACCEPT}) as r:
        _expect(r, 200, f"GET manifest {image.repo}")
        body = await r.read()
    manifest = json.loads(body)
    descriptors = [manifest["config"], *manifest["layers"]]

    async def blob(desc: dict[str, Any]) -> int:
        async with session.get(f"{base}/v2/{image.repo}/blobs/{desc['digest']}") as r:
            _expect(r, 200, f"GET blob {image.repo}")
            n = await _drain(r)
        if n != desc["size"]:
            raise Failed(f"GET blob {image.repo}: {n} bytes, wanted {desc['size']}")
        return n

    sizes = await asyncio.gather(*(blob(d) for d in descriptors))
    return len(body) + sum(sizes)


async def upload_blob(
    session: aiohttp.ClientSession, base: str, repo: str, digest: str, data: bytes
) -> bool:
    """docker's upload of one blob: HEAD first (False: it is there, nothing sent), then POST,
    PATCH with the whole blob, PUT ``?digest=``."""
    async with session.head(f"{base}/v2/{repo}/blobs/{digest}") as r:
        if r.status == 200:
            return False
        _expect(r, 404, f"HEAD blob {repo}")
    async with session.post(f"{base}/v2/{repo}/blobs/uploads/") as r:
        _expect(r, 202, f"POST upload {repo}")
        location = r.headers["Location"]
    # encoded=True: the upload state in the query goes back exactly as the server wrote it
    url = yarl.URL(base).join(yarl.URL(location, encoded=True))
    headers = {"Content-Type": "application/octet-stream"}
    async with session.patch(url, data=data, headers=headers) as r:
        _expect(r, 202, f"PATCH upload {repo}")
        location = r.headers["Location"]
    url = yarl.URL(base).join(yarl.URL(location, encoded=True))
    url = url.update_query({"digest": digest})
    async with session.put(url, headers={"Content-Length": "0"}) as r:
        _expect(r, 201, f"PUT upload {repo}")
    return True


async def push_one(session: aiohttp.ClientSession, base: str, image: Image) -> tuple[int, int]:
    """docker's push: the layers in parallel, then the config, then the manifest by tag.
    Returns (bytes sent, blobs skipped)."""
    uploads = await asyncio.gather(
        *(
            upload_blob(session, base, image.repo, b.digest, image.data[b.digest])
            for b in image.layers
        )
    )
    config_sent = await upload_blob(
        session, base, image.repo, image.config.digest, image.data[image.config.digest]
    )
    url = f"{base}/v2/{image.repo}/manifests/{image.tag}"
    async with session.put(
        url, data=image.manifest, headers={"Content-Type": DOCKER_MANIFEST}
    ) as r:
        _expect(r, 201, f"PUT manifest {image.repo}:{image.tag}")
    sent = [b.size for b, up in zip(image.layers, uploads, strict=True) if up]
    sent_bytes = sum(sent) + (image.config.size if config_sent else 0) + len(image.manifest)
    return sent_bytes, uploads.count(False) + (0 if config_sent else 1)


async def verify_push(session: aiohttp.ClientSession, base: str, image: Image) -> None:
    url = f"{base}/v2/{image.repo}/manifests/{image.tag}"
    async with session.get(url, headers={"Accept": MANIFEST_ACCEPT}) as r:
        _expect(r, 200, f"verify: GET manifest {image.repo}:{image.tag}")
        if await r.read() != image.manifest:
            raise Failed(f"verify: manifest of {image.repo}:{image.tag} differs")
    for blob in image.blobs:
        async with session.head(f"{base}/v2/{image.repo}/blobs/{blob.digest}") as r:
            _expect(r, 200, f"verify: HEAD blob {image.repo}")
            if int(r.headers.get("Content-Length", -1)) != blob.size:
                raise Failed(f"verify: HEAD blob {image.repo}: wrong Content-Length")


def source_address(i: int) -> str:
    """Client ``i``'s own loopback address (127.0.1.1, 127.0.1.2, ...; Linux routes all of
    127/8 to lo): each simulated client is a machine of its own, as in a fleet, so a limit per
    client address (Dockyard's ``http.limits.connectionsperaddress``, default 256) sees 3 or 5
    connections per client, not all of them."""
    return f"127.0.{1 + i // 250}.{1 + i % 250}"


#: every client from 127.0.0.1 (``--one-address``): clients behind one NAT or proxy
ONE_ADDRESS = False


async def drive(base: str, jobs: list[Image], clients: int, push: bool, run: Run) -> None:
    """``clients`` simulated clients, each with a session and connection pool of its own and
    an address of its own, taking the next job until none is left; all start together."""
    next_job = 0
    timeout = aiohttp.ClientTimeout(total=600)

    async def client(i: int) -> None:
        nonlocal next_job
        local = None if ONE_ADDRESS else (source_address(i), 0)
        connector = aiohttp.TCPConnector(limit=5 if push else 3, local_addr=local)
        async with aiohttp.ClientSession(
            connector=connector, timeout=timeout, auto_decompress=False
        ) as session:
            while next_job < len(jobs):
                image = jobs[next_job]
                next_job += 1
                t0 = time.perf_counter()
                try:
                    if push:
                        sent, skipped = await push_one(session, base, image)
                        run.skipped_uploads += skipped
                    else:
                        sent = await pull_one(session, base, image)
                except (TimeoutError, Failed, aiohttp.ClientError, KeyError, ValueError) as e:
                    run.errors += 1
                    if len(run.error_samples) < 5:
                        run.error_samples.append(f"{type(e).__name__}: {e}")
                    continue
                run.latencies.append(time.perf_counter() - t0)
                run.ops += 1
                run.payload += sent

    t0, cpu0 = time.perf_counter(), time.process_time()
    await asyncio.gather(*(client(i) for i in range(clients)))
    run.wall = time.perf_counter() - t0
    run.client_cores = (time.process_time() - cpu0) / run.wall
    if push:  # every push must be there, whole (not timed)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            sem = asyncio.Semaphore(10)

            async def check(image: Image) -> None:
                async with sem:
                    try:
                        await verify_push(session, base, image)
                    except (TimeoutError, Failed, aiohttp.ClientError) as e:
                        run.errors += 1
                        if len(run.error_samples) < 5:
                            run.error_samples.append(str(e))

            await asyncio.gather(*(check(image) for image in jobs))


def measure(
    server: Server, scenario: str, jobs: list[Image], clients: int, push: bool, round_no: int
) -> Run:
    run = Run(scenario, server.name, clients, round_no)
    with TreeSampler(server) as sampler:
        asyncio.run(drive(server.url, jobs, clients, push, run))
    run.peak_rss_kib, run.peak_pss_kib = sampler.peak_rss_kib, sampler.peak_pss_kib
    run.processes, run.cores = sampler.processes(), sampler.cores
    if not server.alive():
        raise BenchError(f"{server.name} died during {scenario}:\n{server.log_tail()}")
    line = (
        f"  {scenario:<24} {server.name:<10} c={clients:<3} {run.ops_per_s:8.1f} ops/s"
        f" {run.mib_per_s:8.1f} MiB/s p99 {1000 * (percentile(run.latencies, 99) or 0):7.0f} ms"
        f" errors {run.errors} ΣRSS {run.peak_rss_kib / 1024:.0f} MiB CPU {run.cores:.2f}"
        f" client CPU {run.client_cores:.2f}"
    )
    print(line + (f"  [{run.error_samples[0]}]" if run.error_samples else ""), flush=True)
    return run


# -- the servers --------------------------------------------------------------------------------


def make_servers(
    work: Path, roots: tuple[Path, Path], extras: tuple[dict[str, Any], dict[str, Any]], s3: bool
) -> list[Server]:
    r2_class = Registry2
    if s3:  # registry:2 without AWS_CA_BUNDLE: its S3 driver fails on it
        from bench.rgw import Registry2S3

        r2_class = Registry2S3
    return [
        r2_class(name=REGISTRY2, work=work, root=roots[0], extra_config=extras[0]),
        Dockyard(name=DOCKYARD, work=work, root=roots[1], extra_config=extras[1]),
    ]


@contextlib.contextmanager
def running(servers: list[Server]) -> Iterator[list[Server]]:
    try:
        for s in servers:
            s.start()
        yield servers
    finally:
        for s in servers:
            s.stop()


def in_order(servers: list[Server], round_no: int) -> list[Server]:
    """registry:2 first in even rounds, Dockyard first in odd ones."""
    return servers if round_no % 2 == 0 else servers[::-1]


def warm_up(servers: list[Server], images: list[Image]) -> None:
    """A few pulls per server, not measured: each worker's first requests pay for lazy set-up."""
    for server in servers:
        run = Run("warm-up", server.name, 4, 0)
        asyncio.run(drive(server.url, images[:8], 4, False, run))
        if run.errors:
            raise BenchError(f"{server.name}: warm-up pulls failed: {run.error_samples}")


# -- the scenarios ------------------------------------------------------------------------------


@dataclass
class Bench:
    p: Params
    work: Path
    content: Content = field(default_factory=Content)
    runs: list[Run] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    _pull: tuple[list[Image], dict[str, tuple[str, int]]] | None = None

    @property
    def pull_set(self) -> tuple[list[Image], dict[str, tuple[str, int]]]:
        if self._pull is None:
            self._pull = pull_images(self.p, self.content)
        return self._pull

    def pull_rounds(self, servers: list[Server], prefix: str, rounds: int) -> None:
        images, _ = self.pull_set
        one = [images[0]] * len(images)
        for r in range(rounds):
            for jobs, label in ((one, "one image"), (images, "different images")):
                for server in in_order(servers, r):
                    self.runs.append(
                        measure(server, f"{prefix}{label}", jobs, self.p.pull_clients, False, r)
                    )

    def disk_pull_store(self) -> tuple[Path, Path]:
        images, sources = self.pull_set
        first, second = self.work / "pull-registry2", self.work / "pull-dockyard"
        t0 = time.monotonic()
        size = write_disk_store(first, layout_entries(images, self.content, sources))
        # one copy of the bytes, hard-linked: both servers read the same page-cached files
        shutil.copytree(first, second, copy_function=os.link)
        print(
            f"pull store: {len(images)} images, {size / MiB:.0f} MiB, written in"
            f" {time.monotonic() - t0:.1f} s",
            flush=True,
        )
        return first, second

    def pulls(self, sweep: bool, scenario3: bool) -> None:
        roots = self.disk_pull_store()
        images, _ = self.pull_set
        with running(make_servers(self.work / "logs", roots, ({}, {}), False)) as servers:
            warm_up(servers, images)
            if scenario3:
                self.pull_rounds(servers, "", self.p.rounds)
            if sweep:
                for c in self.p.pull_levels:
                    for server in servers:
                        self.runs.append(measure(server, "sweep pull", images, c, False, 0))
        for root in roots:
            shutil.rmtree(root, ignore_errors=True)

    def push_jobs(self, mode: str, round_no: int, count: int) -> list[Image]:
        base = [(f"base-{i}", size) for i, size in enumerate(self.p.base_layers)]
        rng = random.Random(round_no * 1000 + len(mode))
        jobs = []
        for i in range(count):
            unique = (f"{mode}-{round_no}-{i}", rng.randrange(self.p.unique_min, self.p.unique_max))
            if mode.endswith("repository"):
                repo, tag = f"ci/{round_no}-job-{i:03d}", "latest"
            else:
                repo, tag = f"ci/app-{mode.split()[0]}-{round_no}", f"job-{i:03d}"
            jobs.append(make_image(self.content, repo, tag, [*base, unique], keep=True))
        return jobs

    def pushes(self, sweep: bool, scenario4: bool) -> None:
        roots = (self.work / "push-registry2", self.work / "push-dockyard")
        with running(make_servers(self.work / "logs", roots, ({}, {}), False)) as servers:
            n = self.p.push_clients
            if scenario4:
                for r in range(self.p.rounds):
                    for mode in ("own repository", "own tag"):
                        jobs = self.push_jobs(mode, r, n)
                        for server in in_order(servers, r):
                            self.runs.append(measure(server, f"push, {mode}", jobs, n, True, r))
            if sweep:
                for c in self.p.push_levels:
                    jobs = self.push_jobs(f"sweep{c} repository", 100 + c, n)
                    for server in servers:
                        self.runs.append(measure(server, "sweep push", jobs, c, True, 0))
        for root in roots:
            shutil.rmtree(root, ignore_errors=True)

    def s3(self) -> None:
        from bench.rgw import RGW  # Ceph and boto3 only when asked for
        from harness.redis import start_redis

        images, sources = self.pull_set
        t0 = time.monotonic()
        rgw = RGW.start(self.work / "rgw")
        try:
            print(f"RGW up in {time.monotonic() - t0:.0f} s at {rgw.url}", flush=True)
            self.notes.append(f"RGW: {first_line(['radosgw', '--version']).split(' (')[0]}")
            self.notes.append(f"Redis: {first_line(['redis-server', '--version'])}")
            buckets = (rgw.create_bucket("load-registry2"), rgw.create_bucket("load-dockyard"))
            t0 = time.monotonic()
            size = write_bucket_store(
                rgw.client, list(buckets), layout_entries(images, self.content, sources)
            )
            print(
                f"S3 pull store: {size / MiB:.0f} MiB into each bucket in"
                f" {time.monotonic() - t0:.0f} s",
                flush=True,
            )
            with start_redis() as redis_r2, start_redis() as redis_dy:

                def extra(bucket: str, redis: str, redirect: bool) -> dict[str, Any]:
                    storage = rgw.storage(bucket)
                    storage["redirect"] = {"disable": not redirect}
                    storage["cache"] = {"blobdescriptor": "redis"}
                    return {"storage": storage, "redis": {"addr": redis}}

                for redirect, rounds in (
                    (False, self.p.s3_rounds),
                    (True, self.p.s3_redirect_rounds),
                ):
                    extras = (
                        extra(buckets[0], redis_r2, redirect),
                        extra(buckets[1], redis_dy, redirect),
                    )
                    roots = (self.work / "s3-registry2", self.work / "s3-dockyard")
                    servers = make_servers(self.work / "logs", roots, extras, True)
                    with running(servers):
                        warm_up(servers, images)
                        prefix = "S3 redirect, " if redirect else "S3, "
                        self.pull_rounds(servers, prefix, rounds)
        finally:
            rgw.stop()


# -- the report ---------------------------------------------------------------------------------


def _fmt(v: float | None, digits: int = 1) -> str:
    return "—" if v is None else f"{v:,.{digits}f}"


def _ratio(dy: float | None, r2: float | None, higher_is_better: bool) -> str:
    if not dy or not r2:
        return "—"
    return f"{(dy / r2 if higher_is_better else r2 / dy):.2f}x"


def _compared(
    label: str, r2: float | None, dy: float | None, higher_is_better: bool, digits: int = 1
) -> tuple[str, str, str, str]:
    """A row of the scenario table: both servers' values and Dockyard's ratio."""
    return label, _fmt(r2, digits), _fmt(dy, digits), _ratio(dy, r2, higher_is_better)


def summaries(runs: list[Run]) -> dict[str, dict[str, Summary]]:
    """scenario -> server -> Summary (sweeps: one per concurrency)."""
    out: dict[str, dict[str, Summary]] = {}
    for run in runs:
        key = (
            f"{run.scenario} @ {run.clients}" if run.scenario.startswith("sweep") else run.scenario
        )
        out.setdefault(key, {}).setdefault(run.server, Summary([])).runs.append(run)
    return out


def _procs(s: Summary) -> str:
    return ", ".join(f"{role} {mib:.0f}" for role, mib in s.processes)


def table(runs: list[Run], scenarios: list[str], push: bool) -> str:
    by = summaries(runs)
    head = [
        "| workload | clients | metric | registry:2 | Dockyard | Dockyard vs registry:2 |",
        "|---|---|---|---:|---:|---:|",
    ]
    lines = []
    for scenario in scenarios:
        if scenario not in by:
            continue
        r2, dy = by[scenario].get(REGISTRY2), by[scenario].get(DOCKYARD)
        if r2 is None or dy is None:
            continue
        clients = r2.runs[0].clients
        unit = "pushes/s" if push else "pulls/s"
        rows: list[tuple[str, str, str, str]] = [
            _compared(unit, r2.ops_per_s, dy.ops_per_s, True),
            _compared("MiB/s", r2.mib_per_s, dy.mib_per_s, True, 0),
            _compared("p50 (ms)", r2.p50_ms, dy.p50_ms, False, 0),
            _compared("p99 (ms)", r2.p99_ms, dy.p99_ms, False, 0),
            (
                f"errors (of {r2.ops + r2.errors} / {dy.ops + dy.errors})",
                str(r2.errors),
                str(dy.errors),
                "",
            ),
        ]
        if push:
            rows.append(
                (
                    "blob uploads skipped (HEAD found)",
                    str(sum(r.skipped_uploads for r in r2.runs)),
                    str(sum(r.skipped_uploads for r in dy.runs)),
                    "",
                )
            )
        rows += [
            _compared("peak ΣRSS (MiB)", r2.peak_rss_mib, dy.peak_rss_mib, False, 0),
            _compared("peak ΣPSS (MiB)", r2.peak_pss_mib, dy.peak_pss_mib, False, 0),
            ("peak RSS per process (MiB)", _procs(r2), _procs(dy), ""),
            ("server CPU (cores)", _fmt(r2.cores, 2), _fmt(dy.cores, 2), ""),
            ("client CPU (cores)", _fmt(r2.client_cores, 2), _fmt(dy.client_cores, 2), ""),
        ]
        for i, (metric, a, b, ratio) in enumerate(rows):
            name = scenario if i == 0 else ""
            lines.append(
                f"| {name} | {clients if i == 0 else ''} | {metric} | {a} | {b} | {ratio} |"
            )
    return "\n".join(head + lines) if lines else ""


def sweep_table(runs: list[Run], scenario: str) -> str:
    rows = [r for r in runs if r.scenario == scenario]
    if not rows:
        return ""
    unit = "pushes/s" if "push" in scenario else "pulls/s"
    lines = [
        f"| clients | registry:2 {unit} | Dockyard {unit} | ratio | registry:2 p99 (ms) |"
        " Dockyard p99 (ms) | ratio | errors (r2 / Dockyard) |",
        "|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    by = summaries(rows)
    for c in sorted({r.clients for r in rows}):
        s = by[f"{scenario} @ {c}"]
        r2, dy = s[REGISTRY2], s[DOCKYARD]
        lines.append(
            f"| {c} | {_fmt(r2.ops_per_s)} | {_fmt(dy.ops_per_s)} |"
            f" {_ratio(dy.ops_per_s, r2.ops_per_s, True)} | {_fmt(r2.p99_ms, 0)} |"
            f" {_fmt(dy.p99_ms, 0)} | {_ratio(dy.p99_ms, r2.p99_ms, False)} |"
            f" {r2.errors} / {dy.errors} |"
        )
    return "\n".join(lines)


def plot(runs: list[Run], path: Path) -> bool:
    """Throughput and p99 against concurrency, both servers (False: no matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    scenarios = [s for s in ("sweep pull", "sweep push") if any(r.scenario == s for r in runs)]
    if not scenarios:
        return False
    fig, axes = plt.subplots(len(scenarios), 2, figsize=(10, 3.6 * len(scenarios)), squeeze=False)
    for row, scenario in enumerate(scenarios):
        by = summaries([r for r in runs if r.scenario == scenario])
        levels = sorted({r.clients for r in runs if r.scenario == scenario})
        unit = "pushes/s" if "push" in scenario else "pulls/s"
        for server, style in ((REGISTRY2, "o-"), (DOCKYARD, "s-")):
            tput = [by[f"{scenario} @ {c}"][server].ops_per_s for c in levels]
            p99 = [by[f"{scenario} @ {c}"][server].p99_ms for c in levels]
            axes[row][0].plot(levels, tput, style, label=server)
            axes[row][1].plot(levels, p99, style, label=server)
        axes[row][0].set_title(f"{scenario.removeprefix('sweep ')}: throughput")
        axes[row][0].set_ylabel(unit)
        axes[row][1].set_title(f"{scenario.removeprefix('sweep ')}: p99 latency")
        axes[row][1].set_ylabel("ms")
        for ax in axes[row]:
            ax.set_xscale("log")
            ax.set_xticks(levels, [str(c) for c in levels])
            ax.set_xlabel("concurrent clients")
            ax.grid(True, alpha=0.3)
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def machine(work: Path) -> dict[str, str]:
    desc = base_machine(work)
    desc["Dockyard"] = f"{dockyard_version()}, {os.cpu_count()} workers (the default)"
    desc["clients"] = f"aiohttp {aiohttp.__version__} (asyncio, this process)"
    desc["commit"] = first_line(["git", "-C", str(ROOT), "rev-parse", "HEAD"])
    desc["src fingerprint"] = code_fingerprint()
    return desc


def report(bench: Bench, desc: dict[str, str], args: argparse.Namespace, took: float) -> str:
    p = bench.p
    out = [
        f"`python -m bench.load_scale {' '.join(sys.argv[1:])}`: took {took / 60:.1f} min;"
        f" load average at start {args.load_at_start:.2f}.",
        "",
        *(f"- {k}: {v}" for k, v in desc.items()),
        "",
        f"Pull images: {p.images}, each a manifest, a config and {p.layers} layers of"
        f" {p.layer_min // KiB}-{p.layer_max // KiB} KiB; pushes: base layers"
        f" {', '.join(str(b // KiB) for b in p.base_layers)} KiB plus a unique layer of"
        f" {p.unique_min // KiB}-{p.unique_max // KiB} KiB. Rounds: {p.rounds} (S3: {p.s3_rounds},"
        f" with redirects {p.s3_redirect_rounds}); throughput is the median over rounds, p50/p99"
        " over every operation of every round; the ratio column is Dockyard's advantage (above 1:"
        " Dockyard better; for latency and memory registry:2's value / Dockyard's).",
    ]
    sections = [
        ("Concurrent pulls", ["one image", "different images"], False),
        ("Concurrent pushes", ["push, own repository", "push, own tag"], True),
        ("On S3 (RGW) with Redis, no redirects", ["S3, one image", "S3, different images"], False),
        (
            "On S3 (RGW) with Redis, redirects (each server on its own)",
            ["S3 redirect, one image", "S3 redirect, different images"],
            False,
        ),
    ]
    for title, scenarios, push in sections:
        t = table(bench.runs, scenarios, push)
        if t:
            out += ["", f"#### {title}", "", t]
    for scenario in ("sweep pull", "sweep push"):
        t = sweep_table(bench.runs, scenario)
        if t:
            out += [
                "",
                f"#### {'Pulls' if scenario == 'sweep pull' else 'Pushes'} against concurrency",
                "",
                t,
            ]
    errors = [e for r in bench.runs for e in r.error_samples]
    if errors:
        out += ["", "Errors (first of each run):", ""]
        out += [
            f"- {r.scenario} {r.server} round {r.round_no}: {r.error_samples[0]}"
            for r in bench.runs
            if r.error_samples
        ]
    out += [f"- {n}" for n in bench.notes]
    return "\n".join(out) + "\n"


def to_json(bench: Bench, desc: dict[str, str], took: float) -> dict[str, Any]:
    return {
        "machine": desc,
        "params": {k: v for k, v in vars(bench.p).items()},
        "took_s": took,
        "runs": [
            {
                "scenario": r.scenario,
                "server": r.server,
                "clients": r.clients,
                "round": r.round_no,
                "ops": r.ops,
                "errors": r.errors,
                "error_samples": r.error_samples,
                "wall_s": r.wall,
                "ops_per_s": r.ops_per_s,
                "mib_per_s": r.mib_per_s,
                "p50_ms": None if not r.latencies else percentile(r.latencies, 50) * 1000,
                "p99_ms": None if not r.latencies else percentile(r.latencies, 99) * 1000,
                "skipped_uploads": r.skipped_uploads,
                "peak_rss_kib": r.peak_rss_kib,
                "peak_pss_kib": r.peak_pss_kib,
                "processes_peak_rss_kib": r.processes,
                "server_cores": r.cores,
                "client_cores": r.client_cores,
                "latencies_s": r.latencies,
            }
            for r in bench.runs
        ],
    }


# -- the command --------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.load_scale",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[2],
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1 round (smoke run)")
    parser.add_argument(
        "--only", help=f"comma-separated scenarios (default all): {','.join(SCENARIOS)}"
    )
    parser.add_argument("--rounds", type=int, help="rounds of scenarios 3 and 4 (default 3)")
    parser.add_argument("--images", type=int, help="different images to pull (default 200)")
    parser.add_argument("--workdir", type=Path, help="stores, logs, RGW (default $TMPDIR)")
    parser.add_argument(
        "--one-address",
        action="store_true",
        help="every client from 127.0.0.1 (as behind one NAT) instead of one address each",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--output", type=Path, help="write the markdown report here")
    parser.add_argument("--json", type=Path, help="write every measured value here")
    parser.add_argument("--plot", type=Path, help="PNG of the sweeps (needs matplotlib)")
    return parser.parse_args(argv)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    p = Params.quick() if args.quick else Params()
    if args.rounds:
        p.rounds = args.rounds
    if args.images:
        p.images = p.pull_clients = args.images
    global ONE_ADDRESS
    ONE_ADDRESS = args.one_address
    only = set(args.only.split(",")) if args.only else set(SCENARIOS)
    if only - set(SCENARIOS):
        print(f"unknown scenarios: {', '.join(sorted(only - set(SCENARIOS)))}", file=sys.stderr)
        return 2
    for binary in ["docker-registry"] + (["radosgw", "redis-server"] if "s3" in only else []):
        if shutil.which(binary) is None:
            print(f"load_scale: {binary} is not installed", file=sys.stderr)
            return 2
    args.load_at_start = loadavg()
    desc = machine(args.workdir or Path(tempfile.gettempdir()))  # what the servers start with
    work = Path(tempfile.mkdtemp(prefix="dockyard-load-", dir=args.workdir))
    bench = Bench(p, work)
    # SIGTERM ends like Ctrl-C: servers stopped (their process groups), work directory removed
    signal.signal(signal.SIGTERM, _interrupt)
    t0 = time.monotonic()
    status = 0
    try:
        if only & {"pulls", "sweep"}:
            bench.pulls(sweep="sweep" in only, scenario3="pulls" in only)
        if only & {"pushes", "sweep"}:
            bench.pushes(sweep="sweep" in only, scenario4="pushes" in only)
        if "s3" in only:
            bench.s3()
    except KeyboardInterrupt:
        print("interrupted: what was measured so far follows", file=sys.stderr)
        status = 130
    except BenchError as e:
        print(f"load_scale: {e}", file=sys.stderr)
        status = 1
    finally:
        kill_all()
        if not args.keep:
            subprocess.run(["rm", "-rf", str(work)], check=False)
        else:
            print(f"kept {work}", file=sys.stderr)
    took = time.monotonic() - t0
    # The tree may change during a run (a shared working tree): say so if it did.
    end = machine(args.workdir or Path(tempfile.gettempdir()))
    for key in ("commit", "src fingerprint"):
        if end[key] != desc[key]:
            desc[f"{key} at the end (changed during the run)"] = end[key]
    text = report(bench, desc, args, took)
    print("\n" + text)
    if args.output:
        args.output.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(to_json(bench, desc, took), indent=1))
    if args.plot and not plot(bench.runs, args.plot):
        print("no plot: matplotlib missing or no sweep run", file=sys.stderr)
    if status == 0 and any(r.errors for r in bench.runs if r.server == DOCKYARD):
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
