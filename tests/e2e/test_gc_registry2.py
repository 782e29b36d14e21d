"""``dockyard gc`` on a store registry:2 (distribution 2.8) wrote, which registry:2 then serves.

skopeo pushes a few images to registry:2 — layers shared between images and repositories, an OCI
index, a Docker schema 2 manifest — and one image is deleted through registry:2's API. With
registry:2 stopped, ``dockyard gc --dry-run`` reports exactly the deleted image's own blobs
(the ones registry:2's own ``garbage-collect --dry-run`` names too) and changes nothing on disk;
``dockyard gc`` then removes them, with the repository's links to them, and nothing else.
registry:2, started again on the directory, serves every remaining image to skopeo byte for
byte, takes the deleted image pushed again, and ``dockyard fsck`` finds the store clean.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from services import Registry2Process

from support import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    free_port,
    sha256,
)

pytestmark = pytest.mark.e2e

REGISTRY2 = shutil.which("docker-registry")
SKOPEO = shutil.which("skopeo")
V2 = Path("docker") / "registry" / "v2"
ACCEPT = ", ".join([OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST])
SUMMARY = re.compile(
    r"(?P<verb>would remove|removed) (?P<blobs>\d+) blobs \((?P<bytes>\d+) bytes\), "
    r"(?P<manifests>\d+) untagged manifests, (?P<links>\d+) dangling layer links"
)


@pytest.fixture(autouse=True)
def _need_binaries() -> None:
    if REGISTRY2 is None:
        pytest.skip("docker-registry (registry:2) binary is not installed")
    if SKOPEO is None:
        pytest.skip("skopeo binary is not installed")


# -- registry:2 ---------------------------------------------------------------------------------


@dataclass(kw_only=True)
class Registry2(Registry2Process):
    config_path: Path


def registry2_config(root: Path, port: int) -> dict[str, Any]:
    return {
        "version": 0.1,
        "log": {"level": "info"},
        "storage": {"filesystem": {"rootdirectory": str(root)}, "delete": {"enabled": True}},
        "http": {"addr": f"127.0.0.1:{port}", "secret": "registry2-gc-test-secret"},
    }


@pytest.fixture
def start_registry2(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[[Path], Registry2]]:
    started: list[Registry2] = []

    def start(root: Path) -> Registry2:
        assert REGISTRY2 is not None
        work = tmp_path_factory.mktemp("registry2")
        port = free_port()
        config = registry2_config(root, port)
        registry = Registry2.launch(REGISTRY2, work, config, port, config_path=work / "config.yml")
        started.append(registry)
        return registry

    yield start
    for registry in started:
        registry.stop()


# -- the images ---------------------------------------------------------------------------------


def layer(size: int) -> bytes:
    """Really gzip, so skopeo pushes it as it is."""
    return gzip.compress(os.urandom(size), compresslevel=1)


@dataclass
class Layout:
    """An OCI image layout skopeo pushes from: tag -> image (or index)."""

    path: Path
    blobs: dict[str, bytes]

    def put(self, media_type: str, data: bytes, **extra: Any) -> dict[str, Any]:
        digest = sha256(data)
        (self.path / "blobs" / "sha256" / digest.removeprefix("sha256:")).write_bytes(data)
        self.blobs[digest] = data
        return {"mediaType": media_type, "digest": digest, "size": len(data), **extra}

    def image(self, arch: str, layers: list[bytes]) -> bytes:
        config = json.dumps(
            {
                "architecture": arch,
                "os": "linux",
                "config": {"Env": [f"NONCE={os.urandom(8).hex()}"]},
                "rootfs": {
                    "type": "layers",
                    "diff_ids": [sha256(gzip.decompress(x)) for x in layers],
                },
            }
        ).encode()
        return json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": self.put("application/vnd.oci.image.config.v1+json", config),
                "layers": [
                    self.put("application/vnd.oci.image.layer.v1.tar+gzip", x) for x in layers
                ],
            }
        ).encode()


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Layout:
    """Tags ``a`` (shared 700 kB + shared 4 kB + own layer), ``b`` (shared 700 kB + own),
    ``c`` (shared 4 kB + own 1 MiB: the one deleted), ``multi`` (an index: an amd64 image with
    the shared 700 kB layer and an arm64 image)."""
    path = tmp_path_factory.mktemp("oci-layout")
    (path / "blobs" / "sha256").mkdir(parents=True)
    out = Layout(path, {})
    shared_big, shared_small = layer(700_000), layer(4096)
    images = {
        "a": out.image("amd64", [shared_big, shared_small, layer(20_000)]),
        "b": out.image("amd64", [shared_big, layer(30_000)]),
        "c": out.image("amd64", [shared_small, layer(1024 * 1024)]),
    }
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                out.put(
                    OCI_MANIFEST,
                    out.image("amd64", [shared_big, layer(5000)]),
                    platform={"architecture": "amd64", "os": "linux"},
                ),
                out.put(
                    OCI_MANIFEST,
                    out.image("arm64", [layer(6000)]),
                    platform={"architecture": "arm64", "os": "linux"},
                ),
            ],
        }
    ).encode()
    refs = [
        out.put(OCI_MANIFEST, body, annotations={"org.opencontainers.image.ref.name": tag})
        for tag, body in images.items()
    ]
    refs.append(
        out.put(OCI_INDEX, index, annotations={"org.opencontainers.image.ref.name": "multi"})
    )
    (path / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": refs}))
    (path / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    return out


@dataclass(frozen=True)
class Push:
    repo: str
    tag: str
    source: str
    flags: tuple[str, ...] = ()


PUSHES = [
    Push("alpha", "v1", "a"),
    Push("beta", "v1", "b", ("--format", "v2s2")),
    Push("team/beta-copy", "v1", "b"),  # the same blobs in a second repository
    Push("gamma", "v1", "c"),  # deleted before the collection
    Push("team/multi", "1.0", "multi", ("--all",)),
]
DELETED = PUSHES[3]


# -- clients ------------------------------------------------------------------------------------


def run(*command: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)


def skopeo(*args: str) -> str:
    assert SKOPEO is not None
    result = run(SKOPEO, *args)
    assert result.returncode == 0, f"skopeo {' '.join(args)}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def push(registry: Registry2, layout: Layout, p: Push, work: Path) -> str:
    digestfile = work / f"digest-{p.repo.replace('/', '_')}-{p.tag}"
    skopeo(
        "copy",
        "--quiet",
        "--dest-tls-verify=false",
        "--digestfile",
        str(digestfile),
        *p.flags,
        f"oci:{layout.path}:{p.source}",
        f"docker://{registry.host}/{p.repo}:{p.tag}",
    )
    return digestfile.read_text().strip()


def get_manifest(registry: Registry2, repo: str, reference: str) -> requests.Response:
    return requests.get(
        f"{registry.url}/v2/{repo}/manifests/{reference}", headers={"Accept": ACCEPT}, timeout=30
    )


def content_of(registry: Registry2, repo: str, digest: str) -> tuple[set[str], set[str]]:
    """(manifests, blobs) an image or index consists of, as registry:2 serves them."""
    r = get_manifest(registry, repo, digest)
    assert r.status_code == 200, r.text
    body = r.json()
    if "manifests" in body:
        manifests, blobs = {digest}, set()
        for child in body["manifests"]:
            m, b = content_of(registry, repo, child["digest"])
            manifests |= m
            blobs |= b
        return manifests, blobs
    return {digest}, {body["config"]["digest"], *(x["digest"] for x in body["layers"])}


def pull_and_compare(
    registry: Registry2, p: Push, digest: str, layout: Layout, pushed: dict[str, bytes], out: Path
) -> None:
    """skopeo pulls into ``dir:`` the very manifest and blobs that were pushed."""
    skopeo(
        "copy",
        "--quiet",
        "--src-tls-verify=false",
        *(["--all"] if "--all" in p.flags else []),
        f"docker://{registry.host}/{p.repo}:{p.tag}",
        f"dir:{out}",
    )
    assert sha256((out / "manifest.json").read_bytes()) == digest, p
    for file in out.iterdir():
        if file.name == "version":
            continue
        data = file.read_bytes()
        if file.name.endswith("manifest.json"):
            continue  # the top one is checked above; children by their file names below
        assert f"sha256:{file.name}" in layout.blobs, f"{p}: {file.name} was never pushed"
        assert data == layout.blobs[f"sha256:{file.name}"], f"{p}: {file.name} differs"
    for file in out.glob("*.manifest.json"):
        assert sha256(file.read_bytes()) == "sha256:" + file.name.split(".")[0]
        assert sha256(file.read_bytes()) in pushed


# -- the store on disk --------------------------------------------------------------------------


def blob_path(root: Path, digest: str) -> Path:
    hexa = digest.removeprefix("sha256:")
    return root / V2 / "blobs" / "sha256" / hexa[:2] / hexa / "data"


def layer_link(root: Path, repo: str, digest: str) -> Path:
    return root / V2 / "repositories" / repo / "_layers" / "sha256" / digest[7:] / "link"


def stored_blobs(root: Path) -> set[str]:
    return {f"sha256:{p.parent.name}" for p in (root / V2 / "blobs").rglob("data")}


def snapshot(root: Path) -> dict[str, tuple[str, int, int, str]]:
    """Every file and directory under ``root``: kind, size, mtime (ns) and a content hash."""
    state = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        if path.is_dir():
            state[str(path.relative_to(root))] = ("dir", 0, st.st_mtime_ns, "")
        else:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            state[str(path.relative_to(root))] = ("file", st.st_size, st.st_mtime_ns, digest)
    return state


def dockyard(command: str, config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run(sys.executable, "-m", "dockyard", command, str(config), *args)


def summary(output: str) -> dict[str, Any]:
    match = SUMMARY.search(output)
    assert match, output
    return {k: (v if k == "verb" else int(v)) for k, v in match.groupdict().items()}


# -- the test -----------------------------------------------------------------------------------


def test_dockyard_gc_on_a_store_registry2_wrote(
    layout: Layout, start_registry2: Callable[[Path], Registry2], tmp_path: Path
) -> None:
    root = tmp_path / "store"
    registry2 = start_registry2(root)
    digests = {p: push(registry2, layout, p, tmp_path) for p in PUSHES}
    contents = {p: content_of(registry2, p.repo, digests[p]) for p in PUSHES}
    manifests = {sha256(get_manifest(registry2, p.repo, d).content): p for p, d in digests.items()}
    pushed_manifests: dict[str, bytes] = {}
    for p, (ms, _) in contents.items():
        for m in ms:
            pushed_manifests[m] = get_manifest(registry2, p.repo, m).content
    assert set(manifests) == set(digests.values())

    # Delete one image through registry:2's API (by digest: its tag goes with it).
    r = requests.delete(
        f"{registry2.url}/v2/{DELETED.repo}/manifests/{digests[DELETED]}", timeout=30
    )
    assert r.status_code == 202, r.text
    assert get_manifest(registry2, DELETED.repo, DELETED.tag).status_code == 404
    registry2.stop()

    kept_blobs = set().union(*(b for p, (_, b) in contents.items() if p != DELETED))
    kept_manifests = set().union(*(m for p, (m, _) in contents.items() if p != DELETED))
    deleted_manifest = digests[DELETED]
    deleted_blobs = contents[DELETED][1]
    own = deleted_blobs - kept_blobs  # the deleted image's config and its 1 MiB layer
    shared = deleted_blobs & kept_blobs  # the 4 kB layer image "a" uses too
    assert len(own) == 2 and len(shared) == 1
    garbage = own | {deleted_manifest}
    before = stored_blobs(root)
    assert before == kept_blobs | kept_manifests | garbage

    # registry:2's own collector names the same garbage.
    assert REGISTRY2 is not None
    reference = run(REGISTRY2, "garbage-collect", "--dry-run", str(registry2.config_path))
    assert reference.returncode == 0, reference.stdout + reference.stderr
    eligible = set(
        re.findall(r"blob eligible for deletion: (sha256:[0-9a-f]{64})", reference.stdout)
    )
    assert eligible == garbage, reference.stdout

    # Dockyard's view of the store. registry:2 is stopped, so nothing is in use: the grace period
    # is zero, for the collections below and in the configuration (nothing needs stamping).
    config = tmp_path / "dockyard.yml"
    storage = {"filesystem": {"rootdirectory": str(root)}, "maintenance": {"gc": {"grace": "0s"}}}
    config.write_text(yaml.safe_dump({"version": 0.1, "storage": storage}))

    # --dry-run: the same garbage reported, not a byte, name or time changed in registry:2's
    # tree; beside it, only the (empty) directory of Dockyard's lease may appear.
    untouched = snapshot(root)

    def unchanged() -> bool:
        now = snapshot(root)
        extra = {k: v[0] for k, v in now.items() if k not in untouched}
        allowed = extra in ({}, {"dockyard": "dir", "dockyard/leases": "dir"})
        return allowed and {k: v for k, v in now.items() if k in untouched} == untouched

    dry = dockyard("gc", config, "--grace", "0s", "--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert unchanged()
    reported = set(re.findall(r"would remove blob (sha256:[0-9a-f]{64})", dry.stdout))
    assert reported == garbage, dry.stdout
    predicted = summary(dry.stdout)
    assert predicted["verb"] == "would remove"
    assert predicted["blobs"] == 3, dry.stdout
    assert predicted["bytes"] == sum(blob_path(root, d).stat().st_size for d in garbage)
    assert predicted["manifests"] == 0, dry.stdout
    # With --delete-untagged the same: the index's untagged children are kept through the index.
    dry_untagged = dockyard("gc", config, "--grace", "0s", "--dry-run", "--delete-untagged")
    assert dry_untagged.returncode == 0, dry_untagged.stdout + dry_untagged.stderr
    assert unchanged()
    removals = set(re.findall(r"would remove (?:blob|manifest) (\S+)", dry_untagged.stdout))
    assert removals == garbage, dry_untagged.stdout

    # The collection itself.
    collected = dockyard("gc", config, "--grace", "0s")
    assert collected.returncode == 0, collected.stdout + collected.stderr
    assert set(re.findall(r"removed blob (sha256:[0-9a-f]{64})", collected.stdout)) == garbage
    done = summary(collected.stdout)
    assert done["blobs"] == 3, collected.stdout
    # The deleted image's repository linked its two own blobs (registry:2 leaves _layers links
    # behind when a manifest is deleted): now dangling, they go too.
    assert done["links"] == 2, collected.stdout
    assert stored_blobs(root) == before - garbage
    for digest in garbage:
        assert not blob_path(root, digest).parent.exists(), digest  # no empty directory left
    for digest in kept_blobs | kept_manifests:
        assert blob_path(root, digest).is_file(), digest
    # The deleted image's repository keeps its link to the shared layer, not to its own blobs.
    for digest in own:
        assert not layer_link(root, DELETED.repo, digest).exists(), digest
    for digest in shared:
        assert layer_link(root, DELETED.repo, digest).read_text() == digest
    # Nothing of Dockyard's own is left in registry:2's tree.
    leftovers = [p for p in (root / V2).rglob("*") if ".gc-" in p.name or ".tmp-" in p.name]
    assert leftovers == []

    fsck = dockyard("fsck", config)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    assert "clean" in fsck.stdout

    # A second collection finds nothing more.
    again = dockyard("gc", config, "--grace", "0s")
    assert again.returncode == 0, again.stderr
    assert summary(again.stdout)["blobs"] == 0, again.stdout

    # registry:2 serves every remaining image, byte for byte, and nothing of the deleted one.
    registry2 = start_registry2(root)
    for i, p in enumerate(PUSHES):
        if p == DELETED:
            continue
        r = get_manifest(registry2, p.repo, p.tag)
        assert r.status_code == 200, r.text
        assert r.headers["Docker-Content-Digest"] == digests[p]
        pull_and_compare(registry2, p, digests[p], layout, pushed_manifests, tmp_path / f"pull{i}")
    assert get_manifest(registry2, DELETED.repo, DELETED.tag).status_code == 404
    for digest in own:
        r = requests.head(f"{registry2.url}/v2/{DELETED.repo}/blobs/{digest}", timeout=30)
        assert r.status_code == 404, digest
    for digest in shared:
        r = requests.head(f"{registry2.url}/v2/{DELETED.repo}/blobs/{digest}", timeout=30)
        assert r.status_code == 200, digest

    # The deleted image can be pushed again (its blobs uploaded anew) and pulled.
    again_dir = tmp_path / "again"
    again_dir.mkdir()
    assert push(registry2, layout, DELETED, again_dir) == digests[DELETED]
    pull_and_compare(
        registry2, DELETED, digests[DELETED], layout, pushed_manifests, tmp_path / "pull-again"
    )
    registry2.stop()
    # registry:2 logs the 404s asked for above at level=error; anything else is a real error.
    errors = [
        line
        for line in registry2.log().splitlines()
        if "level=error" in line and "http.response.status=404" not in line
    ]
    assert errors == [], errors
    assert "panic" not in registry2.log()

    fsck = dockyard("fsck", config)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr

    # Last (so that a mismatch does not hide the checks above): the dry run predicted what the
    # collection did, counts included.
    assert {**predicted, "verb": "removed"} == done, (dry.stdout, collected.stdout)
