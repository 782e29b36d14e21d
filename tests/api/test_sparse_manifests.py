"""Sparse manifests (``validation.manifests.sparse``): a manifest whose blobs, or an index whose
children, the repository does not hold — accepted when the setting is on, MANIFEST_BLOB_UNKNOWN
when it is off (the default).

``test_conformance_sparse`` ports the OCI conformance suite's "sparse" data test
(opencontainers/distribution-spec, conformance/run.go at commit 967efdc: the ``tdName =
"sparse"`` block of ``GenerateData``, run by ``TestAll`` through ``TestPush``, ``TestList``,
``TestHead``, ``TestPull``, ``TestReferrers`` and ``TestDelete``, with the request checks of
conformance/api.go). The Go suite itself is not run here: it needs Go 1.24 and its modules.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import os
import random
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin

import pytest
import requests
from click.testing import CliRunner

from dockyard.cli import main
from dockyard.registry.configured import open_store
from dockyard.registry.fsck import check
from dockyard.registry.gc import GarbageCollector
from dockyard.registry.usage import measure
from harness import (
    OCI_INDEX,
    OCI_MANIFEST,
    InProcessDockyard,
    Server,
    ServerFactory,
    assert_error,
    sha256,
)

SPARSE = {"manifests": {"sparse": True}}

OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_PREFIX = "application/vnd.oci.image.layer.v1."
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"

AMD64 = {"architecture": "amd64", "os": "linux"}
ARM64 = {"architecture": "arm64", "os": "linux"}


@pytest.fixture(scope="module")
def sparse_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = InProcessDockyard.start(tmp_path_factory.mktemp("sparse"), validation=SPARSE)
    yield server
    server.stop()
    log = server.log()
    assert "Traceback" not in log, log[-3000:]
    assert "level=error" not in log


# -- the conformance suite's test data (conformance/testdata.go) -------------------------------


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()  # as Go's json.Marshal


@dataclass
class ConformanceData:
    """Go's ``testData``: what is pushed (blobs, manifests in order, tags) and every descriptor."""

    tags: dict[str, str] = field(default_factory=dict)
    desc: dict[str, dict[str, Any]] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)
    manifests: dict[str, bytes] = field(default_factory=dict)
    man_order: list[str] = field(default_factory=list)

    def gen_layer(self, number: int) -> tuple[str, str]:
        """``genLayer``: a gzipped tar of one file; (compressed, uncompressed) digests."""
        text = (
            f"Conformance test file contents for file number {number}.\n"
            f"Todays lucky number is {random.randrange(2**63)}\n"
        ).encode()
        tar = io.BytesIO()
        with tarfile.open(fileobj=tar, mode="w") as archive:
            info = tarfile.TarInfo(f"./conformance-{number}.txt")
            info.size, info.mode = len(text), 0o644
            archive.addfile(info, io.BytesIO(text))
        uncompressed = tar.getvalue()
        compressed = gzip.compress(uncompressed)
        digest = sha256(compressed)
        self.blobs[digest] = compressed
        self.desc[digest] = {"mediaType": OCI_LAYER_GZIP, "digest": digest, "size": len(compressed)}
        return digest, sha256(uncompressed)

    def gen_config(self, platform: dict[str, str], diff_ids: list[str]) -> str:
        """``genConfig``: an image config for the platform and layers."""
        body = _json(
            {
                "author": "OCI Conformance Test",
                **platform,
                "config": {},
                "rootfs": {"type": "layers", "diff_ids": diff_ids},
            }
        )
        digest = sha256(body)
        self.blobs[digest] = body
        self.desc[digest] = {"mediaType": OCI_CONFIG, "digest": digest, "size": len(body)}
        return digest

    def _add_manifest(self, body: bytes, media_type: str, tag: str | None) -> str:
        digest = sha256(body)
        self.manifests[digest] = body
        self.man_order.append(digest)
        self.desc[digest] = {"mediaType": media_type, "digest": digest, "size": len(body)}
        if tag:
            self.tags[tag] = digest
        return digest

    def gen_manifest_full(
        self, tag: str | None = None, platform: dict[str, str] = AMD64, layer_count: int = 2
    ) -> str:
        """``genManifestFull``: layers, a config and the image manifest."""
        layers = [self.gen_layer(n) for n in range(layer_count)]
        config = self.gen_config(platform, [uncompressed for _, uncompressed in layers])
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": self.desc[config],
            "layers": [self.desc[compressed] for compressed, _ in layers],
        }
        return self._add_manifest(_json(manifest), OCI_MANIFEST, tag)

    def gen_index(
        self, platforms: list[dict[str, str]], manifests: list[str], tag: str | None = None
    ) -> str:
        """``genIndex``: an index of ``manifests``, each with its platform."""
        index = {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {**self.desc[d], "platform": p} for p, d in zip(platforms, manifests, strict=True)
            ],
        }
        return self._add_manifest(_json(index), OCI_INDEX, tag)


