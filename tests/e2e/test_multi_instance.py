"""Several Dockyard instances behind one address, on a real S3 server (Ceph RGW) with a shared
Redis blob descriptor cache: the multi-instance deployment of ``deploy/multi-instance/``.

The module starts one RGW bucket, one Redis (flushed first), two instances (one worker each,
the same ``http.secret``, ``storage.s3``, ``storage.cache.blobdescriptor: redis``, deletes
enabled) and nginx running the shipped ``deploy/multi-instance/nginx.conf``, changed only where
a test must: the upstream servers ``dockyard1:5000``/``dockyard2:5000`` become the two
instances' loopback ports and ``listen 80`` a free loopback port. nginx spreads requests
round-robin, so consecutive requests of one client land on alternate instances.

1. A chunked upload hops between the instances chunk by chunk (PATCHes of assorted sizes, below
   and above S3's 5 MiB part minimum; Redis is flushed halfway) and the blob reads back whole;
   both instances' access logs show PATCHes of that upload. Blob GET and HEAD answer 307 to a
   presigned RGW URL.
2. skopeo pushes an OCI image through nginx and pulls it back (after a Redis flush) by following
   the 307 redirects to RGW; every blob is the same.
3. The Docker engine pushes, removes, pulls back and runs an image through nginx.
4. A third instance on the same bucket with another ``http.secret`` refuses an upload state the
   others signed (404 BLOB_UPLOAD_INVALID, the body naming ``http.secret``), while an instance
   with the right secret continues the same upload.
5. ``dockyard gc --delete-untagged`` runs in a loop (from a config naming the same bucket and
   Redis) while ~20 client threads push through nginx, to both instances: shared layers,
   cross-repository mounts, deletes and re-pushes, moved tags. Afterwards (Redis flushed)
   every image still tagged pulls whole, ``dockyard fsck`` exits 0, and the collector did
   remove garbage meanwhile.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import pytest
import requests
from images import build_busybox_image

from s3support import S3Endpoint, flush_redis, new_bucket
from support import OCI_MANIFEST, Server, free_port, launch, sha256, wait_for_port, write_config

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

REPO_ROOT = Path(__file__).resolve().parents[2]
SITE = REPO_ROOT / "deploy" / "multi-instance" / "nginx.conf"

MiB = 1024 * 1024
#: the grace period of the collections in test 5 (``--grace``), in seconds; the instances are
#: configured with it (``storage.maintenance.gc.grace``) so they refresh the time of content in
#: use every quarter of it (the touch interval, also the Redis entries' lifetime)
GRACE = 4.0
TOUCH_INTERVAL = GRACE / 4
API_VERSION = "Docker-Distribution-Api-Version"

_SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")
_PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


def _which(binary: str) -> str | None:
    return shutil.which(binary, path=os.pathsep.join([os.environ.get("PATH", ""), *_SBIN]))


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.lower() not in _PROXY_VARS}
    env["PATH"] = os.pathsep.join([env.get("PATH", ""), *_SBIN])
    return env


def _output(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


def _session() -> requests.Session:
    s = requests.Session()
    s.trust_env = False  # no proxy between the test and loopback
    return s


def describe(r: requests.Response) -> str:
    chain = " -> ".join(f"{h.status_code} {h.headers.get('Location', '')}" for h in r.history)
    req = r.request
    return (
        f"{req.method} {req.url} -> {r.status_code} {r.reason}"
        + (f" (after {chain})" if chain else "")
        + f"\n  response headers: {dict(r.headers)}\n  response body: {r.text[:2000]}"
    )


# -- access logs -----------------------------------------------------------------------------------

_LOGFMT = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')


@dataclass(frozen=True)
class Request:
    """One line of an instance's access log."""

    method: str
    path: str
    status: int
    user_agent: str


def access_log(server: Server) -> list[Request]:
    requests_seen = []
    for line in server.log().splitlines():
        if "logger=dockyard.access" not in line:
            continue
        fields = {k: json.loads(v) if v.startswith('"') else v for k, v in _LOGFMT.findall(line)}
        requests_seen.append(
            Request(
                fields["method"],
                fields["path"],
                int(fields["status"]),
                fields.get("user_agent", ""),
            )
        )
    return requests_seen


# -- nginx with the shipped configuration ----------------------------------------------------------


def _sub(text: str, pattern: str, replacement: str, count: int) -> str:
    """Replace ``pattern`` exactly ``count`` times: if the shipped file changes shape, the
    template fails loudly instead of testing something else."""
    new, n = re.subn(pattern, replacement, text, flags=re.MULTILINE)
    assert n == count, f"expected {count} match(es) of {pattern!r} in {SITE}, found {n}"
    return new


