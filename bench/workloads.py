"""The workloads ``compare.py`` runs against both servers.

A suite groups the measurements that share set-up (the 1 GiB blob is uploaded, then downloaded;
an image is pushed, then pulled). ``compare.py`` starts both servers for each suite on fresh
storage, restarts them before each measurement (so VmHWM covers that measurement only) and
calls, for every round and each server in turn, :meth:`Suite.run`, which returns one value.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import itertools
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import tempfile
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

from servers import BenchError, Server

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
MANIFEST_ACCEPT = ", ".join(
    [
        OCI_MANIFEST,
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    ]
)
BENCH_USER, BENCH_PASSWORD = "bench", "bench-password"
V2 = "docker/registry/v2"


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


# -- clients ------------------------------------------------------------------------------------


@dataclass
class Response:
    status: int
    headers: http.client.HTTPMessage
    body: bytes


def request(
    server: Server,
    method: str,
    url: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    conn: http.client.HTTPConnection | None = None,
) -> Response:
    """One HTTP request (on ``conn`` when given, which is kept open)."""
    parts = urlsplit(urljoin(server.url, url))
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    all_headers = dict(headers or {})
    if server.authorization:
        all_headers["Authorization"] = server.authorization
    own = conn is None
    if conn is None:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=300)
    try:
        conn.request(method, path, body=body, headers=all_headers)
        r = conn.getresponse()
        return Response(r.status, r.headers, r.read())
    finally:
        if own:
            conn.close()


def expect(r: Response, status: int, what: str) -> Response:
    if r.status != status:
        raise BenchError(f"{what}: HTTP {r.status} (wanted {status}): {r.body[:300]!r}")
    return r


def start_upload(server: Server, repo: str) -> str:
    """POST an upload session; the absolute URL to PUT to (with ``&digest=`` still missing)."""
    r = expect(request(server, "POST", f"/v2/{repo}/blobs/uploads/"), 202, f"POST upload {repo}")
    location = urljoin(server.url, r.headers["Location"])
    return location + ("&" if "?" in location else "?")


def upload_bytes(server: Server, repo: str, data: bytes) -> str:
    """POST + PUT with the whole blob (registry:2 2.8 answers a POST ?digest= with 202)."""
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    url = start_upload(server, repo) + f"digest={digest}"
    headers = {"Content-Type": "application/octet-stream"}
    expect(request(server, "PUT", url, data, headers), 201, f"PUT blob {repo}")
    return digest


def run_tool(args: list[str], what: str, timeout: float) -> subprocess.CompletedProcess[str]:
    try:
        result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{what}: no result after {timeout:.0f}s") from None
    if result.returncode != 0:
        raise BenchError(
            f"{what}: {args[0]} exited with {result.returncode}: "
            f"{(result.stderr or result.stdout).strip()[-600:]}"
        )
    return result


def curl_upload(server: Server, repo: str, path: Path, digest: str, size: int) -> float:
    """POST, then ``curl -T file -X PUT <Location>&digest=``; seconds from POST to the 201."""
    t0 = time.monotonic()
    url = start_upload(server, repo) + f"digest={digest}"
    args = ["curl", "-sS", "-T", str(path), "-X", "PUT", "-o", "/dev/null"]
    args += ["-H", "Content-Type: application/octet-stream"]
    if server.authorization:
        args += ["-H", f"Authorization: {server.authorization}"]
    args += ["-w", "%{http_code} %{size_upload}", url]
    out = run_tool(args, f"curl PUT {size_text(size)}", timeout=3600).stdout.split()
    elapsed = time.monotonic() - t0
    if out[0] != "201" or int(float(out[1])) != size:
        raise BenchError(f"curl PUT: HTTP {out[0]}, {out[1]} of {size} bytes sent")
    return elapsed


def curl_download(server: Server, repo: str, digest: str, size: int) -> float:
    args = ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{size_download} %{time_total}"]
    if server.authorization:
        args += ["-H", f"Authorization: {server.authorization}"]
    args.append(f"{server.url}/v2/{repo}/blobs/{digest}")
    code, got, seconds = run_tool(args, "curl GET blob", timeout=3600).stdout.split()
    if code != "200" or int(float(got)) != size:
        raise BenchError(f"curl GET: HTTP {code}, {got} of {size} bytes")
    return float(seconds)


# -- content ------------------------------------------------------------------------------------


class Filler:
    """Pseudo-random content, fast: a 16 MiB pool of random bytes, every MiB of output made
    unique by a 32-byte header derived from a nonce (nothing in the path compresses or dedups)."""

    def __init__(self) -> None:
        self.pool = [os.urandom(MiB) for _ in range(16)]

    def chunks(self, size: int, nonce: bytes) -> Iterator[bytes]:
        i = 0
        while size > 0:
            head = hashlib.sha256(nonce + i.to_bytes(8, "big")).digest()
            chunk = (head + self.pool[i % 16][len(head) :])[:size]
            yield chunk
            size -= len(chunk)
            i += 1


@dataclass
class Layout:
    path: Path
    tag: str
    blob_bytes: int  # layers and config
    layers: int


def _put_blob(blobs: Path, data: bytes) -> dict[str, object]:
    digest = hashlib.sha256(data).hexdigest()
    (blobs / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def _gzip_layer(blobs: Path, chunks: Iterator[bytes]) -> tuple[dict[str, object], str]:
    """A real gzip stream (stored blocks: level 0) so skopeo pushes it as it is."""
    comp = zlib.compressobj(0, zlib.DEFLATED, 31)
    packed, raw, size = hashlib.sha256(), hashlib.sha256(), 0
    tmp = blobs / ".partial"
    with open(tmp, "wb") as f:
        for chunk in itertools.chain(chunks, [None]):  # None: the end
            if chunk is None:
                out = comp.flush()
            else:
                raw.update(chunk)
                out = comp.compress(chunk)
            packed.update(out)
            f.write(out)
            size += len(out)
    tmp.rename(blobs / packed.hexdigest())
    descriptor = {"mediaType": OCI_LAYER, "digest": f"sha256:{packed.hexdigest()}", "size": size}
    return descriptor, f"sha256:{raw.hexdigest()}"


def make_layout(path: Path, layer_sizes: list[int], filler: Filler, nonce: bytes) -> Layout:
    """An OCI image layout (``oci:PATH:bench``) with fresh layers of the given sizes."""
    blobs = path / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    layers, diff_ids = [], []
    for i, size in enumerate(layer_sizes):
        if size <= MiB:
            data = hashlib.sha256(nonce + bytes([i % 256])).digest() + os.urandom(size)
            chunks: Iterator[bytes] = iter([data])
        else:
            chunks = filler.chunks(size, nonce + i.to_bytes(4, "big"))
        descriptor, diff_id = _gzip_layer(blobs, chunks)
        layers.append(descriptor)
        diff_ids.append(diff_id)
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Env": [f"NONCE={nonce.hex()}"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }
    ).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, **_put_blob(blobs, config)},
        "layers": layers,
    }
    body = json.dumps(manifest).encode()
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": OCI_MANIFEST,
                **_put_blob(blobs, body),
                "annotations": {"org.opencontainers.image.ref.name": "bench"},
            }
        ],
    }
    (path / "index.json").write_text(json.dumps(index))
    (path / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    total = sum(int(layer["size"]) for layer in layers) + len(config)  # type: ignore[call-overload]
    return Layout(path, "bench", total, len(layers))


def delete_from_store(root: Path, repo: str, digest: str | None) -> None:
    """Free disk space behind a server's back: the blob's data and the repository."""
    if digest:
        hexa = digest.removeprefix("sha256:")
        shutil.rmtree(root / V2 / "blobs" / "sha256" / hexa[:2] / hexa, ignore_errors=True)
    shutil.rmtree(root / V2 / "repositories" / repo, ignore_errors=True)


def remove_tree(path: Path) -> None:
    """``rm -rf`` (much faster than shutil.rmtree on a store of many small files)."""
    subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=False)


def settle() -> None:
    """Write dirty pages back, so one run's writeback does not slow the next one down."""
    os.sync()


