"""The debug server (``http.debug.addr``): Prometheus metrics with registry:2's names and labels,
summed over the workers, and ``/debug/health`` with the failing checks' errors."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from harness import ServerFactory, free_port, sha256
from harness.workers import spread_over_workers, workers_of

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def debug_config(port: int, prometheus: bool = True, **extra: Any) -> dict[str, Any]:
    return {
        "http": {"debug": {"addr": f"127.0.0.1:{port}", "prometheus": {"enabled": prometheus}}},
        **extra,
    }


def scrape(port: int, path: str = "/metrics") -> Samples:
    """Every sample of the exposition, parsed by prometheus-client's own parser."""
    deadline = time.monotonic() + 10
    while True:
        try:
            r = requests.get(f"http://127.0.0.1:{port}{path}", timeout=10)
            break
        except requests.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)  # worker 0 listens on the debug address once it serves
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"].startswith("text/plain")
    found: Samples = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and wanted <= lab)


def delta(before: Samples, after: Samples) -> Callable[..., float]:
    return lambda name, **labels: value(after, name, **labels) - value(before, name, **labels)


def upload(conn: Any, repository: str, data: bytes) -> None:
    """A monolithic blob upload on one worker's connection."""
    status, _, _ = conn.request(
        "POST",
        f"/v2/{repository}/blobs/uploads/?digest={sha256(data)}",
        body=data,
        headers={"Content-Length": str(len(data))},
    )
    assert status == 201


def test_http_and_storage_metrics_with_registry2_names(start_server: ServerFactory) -> None:
    port = free_port()
    s = start_server(**debug_config(port))
    digest, manifest = s.push_image("metrics/app", "v1", layers=[b"x" * 5000])
    before = scrape(port)
    for _ in range(3):
        assert requests.head(s.v2("metrics/app/manifests/v1"), headers=ACCEPT).status_code == 200
    for _ in range(2):
        assert requests.get(s.v2(f"metrics/app/manifests/{digest}"), headers=ACCEPT).ok
    layer = manifest["layers"][0]["digest"]
    assert requests.get(s.v2(f"metrics/app/blobs/{layer}")).content == b"x" * 5000
    assert requests.get(s.v2("metrics/app/manifests/nope")).status_code == 404
    requests.get(s.url + "/nowhere")
    after = scrape(port)
    d = delta(before, after)
    requests_total = "registry_http_requests_total"
    assert d(requests_total, handler="manifest", method="head", code="200") == 3
    assert d(requests_total, handler="manifest", method="get", code="200") == 2
    assert d(requests_total, handler="manifest", method="get", code="404") == 1
    assert d(requests_total, handler="blob", method="get", code="200") == 1
    assert d(requests_total, handler="unmatched", code="404") == 1
    duration = "registry_http_request_duration_seconds"
    assert d(duration + "_count", handler="manifest", method="head") == 3
    assert value(after, duration + "_bucket", handler="manifest", method="head", le="60.0") >= 3
    assert d("registry_http_response_size_bytes_count", handler="blob") == 1
    assert d("registry_http_response_size_bytes_sum", handler="blob") == 5000
    # a HEAD sends no body
    assert d("registry_http_response_size_bytes_bucket", handler="manifest", le="1024.0") >= 3
    assert d("dockyard_served_bytes_total", handler="blob") == 5000
    assert value(after, "registry_http_in_flight_requests", handler="manifest") == 0
    # the push: a monolithic upload's body counted as received
    assert value(before, "dockyard_upload_bytes_received_total") >= 5000
    assert value(before, "registry_http_request_size_bytes_sum", handler="blob_upload") >= 5000
    # storage actions, as registry:2 names them
    assert d("registry_storage_action_seconds_count", driver=_driver(s), action="GetContent") > 0
    assert value(before, "registry_storage_action_seconds_count", action="PutContent") > 0
    names = {name for name, _ in after}
    # no per-repository or per-digest label anywhere
    for _, labels in after:
        assert not any("metrics/app" in v or "sha256:" in v for _, v in labels), labels
    assert "registry_http_in_flight_requests" in names


ACCEPT = {"Accept": "application/vnd.oci.image.manifest.v1+json"}


def _driver(s: Any) -> str:
    return "s3aws" if os.environ.get("DOCKYARD_TEST_S3") else "filesystem"


