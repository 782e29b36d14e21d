"""``dockyard serve``: start-up checks, workers, graceful shutdown, environment, access log."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from harness import ServerFactory, free_port, sha256, wait_for_port
from harness.workers import spread_over_workers, worker_of


def run_serve(
    args: list[str], env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 20
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dockyard", "serve", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env={**os.environ, **(env or {})},
    )


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.parametrize(
    ("config", "key"),
    [
        (
            "version: 0.1\nstorage: {filesystem: {rootdirectory: /tmp/x}, delete: {enabled: 7}}\n",
            "storage.delete.enabled",
        ),
        ("version: 0.1\nstorage: {gcs: {bucket: b}}\n", "storage.gcs"),
        ("version: 0.1\nstorage: {s3: {region: x}}\n", "storage.s3.bucket"),
        ("version: 0.1\nstorage: {filesystem: {}}\nhttp: {addr: 'nonsense'}\n", "http.addr"),
        (
            "version: 0.1\nstorage: {filesystem: {rootdirectory: /proc/nope}}\n",
            "storage.filesystem.rootdirectory",
        ),
    ],
)
def test_invalid_config_fails_before_binding(tmp_path: Path, config: str, key: str) -> None:
    path = tmp_path / "config.yml"
    path.write_text(config)
    result = run_serve([str(path)])
    assert result.returncode == 2
    assert f"configuration error: {key}:" in result.stderr


def test_invalid_env_override_fails(tmp_path: Path) -> None:
    result = run_serve(
        [],
        env={"REGISTRY_LOG_LEVEL": "shouty", "REGISTRY_HTTP_ADDR": f"127.0.0.1:{free_port()}"},
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "log.level" in result.stderr


def test_busy_port_fails_clearly(start_server: ServerFactory, tmp_path: Path) -> None:
    s = start_server()
    path = tmp_path / "config.yml"
    path.write_text(s.config_path.read_text())
    result = run_serve([str(path)])
    assert result.returncode == 2
    assert "http.addr" in result.stderr and "cannot listen" in result.stderr


@pytest.fixture
def env_server(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int, Path]]:
    port = free_port()
    log = open(tmp_path / "log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "dockyard", "serve", "--workers", "1"],
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={
            **os.environ,
            "REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY": str(tmp_path / "volume"),
            "REGISTRY_HTTP_ADDR": f"127.0.0.1:{port}",
            "REGISTRY_HTTP_SECRET": "compose-secret",
            "REGISTRY_STORAGE_DELETE_ENABLED": "false",
        },
    )
    wait_for_port(port, proc)
    yield proc, port, tmp_path
    proc.terminate()
    proc.wait(20)
    log.close()


def test_classic_compose_environment(env_server: tuple[subprocess.Popen[bytes], int, Path]) -> None:
    _, port, tmp = env_server
    url = f"http://127.0.0.1:{port}/v2"
    r = requests.post(f"{url}/x/blobs/uploads/", params={"digest": sha256(b"hi")}, data=b"hi")
    assert r.status_code == 201
    assert (tmp / "volume/docker/registry/v2/blobs/sha256").is_dir()
    assert not (tmp / "data").exists()  # the default ./data was overridden
    assert requests.delete(f"{url}/x/blobs/{sha256(b'hi')}").status_code == 405


@pytest.mark.slow
def test_embedded_default_uses_data_dir(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "dockyard", "serve", "--workers", "1"],
        cwd=tmp_path,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "REGISTRY_HTTP_ADDR": f"127.0.0.1:{port}"},
    )
    try:
        wait_for_port(port, proc)
        r = requests.post(
            f"http://127.0.0.1:{port}/v2/x/blobs/uploads/",
            params={"digest": sha256(b"d")},
            data=b"d",
        )
        assert r.status_code == 201
        assert (tmp_path / "data/docker/registry/v2/repositories/x/_layers").is_dir()
        # deletes are on in the embedded default
        assert (
            requests.delete(f"http://127.0.0.1:{port}/v2/x/blobs/{sha256(b'd')}").status_code == 202
        )
    finally:
        proc.terminate()
        proc.wait(20)


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


@pytest.mark.slow
def test_workers_serve_one_port_and_are_restarted(start_server: ServerFactory) -> None:
    s = start_server(workers=3)  # the first also runs the maintenance schedules
    deadline = time.monotonic() + 10
    while len(children(s.proc.pid)) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    workers = children(s.proc.pid)
    assert len(workers) == 3
    for conn in spread_over_workers(s, 3):  # each of the three answers on the one port
        assert conn.served()
        conn.close()
    os.kill(workers[0], signal.SIGKILL)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        now = children(s.proc.pid)
        if len(now) == 3 and workers[0] not in now:
            break
        time.sleep(0.1)
    now = children(s.proc.pid)
    assert len(now) == 3 and workers[0] not in now, (workers, now)  # replaced, not just reaped
    # the replacement serves beside the two survivors
    served_by = set()
    for conn in spread_over_workers(s, 3):
        assert conn.served()
        served_by.add(worker_of(s, conn.sock))
        conn.close()
    assert served_by == set(now)


@pytest.mark.slow
@pytest.mark.filesystem
def test_sigterm_finishes_in_flight_requests(start_server: ServerFactory) -> None:
    s = start_server(workers=2)
    data = os.urandom(4 * 1024 * 1024)
    result: dict[str, object] = {}

    def slow_body() -> Iterator[bytes]:
        for i in range(0, len(data), 256 * 1024):
            yield data[i : i + 256 * 1024]
            time.sleep(0.1)

    def upload() -> None:
        r = requests.post(
            s.v2("drain/blobs/uploads/"), params={"digest": sha256(data)}, data=slow_body()
        )
        result["status"] = r.status_code

    t = threading.Thread(target=upload)
    t.start()
    time.sleep(0.5)  # the upload is now in flight
    s.proc.send_signal(signal.SIGTERM)
    t.join(30)
    assert result.get("status") == 201
    assert s.proc.wait(30) == 0
    assert port_is_free(s.port)
    blob = s.root / "docker/registry/v2/blobs/sha256" / sha256(data)[7:9] / sha256(data)[7:]
    assert (blob / "data").read_bytes() == data


def test_access_log_one_line_per_request(start_server: ServerFactory) -> None:
    s = start_server(log={"formatter": "json", "fields": {"service": "registry"}})
    missing = sha256(b"missing")
    requests.head(s.v2(f"x/blobs/{missing}"))
    loc = requests.post(s.v2("x/blobs/uploads/")).headers["Location"]
    requests.get(loc)
    requests.get(s.v2("x/blobs/sha256:broken"))
    time.sleep(0.3)
    lines = [json.loads(line) for line in s.log().splitlines() if line.startswith("{")]
    access = [e for e in lines if e.get("logger") == "dockyard.access"]
    assert [(e["method"], e["status"]) for e in access] == [
        ("HEAD", 404),
        ("POST", 202),
        ("GET", 204),
        ("GET", 400),
    ]
    assert all(e["level"] == "info" and e["service"] == "registry" for e in access)
    assert access[0]["path"] == f"/v2/x/blobs/{missing}"
    assert all("_state" not in e["path"] for e in access)
    assert not [e for e in lines if e["level"] == "error"]


@pytest.mark.slow
def test_access_log_can_be_disabled(start_server: ServerFactory) -> None:
    """``log.accesslog.disabled`` silences the access log of ``dockyard serve`` (a process of its
    own: in the test process the harness routes the log records itself)."""
    logged = start_server(process=True)
    silent = start_server(process=True, log={"accesslog": {"disabled": True}})
    for s in (logged, silent):
        assert requests.get(s.v2("")).status_code == 200
    time.sleep(0.2)
    access = [line for line in logged.log().splitlines() if "msg=request" in line]
    assert len(access) == 1 and "method=GET path=/v2/ status=200" in access[0], access
    assert "msg=request" not in silent.log()
    assert "level=info" in silent.log()  # it does log, just not the requests