def sparse_data() -> tuple[ConformanceData, str, str]:
    """``GenerateData``, ``tdName = "sparse"``: an image tagged ``sparse-image`` with its first
    layer never pushed, and an index tagged ``sparse-index`` of a complete image (linux/amd64)
    and a descriptor of random bytes (linux/arm64) that is never pushed. Returns the data, the
    missing layer and the missing child."""
    td = ConformanceData()
    td.gen_manifest_full(tag="sparse-image")
    missing_layer = next(
        d for d in td.blobs if td.desc[d]["mediaType"].startswith(OCI_LAYER_PREFIX)
    )
    del td.desc[missing_layer], td.blobs[missing_layer]
    image = td.gen_manifest_full(platform=AMD64)
    missing_child = sha256(os.urandom(1024))
    td.desc[missing_child] = {"mediaType": OCI_MANIFEST, "digest": missing_child, "size": 1024}
    td.gen_index([AMD64, ARM64], [image, missing_child], tag="sparse-index")
    return td, missing_layer, missing_child


# -- the conformance suite's requests and checks (conformance/run.go, api.go) ------------------

ACCEPT = {"Accept": f"{OCI_INDEX}, {OCI_MANIFEST}"}


def media_type_of(body: bytes) -> str:
    """``detectMediaType``."""
    return json.loads(body).get("mediaType") or OCI_MANIFEST


def push_blobs(s: Server, repo: str, td: ConformanceData) -> None:
    for data in td.blobs.values():
        s.push_blob(repo, data)


def manifest_put(s: Server, repo: str, ref: str, digest: str, td: ConformanceData) -> None:
    """``ManifestPut``: 201, the digest header, and a ``Location`` that serves the bytes."""
    body = td.manifests[digest]
    r = requests.put(
        s.v2(f"{repo}/manifests/{ref}"), data=body, headers={"Content-Type": media_type_of(body)}
    )
    assert r.status_code == 201, r.text
    assert r.headers.get("Docker-Content-Digest", digest) == digest
    location = urljoin(s.v2(f"{repo}/manifests/{ref}"), r.headers["Location"])
    got = requests.get(location, headers=ACCEPT)
    assert got.status_code == 200
    assert got.headers["Content-Type"] == media_type_of(body)
    assert got.headers["Content-Length"] == str(len(body))
    assert got.content == body


def manifest_exists(s: Server, repo: str, ref: str, digest: str, td: ConformanceData) -> None:
    """``ManifestHeadExists`` and ``ManifestGetExists``."""
    body = td.manifests[digest]
    head = requests.head(s.v2(f"{repo}/manifests/{ref}"), headers=ACCEPT)
    get = requests.get(s.v2(f"{repo}/manifests/{ref}"), headers=ACCEPT)
    for r in (head, get):
        assert r.status_code == 200
        assert r.headers["Content-Type"] == media_type_of(body)
        assert r.headers["Content-Length"] == str(len(body))
        assert r.headers.get("Docker-Content-Digest", digest) == digest
    assert head.content == b"" and get.content == body