def test_debug_server_without_prometheus_serves_health_only(start_server: ServerFactory) -> None:
    port = free_port()
    s = start_server(**debug_config(port, prometheus=False))
    r = requests.get(f"http://127.0.0.1:{port}/debug/health")
    assert r.status_code == 200 and r.json() == {}
    assert requests.get(f"http://127.0.0.1:{port}/metrics").status_code == 404
    assert requests.get(s.url + "/metrics").status_code == 404  # never on the main port


def test_metrics_at_the_configured_path(start_server: ServerFactory) -> None:
    port = free_port()
    config = debug_config(port)
    config["http"]["debug"]["prometheus"]["path"] = "/prom"
    start_server(**config)
    assert value(scrape(port, "/prom"), "registry_http_requests_total") >= 0
    assert requests.get(f"http://127.0.0.1:{port}/metrics").status_code == 404


@pytest.mark.slow
@pytest.mark.filesystem
def test_debug_health_shows_the_error_and_the_main_port_does_not(
    start_server: ServerFactory,
) -> None:
    port = free_port()
    s = start_server(**debug_config(port))
    probe = s.root / "dockyard" / "health"
    assert requests.get(s.url + "/debug/health").json() == {}
    shutil.rmtree(probe)
    probe.write_text("in the way")
    time.sleep(1.1)  # results are reused for a second
    public = requests.get(s.url + "/debug/health")
    assert public.status_code == 503
    assert public.json() == {"storagedriver_filesystem": "failed"}
    debug = requests.get(f"http://127.0.0.1:{port}/debug/health")
    assert debug.status_code == 503
    detail = debug.json()["storagedriver_filesystem"]
    assert detail != "failed" and (str(probe) in detail or "directory" in detail.lower())
    probe.unlink()
    time.sleep(1.1)
    assert requests.get(f"http://127.0.0.1:{port}/debug/health").json() == {}


@pytest.mark.slow
@pytest.mark.filesystem
def test_storagedriver_threshold(start_server: ServerFactory) -> None:
    """health.storagedriver: checked every interval; failing only after threshold failures in
    a row; passing again at once."""
    port = free_port()
    s = start_server(
        **debug_config(
            port, health={"storagedriver": {"enabled": True, "interval": "0.3s", "threshold": 4}}
        )
    )
    probe = s.root / "dockyard" / "health"
    time.sleep(0.5)
    assert requests.get(s.url + "/debug/health").status_code == 200
    shutil.rmtree(probe)
    probe.write_text("in the way")
    broken = time.monotonic()
    while requests.get(s.url + "/debug/health").status_code == 200:
        assert time.monotonic() - broken < 5, "never failed"
        time.sleep(0.05)
    # four checks 0.3 s apart: not before the fourth (at least ~0.9 s after the break)
    assert time.monotonic() - broken > 0.8
    detail = requests.get(f"http://127.0.0.1:{port}/debug/health").json()
    assert list(detail) == ["storagedriver_filesystem"]
    probe.unlink()
    time.sleep(0.7)
    assert requests.get(s.url + "/debug/health").status_code == 200


@pytest.mark.filesystem
def test_storagedriver_disabled_checks_nothing(start_server: ServerFactory) -> None:
    s = start_server(health={"storagedriver": {"enabled": False}})
    probe = s.root / "dockyard" / "health"
    shutil.rmtree(probe, ignore_errors=True)
    probe.parent.mkdir(parents=True, exist_ok=True)
    probe.write_text("in the way")
    time.sleep(1.1)
    assert requests.get(s.url + "/debug/health").status_code == 200


