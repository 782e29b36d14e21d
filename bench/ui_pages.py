"""Server time per web UI page, p50/p95/p99 (a benchmark, not a test).

    python bench/ui_pages.py                  # 10,000 repositories, 5,000 tags, 200 requests a page
    python bench/ui_pages.py --quick          # smoke run (CI): 500 repositories, 200 tags, 10 each
    python bench/ui_pages.py --output ui.md --json ui.json --workers 2

Writes one store in registry:2's layout directly on disk (in /dev/shm when it has room):
``--repos`` repositories ``org-NNN/repo-NNNNN`` of 1-3 images each (their own config, 1-4
layers from a pool of 48 blobs of 512 B-2 MiB, tags ``v1.0.K`` and ``latest``, push times spread
over a year), and ``bench/many-tags`` with ``--tags`` tags (``build-NNNNN``, ``v1.M.P``, ten
``v2.0.0-rc.N``), each its own manifest, every tenth an OCI index of two platforms. Then
``dockyard reindex CONFIG`` builds the metadata index, ``dockyard serve`` starts on a free
loopback port (``--workers``, default 1; no auth: every page is open), and the benchmark waits
until the server is idle (its index verification, one second after start, reads the whole
layout). The pages, each fetched once to find its URL (a later page by following the HTML's
``rel="next"`` link to the middle of the listing) and checked:

- ``/ui/`` first page; a later page; sorted by name (``sort=name&order=asc``), by size and by
  last push (descending); a search ``q=`` that few names match (it reads every name);
- ``/ui/r/bench/many-tags`` first page; a later page; a filter ``q=`` that 10 tags match (it
  reads every tag); one tag's page; one image's manifest page; one index's manifest page;
- ``/ui/usage``, first page (which holds ``bench/many-tags``) and page 2.

Requests go one after another over one keep-alive connection (``requests``), round-robin over
the pages (so noise spreads over all of them): ``--warmup`` rounds, then ``--requests`` rounds
measured. Server time is the access log's ``duration_ms`` (aiohttp's, from the request's start
to the end of the response; uvloop's clock, so whole milliseconds); client time is the round
trip as the client sees it. Also shown: the server's CPU per request (``/proc``, clock ticks
summed per request: an average) and the CPU that other processes took meanwhile. Target (the
issue): p95 under 50 ms on 2 cores.
"""

from __future__ import annotations

import argparse
import hashlib
import html
import json
import math
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the bench package

import bench  # puts the test harness on sys.path; bench.ROOT
from bench.procstat import TICKS, cpu_snapshot, cpu_ticks, process_tree
from dockyard.oci.digest import Digest
from dockyard.registry import layout
from harness.dockyard import DockyardProcess, write_config
from harness.net import free_port

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
BIG = "bench/many-tags"
#: the issue's target for every page
TARGET_P95_MS = 50.0
#: what the search and the filter look for: few repositories' names and ten tags hold it
SEARCH = "-0042"
FILTER = "-rc."
DAY = 86400.0


# -- the store ------------------------------------------------------------------------------------


@dataclass
class Store:
    """What was written, and what the pages need of it."""

    root: Path
    repos: int = 0
    tags: int = 0  # tags in all
    big_tags: int = 0
    manifests: int = 0
    blobs: int = 0
    files: int = 0
    directories: int = 0
    blob_bytes: int = 0
    search_matches: int = 0
    filter_matches: int = 0
    image_tag: str = ""
    image_digest: str = ""
    index_digest: str = ""