def blob_exists(s: Server, repo: str, digest: str, td: ConformanceData) -> None:
    """``BlobHeadExists`` and ``BlobGetExistsFull``."""
    head = requests.head(s.v2(f"{repo}/blobs/{digest}"))
    get = requests.get(s.v2(f"{repo}/blobs/{digest}"))
    for r in (head, get):
        assert r.status_code == 200
        assert r.headers["Content-Length"] == str(len(td.blobs[digest]))
        assert r.headers.get("Docker-Content-Digest", digest) == digest
    assert head.content == b"" and get.content == td.blobs[digest]


def tag_list(s: Server, repo: str, **params: str) -> list[str]:
    r = requests.get(s.v2(f"{repo}/tags/list"), params=params)
    assert r.status_code == 200
    return r.json()["tags"]


def test_conformance_sparse(sparse_server: Server, repo: str) -> None:
    s, (td, missing_layer, missing_child) = sparse_server, sparse_data()
    # TestPush: the blobs (not the missing layer), each manifest by digest, then the tags
    push_blobs(s, repo, td)
    for digest in td.man_order:
        manifest_put(s, repo, digest, digest, td)
    for tag, digest in td.tags.items():
        manifest_put(s, repo, tag, digest, td)
    # TestList, with its check of ``last``
    tags = tag_list(s, repo)
    assert set(td.tags) <= set(tags)
    ordered = sorted(tags)
    end = len(ordered) // 2
    partial = tag_list(s, repo, last=ordered[end - 1])
    assert not set(ordered[:end]) & set(partial) and set(ordered[end:]) <= set(partial)
    # TestHead and TestPull: every tag, manifest and pushed blob
    for tag, digest in td.tags.items():
        manifest_exists(s, repo, tag, digest, td)
    for digest in td.man_order:
        manifest_exists(s, repo, digest, digest, td)
    for digest in td.blobs:
        blob_exists(s, repo, digest, td)
    # (TestReferrers: this data has no subject.) What was never pushed is not there:
    assert_error(requests.get(s.v2(f"{repo}/blobs/{missing_layer}")), 404, "BLOB_UNKNOWN")
    missing = requests.get(s.v2(f"{repo}/manifests/{missing_child}"), headers=ACCEPT)
    assert_error(missing, 404, "MANIFEST_UNKNOWN")
    # TestDelete: tags, manifests in reverse order, blobs; each gone at once
    for tag in td.tags:
        assert requests.delete(s.v2(f"{repo}/manifests/{tag}")).status_code == 202
        assert requests.head(s.v2(f"{repo}/manifests/{tag}")).status_code == 404
    for digest in reversed(td.man_order):
        assert requests.delete(s.v2(f"{repo}/manifests/{digest}")).status_code == 202
        assert requests.head(s.v2(f"{repo}/manifests/{digest}")).status_code == 404
    for digest in td.blobs:
        assert requests.delete(s.v2(f"{repo}/blobs/{digest}")).status_code == 202
        assert requests.head(s.v2(f"{repo}/blobs/{digest}")).status_code == 404


def test_off_by_default_absent_references_are_manifest_blob_unknown(
    server: Server, repo: str
) -> None:
    """The same data on a server with the setting off: both sparse manifests refused, naming
    what is absent; the complete image is accepted."""
    td, missing_layer, missing_child = sparse_data()
    push_blobs(server, repo, td)
    sparse_image, image, index = td.man_order
    err = assert_error(
        server.push_manifest(repo, "sparse-image", td.manifests[sparse_image]),
        400,
        "MANIFEST_BLOB_UNKNOWN",
    )
    assert err["detail"] == {"digests": [missing_layer]}
    manifest_put(server, repo, image, image, td)
    err = assert_error(
        server.push_manifest(repo, "sparse-index", td.manifests[index], OCI_INDEX),
        400,
        "MANIFEST_BLOB_UNKNOWN",
    )
    assert err["detail"] == {"digests": [missing_child]}
    assert_error(requests.get(server.v2(f"{repo}/manifests/sparse-index")), 404, "MANIFEST_UNKNOWN")
    assert tag_list(server, repo) == []


# -- beyond the conformance suite --------------------------------------------------------------


