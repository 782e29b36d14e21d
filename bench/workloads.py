"""The workload groups ``compare.py`` runs against both servers on the filesystem
(docs/performance.md, "The workloads"); ``bench.rgw`` reuses some of them on S3."""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import random
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench.clients import (
    MANIFEST_ACCEPT,
    ab_head,
    curl_download,
    curl_upload,
    expect,
    request,
    run_tool,
    upload_bytes,
    wrk,
)
from bench.content import (
    Filler,
    Layout,
    delete_from_store,
    make_layout,
    shuffled_tags,
    write_catalog_store,
)
from bench.machine import fstype
from bench.servers import BenchError, Server
from bench.suite import GiB, Metric, MiB, Params, Suite, remove_tree, settle, size_text
from harness.client import OCI_MANIFEST, sha256
from harness.workloads import oci_manifest

BENCH_USER, BENCH_PASSWORD = "bench", "bench-password"
SUITE_KEYS = ["blob", "large", "small", "requests", "auth", "big", "catalog"]


class BlobSuite(Suite):
    """(1) monolithic upload of a 1 GiB blob with curl, (2) its download with curl."""

    key = "blob"

    def __init__(self, params: Params, work: Path) -> None:
        super().__init__(params, work)
        size = size_text(params.blob_bytes)
        self.title = f"{size} blob"
        self.upload = Metric(
            "upload", f"Upload {size} blob (POST + `curl -T` PUT)", "MiB/s", True, 3.0, "≥3x"
        )
        self.download = Metric(
            "download", f"Download {size} blob (curl)", "MiB/s", True, 1.0, "≥1x"
        )
        self.metrics = [self.upload, self.download]
        self.file = work / "blob.bin"
        self.digest = ""
        self.stored: dict[str, tuple[str, str]] = {}  # server -> (repo, digest)

    def prepare(self) -> None:
        filler = Filler()
        with open(self.file, "wb") as f:
            for chunk in filler.chunks(self.params.blob_bytes, b"blob"):
                f.write(chunk)

    def before_round(self, metric: Metric, round_no: int) -> None:
        if metric is not self.upload:
            return
        # A different blob every round (registry:2 and Dockyard skip storing a blob they have).
        with open(self.file, "r+b") as f:
            f.write(hashlib.sha256(os.urandom(32)).digest())
            f.seek(0)
            self.digest = "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()

    def run(self, metric: Metric, server: Server, round_no: int) -> float:
        size = self.params.blob_bytes
        if metric is self.upload:
            repo = f"bench/blob-{round_no}"
            seconds = curl_upload(server, repo, self.file, self.digest, size)
            self.stored[server.name] = (repo, self.digest)
        else:
            if server.name not in self.stored:
                raise BenchError("nothing to download: the upload failed")
            repo, digest = self.stored[server.name]
            seconds = curl_download(server, repo, digest, size)
        return size / MiB / seconds

    def after_run(self, metric: Metric, server: Server, round_no: int) -> None:
        settle()


