"""Content for the workloads: pseudo-random blobs, OCI image layouts for skopeo to push
(layers streamed to disk: they are GiB-sized, unlike ``harness.oci``'s), and registry:2 stores
written directly on disk (the catalog group's 10,000 repositories)."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import shutil
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.suite import MiB
from harness.client import OCI_MANIFEST, sha256
from harness.oci import CONFIG_MEDIA_TYPE, LAYER_MEDIA_TYPE, REF_NAME
from harness.store import V2, blob_data
from harness.workloads import oci_manifest


class Filler:
    """Pseudo-random content, fast: a 16 MiB pool of random bytes, every MiB of output made
    unique by a 32-byte header derived from a nonce (nothing in the path compresses or dedups)."""

    def __init__(self) -> None:
        self.pool = [os.urandom(MiB) for _ in range(16)]

    def chunks(self, size: int, nonce: bytes) -> Iterator[bytes]:
        i = 0
        while size > 0:
            head = hashlib.sha256(nonce + i.to_bytes(8, "big")).digest()
            chunk = (head + self.pool[i % 16][len(head) :])[:size]
            yield chunk
            size -= len(chunk)
            i += 1


@dataclass
class Layout:
    path: Path
    tag: str
    blob_bytes: int  # layers and config
    layers: int


def _put_blob(blobs: Path, data: bytes) -> dict[str, object]:
    digest = sha256(data)
    (blobs / digest.removeprefix("sha256:")).write_bytes(data)
    return {"digest": digest, "size": len(data)}


def _gzip_layer(blobs: Path, chunks: Iterator[bytes]) -> tuple[dict[str, object], str]:
    """A real gzip stream (stored blocks: level 0) so skopeo pushes it as it is."""
    comp = zlib.compressobj(0, zlib.DEFLATED, 31)
    packed, raw, size = hashlib.sha256(), hashlib.sha256(), 0
    tmp = blobs / ".partial"
    with open(tmp, "wb") as f:
        for chunk in itertools.chain(chunks, [None]):  # None: the end
            if chunk is None:
                out = comp.flush()
            else:
                raw.update(chunk)
                out = comp.compress(chunk)
            packed.update(out)
            f.write(out)
            size += len(out)
    tmp.rename(blobs / packed.hexdigest())
    descriptor = {
        "mediaType": LAYER_MEDIA_TYPE,
        "digest": f"sha256:{packed.hexdigest()}",
        "size": size,
    }
    return descriptor, f"sha256:{raw.hexdigest()}"


def make_layout(path: Path, layer_sizes: list[int], filler: Filler, nonce: bytes) -> Layout:
    """An OCI image layout (``oci:PATH:bench``) with fresh layers of the given sizes."""
    blobs = path / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    layers, diff_ids = [], []
    for i, size in enumerate(layer_sizes):
        if size <= MiB:
            data = hashlib.sha256(nonce + bytes([i % 256])).digest() + os.urandom(size)
            chunks: Iterator[bytes] = iter([data])
        else:
            chunks = filler.chunks(size, nonce + i.to_bytes(4, "big"))
        descriptor, diff_id = _gzip_layer(blobs, chunks)
        layers.append(descriptor)
        diff_ids.append(diff_id)
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Env": [f"NONCE={nonce.hex()}"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }
    ).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": CONFIG_MEDIA_TYPE, **_put_blob(blobs, config)},
        "layers": layers,
    }
    body = json.dumps(manifest).encode()
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": OCI_MANIFEST,
                **_put_blob(blobs, body),
                "annotations": {REF_NAME: "bench"},
            }
        ],
    }
    (path / "index.json").write_text(json.dumps(index))
    (path / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    total = sum(int(layer["size"]) for layer in layers) + len(config)  # type: ignore[call-overload]
    return Layout(path, "bench", total, len(layers))


def delete_from_store(root: Path, repo: str, digest: str | None) -> None:
    """Free disk space behind a server's back: the blob's data and the repository."""
    if digest:
        shutil.rmtree((root / V2 / blob_data(digest)).parent, ignore_errors=True)
    shutil.rmtree(root / V2 / "repositories" / repo, ignore_errors=True)


def write_catalog_store(root: Path, repos: list[str], tags: dict[str, list[str]]) -> None:
    """A store in registry:2's layout under ``root``, written with plain system calls (it is a
    few hundred thousand entries): one tiny image (config, one layer) shared by every
    repository in ``repos``, tagged ``latest``, or with the tags ``tags`` gives the repository
    (each tag with its ``current`` and ``index`` links, written in the order given)."""
    base = str(root / V2)
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {}}).encode()
    layer = b"\x1f\x8b" + os.urandom(62)
    blobs = [_write_blob(base, config), _write_blob(base, layer)]
    digest = _write_blob(base, oci_manifest(config, [layer]))
    hexa = digest.removeprefix("sha256:")
    link = digest.encode()
    mkdir = os.mkdir
    for name in repos:
        repo = f"{base}/repositories/{name}"
        os.makedirs(f"{repo}/_layers/sha256")
        for blob in blobs:
            mkdir(f"{repo}/_layers/sha256/{blob.removeprefix('sha256:')}")
            _write(f"{repo}/_layers/sha256/{blob.removeprefix('sha256:')}/link", blob.encode())
        os.makedirs(f"{repo}/_manifests/revisions/sha256/{hexa}")
        _write(f"{repo}/_manifests/revisions/sha256/{hexa}/link", link)
        mkdir(f"{repo}/_manifests/tags")
        for tag in tags.get(name, ["latest"]):
            tag_dir = f"{repo}/_manifests/tags/{tag}"
            mkdir(tag_dir)
            mkdir(f"{tag_dir}/current")
            _write(f"{tag_dir}/current/link", link)
            mkdir(f"{tag_dir}/index")
            mkdir(f"{tag_dir}/index/sha256")
            mkdir(f"{tag_dir}/index/sha256/{hexa}")
            _write(f"{tag_dir}/index/sha256/{hexa}/link", link)


def shuffled_tags(count: int) -> list[str]:
    """``t-000000``... in a fixed shuffled order, so neither server finds them in order on
    disk."""
    tags = [f"t-{i:06d}" for i in range(count)]
    random.Random(0).shuffle(tags)
    return tags


def _write(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _write_blob(base: str, data: bytes) -> str:
    path = f"{base}/{blob_data(sha256(data))}"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    _write(path, data)
    return sha256(data)