def render_site(upstreams: list[int], listen: int) -> str:
    site = SITE.read_text()
    for n, port in enumerate(upstreams, start=1):
        site = _sub(site, rf"^(\s*)server dockyard{n}:5000;", rf"\g<1>server 127.0.0.1:{port};", 1)
    site = _sub(site, r"^(\s*)server dockyard\d+:5000;\n", "", 0)  # no other instance
    return _sub(site, r"^(\s*)listen 80;", rf"\g<1>listen 127.0.0.1:{listen};", 1)


@dataclass
class Nginx:
    prefix: Path
    proc: subprocess.Popen[bytes]
    port: int

    def error_log(self) -> str:
        path = self.prefix / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def access_log(self) -> list[str]:
        path = self.prefix / "access.log"
        return path.read_text(errors="replace").splitlines() if path.exists() else []

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)  # its own session
                self.proc.wait()


def nginx_main_conf(prefix: Path, site: Path) -> Path:
    """A minimal nginx.conf around the site: foreground, everything under ``prefix``; the
    access log names the instance (upstream) that answered each request."""
    for temp in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (prefix / "temp" / temp).mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(
        f"""\
daemon off;
master_process on;
worker_processes 2;
user root;  # pytest's temp directories are private to root
pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;
events {{ worker_connections 1024; }}
http {{
    log_format upstreams '$request_method $uri $status $upstream_addr $upstream_status';
    access_log {prefix}/access.log upstreams;
    client_body_temp_path {prefix}/temp/client_body;
    proxy_temp_path {prefix}/temp/proxy;
    fastcgi_temp_path {prefix}/temp/fastcgi;
    uwsgi_temp_path {prefix}/temp/uwsgi;
    scgi_temp_path {prefix}/temp/scgi;
    include {site};
}}
"""
    )
    return conf