def image_manifest(config: str, *layers: str) -> dict[str, Any]:
    return {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config, "size": 2},
        "layers": [{"mediaType": OCI_LAYER_GZIP, "digest": d, "size": 10} for d in layers],
    }


def index_manifest(*children: str) -> dict[str, Any]:
    return {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": d, "size": 100, "platform": p}
            for d, p in zip(children, [AMD64, ARM64, AMD64], strict=False)
        ],
    }


def test_one_platform_mirrored_then_the_other_pushed(sparse_server: Server, repo: str) -> None:
    """A mirror of linux/amd64 only: the index is stored and served, the arm64 child is a 404
    until it is pushed, then both pull."""
    s = sparse_server
    amd64, _ = s.push_image(repo, None)
    arm64_layer = os.urandom(300)
    arm64_config = b'{"architecture":"arm64","os":"linux"}'
    arm64 = json.dumps(image_manifest(sha256(arm64_config), sha256(arm64_layer))).encode()
    index = json.dumps(index_manifest(amd64, sha256(arm64))).encode()
    r = s.push_manifest(repo, "multi", index, OCI_INDEX)
    assert r.status_code == 201, r.text
    assert r.headers["Docker-Content-Digest"] == sha256(index)
    assert requests.get(s.v2(f"{repo}/manifests/multi")).content == index
    assert requests.get(s.v2(f"{repo}/manifests/{amd64}")).status_code == 200
    assert_error(requests.get(s.v2(f"{repo}/manifests/{sha256(arm64)}")), 404, "MANIFEST_UNKNOWN")
    assert_error(requests.get(s.v2(f"{repo}/blobs/{sha256(arm64_layer)}")), 404, "BLOB_UNKNOWN")

    # The child arrives later, itself sparse for a moment (its blobs after it), then complete.
    assert s.push_manifest(repo, sha256(arm64), arm64, OCI_MANIFEST).status_code == 201
    assert_error(requests.get(s.v2(f"{repo}/blobs/{sha256(arm64_layer)}")), 404, "BLOB_UNKNOWN")
    s.push_blob(repo, arm64_config)
    s.push_blob(repo, arm64_layer)
    assert requests.get(s.v2(f"{repo}/manifests/{sha256(arm64)}")).content == arm64
    assert requests.get(s.v2(f"{repo}/blobs/{sha256(arm64_layer)}")).content == arm64_layer
    # pushing the same index again changes nothing
    assert s.push_manifest(repo, "multi", index, OCI_INDEX).status_code == 201


def test_an_image_manifest_may_lack_its_config_too(sparse_server: Server, repo: str) -> None:
    """Sparse lifts the presence check for every reference, config included (the spec's MAY
    makes no difference between them): a cache may hold a manifest before any of its blobs."""
    manifest = image_manifest(sha256(b"config"), sha256(b"layer 1"), sha256(b"layer 2"))
    r = sparse_server.push_manifest(repo, "bare", manifest)
    assert r.status_code == 201, r.text
    got = requests.get(sparse_server.v2(f"{repo}/manifests/bare"))
    assert got.status_code == 200 and got.json() == manifest
    assert_error(
        requests.get(sparse_server.v2(f"{repo}/blobs/{sha256(b'config')}")), 404, "BLOB_UNKNOWN"
    )


def test_content_of_another_repository_stays_out_of_reach(sparse_server: Server, repo: str) -> None:
    """A sparse manifest referencing a blob another repository holds does not make it pullable
    here: blobs are served where they are linked (pushed or mounted), as always."""
    secret = sparse_server.push_blob(f"{repo}-other", os.urandom(200))
    manifest = image_manifest(secret)
    assert sparse_server.push_manifest(repo, "v1", manifest).status_code == 201
    assert_error(requests.get(sparse_server.v2(f"{repo}/blobs/{secret}")), 404, "BLOB_UNKNOWN")


