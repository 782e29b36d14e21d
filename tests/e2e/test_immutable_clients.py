"""Immutable tags as real clients see them: docker and skopeo (containers/image, podman's
library) push a release tag once; pushing another image to it fails with the rule in the
message the user reads."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from harness.images import build_busybox_image
from harness.skopeo import SKOPEO, needs_skopeo

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

POLICIES = [{"repositories": ["releases/*"], "immutabletags": [r"v?\d+\.\d+\.\d+"]}]
RULE = r"immutabletags v?\d+\.\d+\.\d+"


def test_docker_push_to_an_immutable_tag_shows_the_rule(
    dockerd: Any, registry_port: int, start_server: Any, tmp_path: Path
) -> None:
    server = start_server(port=registry_port, policies=POLICIES)
    ref = f"{server.host}/releases/app:1.0.0"
    for n, name in enumerate(("first", "second")):
        image = build_busybox_image(tmp_path / f"{name}.tar")
        dockerd.docker("load", "-i", str(image.path))
        dockerd.docker("tag", image.repo_tag, ref)
        pushed = dockerd.docker("push", ref, check=n == 0)
    assert pushed.returncode != 0
    said = pushed.stdout + pushed.stderr
    assert "denied" in said and "tag 1.0.0 of releases/app is immutable" in said, said
    assert RULE in said, said
    # a new tag is fine
    dockerd.docker("tag", ref, f"{server.host}/releases/app:1.0.1")
    dockerd.docker("push", f"{server.host}/releases/app:1.0.1")


@needs_skopeo
def test_skopeo_copy_to_an_immutable_tag_shows_the_rule(start_server: Any, tmp_path: Path) -> None:
    server = start_server(policies=POLICIES)
    assert SKOPEO is not None
    results = []
    for name in ("first", "second"):
        image = build_busybox_image(tmp_path / f"{name}.tar")
        results.append(
            subprocess.run(
                [
                    SKOPEO,
                    "copy",
                    "--dest-tls-verify=false",
                    f"docker-archive:{image.path}",
                    f"docker://{server.host}/releases/tool:v2.0.0",
                ],
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
        )
    assert results[0].returncode == 0, results[0].stderr
    assert results[1].returncode != 0
    assert "denied: tag v2.0.0 of releases/tool is immutable" in results[1].stderr
    assert RULE in results[1].stderr.replace("\\\\", "\\")
    # skopeo delete resolves the tag and deletes the manifest by digest: refused as well
    deleted = subprocess.run(
        [SKOPEO, "delete", "--tls-verify=false", f"docker://{server.host}/releases/tool:v2.0.0"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert deleted.returncode != 0
    assert "tag v2.0.0 of releases/tool is immutable" in deleted.stderr, deleted.stderr
    assert server.session.head(server.v2("releases/tool/manifests/v2.0.0")).status_code == 200