def start_nginx(prefix: Path, upstreams: list[int], port: int) -> Nginx:
    binary = _which("nginx")
    if binary is None:
        pytest.skip("nginx is not installed (Debian package nginx)")
    site = prefix / "site.conf"
    site.write_text(render_site(upstreams, port))
    conf = nginx_main_conf(prefix, site)
    args = [binary, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]
    checked = subprocess.run([*args, "-t"], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, _output(checked)
    with open(prefix / "nginx.out", "ab") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    nginx = Nginx(prefix, proc, port)
    try:
        wait_for_port(port, proc)
    except Exception:
        nginx.stop()
        raise RuntimeError(f"nginx did not start:\n{nginx.error_log()}") from None
    return nginx


# -- the deployment --------------------------------------------------------------------------------


@dataclass
class Cluster:
    endpoint: S3Endpoint
    bucket: str
    redis_addr: str
    secret: str
    overrides: dict[str, Any]
    instances: list[Server]
    nginx: Nginx
    #: what ``dockyard gc|fsck`` are given: the instances' storage and Redis
    maintenance_config: Path

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.nginx.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def v2(self, path: str) -> str:
        return f"{self.url}/v2/{path}"

    def flush_redis(self) -> None:
        flush_redis(self.redis_addr)

    def requests_to(self, path_part: str) -> list[list[Request]]:
        """For each instance, the access-log lines whose path contains ``path_part``."""
        return [[r for r in access_log(s) if path_part in r.path] for s in self.instances]

    def context(self) -> str:
        parts = [
            f"\n--- instance {n} log (tail) ---\n{s.log()[-3000:]}"
            for n, s in enumerate(self.instances, start=1)
        ]
        parts.append(f"\n--- nginx error log (tail) ---\n{self.nginx.error_log()[-2000:]}")
        return "".join(parts)

    def assert_clean_logs(self) -> None:
        for n, server in enumerate(self.instances, start=1):
            log = server.log()
            assert "Traceback" not in log, f"instance {n}:\n{log[-6000:]}"
            errors = [line for line in log.splitlines() if "level=error" in line]
            assert not errors, f"instance {n}:\n" + "\n".join(errors[:20])
        bad = [
            line
            for line in self.nginx.error_log().splitlines()
            if re.search(r"\[(crit|alert|emerg)\]", line)
            or ("[error]" in line and "upstream" in line)
        ]
        assert not bad, "\n".join(bad)


@pytest.fixture(scope="module")
def cluster(
    rgw_s3: S3Endpoint,
    redis_addr: str,
    registry_port: int,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Cluster]:
    """Two instances and nginx on ``registry_port`` (the port the module's dockerd is told is an
    insecure registry)."""
    bucket = new_bucket(rgw_s3, "multi-instance")
    flush_redis(redis_addr)  # nothing left from an earlier test or run
    secret = os.urandom(16).hex()
    overrides: dict[str, Any] = {
        "storage": {
            "s3": rgw_s3.storage_config(bucket),
            "cache": {"blobdescriptor": "redis"},
            "delete": {"enabled": True},
            "maintenance": {"gc": {"grace": f"{GRACE:g}s"}},
        },
        "redis": {"addr": redis_addr},
        "http": {"secret": secret},
    }
    instances: list[Server] = []
    nginx: Nginx | None = None
    try:
        for n in (1, 2):
            instances.append(
                launch(tmp_path_factory.mktemp(f"dockyard{n}"), workers=1, **overrides)
            )
        nginx = start_nginx(
            tmp_path_factory.mktemp("nginx"), [s.port for s in instances], registry_port
        )
        maintenance = tmp_path_factory.mktemp("maintenance") / "config.yml"
        write_config(maintenance, maintenance.parent / "unused", free_port(), **overrides)
        yield Cluster(rgw_s3, bucket, redis_addr, secret, overrides, instances, nginx, maintenance)
    finally:
        if nginx is not None:
            nginx.stop()
        for server in instances:
            server.stop()
        with contextlib.suppress(Exception):
            rgw_s3.delete_bucket(bucket)


def test_shipped_site_and_round_robin(cluster: Cluster) -> None:
    """The shipped file has what a multi-instance front needs, and nginx alternates."""
    site = re.sub(r"[ \t]+", " ", SITE.read_text())
    for directive in (
        "client_max_body_size 0;",
        "proxy_request_buffering off;",
        "proxy_buffering off;",
        "proxy_set_header Host $http_host;",
        "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
        "proxy_set_header X-Forwarded-Proto $scheme;",
        "server dockyard1:5000;",
        "server dockyard2:5000;",
        "listen 80;",
    ):
        assert directive in site, directive
    http = _session()
    before = [len(access_log(s)) for s in cluster.instances]
    for _ in range(6):
        r = http.get(cluster.v2(""), timeout=10)
        assert r.status_code == 200, describe(r)
        assert r.headers[API_VERSION] == "registry/2.0"
    after = [len(access_log(s)) for s in cluster.instances]
    served = [a - b for a, b in zip(after, before, strict=True)]
    assert all(n >= 1 for n in served), f"requests per instance: {served}"


# -- 1. an upload hopping between instances --------------------------------------------------------


def test_chunked_upload_hops_between_instances(cluster: Cluster) -> None:
    http = _session()
    repo = "multi/hop"
    sizes = [
        1 * MiB + 17,
        6 * MiB + 5,
        700 * 1024,
        5 * MiB + 123,
        3 * MiB,
        11 * MiB + 7,
        200 * 1024 + 1,
    ]
    assert any(s < 5 * MiB for s in sizes) and any(s > 5 * MiB for s in sizes)
    chunks = [os.urandom(n) for n in sizes]
    data = b"".join(chunks)
    digest = sha256(data)

    r = http.post(cluster.v2(f"{repo}/blobs/uploads/"), timeout=30)
    assert r.status_code == 202, describe(r) + cluster.context()
    upload_id = r.headers["Docker-Upload-UUID"]
    location = urljoin(r.url, r.headers["Location"])
    # Built from the Host nginx passes on: every chunk comes back through nginx.
    assert location.startswith(cluster.v2(f"{repo}/blobs/uploads/{upload_id}?")), location

    offset = 0
    for n, chunk in enumerate(chunks):
        if n == len(chunks) // 2:
            cluster.flush_redis()  # the cache is an optimisation: losing it changes nothing
        r = http.patch(
            location,
            data=chunk,
            headers={
                "Content-Type": "application/octet-stream",
                "Content-Range": f"{offset}-{offset + len(chunk) - 1}",
            },
            timeout=120,
        )
        assert r.status_code == 202, f"chunk {n}: {describe(r)}{cluster.context()}"
        offset += len(chunk)
        assert r.headers["Range"] == f"0-{offset - 1}", describe(r)
        assert r.headers["Docker-Upload-UUID"] == upload_id
        location = urljoin(r.url, r.headers["Location"])
        assert location.startswith(cluster.url + "/"), location

    # The upload's status, from whichever instance answers.
    r = http.get(location, timeout=30)
    assert r.status_code == 204, describe(r)
    assert r.headers["Range"] == f"0-{len(data) - 1}"

    r = http.put(location, params={"digest": digest}, timeout=120)
    assert r.status_code == 201, describe(r) + cluster.context()
    assert r.headers["Docker-Content-Digest"] == digest

    # Every instance saw chunks of this upload: it really hopped.
    patches = [
        [q for q in seen if q.method == "PATCH"]
        for seen in cluster.requests_to(f"/blobs/uploads/{upload_id}")
    ]
    assert sum(len(p) for p in patches) == len(chunks), patches
    assert all(q.status == 202 for p in patches for q in p), patches
    assert all(p for p in patches), (
        f"PATCHes per instance: {[len(p) for p in patches]}" + cluster.context()
    )

    # Read back through nginx: a 307 to a presigned RGW URL, which requests follows.
    cluster.flush_redis()
    blob_url = cluster.v2(f"{repo}/blobs/{digest}")
    r = http.get(blob_url, timeout=120)
    assert r.status_code == 200, describe(r)
    assert [h.status_code for h in r.history] == [307], describe(r)
    redirect = r.history[0].headers["Location"]
    assert redirect.startswith(cluster.endpoint.url + "/"), redirect
    assert "X-Amz-Signature=" in redirect, redirect
    assert r.history[0].headers["Docker-Content-Digest"] == digest
    assert len(r.content) == len(data) and r.content == data, "the blob came back different"

    # HEAD answers 307 too (as registry:2 does), to a URL signed for HEAD.
    r = http.head(blob_url, timeout=30)
    assert r.status_code == 307, describe(r)
    head = http.head(r.headers["Location"], timeout=30)
    assert head.status_code == 200, describe(head)
    assert int(head.headers["Content-Length"]) == len(data)

    cluster.assert_clean_logs()


# -- 2. skopeo -------------------------------------------------------------------------------------


def build_oci_layout(dest: Path, layer_sizes: list[int]) -> tuple[str, dict[str, bytes]]:
    """An OCI image layout (tag ``v1``) with gzip layers of random bytes; returns the manifest
    digest and every blob (config, layers, manifest) by digest."""
    blobs: dict[str, bytes] = {}
    layers = [gzip.compress(os.urandom(n), compresslevel=1) for n in layer_sizes]
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [sha256(gzip.decompress(x)) for x in layers]},
        }
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": sha256(config),
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": sha256(x),
                    "size": len(x),
                }
                for x in layers
            ],
        }
    ).encode()
    for blob in (config, *layers, manifest):
        blobs[sha256(blob)] = blob
    (dest / "blobs" / "sha256").mkdir(parents=True)
    for digest, blob in blobs.items():
        (dest / "blobs" / "sha256" / digest.removeprefix("sha256:")).write_bytes(blob)
    (dest / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": OCI_MANIFEST,
                "digest": sha256(manifest),
                "size": len(manifest),
                "annotations": {"org.opencontainers.image.ref.name": "v1"},
            }
        ],
    }
    (dest / "index.json").write_text(json.dumps(index))
    return sha256(manifest), blobs