def test_sparse_manifests_are_still_validated(sparse_server: Server, repo: str) -> None:
    s = sparse_server
    absent = sha256(b"absent")
    # not JSON; an index with layers; a descriptor without a digest; a bad digest
    assert_error(s.push_manifest(repo, "x", b"{not json"), 400, "MANIFEST_INVALID")
    bad_index = {**index_manifest(absent), "layers": []}
    assert_error(s.push_manifest(repo, "x", bad_index, OCI_INDEX), 400, "MANIFEST_INVALID")
    no_digest = index_manifest(absent)
    del no_digest["manifests"][0]["digest"]
    assert_error(s.push_manifest(repo, "x", no_digest, OCI_INDEX), 400, "MANIFEST_INVALID")
    bad_digest = image_manifest("sha256:nothex")
    assert_error(s.push_manifest(repo, "x", bad_digest), 400, "MANIFEST_INVALID")
    # Content-Type and mediaType disagree
    body = json.dumps(index_manifest(absent)).encode()
    assert_error(s.push_manifest(repo, "x", body, OCI_MANIFEST), 400, "MANIFEST_INVALID")
    # pushed by a digest it does not have
    assert_error(s.push_manifest(repo, sha256(b"other"), body, OCI_INDEX), 400, "DIGEST_INVALID")
    assert_error(requests.get(s.v2(f"{repo}/manifests/x")), 404, "MANIFEST_UNKNOWN")


def test_gc_fsck_and_du_on_a_store_with_sparse_manifests(start_server: ServerFactory) -> None:
    """Absent children and blobs are expected: the collector keeps what exists and removes
    only what nothing references, fsck is clean (counting the sparse manifests), du works,
    and everything still pulls as before."""
    s = start_server(validation=SPARSE, storage={"maintenance": {"gc": {"grace": "0s"}}})
    repo = "mirror/app"
    td, missing_layer, missing_child = sparse_data()
    push_blobs(s, repo, td)
    for digest in td.man_order:  # the index's present child stays untagged
        manifest_put(s, repo, digest, digest, td)
    for tag, digest in td.tags.items():
        manifest_put(s, repo, tag, digest, td)
    orphan = s.push_blob(repo, os.urandom(500))  # referenced by nothing
    time.sleep(0.01)

    async def maintain() -> tuple[Any, Any, Any, Any]:
        registry = open_store(s.config)
        try:
            touch = s.config.storage.maintenance.gc.touch_interval
            collector = GarbageCollector(
                registry.storage, grace=0.001, touch_interval=touch, delete_untagged=True
            )
            report = await collector.run()
            again = await GarbageCollector(
                registry.storage, grace=0.001, touch_interval=touch, delete_untagged=True
            ).run()
            return report, again, await check(registry.storage), await measure(registry.storage)
        finally:
            await registry.close()

    report, again, fsck, usage = asyncio.run(maintain())
    assert report.removed == [f"blob {orphan} (500 bytes)"] and not report.warnings
    assert report.manifests_kept == 3 and report.manifests_removed == 0
    assert report.blobs_marked == len(td.blobs) + 3  # stored blobs only: the manifests too
    assert again.removed == [] and again.blobs_marked == report.blobs_marked
    assert fsck.clean, fsck.problems
    assert fsck.sparse_manifests == 2  # the image without its layer, the index
    (entry,) = usage.repositories
    assert entry.manifests == 3 and entry.blobs == len(td.blobs) + 3
    assert usage.unreferenced_blobs == 0
    result = CliRunner().invoke(main, ["fsck", str(s.config_path)])
    assert result.exit_code == 0, result.output
    assert "2 sparse manifests" in result.output and "problem" not in result.output

    for tag, digest in td.tags.items():
        manifest_exists(s, repo, tag, digest, td)
    for digest in td.blobs:
        blob_exists(s, repo, digest, td)
    assert_error(requests.get(s.v2(f"{repo}/blobs/{orphan}")), 404, "BLOB_UNKNOWN")
    assert_error(requests.get(s.v2(f"{repo}/blobs/{missing_layer}")), 404, "BLOB_UNKNOWN")
    assert_error(requests.get(s.v2(f"{repo}/manifests/{missing_child}")), 404, "MANIFEST_UNKNOWN")
