"""Concurrent uploads of the same blob and concurrent pushes of the same tag leave a
consistent store: every link points at content that is there, every tag at a manifest."""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from harness import OCI_MANIFEST, Server, ServerFactory, sha256


def check_store(root: Path) -> None:
    """Every link file holds a digest whose data exists, and nothing half-written remains."""
    v2 = root / "docker/registry/v2"
    links = list((v2 / "repositories").rglob("link"))
    assert links
    for link in links:
        digest = link.read_text()
        alg, hexpart = digest.split(":")
        assert link.parent.name == hexpart or "current" in link.parts, link
        assert (v2 / "blobs" / alg / hexpart[:2] / hexpart / "data").is_file(), link
    for data in (v2 / "blobs").rglob("data"):
        assert hashlib.sha256(data.read_bytes()).hexdigest() == data.parent.name
    assert not [p for p in v2.rglob("*") if ".tmp-" in p.name]


@pytest.mark.slow
@pytest.mark.filesystem
def test_concurrent_uploads_of_the_same_blob(start_server: ServerFactory) -> None:
    s = start_server(workers=2)
    data = os.urandom(3 * 1024 * 1024)
    digest = sha256(data)

    def chunked(i: int) -> int:
        name = f"same/r{i % 4}"
        loc = requests.post(s.v2(f"{name}/blobs/uploads/")).headers["Location"]
        half = len(data) // 2
        loc = requests.patch(
            loc, data=data[:half], headers={"Content-Range": f"0-{half - 1}"}
        ).headers["Location"]
        loc = requests.patch(
            loc, data=data[half:], headers={"Content-Range": f"{half}-{len(data) - 1}"}
        ).headers["Location"]
        return requests.put(loc, params={"digest": digest}).status_code

    def monolithic(i: int) -> int:
        return requests.post(
            s.v2(f"same/r{i % 4}/blobs/uploads/"), params={"digest": digest}, data=data
        ).status_code

    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(lambda i: (chunked if i % 2 else monolithic)(i), range(32)))
    assert codes == [201] * 32
    for i in range(4):
        assert requests.get(s.v2(f"same/r{i}/blobs/{digest}")).content == data
    check_store(s.root)


@pytest.mark.slow
@pytest.mark.filesystem
def test_concurrent_pushes_of_the_same_tag(start_server: ServerFactory) -> None:
    s: Server = start_server(workers=2)
    images = [s.push_image("race/app", None) for _ in range(12)]
    bodies = [json.dumps(m).encode() for _, m in images]

    def push(body: bytes) -> int:
        return s.push_manifest("race/app", "latest", body, OCI_MANIFEST).status_code

    with ThreadPoolExecutor(12) as pool:
        assert list(pool.map(push, bodies * 3)) == [201] * 36
    r = requests.get(s.v2("race/app/manifests/latest"))
    assert r.status_code == 200
    assert r.content in bodies
    assert r.headers["Docker-Content-Digest"] == sha256(r.content)
    index = s.root / "docker/registry/v2/repositories/race/app/_manifests/tags/latest/index/sha256"
    assert sorted(p.name for p in index.iterdir()) == sorted(d[7:] for d, _ in images)
    check_store(s.root)
