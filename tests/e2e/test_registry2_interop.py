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

import gzip
import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytest
import requests
from pushload import oci_manifest
from services import Registry2Process

from support import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    ServerFactory,
    free_port,
    sha256,
)

pytestmark = pytest.mark.e2e


REGISTRY2 = shutil.which("docker-registry")
SKOPEO = shutil.which("skopeo")

MANIFEST_ACCEPT = ", ".join(
    [
        OCI_MANIFEST,
        OCI_INDEX,
        DOCKER_MANIFEST,
        DOCKER_LIST,
    ]
)
LIST_TYPES = {OCI_INDEX, DOCKER_LIST}
V2 = "docker/registry/v2"
LINK_CONTENT = re.compile(rb"sha256:[0-9a-f]{64}")


@pytest.fixture(autouse=True)
def _need_binaries() -> None:
    if REGISTRY2 is None:
        pytest.skip("docker-registry (registry:2) binary is not installed")
    if SKOPEO is None:
        pytest.skip("skopeo binary is not installed")


# -- registry:2 ---------------------------------------------------------------------------------


class Registry(Protocol):
    """What the checks need from either server."""

    @property
    def host(self) -> str: ...

    @property
    def url(self) -> str: ...

    def log(self) -> str: ...


@dataclass(kw_only=True)
class Registry2(Registry2Process):
    """registry:2 on a directory."""

    root: Path


@pytest.fixture
def start_registry2(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[[Path], Registry2]]:
    started: list[Registry2] = []

    def start(root: Path) -> Registry2:
        assert REGISTRY2 is not None
        work = tmp_path_factory.mktemp("registry2")
        port = free_port()
        config = {
            "version": 0.1,
            "log": {"level": "info"},
            "storage": {
                "filesystem": {"rootdirectory": str(root)},
                "delete": {"enabled": True},
            },
            "http": {"addr": f"127.0.0.1:{port}", "secret": "registry2-test-secret"},
        }
        registry = Registry2.launch(REGISTRY2, work, config, port, root=root)
        started.append(registry)
        return registry

    yield start
    for registry in started:
        registry.stop()


# -- the image layout skopeo pushes from -------------------------------------------------------


@dataclass
class OciLayout:
    path: Path
    blobs: dict[str, bytes]  # every blob and manifest by digest


def _layer(size: int) -> bytes:
    # Really gzip, so skopeo pushes it as it is (it compresses layers it sees as uncompressed).
    return gzip.compress(os.urandom(size), compresslevel=1)


def _image_manifest(
    put: Callable[[str, bytes], dict[str, Any]], arch: str, layers: list[bytes]
) -> bytes:
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
        "config": put("application/vnd.oci.image.config.v1+json", config),
        "layers": [put("application/vnd.oci.image.layer.v1.tar+gzip", layer) for layer in layers],
    }
    return json.dumps(manifest, indent=1).encode()