# -- suites -------------------------------------------------------------------------------------


class Suite:
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
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {
                    "mediaType": OCI_CONFIG,
                    "digest": upload_bytes(server, self.repo, config),
                    "size": len(config),
                },
                "layers": [
                    {
                        "mediaType": OCI_LAYER,
                        "digest": upload_bytes(server, self.repo, layer),
                        "size": len(layer),
                    }
                ],
            }
        ).encode()
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
        if (
            r.headers.get("Docker-Content-Digest")
            != "sha256:" + hashlib.sha256(manifest).hexdigest()
        ):
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
        script = self.work / "wrk.lua"
        lines = ['wrk.method = "GET"']
        lines += [
            f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}"
            for k, v in self._headers(server).items()
        ]
        script.write_text("\n".join(lines) + "\n")
        p = self.params
        args = ["wrk", "-t", str(p.wrk_threads), "-c", str(p.connections)]
        args += ["-d", f"{p.http_seconds}s", "--timeout", "10s", "-s", str(script), url]
        out = run_tool(args, "wrk", timeout=p.http_seconds + 60).stdout
        rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
        if rate is None:
            raise BenchError(f"wrk printed no rate:\n{out}")
        non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        if non2xx:
            raise BenchError(f"wrk: {non2xx.group(1)} responses were not 2xx/3xx")
        errors = re.search(r"Socket errors: (.*)", out)
        if errors:
            self.notes.append(
                f"{server.name}, wrk {urlsplit(url).path}: socket errors {errors.group(1)}"
            )
        return float(rate.group(1))

    def _ab_head(self, server: Server, url: str) -> float:
        # wrk 4.1 cannot do HEAD (it waits for the body Content-Length announces: wrk#198), so
        # HEAD goes through ApacheBench with keep-alive, the same connections and duration.
        p = self.params
        args = ["ab", "-q", "-r", "-k", "-i", "-c", str(p.connections), "-t", str(p.http_seconds)]
        args += ["-n", "50000000", "-s", "10"]
        for k, v in self._headers(server).items():
            args += ["-H", f"{k}: {v}"]
        out = run_tool([*args, url], "ab", timeout=p.http_seconds + 60).stdout
        rate = re.search(r"Requests per second:\s+([\d.]+)", out)
        complete = re.search(r"Complete requests:\s+(\d+)", out)
        if rate is None or complete is None or int(complete.group(1)) == 0:
            raise BenchError(f"ab: no completed requests:\n{out[-800:]}")
        non2xx = re.search(r"Non-2xx responses:\s+(\d+)", out)
        if non2xx:
            raise BenchError(f"ab: {non2xx.group(1)} responses were not 2xx")
        failed = re.search(r"Failed requests:\s+(\d+)", out)
        if failed and int(failed.group(1)):
            self.notes.append(f"{server.name}, ab HEAD: {failed.group(1)} failed requests")
        return float(rate.group(1))


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
        self.notes.append(f"catalog stores in {self.store_base} ({_fstype(self.store_base)})")

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
        """The store, written with plain system calls (it is a few hundred thousand entries)."""
        t0 = time.monotonic()
        base = str(root / V2)
        config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {}}).encode()
        layer = b"\x1f\x8b" + os.urandom(62)
        blobs = [_write_blob(base, config), _write_blob(base, layer)]
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": blobs[0], "size": len(config)},
                "layers": [{"mediaType": OCI_LAYER, "digest": blobs[1], "size": len(layer)}],
            }
        ).encode()
        digest = _write_blob(base, manifest)
        hexa = digest.removeprefix("sha256:")
        link = digest.encode()
        names = [f"org-{i // 100:03d}/repo-{i:05d}" for i in range(self.params.catalog_repos)]
        mkdir = os.mkdir
        for name in [*names, self.big_repo]:
            repo = f"{base}/repositories/{name}"
            os.makedirs(f"{repo}/_layers/sha256")
            for blob in blobs:
                mkdir(f"{repo}/_layers/sha256/{blob.removeprefix('sha256:')}")
                _write(f"{repo}/_layers/sha256/{blob.removeprefix('sha256:')}/link", blob.encode())
            os.makedirs(f"{repo}/_manifests/revisions/sha256/{hexa}")
            _write(f"{repo}/_manifests/revisions/sha256/{hexa}/link", link)
            mkdir(f"{repo}/_manifests/tags")
            tags = ["latest"]
            if name == self.big_repo:
                # shuffled, so neither server finds them in order on disk
                tags = [f"t-{i:06d}" for i in range(self.params.big_tags)]
                random.Random(0).shuffle(tags)
            for tag in tags:
                tag_dir = f"{repo}/_manifests/tags/{tag}"
                mkdir(tag_dir)
                mkdir(f"{tag_dir}/current")
                _write(f"{tag_dir}/current/link", link)
                mkdir(f"{tag_dir}/index")
                mkdir(f"{tag_dir}/index/sha256")
                mkdir(f"{tag_dir}/index/sha256/{hexa}")
                _write(f"{tag_dir}/index/sha256/{hexa}/link", link)
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