def test_skopeo_push_and_pull_through_redirects(cluster: Cluster, tmp_path: Path) -> None:
    skopeo = _which("skopeo")
    if skopeo is None:
        pytest.skip("skopeo is not installed (Debian package skopeo)")
    source, pulled = tmp_path / "source", tmp_path / "pulled"
    manifest_digest, blobs = build_oci_layout(
        source, [6 * MiB, 6 * MiB + 4321, 3000, 12_345, 100_000]
    )
    ref = f"{cluster.host}/multi/skopeo:v1"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [skopeo, *args], capture_output=True, text=True, timeout=180, env=_clean_env()
        )
        assert result.returncode == 0, f"skopeo {' '.join(args)}\n{_output(result)}" + (
            cluster.context()
        )
        return result

    run("copy", "--dest-tls-verify=false", f"oci:{source}:v1", f"docker://{ref}")
    cluster.flush_redis()
    run("copy", "--src-tls-verify=false", f"docker://{ref}", f"oci:{pulled}:v1")

    (entry,) = json.loads((pulled / "index.json").read_text())["manifests"]
    assert entry["digest"] == manifest_digest
    pulled_blobs = {
        "sha256:" + p.name: p.read_bytes() for p in (pulled / "blobs" / "sha256").iterdir()
    }
    assert set(pulled_blobs) == set(blobs)
    for digest, data in pulled_blobs.items():
        assert sha256(data) == digest
        assert data == blobs[digest]

    # Every blob skopeo fetched was a GET answered with 307 (by either instance); skopeo
    # followed the redirects to RGW, since the pull succeeded.
    manifest = json.loads(blobs[manifest_digest])
    wanted = [manifest["config"]["digest"], *(x["digest"] for x in manifest["layers"])]
    seen = [q for per in cluster.requests_to("/v2/multi/skopeo/blobs/sha256:") for q in per]
    for digest in wanted:
        gets = [q for q in seen if q.method == "GET" and q.path.endswith(digest)]
        assert gets, f"no GET of {digest} in the access logs" + cluster.context()
        assert all(q.status == 307 for q in gets), gets
    # The pushes went to both instances.
    assert all(cluster.requests_to("/v2/multi/skopeo/")), cluster.context()
    cluster.assert_clean_logs()


# -- 3. the Docker engine --------------------------------------------------------------------------


