"""Quotas as real clients see them: a push that would take a namespace over its quota fails
with the scope, its usage and its limit in the message docker and skopeo (containers/image,
podman's library) print; a push that fits succeeds."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from harness.images import build_busybox_image
from harness.skopeo import SKOPEO, needs_skopeo

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

#: busybox is about 1 MiB: one image fits team-a's quota; ci/* has room for none
QUOTAS = [{"scope": "team-a/*", "limit": "3MiB"}, {"scope": "ci/*", "limit": "200KiB"}]


@needs_skopeo
def test_skopeo_copy_over_the_quota_shows_scope_usage_and_limit(
    start_server: Any, tmp_path: Path
) -> None:
    server = start_server(quotas=QUOTAS)
    assert SKOPEO is not None

    def copy(image: Path, ref: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [SKOPEO, "copy", "--dest-tls-verify=false", f"docker-archive:{image}", ref],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    image = build_busybox_image(tmp_path / "one.tar")
    fits = copy(image.path, f"docker://{server.host}/team-a/tool:1")
    assert fits.returncode == 0, fits.stderr
    refused = copy(image.path, f"docker://{server.host}/ci/tool:1")
    assert refused.returncode != 0
    assert "denied: quota exceeded for ci/*:" in refused.stderr, refused.stderr
    assert "used of 200.0 KiB" in refused.stderr
    assert server.session.head(server.v2("ci/tool/manifests/1")).status_code == 404


def test_docker_push_over_the_quota_shows_scope_usage_and_limit(
    dockerd: Any, registry_port: int, start_server: Any, tmp_path: Path
) -> None:
    server = start_server(port=registry_port, quotas=QUOTAS)
    image = build_busybox_image(tmp_path / "image.tar")
    dockerd.docker("load", "-i", str(image.path))
    ref = f"{server.host}/ci/app:1"
    dockerd.docker("tag", image.repo_tag, ref)
    pushed = dockerd.docker("push", ref, check=False)
    assert pushed.returncode != 0
    said = pushed.stdout + pushed.stderr
    assert "denied: quota exceeded for ci/*:" in said, said