def _fstype(path: Path) -> str:
    """The file system type of the mount holding ``path`` (from /proc/mounts)."""
    best, fstype = "", "?"
    resolved = str(path.resolve())
    with contextlib.suppress(OSError), open("/proc/mounts") as f:
        for line in f:
            fields = line.split()
            mount = fields[1]
            inside = resolved == mount or resolved.startswith(mount.rstrip("/") + "/")
            if inside and len(mount) > len(best):
                best, fstype = mount, fields[2]
    return fstype


def _write(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _write_blob(base: str, data: bytes) -> str:
    hexa = hashlib.sha256(data).hexdigest()
    os.makedirs(f"{base}/blobs/sha256/{hexa[:2]}/{hexa}", exist_ok=True)
    _write(f"{base}/blobs/sha256/{hexa[:2]}/{hexa}/data", data)
    return f"sha256:{hexa}"


def suites(params: Params, work: Path, only: set[str] | None) -> list[Suite]:
    rng = random.Random(64)
    small = [
        rng.randint(params.small_layer_min, params.small_layer_max)
        for _ in range(params.small_layers)
    ]
    large_label = f"{params.large_layers} x {size_text(params.large_layer_bytes)} layers"
    all_suites: list[Suite] = [
        BlobSuite(params, work / "blob"),
        SkopeoSuite(
            params,
            work / "large",
            "large",
            [params.large_layer_bytes] * params.large_layers,
            large_label,
            "large",
        ),
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


SUITE_KEYS = ["blob", "large", "small", "requests", "auth", "big", "catalog"]
