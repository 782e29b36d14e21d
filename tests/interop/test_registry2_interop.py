"""Dockyard and registry:2 (distribution 2.8) share one on-disk layout, both ways.

The client is skopeo, pushing a hand-made OCI image layout (gzip "layers" of random bytes, one
over 5 MiB, a config, a manifest and a two-platform index) in several shapes: OCI and Docker
schema 2 manifests, a nested repository name, an OCI index and a Docker manifest list.

1. registry:2 writes the store; Dockyard, started on the same directory afterwards, serves all of
   it (manifests by the same digests, blobs byte for byte, catalog and tag lists).
2. Dockyard writes the store (the same pushes plus a chunked upload done by hand); registry:2,
   started on the same directory afterwards, serves all of it. Dockyard's link files are checked
   against the paths registry:2 uses and against a tree registry:2 itself wrote for the same pushes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests

from harness import (
    LINK_CONTENT,
    DiskStore,
    Loopback,
    OciLayout,
    Push,
    Registry2Factory,
    Server,
    ServerFactory,
    check_catalog_and_tags,
    check_manifest_served,
    chunked_push,
    content_of,
    expected_tags,
    gzip_layer,
    needs_skopeo,
    oci_manifest,
    push_all,
    sha256,
    verify_pushes,
)

pytestmark = needs_skopeo


PUSHES = [
    Push("alpha", "v1", "v1", ("--format", "oci")),
    Push("beta", "v1", "v1", ("--format", "v2s2")),
    Push("team/app", "latest", "v1", ()),
    Push("team/app", "docker", "v1", ("--format", "v2s2")),
    Push("team/multi", "1.0", "multi", ("--all",)),
    Push("team/multi-docker", "1.0", "multi", ("--all", "--format", "v2s2")),
]


@pytest.fixture(scope="module")
def oci_layout(tmp_path_factory: pytest.TempPathFactory) -> OciLayout:
    """``oci:DIR:v1`` is a three-layer image (5 MiB, 700 kB, 4 kB layers); ``oci:DIR:multi``
    an index of an amd64 and an arm64 image."""
    layout = OciLayout(tmp_path_factory.mktemp("oci-layout"), indent=1)
    big, medium, small = (
        gzip_layer(5 * 1024 * 1024 + 123),
        gzip_layer(700_001),
        gzip_layer(4096),
    )
    layout.tag("v1", layout.image("amd64", [big, medium, small]))
    layout.tag("multi", layout.index([("amd64", [small, medium]), ("arm64", [gzip_layer(3000)])]))
    return layout


# -- 1. registry:2 writes, Dockyard reads -------------------------------------------------------


@pytest.mark.slow
def test_dockyard_serves_a_store_registry2_wrote(
    oci_layout: OciLayout,
    start_registry2: Registry2Factory,
    start_server: ServerFactory,
    tmp_path: Path,
) -> None:
    store = DiskStore(tmp_path / "store")
    registry2 = start_registry2(root=store.root)
    digests = push_all(registry2, oci_layout, PUSHES, tmp_path)
    for push, digest in digests.items():
        check_manifest_served(registry2, push, digest)
    registry2.stop()
    # registry:2 really wrote the standard layout (this is what Dockyard is handed).
    assert store.links() == store.expected_links(digests)

    dockyard = start_server(root=store.root, workers=2)
    verify_pushes(dockyard, digests, oci_layout.blobs, tmp_path)
    check_catalog_and_tags(dockyard, expected_tags(PUSHES), sorted_by_server=True)
    # Blobs by digest over HTTP too (HEAD and GET), in every repository that links them.
    for push, digest in digests.items():
        for blob in content_of(dockyard, push.repo, digest)[1]:
            url = dockyard.v2(f"{push.repo}/blobs/{blob}")
            head = requests.head(url, timeout=30)
            assert head.status_code == 200, (url, head.status_code)
            assert int(head.headers["Content-Length"]) == len(oci_layout.blobs[blob])
            assert requests.get(url, timeout=30).content == oci_layout.blobs[blob]
    assert "Traceback" not in dockyard.log(), dockyard.log()


# -- 2. Dockyard writes, registry:2 reads -------------------------------------------------------

CHUNKED = Push("team/chunked", "v1", "")


def push_chunked(registry: Loopback, blobs: dict[str, bytes]) -> str:
    """A layer uploaded by hand in two ``Content-Range`` chunks (POST, PATCH, PATCH, PUT
    ?digest=), a config uploaded whole, and a manifest referencing both. Returns the manifest
    digest."""
    layer, config = blobs["layer"], blobs["config"]
    return chunked_push(
        registry,
        CHUNKED.repo,
        CHUNKED.tag,
        layer,
        config,
        oci_manifest(config, [layer]),
        cuts=[0, 1024 * 1024 + 17, len(layer)],
    )


@pytest.mark.slow
def test_registry2_serves_a_store_dockyard_wrote(
    oci_layout: OciLayout,
    start_registry2: Registry2Factory,
    start_server: ServerFactory,
    tmp_path: Path,
) -> None:
    chunked = {
        "layer": gzip_layer(2 * 1024 * 1024 + 4321),
        "config": json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {}}).encode(),
    }
    blobs = {**oci_layout.blobs, **{sha256(b): b for b in chunked.values()}}

    store = DiskStore(tmp_path / "store")
    dockyard = start_server(root=store.root, workers=2)
    digests = push_all(dockyard, oci_layout, PUSHES, tmp_path)
    digests[CHUNKED] = push_chunked(dockyard, chunked)
    for push, digest in digests.items():
        check_manifest_served(dockyard, push, digest)
    # Links exactly as registry:2 keeps them: the expected paths, plain "sha256:<hex>".
    links = store.links()
    for path, content in links.items():
        assert LINK_CONTENT.fullmatch(content), (path, content)
    assert links == store.expected_links(digests)
    assert dockyard.stop() == 0, dockyard.log()
    assert store.uploads() == []

    # registry:2 itself, given the same pushes, writes the same links and blobs.
    reference_store = DiskStore(tmp_path / "reference")
    reference = start_registry2(root=reference_store.root)
    reference_digests = push_all(reference, oci_layout, PUSHES, tmp_path / "reference-work")
    reference_digests[CHUNKED] = push_chunked(reference, chunked)
    reference.stop()
    assert reference_digests == digests
    assert store.links() == reference_store.links()
    assert store.blob_files() == reference_store.blob_files()

    registry2 = start_registry2(root=store.root)
    verify_pushes(registry2, digests, blobs, tmp_path)
    check_catalog_and_tags(registry2, expected_tags([*PUSHES, CHUNKED]), sorted_by_server=False)
    assert "level=error" not in registry2.log(), registry2.log()


@pytest.mark.slow
def test_skopeo_roundtrip_on_dockyard(
    oci_layout: OciLayout, start_server: ServerFactory, tmp_path: Path
) -> None:
    """skopeo pushes every shape (OCI and v2s2 manifests, OCI index, Docker manifest list) to
    Dockyard and pulls it back from Dockyard: same digests, same bytes."""
    dockyard = start_server(workers=2)
    digests = push_all(dockyard, oci_layout, PUSHES, tmp_path)
    verify_pushes(dockyard, digests, oci_layout.blobs, tmp_path)
    check_catalog_and_tags(dockyard, expected_tags(PUSHES), sorted_by_server=True)
    # A second push of the same content uploads nothing new and keeps the digests.
    started = uploads_started(dockyard)
    assert started > 0
    assert push_all(dockyard, oci_layout, PUSHES, tmp_path / "again") == digests
    assert uploads_started(dockyard) == started


def uploads_started(server: Server) -> int:
    """How many blob uploads the server's access log shows started (``POST .../uploads/``)."""
    return sum(
        1
        for line in server.log().splitlines()
        if "msg=request" in line and "method=POST" in line and "/blobs/uploads/" in line
    )
