"""The harness's hand-made OCI layouts (harness/oci.py) and its reading of registry:2's store
(harness/store.py), without any server: what the interop tests build on."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from harness import DiskStore, OciLayout, Push, gzip_layer, referenced, sha256
from harness.store import LINK_CONTENT


def test_layout_is_an_oci_image_layout(tmp_path: Path) -> None:
    layout = OciLayout(tmp_path / "layout", indent=1)
    shared = gzip_layer(100)
    single = layout.tag("v1", layout.image("amd64", [shared, gzip_layer(200)]))
    multi = layout.tag("multi", layout.index([("amd64", [shared]), ("arm64", [gzip_layer(50)])]))

    assert json.loads((layout.path / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    refs = json.loads((layout.path / "index.json").read_text())["manifests"]
    assert [r["annotations"]["org.opencontainers.image.ref.name"] for r in refs] == ["v1", "multi"]
    assert [r["digest"] for r in refs] == [single, multi]
    # Every blob and manifest is a file named by its digest, with the bytes kept in ``blobs``.
    files = {f"sha256:{p.name}": p.read_bytes() for p in (layout.path / "blobs/sha256").iterdir()}
    assert files == layout.blobs
    assert all(sha256(data) == digest for digest, data in files.items())
    # Manifests keep the layout's indentation (they are pushed as they are).
    assert b'\n "schemaVersion": 2' in layout.blobs[single]

    children, blobs = referenced(layout.blobs[multi])
    assert blobs == [] and len(children) == 2
    platforms = [m["platform"] for m in json.loads(layout.blobs[multi])["manifests"]]
    assert platforms == [{"architecture": a, "os": "linux"} for a in ("amd64", "arm64")]
    assert referenced(layout.blobs[children[0]])[1][1:] == [sha256(shared)]
    config_digest, *layers = referenced(layout.blobs[single])[1]
    config = json.loads(layout.blobs[config_digest])
    assert config["rootfs"]["diff_ids"] == [
        sha256(gzip.decompress(layout.blobs[layer])) for layer in layers
    ]


def test_disk_store_reads_what_registry2_keeps(tmp_path: Path) -> None:
    layout = OciLayout(tmp_path / "layout")
    image = layout.tag("v1", layout.image("amd64", [gzip_layer(10)]))
    store = DiskStore(tmp_path / "store")
    for digest, data in layout.blobs.items():
        store.blob_path(digest).parent.mkdir(parents=True)
        store.blob_path(digest).write_bytes(data)
    config, layer = referenced(layout.blobs[image])[1]
    hexa = image.removeprefix("sha256:")
    links = {
        "app/_manifests/tags/v1/current/link": image,
        f"app/_manifests/tags/v1/index/sha256/{hexa}/link": image,
        f"app/_manifests/revisions/sha256/{hexa}/link": image,
        f"app/_layers/sha256/{config[7:]}/link": config,
        f"app/_layers/sha256/{layer[7:]}/link": layer,
    }
    for path, digest in links.items():
        file = store.v2 / "repositories" / path
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(digest)
    upload = store.v2 / "repositories/app/_uploads/some-id/startedat"
    upload.parent.mkdir(parents=True)
    upload.write_text("2026-01-01T00:00:00Z")

    assert store.links() == {path: digest.encode() for path, digest in links.items()}
    assert all(LINK_CONTENT.fullmatch(content) for content in store.links().values())
    assert store.expected_links({Push("app", "v1", "v1"): image}) == store.links()
    assert store.stored_blobs() == {d: len(data) for d, data in layout.blobs.items()}
    assert store.read_blob(image) == layout.blobs[image]
    assert store.layer_link("app", layer).read_text() == layer
    assert store.uploads() == [upload]
    assert store.leftovers() == []
