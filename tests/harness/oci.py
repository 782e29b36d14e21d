"""OCI image layouts made by hand, for skopeo to push from (``oci:DIR:TAG``).

A layout holds images of gzip "layers" of random bytes (really gzip, so skopeo pushes them as
they are instead of compressing them), each with a config of its own, and OCI indexes of such
images; ``index.json`` names them by tag. Every blob and manifest put into the layout is kept in
``blobs`` by digest, to compare what a registry serves with what was pushed.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.client import OCI_INDEX, OCI_MANIFEST, sha256

CONFIG_MEDIA_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_NAME = "org.opencontainers.image.ref.name"


def gzip_layer(size: int) -> bytes:
    """``size`` random bytes, gzip-compressed (quickly: they do not compress anyway)."""
    return gzip.compress(os.urandom(size), compresslevel=1)


def referenced(manifest_body: bytes) -> tuple[list[str], list[str]]:
    """(child manifests, blobs) an image manifest or index references."""
    manifest = json.loads(manifest_body)
    if "manifests" in manifest:
        return [m["digest"] for m in manifest["manifests"]], []
    return [], [manifest["config"]["digest"], *(layer["digest"] for layer in manifest["layers"])]


@dataclass
class OciLayout:
    """An OCI image layout in the directory ``path`` (made if need be): ``put`` stores a blob,
    ``image`` and ``index`` make manifests, ``tag`` names one in ``index.json``. Manifests are
    JSON indented by ``indent`` (``None``: compact), so they are pushed with those bytes."""

    path: Path
    indent: int | None = None
    blobs: dict[str, bytes] = field(default_factory=dict)  # every blob and manifest by digest
    refs: list[dict[str, Any]] = field(default_factory=list)  # index.json's manifests

    def __post_init__(self) -> None:
        (self.path / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (self.path / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
        self._write_index()

    def put(self, media_type: str, data: bytes, **extra: Any) -> dict[str, Any]:
        """Store ``data`` as a blob; its descriptor, with ``extra`` fields (``platform``...)."""
        digest = sha256(data)
        (self.path / "blobs" / "sha256" / digest.removeprefix("sha256:")).write_bytes(data)
        self.blobs[digest] = data
        return {"mediaType": media_type, "digest": digest, "size": len(data), **extra}

    def image(self, arch: str, layers: Sequence[bytes]) -> bytes:
        """The manifest of a linux/``arch`` image of ``layers`` (gzip) and a config of its own
        (a nonce in its environment), both stored; the manifest is not (``put`` or ``tag``
        it)."""
        config = json.dumps(
            {
                "architecture": arch,
                "os": "linux",
                "config": {"Env": [f"NONCE={os.urandom(8).hex()}"]},
                "rootfs": {
                    "type": "layers",
                    "diff_ids": [sha256(gzip.decompress(layer)) for layer in layers],
                },
            }
        ).encode()
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": self.put(CONFIG_MEDIA_TYPE, config),
            "layers": [self.put(LAYER_MEDIA_TYPE, layer) for layer in layers],
        }
        return json.dumps(manifest, indent=self.indent).encode()

    def index(self, platforms: Sequence[tuple[str, Sequence[bytes]]]) -> bytes:
        """An OCI index of one linux image per ``(arch, layers)``, each stored with its
        platform; the index is not stored (``put`` or ``tag`` it)."""
        index = {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                self.put(
                    OCI_MANIFEST,
                    self.image(arch, layers),
                    platform={"architecture": arch, "os": "linux"},
                )
                for arch, layers in platforms
            ],
        }
        return json.dumps(index, indent=self.indent).encode()

    def tag(self, name: str, manifest: bytes) -> str:
        """Store ``manifest`` (an image's or an index) and name it ``name`` in ``index.json``
        (``oci:PATH:NAME``); returns its digest."""
        media_type = json.loads(manifest)["mediaType"]
        self.refs.append(self.put(media_type, manifest, annotations={REF_NAME: name}))
        self._write_index()
        return sha256(manifest)

    def _write_index(self) -> None:
        (self.path / "index.json").write_text(
            json.dumps({"schemaVersion": 2, "manifests": self.refs})
        )