class SkopeoSuite(Suite):
    """(3, 4) skopeo copy oci: → docker:// (a fresh repository each time), then docker:// →
    dir: (a fresh directory each time)."""

    def __init__(
        self, params: Params, work: Path, key: str, layer_sizes: list[int], label: str, target: str
    ) -> None:
        super().__init__(params, work)
        self.key = key
        self.layer_sizes = layer_sizes
        self.title = f"skopeo, {label}"
        push_target, pull_target = {"large": ((1.2, "≥1.2x"), (1.0, "≥1x"))}.get(
            target, ((1.0, "≥1x (no slower)"), (1.0, "≥1x (no slower)"))
        )
        self.push = Metric("push", f"skopeo push, {label}", "s", False, *push_target)
        self.pull = Metric("pull", f"skopeo pull, {label}", "s", False, *pull_target)
        self.metrics = [self.push, self.pull]
        self.filler: Filler | None = None
        self.layout: Layout | None = None
        self.pushed: dict[tuple[str, int], str] = {}  # (server, round) -> repository

    def prepare(self) -> None:
        self.filler = Filler()

    def before_round(self, metric: Metric, round_no: int) -> None:
        if metric is not self.push:
            return
        # Fresh layers every round: nothing is already there to skip or mount.
        path = self.work / "layout"
        shutil.rmtree(path, ignore_errors=True)
        assert self.filler is not None
        self.layout = make_layout(path, self.layer_sizes, self.filler, os.urandom(16))

    def run(self, metric: Metric, server: Server, round_no: int) -> float:
        if metric is self.push:
            assert self.layout is not None
            repo = f"bench/{self.key}-{round_no}"
            args = ["skopeo", "copy", "--quiet", "--dest-tls-verify=false"]
            args += self._creds(server, "--dest-creds")
            args += [
                f"oci:{self.layout.path}:{self.layout.tag}",
                f"docker://{server.host}/{repo}:v1",
            ]
            t0 = time.monotonic()
            run_tool(args, "skopeo push", timeout=3600)
            seconds = time.monotonic() - t0
            self.pushed[(server.name, round_no)] = repo
            return seconds
        repo = self.pushed.get((server.name, round_no))
        if repo is None:
            raise BenchError("nothing to pull: the push failed")
        out = self.work / f"pull-{server.slug}"
        shutil.rmtree(out, ignore_errors=True)
        args = ["skopeo", "copy", "--quiet", "--src-tls-verify=false"]
        args += self._creds(server, "--src-creds")
        args += [f"docker://{server.host}/{repo}:v1", f"dir:{out}"]
        t0 = time.monotonic()
        run_tool(args, "skopeo pull", timeout=3600)
        seconds = time.monotonic() - t0
        blobs = [p for p in out.iterdir() if p.name not in ("manifest.json", "version")]
        if len(blobs) != len(self.layer_sizes) + 1:
            raise BenchError(f"skopeo pull: {len(blobs)} blobs in {out}, wanted config + layers")
        return seconds

    @staticmethod
    def _creds(server: Server, flag: str) -> list[str]:
        return [flag, f"{BENCH_USER}:{BENCH_PASSWORD}"] if server.authorization else []

    def after_run(self, metric: Metric, server: Server, round_no: int) -> None:
        if metric is self.pull:
            shutil.rmtree(self.work / f"pull-{server.slug}", ignore_errors=True)
        settle()


class RequestsSuite(Suite):
    """(5, 6) HEAD and GET of a manifest by tag and GET of a tag list, many connections."""

    def __init__(self, params: Params, work: Path, auth: bool) -> None:
        super().__init__(params, work)
        self.auth = auth
        self.key = "auth" if auth else "requests"
        self.title = "small requests, htpasswd auth" if auth else "small requests, no auth"
        suffix = ", htpasswd" if auth else ""
        target = (5.0, "≥5x") if auth else (2.0, "≥2x")
        c = params.connections
        self.head = Metric(
            "head", f"HEAD manifest by tag{suffix} ({c} conns)", "req/s", True, *target
        )
        self.get = Metric("get", f"GET manifest by tag{suffix} ({c} conns)", "req/s", True, *target)
        self.tags = Metric("tags", f"GET tag list{suffix} ({c} conns)", "req/s", True, *target)
        self.metrics = [self.head, self.get, self.tags]
        self.repo = "bench/small"

    @property
    def htpasswd(self) -> Path | None:
        return self.work / "htpasswd" if self.auth else None

    @property
    def authorization(self) -> str | None:
        if not self.auth:
            return None
        return "Basic " + base64.b64encode(f"{BENCH_USER}:{BENCH_PASSWORD}".encode()).decode()

    def prepare(self) -> None:
        if self.auth:
            # Apache's htpasswd, bcrypt at its default cost (5), as the classic recipe does.
            out = run_tool(
                ["htpasswd", "-Bbn", BENCH_USER, BENCH_PASSWORD], "htpasswd", timeout=60
            ).stdout
            assert self.htpasswd is not None
            self.htpasswd.write_text(out.strip() + "\n")
            cost = out.split("$")[2] if out.count("$") >= 3 else "?"
            self.notes.append(f"htpasswd -Bbn: bcrypt cost {cost}")

    def setup(self, server: Server) -> None:
        config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {}}).encode()
        layer = os.urandom(1024)
        upload_bytes(server, self.repo, config)
        upload_bytes(server, self.repo, layer)
        manifest = oci_manifest(config, [layer])
        for tag in ["latest", *(f"v{i}" for i in range(1, 10))]:
            r = request(
                server,
                "PUT",
                f"/v2/{self.repo}/manifests/{tag}",
                manifest,
                {"Content-Type": OCI_MANIFEST},
            )
            expect(r, 201, f"PUT manifest {tag}")
        r = request(
            server, "HEAD", f"/v2/{self.repo}/manifests/latest", headers={"Accept": MANIFEST_ACCEPT}
        )
        expect(r, 200, "HEAD manifest")
        if r.headers.get("Docker-Content-Digest") != sha256(manifest):
            raise BenchError(f"HEAD manifest: digest {r.headers.get('Docker-Content-Digest')}")
        tags = json.loads(
            expect(request(server, "GET", f"/v2/{self.repo}/tags/list"), 200, "tags").body
        )
        if len(tags["tags"]) != 10:
            raise BenchError(f"tag list: {tags}")

    def run(self, metric: Metric, server: Server, round_no: int) -> float:
        if metric is self.head:
            return self._ab_head(server, f"{server.url}/v2/{self.repo}/manifests/latest")
        path = "manifests/latest" if metric is self.get else "tags/list"
        return self._wrk(server, f"{server.url}/v2/{self.repo}/{path}")

    def _headers(self, server: Server) -> dict[str, str]:
        headers = {"Accept": MANIFEST_ACCEPT}
        if server.authorization:
            headers["Authorization"] = server.authorization
        return headers

    def _wrk(self, server: Server, url: str) -> float:
        p = self.params
        rate, errors = wrk(
            url,
            self._headers(server),
            threads=p.wrk_threads,
            connections=p.connections,
            seconds=p.http_seconds,
            script=self.work / "wrk.lua",
        )
        if errors:
            self.notes.append(f"{server.name}, wrk {urlsplit(url).path}: socket errors {errors}")
        return rate

    def _ab_head(self, server: Server, url: str) -> float:
        # wrk 4.1 cannot do HEAD, so HEAD goes through ApacheBench with keep-alive, the same
        # connections and duration.
        p = self.params
        rate, failed = ab_head(
            url,
            self._headers(server),
            connections=p.connections,
            seconds=p.http_seconds,
            most=p.head_requests,
        )
        if failed:
            self.notes.append(f"{server.name}, ab HEAD: {failed} failed requests")
        return rate