@pytest.fixture(scope="module")
def oci_layout(tmp_path_factory: pytest.TempPathFactory) -> OciLayout:
    """``oci:DIR:v1`` is a three-layer image (5 MiB, 700 kB, 4 kB layers); ``oci:DIR:multi``
    an index of an amd64 and an arm64 image."""
    path = tmp_path_factory.mktemp("oci-layout")
    (path / "blobs" / "sha256").mkdir(parents=True)
    blobs: dict[str, bytes] = {}

    def put(media_type: str, data: bytes, **extra: Any) -> dict[str, Any]:
        digest = sha256(data)
        (path / "blobs" / "sha256" / digest.removeprefix("sha256:")).write_bytes(data)
        blobs[digest] = data
        return {"mediaType": media_type, "digest": digest, "size": len(data), **extra}

    big, medium, small = _layer(5 * 1024 * 1024 + 123), _layer(700_001), _layer(4096)
    single = _image_manifest(put, "amd64", [big, medium, small])
    amd64 = _image_manifest(put, "amd64", [small, medium])
    arm64 = _image_manifest(put, "arm64", [_layer(3000)])
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            put(OCI_MANIFEST, amd64, platform={"architecture": "amd64", "os": "linux"}),
            put(OCI_MANIFEST, arm64, platform={"architecture": "arm64", "os": "linux"}),
        ],
    }
    index_body = json.dumps(index, indent=1).encode()
    top = {
        "schemaVersion": 2,
        "manifests": [
            put(OCI_MANIFEST, single, annotations={"org.opencontainers.image.ref.name": "v1"}),
            put(OCI_INDEX, index_body, annotations={"org.opencontainers.image.ref.name": "multi"}),
        ],
    }
    (path / "index.json").write_text(json.dumps(top))
    (path / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    return OciLayout(path=path, blobs=blobs)


# -- skopeo -------------------------------------------------------------------------------------


def skopeo(*args: str, timeout: float = 120) -> str:
    assert SKOPEO is not None
    result = subprocess.run(
        [SKOPEO, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    assert result.returncode == 0, f"skopeo {' '.join(args)}\n{result.stdout}\n{result.stderr}"
    return result.stdout


@dataclass(frozen=True)
class Push:
    repo: str
    tag: str
    source: str  # the tag in the OCI layout
    flags: tuple[str, ...]

    @property
    def all(self) -> bool:
        return "--all" in self.flags


PUSHES = [
    Push("alpha", "v1", "v1", ("--format", "oci")),
    Push("beta", "v1", "v1", ("--format", "v2s2")),
    Push("team/app", "latest", "v1", ()),
    Push("team/app", "docker", "v1", ("--format", "v2s2")),
    Push("team/multi", "1.0", "multi", ("--all",)),
    Push("team/multi-docker", "1.0", "multi", ("--all", "--format", "v2s2")),
]


def push_all(registry: Registry, layout: OciLayout, work: Path) -> dict[Push, str]:
    """Push every image with skopeo; return the manifest digest each push reported."""
    digests: dict[Push, str] = {}
    for i, push in enumerate(PUSHES):
        digestfile = work / f"digest-{i}"
        skopeo(
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            "--digestfile",
            str(digestfile),
            *push.flags,
            f"oci:{layout.path}:{push.source}",
            f"docker://{registry.host}/{push.repo}:{push.tag}",
        )
        digests[push] = digestfile.read_text().strip()
    return digests


def get_manifest(registry: Registry, repo: str, reference: str) -> requests.Response:
    r = requests.get(
        f"{registry.url}/v2/{repo}/manifests/{reference}",
        headers={"Accept": MANIFEST_ACCEPT},
        timeout=30,
    )
    assert r.status_code == 200, f"GET {repo}:{reference} -> {r.status_code} {r.text}"
    return r


def referenced(manifest_body: bytes) -> tuple[list[str], list[str]]:
    """(child manifests, blobs) an image manifest or index references."""
    manifest = json.loads(manifest_body)
    if "manifests" in manifest:
        return [m["digest"] for m in manifest["manifests"]], []
    return [], [manifest["config"]["digest"], *(layer["digest"] for layer in manifest["layers"])]


def check_manifest_served(registry: Registry, push: Push, digest: str) -> bytes:
    """The tag resolves to ``digest`` over HTTP, by tag and by digest, byte-identical."""
    by_tag = get_manifest(registry, push.repo, push.tag)
    assert by_tag.headers["Docker-Content-Digest"] == digest
    assert sha256(by_tag.content) == digest
    media_type = json.loads(by_tag.content)["mediaType"]
    assert by_tag.headers["Content-Type"] == media_type
    if push.all:
        assert media_type in LIST_TYPES
    by_digest = get_manifest(registry, push.repo, digest)
    assert by_digest.content == by_tag.content
    return by_tag.content


def pull_and_compare(
    registry: Registry, push: Push, digest: str, blobs: dict[str, bytes], out: Path
) -> None:
    """skopeo pull into ``dir:`` and compare every manifest and blob with what was pushed."""
    skopeo(
        "copy",
        "--quiet",
        "--src-tls-verify=false",
        *(["--all"] if push.all else []),
        f"docker://{registry.host}/{push.repo}:{push.tag}",
        f"dir:{out}",
    )
    top = (out / "manifest.json").read_bytes()
    assert sha256(top) == digest, f"{push}: pulled manifest is not the pushed one"
    children, wanted = referenced(top)
    for child in children:
        body = (out / f"{child.removeprefix('sha256:')}.manifest.json").read_bytes()
        assert sha256(body) == child
        wanted += referenced(body)[1]
    pulled = {
        f"sha256:{p.name}": p
        for p in out.iterdir()
        if p.name != "version" and not p.name.endswith("manifest.json")
    }
    assert set(pulled) == set(wanted), push
    for blob, file in pulled.items():
        assert blob in blobs, f"{push}: {blob} was never pushed"
        assert file.read_bytes() == blobs[blob], f"{push}: blob {blob} differs"


def check_catalog_and_tags(
    registry: Registry, expected: dict[str, list[str]], *, sorted_by_server: bool
) -> None:
    r = requests.get(f"{registry.url}/v2/_catalog", timeout=30)
    assert r.status_code == 200, r.text
    repositories = r.json()["repositories"]
    if not sorted_by_server:
        repositories = sorted(repositories)
    assert repositories == sorted(expected)
    for repo, tags in expected.items():
        r = requests.get(f"{registry.url}/v2/{repo}/tags/list", timeout=30)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["name"] == repo
        listed = body["tags"] if sorted_by_server else sorted(body["tags"])
        assert listed == sorted(tags)
        listed_by_skopeo = json.loads(
            skopeo("list-tags", "--tls-verify=false", f"docker://{registry.host}/{repo}")
        )
        assert sorted(listed_by_skopeo["Tags"]) == sorted(tags)


def expected_tags(pushes: list[Push]) -> dict[str, list[str]]:
    tags: dict[str, list[str]] = {}
    for push in pushes:
        tags.setdefault(push.repo, []).append(push.tag)
    return tags


def verify_everything(
    registry: Registry, digests: dict[Push, str], blobs: dict[str, bytes], work: Path
) -> None:
    for i, (push, digest) in enumerate(digests.items()):
        check_manifest_served(registry, push, digest)
        pull_and_compare(registry, push, digest, blobs, work / f"pull-{i}")


# -- on-disk layout -----------------------------------------------------------------------------


def link_files(root: Path) -> dict[str, bytes]:
    """Every ``link`` under ``repositories/`` (uploads aside): relative path -> content."""
    base = root / V2 / "repositories"
    return {
        str(p.relative_to(base)): p.read_bytes()
        for p in base.rglob("link")
        if "_uploads" not in p.relative_to(base).parts
    }


def blob_files(root: Path) -> set[str]:
    base = root / V2 / "blobs"
    return {str(p.relative_to(base)) for p in base.rglob("*") if p.is_file()}


def read_blob(root: Path, digest: str) -> bytes:
    hexa = digest.removeprefix("sha256:")
    return (root / V2 / "blobs" / "sha256" / hexa[:2] / hexa / "data").read_bytes()


def expected_links(root: Path, pushes: dict[Push, str]) -> dict[str, bytes]:
    """The link files registry:2 keeps for these pushes, derived from the stored manifests:
    each tag's ``current`` and ``index`` entry, a revision for every manifest (an index and its
    children), and a ``_layers`` link for every config and layer."""
    links: dict[str, bytes] = {}

    def link(path: str, digest: str) -> None:
        links[path] = digest.encode()

    for push, digest in pushes.items():
        hexa = digest.removeprefix("sha256:")
        link(f"{push.repo}/_manifests/tags/{push.tag}/current/link", digest)
        link(f"{push.repo}/_manifests/tags/{push.tag}/index/sha256/{hexa}/link", digest)
        manifests = [digest]
        while manifests:
            m = manifests.pop()
            link(f"{push.repo}/_manifests/revisions/sha256/{m.removeprefix('sha256:')}/link", m)
            children, blobs = referenced(read_blob(root, m))
            manifests += children
            for blob in blobs:
                link(f"{push.repo}/_layers/sha256/{blob.removeprefix('sha256:')}/link", blob)
    return links


# -- 1. registry:2 writes, Dockyard reads -------------------------------------------------------


def test_dockyard_serves_a_store_registry2_wrote(
    oci_layout: OciLayout,
    start_registry2: Callable[[Path], Registry2],
    start_server: ServerFactory,
    tmp_path: Path,
) -> None:
    root = tmp_path / "store"
    registry2 = start_registry2(root)
    digests = push_all(registry2, oci_layout, tmp_path)
    for push, digest in digests.items():
        check_manifest_served(registry2, push, digest)
    registry2.stop()
    # registry:2 really wrote the standard layout (this is what Dockyard is handed).
    assert link_files(root) == expected_links(root, digests)

    dockyard = start_server(root=root, workers=2)
    verify_everything(dockyard, digests, oci_layout.blobs, tmp_path)
    check_catalog_and_tags(dockyard, expected_tags(PUSHES), sorted_by_server=True)
    # Blobs by digest over HTTP too (HEAD and GET), in every repository that links them.
    for push, digest in digests.items():
        for blob in blobs_of(dockyard, push.repo, digest):
            url = f"{dockyard.url}/v2/{push.repo}/blobs/{blob}"
            head = requests.head(url, timeout=30)
            assert head.status_code == 200, (url, head.status_code)
            assert int(head.headers["Content-Length"]) == len(oci_layout.blobs[blob])
            assert requests.get(url, timeout=30).content == oci_layout.blobs[blob]
    assert "Traceback" not in dockyard.log(), dockyard.log()


def blobs_of(registry: Registry, repo: str, digest: str) -> list[str]:
    children, blobs = referenced(get_manifest(registry, repo, digest).content)
    for child in children:
        blobs += referenced(get_manifest(registry, repo, child).content)[1]
    return blobs


# -- 2. Dockyard writes, registry:2 reads -------------------------------------------------------

CHUNKED_REPO = "team/chunked"
CHUNKED_TAG = "v1"


def chunked_push(registry: Registry, blobs: dict[str, bytes]) -> str:
    """A layer uploaded by hand in two ``Content-Range`` chunks (POST, PATCH, PATCH, PUT
    ?digest=), a config uploaded whole, and a manifest referencing both. Returns the manifest
    digest."""
    base = f"{registry.url}/v2/{CHUNKED_REPO}"
    layer = blobs["layer"]
    split = 1024 * 1024 + 17
    first, second = layer[:split], layer[split:]

    r = requests.post(f"{base}/blobs/uploads/", timeout=30)
    assert r.status_code == 202, r.text
    location = r.headers["Location"]
    r = requests.patch(
        location,
        data=first,
        headers={
            "Content-Type": "application/octet-stream",
            "Content-Range": f"0-{len(first) - 1}",
        },
        timeout=30,
    )
    assert r.status_code == 202, r.text
    assert r.headers["Range"] == f"0-{len(first) - 1}"
    location = r.headers["Location"]
    r = requests.patch(
        location,
        data=second,
        headers={
            "Content-Type": "application/octet-stream",
            "Content-Range": f"{len(first)}-{len(layer) - 1}",
        },
        timeout=30,
    )
    assert r.status_code == 202, r.text
    assert r.headers["Range"] == f"0-{len(layer) - 1}"
    location = r.headers["Location"]
    r = requests.put(location, params={"digest": sha256(layer)}, timeout=30)
    assert r.status_code == 201, r.text
    assert r.headers["Docker-Content-Digest"] == sha256(layer)

    config = blobs["config"]
    # POST, then the whole blob in the PUT (registry:2 has no single-POST upload).
    r = requests.post(f"{base}/blobs/uploads/", timeout=30)
    assert r.status_code == 202, r.text
    r = requests.put(
        r.headers["Location"],
        params={"digest": sha256(config)},
        data=config,
        headers={"Content-Type": "application/octet-stream"},
        timeout=30,
    )
    assert r.status_code == 201, r.text

    manifest = oci_manifest(config, [layer])
    r = requests.put(
        f"{base}/manifests/{CHUNKED_TAG}",
        data=manifest,
        headers={"Content-Type": OCI_MANIFEST},
        timeout=30,
    )
    assert r.status_code == 201, r.text
    assert r.headers["Docker-Content-Digest"] == sha256(manifest)
    return sha256(manifest)


def test_registry2_serves_a_store_dockyard_wrote(
    oci_layout: OciLayout,
    start_registry2: Callable[[Path], Registry2],
    start_server: ServerFactory,
    tmp_path: Path,
) -> None:
    chunked = {
        "layer": _layer(2 * 1024 * 1024 + 4321),
        "config": json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {}}).encode(),
    }
    blobs = {**oci_layout.blobs, **{sha256(b): b for b in chunked.values()}}
    chunked_push_ = Push(CHUNKED_REPO, CHUNKED_TAG, "", ())

    root = tmp_path / "store"
    dockyard = start_server(root=root, workers=2)
    digests = push_all(dockyard, oci_layout, tmp_path)
    digests[chunked_push_] = chunked_push(dockyard, chunked)
    for push, digest in digests.items():
        check_manifest_served(dockyard, push, digest)
    # Links exactly as registry:2 keeps them: the expected paths, plain "sha256:<hex>".
    links = link_files(root)
    for path, content in links.items():
        assert LINK_CONTENT.fullmatch(content), (path, content)
    assert links == expected_links(root, digests)
    assert dockyard.stop() == 0, dockyard.log()
    uploads_left = [
        p for p in (root / V2 / "repositories").rglob("*") if "_uploads" in p.parts and p.is_file()
    ]
    assert uploads_left == []

    # registry:2 itself, given the same pushes, writes the same links and blobs.
    reference_root = tmp_path / "reference"
    reference = start_registry2(reference_root)
    (tmp_path / "reference-work").mkdir()
    reference_digests = push_all(reference, oci_layout, tmp_path / "reference-work")
    reference_digests[chunked_push_] = chunked_push(reference, chunked)
    reference.stop()
    assert reference_digests == digests
    assert link_files(root) == link_files(reference_root)
    assert blob_files(root) == blob_files(reference_root)

    registry2 = start_registry2(root)
    verify_everything(registry2, digests, blobs, tmp_path)
    check_catalog_and_tags(
        registry2, expected_tags([*PUSHES, chunked_push_]), sorted_by_server=False
    )
    assert "level=error" not in registry2.log(), registry2.log()


def test_skopeo_roundtrip_on_dockyard(
    oci_layout: OciLayout, start_server: ServerFactory, tmp_path: Path
) -> None:
    """skopeo pushes every shape (OCI and v2s2 manifests, OCI index, Docker manifest list) to
    Dockyard and pulls it back from Dockyard: same digests, same bytes."""
    dockyard = start_server(workers=2)
    digests = push_all(dockyard, oci_layout, tmp_path)
    verify_everything(dockyard, digests, oci_layout.blobs, tmp_path)
    check_catalog_and_tags(dockyard, expected_tags(PUSHES), sorted_by_server=True)
    # A second push of the same content uploads nothing new and keeps the digests.
    (tmp_path / "again").mkdir()
    assert push_all(dockyard, oci_layout, tmp_path / "again") == digests