@pytest.mark.slow
def test_counts_add_up_across_four_workers(start_server: ServerFactory) -> None:
    """Requests spread over four workers (each connection placed on another one) are all in
    one scrape of the debug address: counts and bytes summed over the workers."""
    from harness.receiver import Receiver

    port = free_port()
    receiver = Receiver().start()  # the events' metrics come from the outbox, not a worker
    endpoint = {"name": "hook", "url": receiver.url, "ignore": {"actions": ["pull"]}}
    s = start_server(
        workers=4,
        **debug_config(port),
        notifications={"endpoints": [endpoint], "outbox": {"pollinterval": "50ms"}},
    )
    connections = spread_over_workers(s, 4)  # (each asked GET /v2/ once or more)
    time.sleep(1.2)  # every worker's counts are in
    before = scrape(port)
    blobs = [os.urandom(3000 + i) for i in range(8)]
    try:
        for i, data in enumerate(blobs):
            upload(connections[i % 4], "multi/app", data)
        for i in range(20):
            status, _ = connections[i % 4].get("/v2/")
            assert status == 200
        for i, data in enumerate(blobs):
            status, _, body = connections[i % 4].request(
                "GET", f"/v2/multi/app/blobs/{sha256(data)}"
            )
            assert status == 200 and body == data
    finally:
        for conn in connections:
            conn.close()
    total = sum(len(b) for b in blobs)
    # Each worker adds what it counted to the shared values every second (the response's size
    # when the response has ended, which may be a flush after its served bytes).
    deadline = time.monotonic() + 10
    while True:
        after = scrape(port)
        d = delta(before, after)
        delivered = d("dockyard_events_delivered_total", endpoint="hook")
        counted = (
            d("dockyard_served_bytes_total") == total
            and d("registry_http_response_size_bytes_sum", handler="blob") == total
            and d("registry_http_requests_total", handler="blob", method="get", code="200") == 8
        )
        if counted and delivered == 8:
            break
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    receiver.stop()
    assert delivered == 8  # a push event per blob, counted once for the instance
    assert value(after, "dockyard_events_backlog_bytes", endpoint="hook") == 0
    requests_total = "registry_http_requests_total"
    assert d(requests_total, handler="blob_upload", method="post", code="201") == 8
    assert d(requests_total, handler="base", method="get", code="200") == 20
    assert d(requests_total, handler="blob", method="get", code="200") == 8
    assert d("dockyard_upload_bytes_received_total") == total
    assert d("registry_http_request_size_bytes_sum", handler="blob_upload") == total
    assert d("dockyard_served_bytes_total", handler="blob") == total
    assert d("registry_http_response_size_bytes_sum", handler="blob") == total
    assert value(after, "registry_http_in_flight_requests") == 0
    # a scrape is not a request of the registry's: the count does not move
    assert value(scrape(port), requests_total) == value(after, requests_total)
    served = [line for line in s.log().splitlines() if "serving the debug server" in line]
    assert len(served) == 1, served  # by one worker only
    # the workers' values live in a directory of this instance's own, removed at the end
    with open(f"/proc/{workers_of(s)[0]}/maps") as maps:  # the worker maps its files
        mapped = [line.split()[-1] for line in maps if "dockyard-metrics-" in line]
    path = os.path.dirname(mapped[0])
    assert len(os.listdir(path)) >= 4
    s.stop()
    assert not os.path.exists(path)


@pytest.mark.slow
def test_a_restarted_worker_serves_the_debug_address_and_counts_survive(
    start_server: ServerFactory,
) -> None:
    """kill -9 of the worker serving the debug address: its replacement serves it on the same
    socket, and what the dead worker counted is still in the sums."""
    port = free_port()
    s = start_server(workers=2, **debug_config(port))
    for _ in range(10):
        assert requests.get(s.v2("")).status_code == 200
    time.sleep(1.2)  # every worker's counts are in
    before = value(scrape(port), "registry_http_requests_total", handler="base")
    assert before >= 10
    (line,) = [x for x in s.log().splitlines() if "serving the debug server" in x]
    pid = int(line.split("pid=")[1].split()[0])
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while s.log().count("serving the debug server") < 2:
        assert time.monotonic() < deadline, s.log()[-3000:]
        time.sleep(0.1)
    after = scrape(port)
    assert value(after, "registry_http_requests_total", handler="base") >= before
    assert value(after, "registry_http_in_flight_requests") == 0