class BigUploadSuite(Suite):
    """(7) peak server memory while a blob of --big-gib GiB (a sparse file of zeros) is
    uploaded with POST + ``curl -T`` PUT."""

    key = "big"

    def __init__(self, params: Params, work: Path) -> None:
        super().__init__(params, work)
        size = size_text(params.big_bytes)
        self.title = f"{size} upload"
        self.upload = Metric(
            "upload",
            f"Upload {size} blob (throughput; peak RSS is the point)",
            "MiB/s",
            True,
            None,
            "RSS <150 MB, flat",
            memory_limit_mb=150.0,
            timeline=True,
        )
        self.metrics = [self.upload]
        self.file = work / "big.bin"
        self.digest = ""

    def rounds(self, metric: Metric) -> int:
        return self.params.big_rounds

    def prepare(self) -> None:
        with open(self.file, "wb") as f:
            f.truncate(self.params.big_bytes)  # sparse: reading it costs no disk I/O
        zeros = bytes(64 * MiB)
        h, left = hashlib.sha256(), self.params.big_bytes
        while left:
            n = min(left, len(zeros))
            h.update(memoryview(zeros)[:n])
            left -= n
        self.digest = "sha256:" + h.hexdigest()

    def run(self, metric: Metric, server: Server, round_no: int) -> float:
        repo = f"bench/big-{round_no}"
        seconds = curl_upload(server, repo, self.file, self.digest, self.params.big_bytes)
        return self.params.big_bytes / MiB / seconds

    def after_run(self, metric: Metric, server: Server, round_no: int) -> None:
        delete_from_store(server.root, f"bench/big-{round_no}", self.digest)
        settle()