class Writer:
    """registry:2's layout under ``root``, written with plain system calls (a few hundred
    thousand entries), each blob once."""

    def __init__(self, root: Path, store: Store) -> None:
        self.root = str(root)
        self.store = store
        self.written: set[str] = set()
        self.made: set[str] = set()

    def _mkdirs(self, path: str) -> None:
        if path in self.made:
            return
        parent = os.path.dirname(path)
        if parent not in self.made and not os.path.isdir(parent):
            self._mkdirs(parent)
        try:
            os.mkdir(path)
            self.store.directories += 1
        except FileExistsError:
            pass
        self.made.add(path)

    def _write(self, path: str, data: bytes, mtime: float | None = None) -> None:
        """``path``: one of ``registry.layout``'s, under the store's root."""
        path = self.root + path
        self._mkdirs(os.path.dirname(path))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        if mtime is not None:
            os.utime(path, (mtime, mtime))
        self.store.files += 1

    def blob(self, data: bytes) -> dict[str, Any]:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if digest not in self.written:
            self._write(layout.blob_data(Digest.parse(digest)), data)
            self.written.add(digest)
            self.store.blobs += 1
            self.store.blob_bytes += len(data)
        return {"digest": digest, "size": len(data)}

    def layer(self, repo: str, digest: str) -> None:
        self._write(layout.layer_link(repo, Digest.parse(digest)), digest.encode())

    def revision(self, repo: str, digest: str, pushed: float) -> None:
        self._write(layout.revision_link(repo, Digest.parse(digest)), digest.encode(), pushed)

    def tag(self, repo: str, tag: str, digest: str, pushed: float) -> None:
        parsed = Digest.parse(digest)
        self._write(layout.tag_current_link(repo, tag), digest.encode(), pushed)
        self._write(layout.tag_index_link(repo, tag, parsed), digest.encode(), pushed)
        self.store.tags += 1


def image_config(
    rng: random.Random, repo: str, build: str, layers: list[dict[str, Any]], arch: str = "amd64"
) -> bytes:
    """An image config of the usual shape: labels, env, entrypoint, a history step per layer
    and empty steps between."""
    history: list[dict[str, Any]] = []
    for i, layer in enumerate(layers):
        history.append(
            {
                "created": "2026-01-01T00:00:00Z",
                "created_by": f"/bin/sh -c #(nop) COPY dir:{layer['digest'][7:23]} in /opt/{i} ",
            }
        )
        history.append(
            {"created": "2026-01-01T00:00:00Z", "created_by": f"ENV STEP={i}", "empty_layer": True}
        )
    config = {
        "created": "2026-01-01T00:00:00Z",
        "architecture": arch,
        "os": "linux",
        "config": {
            "Env": [
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                f"BUILD={build}",
            ],
            "Entrypoint": ["/usr/local/bin/app"],
            "Cmd": ["--listen", ":8080"],
            "ExposedPorts": {"8080/tcp": {}},
            "WorkingDir": "/srv",
            "Labels": {
                "org.opencontainers.image.title": repo,
                "org.opencontainers.image.version": build,
                "org.opencontainers.image.revision": f"{rng.getrandbits(160):040x}",
            },
        },
        "rootfs": {
            "type": "layers",
            "diff_ids": [
                "sha256:" + hashlib.sha256(d["digest"].encode()).hexdigest() for d in layers
            ],
        },
        "history": history,
    }
    return json.dumps(config, indent=None).encode()


def write_image(
    w: Writer,
    rng: random.Random,
    pool: list[bytes],
    repo: str,
    build: str,
    pushed: float,
    arch: str = "amd64",
) -> str:
    """An image (its own config, 1-4 layers of the pool) in ``repo``: its blobs, layer links
    and revision link; returns the manifest's digest."""
    layers = [w.blob(data) for data in rng.sample(pool, rng.randint(1, 4))]
    config = w.blob(image_config(rng, repo, build, layers, arch))
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, **config},
        "layers": [{"mediaType": OCI_LAYER, **layer} for layer in layers],
        "annotations": {"org.opencontainers.image.created": "2026-01-01T00:00:00Z"},
    }
    digest = w.blob(json.dumps(manifest).encode())["digest"]
    for d in [config, *layers]:
        w.layer(repo, d["digest"])
    w.revision(repo, digest, pushed)
    w.store.manifests += 1
    return digest


def write_index(
    w: Writer, rng: random.Random, pool: list[bytes], repo: str, build: str, pushed: float
) -> str:
    platforms = [("amd64", None), ("arm64", "v8")]
    entries = []
    for arch, variant in platforms:
        child = write_image(w, rng, pool, repo, f"{build}-{arch}", pushed, arch)
        size = os.path.getsize(w.root + layout.blob_data(Digest.parse(child)))
        platform_ = {"architecture": arch, "os": "linux"}
        if variant:
            platform_["variant"] = variant
        entries.append(
            {"mediaType": OCI_MANIFEST, "digest": child, "size": size, "platform": platform_}
        )
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
    digest = w.blob(json.dumps(index).encode())["digest"]
    w.revision(repo, digest, pushed)
    w.store.manifests += 1
    return digest


