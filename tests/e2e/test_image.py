"""The container image from deploy/Dockerfile: built by a real docker engine from a local base
(Debian bookworm's python3, made with mmdebstrap once and imported, since there is no Docker
Hub here), then run: non-root, healthy, serving the registry, stopping cleanly on SIGTERM.

Dockyard's own Python dependencies come from a wheelhouse served on loopback (PIP_FIND_LINKS,
PIP_NO_INDEX), as a build behind a mirror would."""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
import requests

from harness import free_port, sha256
from harness.docker import Dockerd
from harness.images import debian_python_rootfs

ROOT = Path(__file__).resolve().parents[2]
BASE = "local/debian-python:bookworm"


@pytest.fixture(scope="module")
def base_image(dockerd_engine: Dockerd) -> str:
    """Debian bookworm's python3 as a local image (debootstrap, made once and kept)."""
    tarball = debian_python_rootfs()
    imported = dockerd_engine.docker("import", str(tarball), BASE, timeout=300)
    assert imported.returncode == 0, imported.stderr
    return BASE


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Dockyard and its dependencies as wheels, served over HTTP on loopback."""
    wheels = tmp_path_factory.mktemp("wheels")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--wheel-dir", str(wheels), str(ROOT)],
        check=True,
        timeout=600,
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--dest",
            str(wheels),
            "setuptools>=77",
            "wheel",
            # redis needs it on Pythons before 3.11.3, such as bookworm's 3.11.2 in the image,
            # though not on the one running the tests
            "async-timeout>=4.0.3",
        ],
        check=True,
        timeout=600,
    )
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(wheels))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


@pytest.mark.slow
def test_image_builds_runs_non_root_and_healthy(
    dockerd_engine: Dockerd, base_image: str, wheelhouse: str
) -> None:
    engine = dockerd_engine
    engine.docker(
        "build",
        "--network",
        "host",
        "-f",
        str(ROOT / "deploy/Dockerfile"),
        "--build-arg",
        f"BASE={base_image}",
        "--build-arg",
        f"PIP_FIND_LINKS={wheelhouse}",
        "--build-arg",
        "PIP_NO_INDEX=1",
        "-t",
        "dockyard:test",
        str(ROOT),
        timeout=900,
    )
    inspect = engine.docker(
        "image",
        "inspect",
        "--format",
        "{{.Config.User}}|{{json .Config.Volumes}}|{{.Config.Healthcheck}}",
        "dockyard:test",
    ).stdout
    user, volumes, healthcheck = inspect.strip().split("|", 2)
    assert user == "dockyard"
    assert "/var/lib/registry" in volumes
    assert "healthcheck" in healthcheck

    port = free_port()
    print(
        engine.docker(
            "run",
            "--rm",
            "--entrypoint",
            "/bin/sh",
            "dockyard:test",
            "-c",
            "echo $PATH; ls -la /opt/dockyard/bin",
            check=False,
        )
    )
    container = engine.docker(
        "run",
        "-d",
        "--network",
        "host",
        "--health-interval",
        "1s",
        "--health-start-period",
        "0s",
        "-e",
        f"REGISTRY_HTTP_ADDR=127.0.0.1:{port}",
        "-e",
        "REGISTRY_HTTP_SECRET=s",
        "-e",
        "REGISTRY_STORAGE_DELETE_ENABLED=true",
        "dockyard:test",
    ).stdout.strip()
    try:
        deadline = time.monotonic() + 60
        status = ""
        while time.monotonic() < deadline:
            status = engine.docker(
                "inspect", "--format", "{{.State.Health.Status}}", container
            ).stdout.strip()
            if status == "healthy":
                break
            time.sleep(1)
        assert status == "healthy", engine.docker("logs", container, check=False).stderr
        assert engine.docker("exec", container, "id", "-u").stdout.strip() == "10001"
        base = f"http://127.0.0.1:{port}/v2"
        r = requests.post(
            f"{base}/img/test/blobs/uploads/", params={"digest": sha256(b"x")}, data=b"x"
        )
        assert r.status_code == 201, r.text
        assert requests.get(f"{base}/img/test/blobs/{sha256(b'x')}").content == b"x"
        stopped = engine.docker("stop", "--time", "30", container, timeout=60)
        assert stopped.returncode == 0
        code = engine.docker("inspect", "--format", "{{.State.ExitCode}}", container).stdout
        assert code.strip() == "0"  # SIGTERM: finished cleanly, not killed
    finally:
        engine.docker("rm", "-f", container, check=False)