class CatalogSuite(Suite):
    """(8) catalog of 10,000 repositories and a tag list of 100,000 tags, from a store written
    directly on disk in registry:2's layout."""

    key = "catalog"

    def __init__(self, params: Params, work: Path) -> None:
        super().__init__(params, work)
        repos, tags = params.catalog_repos, params.big_tags
        self.title = f"catalog ({repos:,} repos), tags ({tags:,})"
        self.catalog = Metric(
            "catalog",
            f"GET /v2/_catalog?n=10000, {repos:,} repos (all pages)",
            "s",
            False,
        )
        self.tags = Metric("tags", f"GET tags/list, {tags:,} tags", "s", False)
        self.metrics = [self.catalog, self.tags]
        self.big_repo = "bench/many-tags"
        self.store_base = work / "stores"

    def prepare(self) -> None:
        # A few hundred thousand small files and directories: on this kind of disk (ext4 mounted
        # with discard, in a VM) writing them takes minutes and deleting them far longer, so
        # they go to tmpfs when there is one with room (both servers alike; --catalog-on-disk
        # keeps them in the work directory).
        self.store_base = self.work / "stores"
        shm = Path("/dev/shm")
        if self.params.catalog_tmpfs and shm.is_dir():
            st = os.statvfs(shm)
            if st.f_bavail * st.f_frsize > 8 * GiB:
                self.store_base = Path(tempfile.mkdtemp(prefix="dockyard-bench-", dir=shm))
        self.notes.append(f"catalog stores in {self.store_base} ({fstype(self.store_base)})")

    def storage(self, slug: str) -> Path:
        return self.store_base / slug

    def cleanup(self) -> None:
        remove_tree(self.store_base)
        super().cleanup()

    @property
    def extra_config(self) -> dict[str, Any]:
        # registry:2 answers n above catalog.maxentries (default 1000) with 400
        # PAGINATION_NUMBER_INVALID; Dockyard would lower n. Both get the same limit.
        return {"catalog": {"maxentries": 10_000}}

    def populate(self, root: Path) -> None:
        t0 = time.monotonic()
        repos = [f"org-{i // 100:03d}/repo-{i:05d}" for i in range(self.params.catalog_repos)]
        tags = {self.big_repo: shuffled_tags(self.params.big_tags)}
        write_catalog_store(root, [*repos, self.big_repo], tags)
        self.notes.append(f"{root}: store written in {time.monotonic() - t0:.0f} s")

    def run(self, metric: Metric, server: Server, round_no: int) -> float:
        if metric is self.catalog:
            start, key, want = "/v2/_catalog?n=10000", "repositories", self.params.catalog_repos + 1
        else:
            start, key, want = f"/v2/{self.big_repo}/tags/list", "tags", self.params.big_tags
        times = []
        for _ in range(self.params.list_requests):
            seconds, items, pages = self._walk(server, start, key)
            if len(items) != want or len(set(items)) != want:
                raise BenchError(f"{start}: {len(items)} {key} in {pages} pages, wanted {want}")
            times.append(seconds)
        if round_no == 0:
            self.notes.append(f"{server.name}, {start}: {pages} page(s)")
        return statistics.median(times)

    @staticmethod
    def _walk(server: Server, url: str, key: str) -> tuple[float, list[str], int]:
        """Every page, following ``Link`` headers, on one kept-alive connection."""
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=300)
        items: list[str] = []
        pages = 0
        try:
            t0 = time.monotonic()
            next_url: str | None = url
            while next_url:
                r = expect(request(server, "GET", next_url, conn=conn), 200, f"GET {next_url}")
                items += json.loads(r.body)[key] or []
                pages += 1
                link = r.headers.get("Link")
                match = re.match(r"\s*<([^>]+)>", link) if link else None
                next_url = match.group(1) if match else None
            return time.monotonic() - t0, items, pages
        finally:
            conn.close()


def large_skopeo_suite(
    params: Params, work: Path, cls: type[SkopeoSuite] = SkopeoSuite
) -> SkopeoSuite:
    """skopeo push and pull of the 4 x 256 MiB image (filesystem and S3)."""
    label = f"{params.large_layers} x {size_text(params.large_layer_bytes)} layers"
    layers = [params.large_layer_bytes] * params.large_layers
    return cls(params, work / "large", "large", layers, label, "large")


def suites(params: Params, work: Path, only: set[str] | None) -> list[Suite]:
    rng = random.Random(64)
    small = [
        rng.randint(params.small_layer_min, params.small_layer_max)
        for _ in range(params.small_layers)
    ]
    all_suites: list[Suite] = [
        BlobSuite(params, work / "blob"),
        large_skopeo_suite(params, work),
        SkopeoSuite(
            params,
            work / "small",
            "small",
            small,
            f"{params.small_layers} layers of {size_text(params.small_layer_min)}-"
            f"{size_text(params.small_layer_max)}",
            "small",
        ),
        RequestsSuite(params, work / "requests", auth=False),
        RequestsSuite(params, work / "auth", auth=True),
    ]
    if params.big_bytes:
        all_suites.append(BigUploadSuite(params, work / "big"))
    all_suites.append(CatalogSuite(params, work / "catalog"))
    if only:
        all_suites = [s for s in all_suites if s.key in only]
    return all_suites