def test_docker_push_pull_run(cluster: Cluster, dockerd: Any, tmp_path: Path) -> None:
    image = build_busybox_image(tmp_path / "busybox.tar")
    ref = f"{cluster.host}/multi/busybox:v1"
    dockerd.docker("load", "-i", str(image.path))
    dockerd.docker("tag", image.repo_tag, ref)
    push = dockerd.docker("push", ref)
    match = re.search(r"^v1: digest: (sha256:[0-9a-f]{64}) size: \d+$", push.stdout, re.M)
    assert match, push.stdout
    digest = match[1]

    dockerd.docker("rmi", ref, image.repo_tag)
    assert dockerd.docker("images", "-q").stdout.strip() == ""
    cluster.flush_redis()

    pull = dockerd.docker("pull", ref)
    assert f"Digest: {digest}" in pull.stdout, pull.stdout + cluster.context()
    (info,) = json.loads(dockerd.docker("image", "inspect", ref).stdout)
    assert info["Id"] == image.image_id
    assert info["RootFS"]["Layers"] == image.diff_ids
    run = dockerd.docker("run", "--rm", "--network", "none", ref)
    assert run.stdout == image.content

    blob_gets = [
        q
        for per in cluster.requests_to("/v2/multi/busybox/blobs/sha256:")
        for q in per
        if q.method == "GET"
    ]
    assert blob_gets and all(q.status == 307 for q in blob_gets), blob_gets
    cluster.assert_clean_logs()


# -- 4. an instance with another secret ------------------------------------------------------------


def test_instance_with_another_secret_refuses_the_upload_state(
    cluster: Cluster, tmp_path: Path
) -> None:
    (tmp_path / "dockyard3").mkdir()
    other = launch(
        tmp_path / "dockyard3",
        workers=1,
        **{**cluster.overrides, "http": {"secret": cluster.secret + "-but-different"}},
    )
    try:
        first, second = cluster.instances
        http = _session()
        repo = "multi/secret"
        r = http.post(first.v2(f"{repo}/blobs/uploads/"), timeout=30)
        assert r.status_code == 202, describe(r)
        path_qs = urlsplit(r.headers["Location"])
        minted = f"{path_qs.path}?{path_qs.query}"
        assert "_state=" in minted
        data = os.urandom(1000)
        headers = {
            "Content-Type": "application/octet-stream",
            "Content-Range": f"0-{len(data) - 1}",
        }

        refused = http.patch(other.url + minted, data=data, headers=headers, timeout=30)
        assert refused.status_code == 404, describe(refused)
        assert refused.headers["Content-Type"].startswith("application/json")
        (error,) = refused.json()["errors"]
        assert error["code"] == "BLOB_UPLOAD_INVALID", error
        said = error["message"] + " " + json.dumps(error.get("detail"))
        assert "http.secret" in said, error
        assert "secret" in error["message"], error

        # The same state is good on an instance that shares the secret, and nothing was
        # appended by the refused request.
        r = http.patch(second.url + minted, data=data, headers=headers, timeout=30)
        assert r.status_code == 202, describe(r)
        assert r.headers["Range"] == f"0-{len(data) - 1}"
        r = http.put(
            urljoin(r.url, r.headers["Location"]), params={"digest": sha256(data)}, timeout=30
        )
        assert r.status_code == 201, describe(r)
        assert http.get(cluster.v2(f"{repo}/blobs/{sha256(data)}"), timeout=30).content == data
    finally:
        other.stop()
    assert "Traceback" not in other.log(), other.log()[-4000:]


# -- 5. online garbage collection while both instances take pushes ---------------------------------

THREADS = 20
REPOSITORIES = [f"gc/app{i}" for i in range(5)] + ["gc/team/svc0", "gc/team/svc1"]
SHARED_LAYERS = 10
LAYER_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
CONFIG_MEDIA_TYPE = "application/vnd.oci.image.config.v1+json"
REMOVED = re.compile(r"\bremoved (\d+) blobs \((\d+) bytes\), (\d+) untagged manifests")


@dataclass(frozen=True)
class Image:
    repo: str
    tag: str
    config: bytes
    layers: tuple[bytes, ...]

    def blobs(self) -> list[bytes]:
        return [self.config, *self.layers]

    def manifest(self) -> bytes:
        def descriptor(media_type: str, data: bytes) -> dict[str, Any]:
            return {"mediaType": media_type, "digest": sha256(data), "size": len(data)}

        return json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": descriptor(CONFIG_MEDIA_TYPE, self.config),
                "layers": [descriptor(LAYER_MEDIA_TYPE, layer) for layer in self.layers],
            }
        ).encode()

    @property
    def digest(self) -> str:
        return sha256(self.manifest())


class ClientError(AssertionError):
    """A response a well-behaved registry must not give; carries the whole exchange."""


@dataclass
class Ledger:
    lock: threading.Lock = field(default_factory=threading.Lock)
    holders: dict[str, set[str]] = field(default_factory=dict)
    kept: dict[tuple[str, str], Image] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    def count(self, what: str) -> None:
        with self.lock:
            self.counts[what] = self.counts.get(what, 0) + 1

    def hold(self, digest: str, repo: str) -> None:
        with self.lock:
            self.holders.setdefault(digest, set()).add(repo)

    def mount_source(self, digest: str, repo: str, rng: random.Random) -> str | None:
        with self.lock:
            others = sorted(self.holders.get(digest, set()) - {repo})
        return rng.choice(others) if others else None


