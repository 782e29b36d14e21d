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
import functools
import json
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import pytest

from harness import (
    DockyardProcess,
    S3Endpoint,
    Server,
    flush_redis,
    free_port,
    new_bucket,
    sha256,
    write_config,
)
from harness.images import build_busybox_image
from harness.net import Loopback
from harness.nginx import (
    NginxProcess,
    nginx_test,
    run_nginx,
    sub_exactly,
    write_nginx_conf,
)
from harness.oci import OciLayout, gzip_layer
from harness.workloads import (
    Client,
    GCRun,
    Ledger,
    Workload,
    assert_collected,
    assert_no_failures,
    completed_runs,
    describe,
    dockyard,
    gc_loop,
    make_jobs,
    report,
    run_load,
    session,
    touch_interval,
    verify_all,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

REPO_ROOT = Path(__file__).resolve().parents[2]
SITE = REPO_ROOT / "deploy" / "multi-instance" / "nginx.conf"

MiB = 1024 * 1024
#: the grace period of the collections in test 5 (``--grace``), in seconds; the instances are
#: configured with it (``storage.maintenance.gc.grace``) so they refresh the time of content in
#: use every quarter of it (the touch interval, also the Redis entries' lifetime)
GRACE = 4.0
TOUCH_INTERVAL = touch_interval(GRACE)
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


#: nginx's access log names the instance (upstream) that answered each request
UPSTREAMS = "$request_method $uri $status $upstream_addr $upstream_status"


def render_site(upstreams: list[int], listen: int) -> str:
    site = SITE.read_text()
    for n, port in enumerate(upstreams, start=1):
        site = sub_exactly(
            site, rf"^(\s*)server dockyard{n}:5000;", rf"\g<1>server 127.0.0.1:{port};", 1, SITE
        )
    site = sub_exactly(site, r"^(\s*)server dockyard\d+:5000;\n", "", 0, SITE)  # no other instance
    return sub_exactly(site, r"^(\s*)listen 80;", rf"\g<1>listen 127.0.0.1:{listen};", 1, SITE)


@dataclass
class Nginx(NginxProcess):
    port: int


def start_nginx(prefix: Path, upstreams: list[int], port: int) -> Nginx:
    binary = _which("nginx")
    if binary is None:
        pytest.skip("nginx is not installed (Debian package nginx)")
    conf = write_nginx_conf(prefix, render_site(upstreams, port), UPSTREAMS)
    checked = nginx_test(binary, prefix, conf)
    assert checked.returncode == 0, _output(checked)
    return Nginx(prefix, run_nginx(binary, prefix, conf, [port]), port)


# -- the deployment --------------------------------------------------------------------------------


@dataclass
class Cluster(Loopback):
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
    def port(self) -> int:  # type: ignore[override]
        return self.nginx.port

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
        self.nginx.assert_clean_error_log()


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
                DockyardProcess.launch(tmp_path_factory.mktemp(f"dockyard{n}"), **overrides)
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
    http = session()
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
    http = session()
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


def test_skopeo_push_and_pull_through_redirects(cluster: Cluster, tmp_path: Path) -> None:
    skopeo = _which("skopeo")
    if skopeo is None:
        pytest.skip("skopeo is not installed (Debian package skopeo)")
    source, pulled = OciLayout(tmp_path / "source"), tmp_path / "pulled"
    sizes = [6 * MiB, 6 * MiB + 4321, 3000, 12_345, 100_000]
    manifest_digest = source.tag("v1", source.image("amd64", [gzip_layer(n) for n in sizes]))
    blobs = source.blobs
    ref = f"{cluster.host}/multi/skopeo:v1"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [skopeo, *args], capture_output=True, text=True, timeout=180, env=_clean_env()
        )
        assert result.returncode == 0, f"skopeo {' '.join(args)}\n{_output(result)}" + (
            cluster.context()
        )
        return result

    run("copy", "--dest-tls-verify=false", f"oci:{source.path}:v1", f"docker://{ref}")
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
    # Gone from the engine (which other tests' images share): the pull must fetch it all.
    listed = dockerd.docker("images", "-q", "--no-trunc").stdout.split()
    assert image.image_id not in listed, listed
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
    other = DockyardProcess.launch(
        tmp_path / "dockyard3",
        workers=1,
        **{**cluster.overrides, "http": {"secret": cluster.secret + "-but-different"}},
    )
    try:
        first, second = cluster.instances
        http = session()
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
WORKLOAD = Workload(
    grace=GRACE,
    repositories=(*(f"gc/app{i}" for i in range(5)), "gc/team/svc0", "gc/team/svc1"),
    pool=10,
    pool_layer=(32 * 1024, 1024 * 1024),
    stable=7,
    churn=6,
    garbage=4,
    retag=3,
    layers_from_pool=(1, 3),
    own_layer=(16 * 1024, 256 * 1024),
    churn_rounds=(2, 2),
    churn_delay=0,
    churn_wait=(0.5, 2.5),
)


def test_online_gc_on_rgw_while_both_instances_take_pushes(cluster: Cluster) -> None:
    jobs = make_jobs(WORKLOAD)
    assert len(jobs) == THREADS
    ledger = Ledger()
    runs: list[GCRun] = []
    stop = threading.Event()

    def client() -> Client:
        """docker's and skopeo's requests through nginx, following the 307s to RGW."""
        return Client(cluster, ledger, GRACE, redirects=True)

    collect = functools.partial(
        dockyard, cluster.maintenance_config, "gc", "--grace", f"{GRACE:g}s", "--delete-untagged"
    )
    collector = threading.Thread(target=gc_loop, args=(collect, stop, runs))
    started = time.monotonic()
    collector.start()
    try:
        run_load(client, jobs, threads=THREADS)
        load_seconds = time.monotonic() - started
        # Let the collector see the last garbage grow old enough.
        stop.wait(GRACE + TOUCH_INTERVAL + 1)
    finally:
        stop.set()
        collector.join(180)

    completed = completed_runs(runs)
    print(report(load_seconds, ledger, runs, each=True))
    assert_no_failures(ledger, runs, cluster.context())
    # Otherwise the test proves nothing: the collector took garbage while the pushes ran.
    assert_collected(completed)
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
    assert len(ledger.kept) == 16, ledger.kept.keys()
    verify_all(client(), runs)
    fsck = dockyard(cluster.maintenance_config, "fsck")
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    cluster.assert_clean_logs()
