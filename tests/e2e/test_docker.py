"""End to end with the real Docker engine: load an offline-built image, push it to Dockyard,
remove it, pull it back and run it; check what the registry serves along the way."""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pytest

from harness.images import build_busybox_image

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
ACCEPT = ", ".join(
    [
        DOCKER_MANIFEST,
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
    ]
)
REPO = "e2e/busybox"


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _inspect(dockerd: Any, ref: str) -> dict[str, Any]:
    out = dockerd.docker("image", "inspect", ref).stdout
    (info,) = json.loads(out)
    return info


def _pushed_digest(output: str, tag: str) -> str:
    match = re.search(rf"^{re.escape(tag)}: digest: (sha256:[0-9a-f]{{64}}) size: \d+$", output,
                      re.MULTILINE)  # fmt: skip
    assert match, f"no digest line in docker push output:\n{output}"
    return match[1]


def test_push_pull_run(dockerd: Any, registry_port: int, start_server: Any, tmp_path: Path) -> None:
    server = start_server(port=registry_port, workers=2)
    image = build_busybox_image(tmp_path / "busybox.tar")
    ref = f"{server.host}/{REPO}:v1"

    def context() -> str:
        return f"\n--- dockyard log ---\n{server.log()[-6000:]}"

    # -- load the offline image and push it ----------------------------------------------------
    loaded = dockerd.docker("load", "-i", str(image.path))
    assert image.repo_tag in loaded.stdout, loaded.stdout
    assert _inspect(dockerd, image.repo_tag)["Id"] == image.image_id

    dockerd.docker("tag", image.repo_tag, ref)
    push = dockerd.docker("push", ref)
    digest = _pushed_digest(push.stdout, "v1")
    assert f"{server.host}/{REPO}@{digest}" in _inspect(dockerd, ref)["RepoDigests"]

    # A second push finds every layer in place and yields the same manifest digest.
    again = dockerd.docker("push", ref)
    assert again.stdout.count("Layer already exists") == len(image.layers), again.stdout
    assert _pushed_digest(again.stdout, "v1") == digest

    # -- the registry side -----------------------------------------------------------------------
    http = server.session
    r = http.get(server.v2(f"{REPO}/tags/list"))
    assert r.status_code == 200, r.text + context()
    assert r.json()["name"] == REPO
    assert "v1" in r.json()["tags"]

    for reference in ("v1", digest):
        r = http.get(server.v2(f"{REPO}/manifests/{reference}"), headers={"Accept": ACCEPT})
        assert r.status_code == 200, r.text + context()
        assert r.headers["Docker-Content-Digest"] == digest
        assert _sha256(r.content) == digest
        assert r.headers["Content-Type"] == DOCKER_MANIFEST
        h = http.head(server.v2(f"{REPO}/manifests/{reference}"), headers={"Accept": ACCEPT})
        assert h.status_code == 200, context()
        assert h.headers["Docker-Content-Digest"] == digest
        assert int(h.headers["Content-Length"]) == len(r.content)
    manifest = r.json()
    assert manifest["mediaType"] == DOCKER_MANIFEST
    assert manifest["config"]["mediaType"] == DOCKER_CONFIG
    assert manifest["config"]["digest"] == image.image_id

    r = http.get(server.v2(f"{REPO}/blobs/{image.image_id}"))
    assert r.status_code == 200, r.text + context()
    assert r.content == image.config

    assert len(manifest["layers"]) == len(image.layers)
    for descriptor, diff_id in zip(manifest["layers"], image.diff_ids, strict=True):
        assert descriptor["mediaType"] == DOCKER_LAYER
        r = http.get(server.v2(f"{REPO}/blobs/{descriptor['digest']}"))
        assert r.status_code == 200, r.text + context()
        assert len(r.content) == descriptor["size"]
        assert _sha256(r.content) == descriptor["digest"]
        assert _sha256(gzip.decompress(r.content)) == diff_id

    # -- remove it locally, pull it back, run it -------------------------------------------------
    dockerd.docker("rmi", ref, image.repo_tag)
    gone = dockerd.docker("image", "inspect", image.image_id, check=False)
    assert gone.returncode != 0, f"image still present after rmi:\n{gone.stdout}"
    # Gone from the engine (which other tests' images share): the pull must fetch it all.
    listed = dockerd.docker("images", "-q", "--no-trunc").stdout.split()
    assert image.image_id not in listed, listed

    pull = dockerd.docker("pull", ref)
    assert f"Digest: {digest}" in pull.stdout, pull.stdout + context()
    pulled = _inspect(dockerd, ref)
    assert pulled["RepoDigests"] == [f"{server.host}/{REPO}@{digest}"]
    assert pulled["Id"] == image.image_id
    assert pulled["RootFS"]["Layers"] == image.diff_ids

    run = dockerd.docker("run", "--rm", "--network", "none", ref)
    assert run.stdout == image.content

    log = server.log()
    assert "Traceback" not in log, log