def _missing_blobs(r: requests.Response) -> list[str]:
    """The digests of a 400 MANIFEST_BLOB_UNKNOWN; empty for any other answer."""
    if r.status_code != 400:
        return []
    try:
        error = r.json()["errors"][0]
    except (ValueError, KeyError, IndexError):
        return []
    if error.get("code") != "MANIFEST_BLOB_UNKNOWN":
        return []
    return list(error.get("detail", {}).get("digests", []))


class Client:
    """docker's and skopeo's sequence of requests, through nginx: HEAD each blob (following the
    307), else mount it from a repository that has it, else upload it (POST, PATCH in one or two
    chunks, PUT); then PUT the manifest by tag."""

    def __init__(self, cluster: Cluster, ledger: Ledger) -> None:
        self.cluster = cluster
        self.ledger = ledger
        self.http = _session()

    def _check(self, r: requests.Response, *expected: int, what: str) -> requests.Response:
        if r.status_code not in expected:
            raise ClientError(f"{what}: expected {expected} at {time.time():.3f}\n{describe(r)}")
        return r

    def push_blob(self, repo: str, data: bytes, rng: random.Random) -> float:
        """Make the blob present in ``repo``; return when the registry said it is there."""
        digest = sha256(data)
        base = self.cluster.v2(repo)
        r = self.http.head(f"{base}/blobs/{digest}", allow_redirects=True, timeout=60)
        self._check(r, 200, 404, what=f"HEAD {repo}@{digest}")
        if r.status_code == 200:
            if [h.status_code for h in r.history] != [307]:
                raise ClientError(f"HEAD {digest}: not redirected\n{describe(r)}")
            if int(r.headers["Content-Length"]) != len(data):
                raise ClientError(f"HEAD {digest}: wrong size\n{describe(r)}")
            self.ledger.count("head-exists")
            self.ledger.hold(digest, repo)
            return time.time()
        source = self.ledger.mount_source(digest, repo, rng)
        if source is not None:
            r = self.http.post(
                f"{base}/blobs/uploads/", params={"mount": digest, "from": source}, timeout=60
            )
            self._check(r, 201, 202, what=f"mount {digest} from {source} into {repo}")
            if r.status_code == 201:
                self.ledger.count("mounted")
                self.ledger.hold(digest, repo)
                return time.time()
            self.ledger.count("mount-fell-back")
        else:
            r = self.http.post(f"{base}/blobs/uploads/", timeout=60)
            self._check(r, 202, what=f"start upload into {repo}")
        location = urljoin(r.url, r.headers["Location"])
        split = rng.choice([len(data), len(data) // 2]) or len(data)
        offset = 0
        for chunk in (data[:split], data[split:]):
            if not chunk:
                continue
            r = self.http.patch(
                location,
                data=chunk,
                headers={
                    "Content-Type": "application/octet-stream",
                    "Content-Range": f"{offset}-{offset + len(chunk) - 1}",
                },
                timeout=60,
            )
            self._check(r, 202, what=f"PATCH {digest} into {repo}")
            offset += len(chunk)
            location = urljoin(r.url, r.headers["Location"])
        r = self.http.put(location, params={"digest": digest}, timeout=60)
        self._check(r, 201, what=f"PUT {digest} into {repo}")
        self.ledger.count("uploaded")
        self.ledger.hold(digest, repo)
        return time.time()

    def push(self, image: Image, rng: random.Random) -> None:
        """Blobs in a random order, then the manifest. A manifest refused for blobs that were
        all reported present longer ago than ``GRACE - TOUCH_INTERVAL`` is the documented limit
        of a registry with so short a grace period (docs/gc.md): counted and retried. Refused
        for a blob reported present more recently, it is a failure."""
        for _attempt in range(3):
            blobs = image.blobs()
            rng.shuffle(blobs)
            told = {sha256(blob): self.push_blob(image.repo, blob, rng) for blob in blobs}
            r = self.http.put(
                self.cluster.v2(f"{image.repo}/manifests/{image.tag}"),
                data=image.manifest(),
                headers={"Content-Type": OCI_MANIFEST},
                timeout=60,
            )
            now = time.time()
            if r.status_code == 201:
                break
            ages = {d: now - t for d, t in told.items()}
            missing = _missing_blobs(r)
            if missing and all(ages.get(d, 0) > GRACE - TOUCH_INTERVAL for d in missing):
                self.ledger.count("push-outlived-grace")
                continue
            shown = {d: f"{a:.3f}s" for d, a in ages.items()}
            raise ClientError(
                f"PUT manifest {image.repo}:{image.tag} ({image.digest}) answered at {now:.3f}; "
                f"each blob had been reported present this long before: {shown}\n{describe(r)}"
            )
        else:
            raise ClientError(f"{image.repo}:{image.tag}: three pushes outlived the grace period")
        if r.headers.get("Docker-Content-Digest") != image.digest:
            raise ClientError(f"manifest stored under another digest\n{describe(r)}")
        self.ledger.count("manifests")

    def delete(self, image: Image) -> None:
        r = self.http.delete(self.cluster.v2(f"{image.repo}/manifests/{image.digest}"), timeout=60)
        self._check(r, 202, what=f"DELETE {image.repo}@{image.digest}")
        r = self.http.get(self.cluster.v2(f"{image.repo}/manifests/{image.tag}"), timeout=60)
        self._check(r, 404, what=f"GET deleted {image.repo}:{image.tag}")
        self.ledger.count("deleted")

    def pull(self, image: Image) -> None:
        """Manifest by tag and every blob (through the 307 to RGW), checked by digest."""
        r = self.http.get(
            self.cluster.v2(f"{image.repo}/manifests/{image.tag}"),
            headers={"Accept": OCI_MANIFEST},
            timeout=60,
        )
        self._check(r, 200, what=f"pull {image.repo}:{image.tag}")
        if r.headers.get("Docker-Content-Digest") != image.digest or r.content != image.manifest():
            raise ClientError(f"{image.repo}:{image.tag} is not {image.digest}\n{describe(r)}")
        for data in image.blobs():
            digest = sha256(data)
            r = self.http.get(self.cluster.v2(f"{image.repo}/blobs/{digest}"), timeout=60)
            self._check(r, 200, what=f"pull blob {digest} of {image.repo}:{image.tag}")
            if sha256(r.content) != digest:
                raise ClientError(
                    f"blob {digest} of {image.repo}:{image.tag}: {len(r.content)} bytes hashing "
                    f"to {sha256(r.content)}\n{describe(r)}"
                )
        self.ledger.count("pulls")


@dataclass
class GCRun:
    args: tuple[str, ...]
    started: float
    ended: float
    returncode: int
    stdout: str
    stderr: str

    @property
    def removed(self) -> tuple[int, int]:
        """(blobs, untagged manifests) removed."""
        match = REMOVED.search(self.stdout)
        return (int(match[1]), int(match[3])) if match else (0, 0)


def dockyard(cluster: Cluster, command: str, *args: str, timeout: float = 120) -> GCRun:
    started = time.time()
    result = subprocess.run(
        [sys.executable, "-m", "dockyard", command, str(cluster.maintenance_config), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return GCRun(args, started, time.time(), result.returncode, result.stdout, result.stderr)


def make_jobs(rng: random.Random, shared: list[bytes]) -> list[Callable[[Client], None]]:
    """One closure per client thread: push, and maybe delete / re-push / move the tag."""

    def new_image(n: int, repo: str | None = None, tag: str | None = None) -> Image:
        config = json.dumps(
            {"architecture": "amd64", "os": "linux", "job": n, "nonce": os.urandom(8).hex()}
        ).encode()
        chosen = rng.sample(shared, rng.randint(1, 3))
        unique = os.urandom(rng.randint(16 * 1024, 256 * 1024))
        return Image(repo or rng.choice(REPOSITORIES), tag or f"job{n}", config, (*chosen, unique))

    kinds = ["stable"] * 7 + ["churn"] * 6 + ["garbage"] * 4 + ["retag"] * 3
    assert len(kinds) == THREADS
    rng.shuffle(kinds)
    jobs: list[Callable[[Client], None]] = []
    for n, kind in enumerate(kinds):
        seed = rng.random()
        image = new_image(n)
        if kind == "stable":  # pushed once

            def job(c: Client, image: Image = image, seed: float = seed) -> None:
                c.push(image, random.Random(seed))
                with c.ledger.lock:
                    c.ledger.kept[(image.repo, image.tag)] = image

        elif kind == "churn":  # deleted, left to the collector, pushed again identically

            def job(c: Client, image: Image = image, seed: float = seed) -> None:
                job_rng = random.Random(seed)
                c.push(image, job_rng)
                for _ in range(2):
                    c.delete(image)
                    time.sleep(job_rng.uniform(0.5 * GRACE, 2.5 * GRACE))
                    c.push(image, job_rng)
                    c.ledger.count("re-pushed")
                with c.ledger.lock:
                    c.ledger.kept[(image.repo, image.tag)] = image

        elif kind == "garbage":  # deleted for good

            def job(c: Client, image: Image = image, seed: float = seed) -> None:
                job_rng = random.Random(seed)
                c.push(image, job_rng)
                time.sleep(job_rng.uniform(0, 1))
                c.delete(image)

        else:  # the tag moves to another image; the first one is left untagged
            second = new_image(n, repo=image.repo, tag=image.tag)

            def job(
                c: Client, image: Image = image, second: Image = second, seed: float = seed
            ) -> None:
                job_rng = random.Random(seed)
                c.push(image, job_rng)
                time.sleep(job_rng.uniform(0, 1.5 * GRACE))
                c.push(second, job_rng)
                c.ledger.count("re-tagged")
                with c.ledger.lock:
                    c.ledger.kept[(second.repo, second.tag)] = second

        jobs.append(job)
    return jobs


def run_job(cluster: Cluster, ledger: Ledger, job: Callable[[Client], None]) -> None:
    try:
        job(Client(cluster, ledger))
    except ClientError as exc:
        with ledger.lock:
            ledger.failures.append(str(exc))
    except Exception as exc:  # the client itself: keep it with the rest
        with ledger.lock:
            ledger.failures.append(f"{type(exc).__name__}: {exc}")


def evidence(failure: str, runs: list[GCRun]) -> str:
    """A failure with what the collections said about the digests it names."""
    digests = set(re.findall(r"sha256:[0-9a-f]{64}", failure))
    lines = [failure, "  collections:"]
    for r in sorted(runs, key=lambda r: r.started):
        said = [line for line in r.stdout.splitlines() if any(d in line for d in digests)]
        if said:
            lines.append(f"    {r.started:.3f}-{r.ended:.3f} -> {r.returncode}")
            lines += [f"      {line}" for line in said]
    return "\n".join(lines)


def test_online_gc_on_rgw_while_both_instances_take_pushes(cluster: Cluster) -> None:
    rng = random.Random(int.from_bytes(os.urandom(4)))
    shared = [os.urandom(rng.randint(32 * 1024, 1024 * 1024)) for _ in range(SHARED_LAYERS)]
    jobs = make_jobs(rng, shared)
    ledger = Ledger()
    runs: list[GCRun] = []
    stop = threading.Event()

    def collect() -> None:
        while not stop.is_set():
            runs.append(dockyard(cluster, "gc", "--grace", f"{GRACE:g}s", "--delete-untagged"))

    collector = threading.Thread(target=collect)
    started = time.monotonic()
    collector.start()
    try:
        with ThreadPoolExecutor(THREADS) as pool:
            for job in jobs:
                pool.submit(run_job, cluster, ledger, job)
        load_seconds = time.monotonic() - started
        # Let the collector see the last garbage grow old enough.
        stop.wait(GRACE + TOUCH_INTERVAL + 1)
    finally:
        stop.set()
        collector.join(180)

    odd = [r for r in runs if r.returncode not in (0, 3)]
    assert not odd, "\n".join(f"gc -> {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr}" for r in odd)
    completed = [r for r in runs if r.returncode == 0]
    blobs_removed = sum(r.removed[0] for r in completed)
    manifests_removed = sum(r.removed[1] for r in completed)
    print(
        f"\nload: {load_seconds:.1f} s, {dict(sorted(ledger.counts.items()))}\n"
        f"gc: {len(runs)} runs, {len(completed)} completed; removed {blobs_removed} blobs and "
        f"{manifests_removed} untagged manifests"
    )
    for r in runs:
        summary = (r.stdout.strip().splitlines() or [r.stderr.strip()])[-1:]
        print(f"  gc {r.started:.1f}-{r.ended:.1f} -> {r.returncode}: {summary}")
    assert not ledger.failures, (
        f"{len(ledger.failures)} failures:\n"
        + "\n\n".join(evidence(failure, runs) for failure in ledger.failures[:10])
        + cluster.context()
    )
    # Otherwise the test proves nothing: the collector took garbage while the pushes ran.
    assert blobs_removed > 0, [r.stdout[-1500:] for r in completed]
    assert manifests_removed > 0, "no untagged manifest was ever collected"
    assert ledger.counts.get("re-pushed", 0) == 12, ledger.counts
    assert ledger.counts.get("mounted", 0) > 0, ledger.counts  # cross-repository mounts
    # Both instances took manifest pushes.
    puts = [
        [q for q in access_log(s) if q.method == "PUT" and "/v2/gc/" in q.path]
        for s in cluster.instances
    ]
    assert all(puts), [len(p) for p in puts]

    # Everything still tagged is there, whole, with an empty cache.
    cluster.flush_redis()
    client = Client(cluster, ledger)
    problems = []
    assert len(ledger.kept) == 16, ledger.kept.keys()
    for image in ledger.kept.values():
        try:
            client.pull(image)
        except ClientError as exc:
            problems.append(str(exc))
    assert not problems, f"{len(problems)} of {len(ledger.kept)} images do not pull:\n" + (
        "\n\n".join(evidence(p, runs) for p in problems[:10])
    )
    fsck = dockyard(cluster, "fsck")
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    cluster.assert_clean_logs()