def big_tag_names(count: int) -> list[str]:
    """``count`` tags: ten release candidates ``v2.0.0-rc.N`` (what the filter finds), one
    release ``v1.M.P`` in fifty, builds ``build-NNNNN`` for the rest; in push order."""
    rc = min(10, count)
    releases = (count - rc) // 50
    builds = count - rc - releases
    names = [f"build-{i:05d}" for i in range(builds)]
    # releases every fiftieth push, the candidates at the end
    for i in range(releases):
        names.insert(min(len(names), (i + 1) * 50), f"v1.{i // 10}.{i % 10}")
    return names + [f"v2.0.0-rc.{i}" for i in range(rc)]


def write_store(root: Path, repos: int, tags: int, seed: int = 0) -> Store:
    store = Store(root)
    w = Writer(root, store)
    rng = random.Random(seed)
    now = time.time()
    # the layer pool: sizes spread from 512 B to 2 MiB (log-uniform), so repositories' sizes
    # differ
    pool = [b"\x1f\x8b" + rng.randbytes(int(2 ** rng.uniform(9, 21))) for _ in range(48)]
    for i in range(repos):
        name = f"org-{i // 100:03d}/repo-{i:05d}"
        latest = now - rng.uniform(0, 365) * DAY
        count = rng.randint(1, 3)
        digest = ""
        for k in range(count):
            pushed = latest - (count - 1 - k) * rng.uniform(0.1, 30) * DAY
            digest = write_image(w, rng, pool, name, f"1.0.{k}", pushed)
            w.tag(name, f"v1.0.{k}", digest, pushed)
        w.tag(name, "latest", digest, latest)
        store.repos += 1
        if SEARCH in name:
            store.search_matches += 1
    names = big_tag_names(tags)
    start = now - 200 * DAY
    for n, tag in enumerate(names):
        pushed = start + n * (199 * DAY / max(1, len(names)))
        if n % 10 == 9:
            digest = write_index(w, rng, pool, BIG, tag, pushed)
            if not store.index_digest or tag.startswith("v1."):
                store.index_digest = digest
        else:
            digest = write_image(w, rng, pool, BIG, tag, pushed)
            if tag.startswith("v1.") or not store.image_tag:
                store.image_tag, store.image_digest = tag, digest
        w.tag(BIG, tag, digest, pushed)
        if FILTER in tag:
            store.filter_matches += 1
    store.repos += 1
    store.big_tags = len(names)
    return store


# -- the server -----------------------------------------------------------------------------------


def server_overrides() -> dict[str, Any]:
    """The configuration (besides the harness's defaults: filesystem storage in the store,
    deletes on, ``http.secret`` set, 127.0.0.1): JSON log lines, the access log on."""
    return {"log": {"level": "info", "formatter": "json"}}