def test_a_busy_debug_address_stops_start_up(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        config = tmp_path / "config.yml"
        config.write_text(
            yaml.safe_dump(
                {
                    "version": "0.1",
                    "storage": {"filesystem": {"rootdirectory": str(tmp_path / "data")}},
                    "http": {
                        "addr": f"127.0.0.1:{free_port()}",
                        "debug": {"addr": f"127.0.0.1:{taken}"},
                    },
                }
            )
        )
        done = subprocess.run(
            [sys.executable, "-m", "dockyard", "serve", str(config), "--workers", "2"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert done.returncode != 0
    assert "http.debug.addr" in done.stderr and "cannot listen" in done.stderr


def test_pull_through_cache_hits_misses_and_upstream_errors(start_server: ServerFactory) -> None:
    upstream = start_server()
    digest, manifest = upstream.push_image("library/alpine", "3", [os.urandom(20_000)])
    port = free_port()
    mirror = start_server(proxy={"remoteurl": upstream.url}, **debug_config(port))
    layer = manifest["layers"][0]
    before = scrape(port)
    for _ in range(2):  # a miss, then a hit
        assert requests.get(mirror.v2(f"library/alpine/manifests/{digest}"), headers=ACCEPT).ok
        assert requests.get(mirror.v2(f"library/alpine/blobs/{layer['digest']}")).ok
    upstream.stop()
    assert requests.get(mirror.v2("library/busybox/manifests/1")).status_code == 503
    d = delta(before, scrape(port))
    for kind in ("manifest", "blob"):
        assert d("registry_proxy_hits_total", type=kind) == 1
    assert d("registry_proxy_misses_total", type="blob") == 1
    # the manifest the upstream could not give is a miss too
    assert d("registry_proxy_misses_total", type="manifest") == 2
    assert d("registry_proxy_requests_total", type="manifest") == 3
    assert d("registry_proxy_requests_total", type="blob") == 2
    assert d("registry_proxy_pulled_bytes_total", type="blob") == layer["size"]
    assert d("dockyard_proxy_upstream_errors_total", kind="unavailable") >= 1


def test_auth_failures_and_throttled_logins(start_server: ServerFactory, tmp_path: Path) -> None:
    from dockyard.auth.htpasswd import hash_password

    users = tmp_path / "htpasswd"
    users.write_text(f"alice:{hash_password('secret', rounds=4)}\n")
    port = free_port()
    config = debug_config(port)
    config["http"]["limits"] = {"login": {"attempts": 2, "window": "10s", "lockout": "30s"}}
    s = start_server(auth={"htpasswd": {"realm": "R", "path": str(users)}}, **config)
    before = scrape(port)
    assert requests.get(s.v2("")).status_code == 401  # no credentials: a challenge, not a failure
    for _ in range(2):
        assert requests.get(s.v2(""), auth=("alice", "wrong")).status_code == 401
    assert requests.get(s.v2(""), auth=("alice", "wrong")).status_code == 429
    d = delta(before, scrape(port))
    assert d("dockyard_auth_failures_total", reason="bad_credentials") == 2
    assert d("dockyard_auth_failures_total", reason="throttled") >= 1
    assert d("registry_http_requests_total", handler="base", code="401") == 3


@pytest.mark.slow
def test_scheduled_gc_runs_reclaimed_bytes_and_storage_used(start_server: ServerFactory) -> None:
    port = free_port()
    s = start_server(
        # a grace longer than a push: with none, a collection between a layer's upload and its
        # manifest may take the layer (object storage stamps times in whole seconds)
        storage={"maintenance": {"gc": {"enabled": True, "interval": "1s", "grace": "3s"}}},
        **debug_config(port),
    )
    kept = os.urandom(7000)
    garbage = os.urandom(5000)
    s.push_image("gc/kept", "v1", [kept])
    digest, manifest = s.push_image("gc/gone", "v1", [garbage])
    before = scrape(port)
    assert requests.delete(s.v2(f"gc/gone/manifests/{digest}")).status_code == 202
    deadline = time.monotonic() + 45
    while True:
        after = scrape(port)
        if (
            value(after, "dockyard_gc_reclaimed_bytes_total")
            - value(before, "dockyard_gc_reclaimed_bytes_total")
            >= len(garbage)
            or time.monotonic() > deadline
        ):
            break
        time.sleep(0.3)
    d = delta(before, after)
    # the unreferenced layer, config and manifest of the deleted image
    config_size = manifest["config"]["size"]
    assert d("dockyard_gc_reclaimed_bytes_total") >= len(garbage) + config_size
    assert value(after, "dockyard_gc_runs_total") >= 1
    assert value(after, "dockyard_gc_duration_seconds_count") >= 1
    used = value(after, "dockyard_storage_used_bytes")
    assert len(kept) < used < len(kept) + len(garbage) + 5000  # the kept image, its manifest


@pytest.mark.slow
def test_scrapes_during_pushes_on_four_workers_only_grow_and_end_exact(
    start_server: ServerFactory,
) -> None:
    """Pushes on four connections, one per worker, while the debug address is scraped: every
    scrape parses, no count ever goes down, and once the pushes are done the sums are exact."""
    port = free_port()
    s = start_server(workers=4, **debug_config(port))
    connections = spread_over_workers(s, 4)
    time.sleep(1.2)
    before = scrape(port)
    per_connection = 15
    sizes: list[int] = []

    def push(conn: Any, index: int) -> None:
        for i in range(per_connection):
            data = os.urandom(2000 + 100 * index + i)
            upload(conn, f"during/app{index}", data)
            sizes.append(len(data))

    threads = [threading.Thread(target=push, args=(conn, i)) for i, conn in enumerate(connections)]
    for t in threads:
        t.start()
    seen: list[float] = []
    try:
        while any(t.is_alive() for t in threads):
            seen.append(value(scrape(port), "registry_http_requests_total", handler="blob_upload"))
            time.sleep(0.1)
    finally:
        for t in threads:
            t.join()
        for conn in connections:
            conn.close()
    assert seen == sorted(seen), seen
    total = 4 * per_connection
    deadline = time.monotonic() + 5
    while True:
        d = delta(before, scrape(port))
        done = d("registry_http_requests_total", handler="blob_upload", code="201")
        if done == total or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert done == total
    assert d("dockyard_upload_bytes_received_total") == sum(sizes)


def test_event_metrics_per_endpoint(start_server: ServerFactory) -> None:
    """Backlog, failed attempts and drops while the receiver is down; delivered once it is up.
    Read from the outbox's state, so they are the instance's, not one worker's."""
    from harness.receiver import Receiver

    receiver = Receiver()  # down
    port = free_port()
    s = start_server(
        **debug_config(port),
        notifications={
            "endpoints": [
                {
                    "name": "ci",
                    "url": receiver.url,
                    "timeout": "1s",
                    "threshold": 2,
                    "backoff": "50ms",
                    "maxbackoff": "100ms",
                    "ignoredmediatypes": ["application/octet-stream"],
                }
            ],
            "outbox": {"pollinterval": "50ms", "maxbytes": 4096},
        },
    )
    for i in range(20):
        body = f'{{"schemaVersion": 2, "manifests": [], "annotations": {{"n": "{i}"}}}}'
        r = s.push_manifest("ev/app", f"t{i}", body.encode(), INDEX)
        assert r.status_code == 201, r.text
    deadline = time.monotonic() + 15
    while True:
        down = scrape(port)  # the bound is applied between attempts
        backlog = value(down, "dockyard_events_backlog_bytes", endpoint="ci")
        if value(down, "dockyard_events_dropped_total", endpoint="ci") > 0 and backlog <= 4096:
            break
        assert time.monotonic() < deadline, "nothing dropped past maxbytes"
        time.sleep(0.1)
    assert value(down, "dockyard_events_delivery_failures_total", endpoint="ci") >= 2
    assert value(down, "dockyard_events_consecutive_failures", endpoint="ci") >= 2
    assert backlog > 0
    assert value(down, "dockyard_events_delivered_total", endpoint="ci") == 0
    dropped = value(down, "dockyard_events_dropped_total", endpoint="ci")
    receiver.start()
    try:
        receiver.wait_for(int(20 - dropped), timeout=15, settle=0.3)
        deadline = time.monotonic() + 10
        while True:
            up = scrape(port)
            if value(up, "dockyard_events_backlog_bytes", endpoint="ci") == 0:
                break
            assert time.monotonic() < deadline, "the backlog does not drain"
            time.sleep(0.1)
        assert value(up, "dockyard_events_delivered_total", endpoint="ci") == 20 - dropped
        assert value(up, "dockyard_events_consecutive_failures", endpoint="ci") == 0
    finally:
        receiver.stop()


INDEX = "application/vnd.oci.image.index.v1+json"


def test_quota_usage_and_limits(start_server: ServerFactory) -> None:
    """Each configured quota's limit and usage (from the metadata index, refreshed every few
    seconds, never at scrape time), and the registry's space used."""
    port = free_port()
    s = start_server(
        **debug_config(port),
        quotas=[{"scope": "team/*", "limit": "1MiB"}, {"scope": "x", "limit": 5}],
    )
    s.push_image("team/app", "1", [os.urandom(10_000)])
    s.push_image("other", "1", [os.urandom(20_000)])
    deadline = time.monotonic() + 15
    while True:
        samples = scrape(port)
        used = value(samples, "dockyard_quota_used_bytes", scope="team/*")
        if used > 10_000 and value(samples, "dockyard_index_used_bytes") > 30_000:
            break
        assert time.monotonic() < deadline, samples
        time.sleep(0.2)
    assert value(samples, "dockyard_quota_limit_bytes", scope="team/*") == 1024 * 1024
    assert value(samples, "dockyard_quota_limit_bytes", scope="x") == 5
    assert value(samples, "dockyard_quota_used_bytes", scope="x") == 0
    assert used < 20_000  # the other repository is not in the scope