def reindex(config: Path) -> tuple[float, int]:
    """``dockyard reindex CONFIG``: its seconds (process start included) and the number of
    repositories it indexed."""
    started = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "dockyard", "reindex", str(config), "--json"],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    took = time.perf_counter() - started
    if out.returncode != 0:
        raise SystemExit(f"dockyard reindex failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return took, len(json.loads(out.stdout)["repositories"])


def wait_idle(pid: int, quiet: float, timeout: float = 1800.0) -> tuple[float, float]:
    """Until the server's processes have used (almost) no CPU for ``quiet`` seconds, that
    window beginning at least 1.5 s after now (the server's index verification begins 1 s
    after it is ready); returns the seconds from now to the last busy sample and the CPU
    seconds the server used meanwhile (its verification)."""
    start = time.monotonic()
    first = cpu_ticks(process_tree(pid))
    ticks, last_busy = first, start
    deadline = start + timeout
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now_ticks = cpu_ticks(process_tree(pid))
        now = time.monotonic()
        if now_ticks - ticks > 1:  # more than 10 ms of CPU in 100 ms
            last_busy = now
        ticks = now_ticks
        if now - max(last_busy, start + 1.5) >= quiet:
            return last_busy - start, (ticks - first) / TICKS
    raise SystemExit("the server did not become idle")


# -- the pages ------------------------------------------------------------------------------------


@dataclass
class Page:
    label: str
    url: str  # path and query
    #: what the page must hold (a check that it is the page meant)
    expect: list[str] = field(default_factory=list)
    rows: int | None = None  # the number of table rows it must show (None: not checked)
    server_ms: list[float] = field(default_factory=list)
    client_ms: list[float] = field(default_factory=list)
    cpu_ticks: int = 0
    bytes: int = 0


_NEXT = re.compile(r'<a rel="next" href="([^"]+)"')


def next_link(body: str) -> str | None:
    found = _NEXT.search(body)
    return html.unescape(found.group(1)) if found else None


def repo_rows(body: str) -> int:
    return body.count('<td><a href="')


def tag_rows(body: str) -> int:
    return body.count('<input type="checkbox" name="tag" value=')


def follow(session: requests.Session, base: str, url: str, times: int) -> str:
    """The URL ``times`` rel="next" links after ``url``."""
    for _ in range(times):
        r = session.get(base + url)
        r.raise_for_status()
        found = next_link(r.text)
        if found is None:
            raise SystemExit(f"{url}: no rel=next link")
        url = found
    return url


def pages(session: requests.Session, base: str, store: Store) -> list[Page]:
    repo_pages = store.repos // 50
    tag_pages = store.big_tags // 50
    big = quote(BIG)
    first = f"/ui/r/{big}"
    return [
        Page("repositories, first page", "/ui/", ["org-000/repo-00000"], 50),
        Page(
            f"repositories, page {repo_pages // 2 + 1} (rel=next)",
            follow(session, base, "/ui/", repo_pages // 2),
            [],
            50,
        ),
        Page("repositories, sort=name asc", "/ui/?sort=name&order=asc", ["repo-00000"], 50),
        Page("repositories, sort=size desc", "/ui/?sort=size&order=desc", [], 50),
        Page("repositories, sort=pushed desc", "/ui/?sort=pushed&order=desc", [], 50),
        Page(
            f"repositories, q={SEARCH} ({store.search_matches} match)",
            f"/ui/?q={SEARCH}",
            [f"repo-{SEARCH[1:]}"],
            store.search_matches,
        ),
        Page(f"tags of {BIG}, first page", first, ["build-00000"], 50),
        Page(
            f"tags, page {tag_pages // 2 + 1} (rel=next)",
            follow(session, base, first, tag_pages // 2),
            [],
            50,
        ),
        Page(
            f"tags, q={FILTER} ({store.filter_matches} match)",
            f"{first}?q={FILTER}",
            ["v2.0.0-rc.0"],
            store.filter_matches,
        ),
        Page("tag page (image)", f"{first}/-/tag/{store.image_tag}", [store.image_digest]),
        Page(
            "manifest page (image)",
            f"{first}/-/manifest/{store.image_digest}",
            [store.image_digest],
        ),
        Page(
            "manifest page (index, 2 platforms)",
            f"{first}/-/manifest/{store.index_digest}",
            ["linux/arm64"],
        ),
        Page(f"usage, first page (holds {BIG})", "/ui/usage", [BIG, "org-000/repo-00000"]),
        Page("usage, page 2 (rel=next)", follow(session, base, "/ui/usage", 1), []),
    ]


def check(page: Page, r: requests.Response) -> None:
    if r.status_code != 200:
        raise SystemExit(f"{page.label}: {page.url} answered {r.status_code}: {r.text[:500]}")
    for text in page.expect:
        if text not in r.text:
            raise SystemExit(f"{page.label}: {page.url} does not show {text!r}")
    if page.rows is not None:
        counted = tag_rows(r.text) if "/ui/r/" in page.url else repo_rows(r.text)
        if counted != page.rows:
            raise SystemExit(f"{page.label}: {page.url} shows {counted} rows, not {page.rows}")


def access_lines(log: Path, offset: int) -> list[dict[str, Any]]:
    lines = []
    with open(log, "rb") as f:
        f.seek(offset)
        for raw in f:
            try:
                entry = json.loads(raw)
            except ValueError:
                continue
            if entry.get("logger") == "dockyard.access":
                lines.append(entry)
    return lines


def measure(
    session: requests.Session,
    base: str,
    server: DockyardProcess,
    all_pages: list[Page],
    warmup: int,
    rounds: int,
) -> dict[str, float]:
    for _ in range(warmup):
        for page in all_pages:
            r = session.get(base + page.url)
            check(page, r)
            page.bytes = len(r.content)
    time.sleep(0.2)
    offset = server.log_path.stat().st_size
    pids = process_tree(server.proc.pid)
    order: list[Page] = []
    machine_before = cpu_snapshot()
    started = time.perf_counter()
    for _ in range(rounds):
        for page in all_pages:
            ticks = cpu_ticks(pids)
            t0 = time.perf_counter()
            r = session.get(base + page.url)
            page.client_ms.append((time.perf_counter() - t0) * 1000)
            page.cpu_ticks += cpu_ticks(pids) - ticks
            if r.status_code != 200:
                check(page, r)
            order.append(page)
    elapsed = time.perf_counter() - started
    busy, ours = cpu_snapshot()
    server_cpu = sum(p.cpu_ticks for p in all_pages)
    time.sleep(0.5)  # the last lines reach the log
    lines = access_lines(server.log_path, offset)
    if len(lines) != len(order):
        raise SystemExit(f"{len(order)} requests but {len(lines)} access log lines")
    for page, entry in zip(order, lines, strict=True):
        fields = entry.get("fields", entry)
        if urlsplit(fields["path"]).path != urlsplit(page.url).path:
            raise SystemExit(f"log line {fields['path']} for the request of {page.url}")
        page.server_ms.append(float(fields["duration_ms"]))
    foreign = (busy - machine_before[0]) - (ours - machine_before[1])
    return {
        "seconds": elapsed,
        "requests": len(order),
        "server_cpu_cores": server_cpu / TICKS / elapsed,
        "other_cpu_cores": max(0.0, foreign / TICKS / elapsed),
    }


def pct(values: list[float], p: float) -> float:
    """Nearest rank."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


# -- the report -----------------------------------------------------------------------------------


def render(store: Store, info: dict[str, Any], all_pages: list[Page]) -> str:
    lines = [
        f"Web UI pages: {info['rounds']} requests per page after {info['warmup']} warm-up "
        f"rounds, one keep-alive connection, round-robin over the pages; Dockyard "
        f"`serve --workers {info['workers']}` ({info['code']}), {info['cpus']} CPUs, load average "
        f"{info['load_before']} at the start. Store: {store.repos:,} repositories, "
        f"{store.tags:,} tags ({store.big_tags:,} in {BIG}), {store.manifests:,} manifests, "
        f"{store.blobs:,} blobs ({store.blob_bytes / 2**20:.0f} MiB), {store.files:,} files "
        f"and {store.directories:,} directories on {info['fstype']}; written in "
        f"{info['write_s']:.1f} s, `dockyard reindex` {info['reindex_s']:.1f} s; the server "
        f"answered {info['start_s']:.1f} s after start and was then busy for "
        f"{info['verify_s']:.1f} s ({info['verify_cpu_s']:.1f} s of CPU: its index "
        f"verification), before the pages were requested.",
        "",
        "| page | server p50 | p95 | p99 | client p50 | p95 | p99 | server CPU/req | KiB "
        "| p95 < 50 ms |",
        "|:---|---:|---:|---:|---:|---:|---:|---:|---:|:---|",
    ]
    for page in all_pages:
        s, c = page.server_ms, page.client_ms
        met = "yes" if pct(s, 95) < TARGET_P95_MS else "**no**"
        cpu = page.cpu_ticks / TICKS * 1000 / len(c)
        lines.append(
            f"| {page.label} | {pct(s, 50):.1f} | {pct(s, 95):.1f} | {pct(s, 99):.1f} "
            f"| {pct(c, 50):.1f} | {pct(c, 95):.1f} | {pct(c, 99):.1f} | {cpu:.1f} "
            f"| {page.bytes / 1024:.0f} | {met} |"
        )
    m = info["measured"]
    lines += [
        "",
        f"Milliseconds. Server: the access log's duration_ms; client: the round trip "
        f"(requests). Measured {m['requests']} requests in {m['seconds']:.1f} s; the server "
        f"used {m['server_cpu_cores']:.2f} core, other processes {m['other_cpu_cores']:.2f} "
        f"core meanwhile.",
    ]
    return "\n".join(lines) + "\n"


def code_version() -> str:
    """The commit, and a hash of every file under src/ as it is now (the UI may be
    uncommitted and changing: the hash tells runs of different code apart)."""
    src = bench.ROOT / "src"
    digest = hashlib.sha256()
    for path in sorted(src.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            digest.update(str(path.relative_to(src)).encode() + b"\0" + path.read_bytes())
    head = subprocess.run(
        ["git", "-C", str(bench.ROOT), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return f"commit {head or '?'}, src/ {digest.hexdigest()[:12]}"


def fstype_of(path: Path) -> str:
    from bench.machine import fstype

    return f"{fstype(path)} ({path})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run (CI)")
    parser.add_argument("--repos", type=int, help="repositories (default 10,000; quick 500)")
    parser.add_argument("--tags", type=int, help=f"tags of {BIG} (default 5,000; quick 200)")
    parser.add_argument("--requests", type=int, help="measured per page (default 200; quick 10)")
    parser.add_argument("--warmup", type=int, help="warm-up rounds (default 10; quick 2)")
    parser.add_argument("--workers", type=int, default=1, help="server workers (default 1)")
    parser.add_argument("--workdir", type=Path, help="where the store goes (default /dev/shm)")
    parser.add_argument("--keep", action="store_true", help="keep the store and the server log")
    parser.add_argument("--output", type=Path, help="also write the report here")
    parser.add_argument("--json", type=Path, help="every measured value, as JSON")
    args = parser.parse_args()
    repos = args.repos or (500 if args.quick else 10_000)
    tags = args.tags or (200 if args.quick else 5_000)
    rounds = args.requests or (10 if args.quick else 200)
    warmup = args.warmup if args.warmup is not None else (2 if args.quick else 10)
    where = args.workdir
    if where is None and Path("/dev/shm").is_dir():
        free = shutil.disk_usage("/dev/shm").free
        where = Path("/dev/shm") if free > (512 << 20) + repos * (64 << 10) else None
    work = Path(tempfile.mkdtemp(prefix="dockyard-bench-ui-", dir=where))
    server = None
    try:
        info: dict[str, Any] = {
            "workers": args.workers,
            "cpus": os.cpu_count(),
            "rounds": rounds,
            "warmup": warmup,
            "python": platform.python_version(),
            "load_before": Path("/proc/loadavg").read_text().split()[0],
            "fstype": fstype_of(work),
            "code": code_version(),
        }
        t0 = time.perf_counter()
        store = write_store(work / "data", repos, tags)
        info["write_s"] = time.perf_counter() - t0
        print(f"store written in {info['write_s']:.1f} s", file=sys.stderr)
        port = free_port()
        overrides = server_overrides()
        config = work / "config.yml"
        write_config(config, work / "data", port, **overrides)
        info["reindex_s"], indexed = reindex(config)
        if indexed != store.repos:
            raise SystemExit(f"dockyard reindex indexed {indexed} repositories, not {store.repos}")
        print(f"dockyard reindex: {info['reindex_s']:.1f} s", file=sys.stderr)
        started = time.monotonic()
        server = DockyardProcess.launch(
            work, root=work / "data", workers=args.workers, port=port, **overrides
        )
        info["start_s"] = time.monotonic() - started
        info["verify_s"], info["verify_cpu_s"] = wait_idle(
            server.proc.pid, quiet=0.5 if args.quick else 2.0
        )
        print(
            f"server ready {info['start_s']:.1f} s after start, then busy "
            f"{info['verify_s']:.1f} s ({info['verify_cpu_s']:.1f} s of CPU)",
            file=sys.stderr,
        )
        session = requests.Session()
        session.trust_env = False
        base = server.url
        try:
            all_pages = pages(session, base, store)
            info["measured"] = measure(session, base, server, all_pages, warmup, rounds)
        except SystemExit:
            errors = [line for line in server.log().splitlines() if '"level": "error"' in line]
            print("server errors:\n" + "\n".join(errors[-5:]), file=sys.stderr)
            raise
        session.close()
        refreshed = [
            line for line in server.log().splitlines() if "index verification refreshed" in line
        ]
        info["verification_refreshed"] = refreshed
    finally:
        if server is not None:
            server.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}", file=sys.stderr)
    report = render(store, info, all_pages)
    print(report)
    if args.output:
        args.output.write_text(report)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "info": info,
                    "store": {k: v for k, v in vars(store).items() if k != "root"},
                    "pages": [
                        {
                            "label": p.label,
                            "url": p.url,
                            "server_ms": p.server_ms,
                            "client_ms": p.client_ms,
                            "server_cpu_ms": p.cpu_ticks / TICKS * 1000,
                            "bytes": p.bytes,
                        }
                        for p in all_pages
                    ],
                },
                indent=1,
            )
        )
    missed = [p.label for p in all_pages if pct(p.server_ms, 95) >= TARGET_P95_MS]
    if missed:
        print(f"p95 >= {TARGET_P95_MS:.0f} ms: {', '.join(missed)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
