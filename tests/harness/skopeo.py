"""skopeo against a registry (Dockyard or registry:2): pushes from an OCI layout
(``harness.oci``), pulls compared with what was pushed, and the registry's answers (manifests
by tag and by digest, catalog and tag lists) checked against the pushes.

A registry here is anything on loopback with ``host`` and ``url`` (``harness.net.Loopback``):
Dockyard in the test process or in its own, or registry:2. Tests that use skopeo are marked
``needs_skopeo`` (skipped where it is not installed).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from harness.client import DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST, sha256
from harness.net import Loopback
from harness.oci import OciLayout, referenced

#: the skopeo binary, or None when it is not installed
SKOPEO = shutil.which("skopeo")
needs_skopeo = pytest.mark.skipif(SKOPEO is None, reason="skopeo is not installed")

MANIFEST_ACCEPT = ", ".join([OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST])
LIST_TYPES = {OCI_INDEX, DOCKER_LIST}


def skopeo(*args: str, timeout: float = 120) -> str:
    """``skopeo ARGS...``, which must succeed; its standard output."""
    assert SKOPEO is not None, "skopeo is not installed"
    result = subprocess.run(
        [SKOPEO, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    assert result.returncode == 0, f"skopeo {' '.join(args)}\n{result.stdout}\n{result.stderr}"
    return result.stdout


@dataclass(frozen=True)
class Push:
    """``skopeo copy [FLAGS] oci:LAYOUT:SOURCE docker://REGISTRY/REPO:TAG``."""

    repo: str
    tag: str
    source: str  # the tag in the OCI layout
    flags: tuple[str, ...] = ()

    @property
    def all(self) -> bool:
        """An index or manifest list pushed with every image in it."""
        return "--all" in self.flags


def push(registry: Loopback, layout: OciLayout, p: Push, work: Path) -> str:
    """Push ``p`` with skopeo (its digest file in ``work``); the manifest digest it reports."""
    work.mkdir(parents=True, exist_ok=True)
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


def push_all(
    registry: Loopback, layout: OciLayout, pushes: Iterable[Push], work: Path
) -> dict[Push, str]:
    """Every push, in order; the manifest digest each reported."""
    return {p: push(registry, layout, p, work) for p in pushes}


def get_manifest(
    registry: Loopback, repo: str, reference: str, status: int = 200
) -> requests.Response:
    """``GET`` a manifest by tag or digest, accepting every image and list type; the answer
    must have ``status``."""
    r = requests.get(
        registry.v2(f"{repo}/manifests/{reference}"),
        headers={"Accept": MANIFEST_ACCEPT},
        timeout=30,
    )
    assert r.status_code == status, f"GET {repo}:{reference} -> {r.status_code} {r.text}"
    return r


def content_of(registry: Loopback, repo: str, digest: str) -> tuple[set[str], set[str]]:
    """(manifests, blobs) an image or index consists of, as the registry serves them."""
    children, blobs = referenced(get_manifest(registry, repo, digest).content)
    manifests = {digest}
    found = set(blobs)
    for child in children:
        m, b = content_of(registry, repo, child)
        manifests |= m
        found |= b
    return manifests, found


def check_manifest_served(registry: Loopback, p: Push, digest: str) -> bytes:
    """The tag resolves to ``digest`` over HTTP, by tag and by digest, byte-identical, with
    the manifest's own media type (a list type for ``--all`` pushes); returns the body."""
    by_tag = get_manifest(registry, p.repo, p.tag)
    assert by_tag.headers["Docker-Content-Digest"] == digest
    assert sha256(by_tag.content) == digest
    media_type = json.loads(by_tag.content)["mediaType"]
    assert by_tag.headers["Content-Type"] == media_type
    if p.all:
        assert media_type in LIST_TYPES
    by_digest = get_manifest(registry, p.repo, digest)
    assert by_digest.content == by_tag.content
    return by_tag.content


def pull_and_compare(
    registry: Loopback,
    p: Push,
    digest: str,
    blobs: Mapping[str, bytes],
    out: Path,
    manifests: Collection[str] | None = None,
) -> None:
    """skopeo pulls ``p`` into ``dir:out``: the manifest is ``digest``; the child manifests
    (of an index) are the ones it names, each hashing to its name (and one of ``manifests``
    where given); the blobs are exactly the ones referenced, each the very bytes pushed
    (``blobs``, by digest)."""
    skopeo(
        "copy",
        "--quiet",
        "--src-tls-verify=false",
        *(["--all"] if p.all else []),
        f"docker://{registry.host}/{p.repo}:{p.tag}",
        f"dir:{out}",
    )
    top = (out / "manifest.json").read_bytes()
    assert sha256(top) == digest, f"{p}: pulled manifest is not the pushed one"
    children, wanted = referenced(top)
    child_files = {f"sha256:{f.name.split('.')[0]}" for f in out.glob("*.manifest.json")}
    assert child_files == set(children), p
    for child in children:
        body = (out / f"{child.removeprefix('sha256:')}.manifest.json").read_bytes()
        assert sha256(body) == child
        if manifests is not None:
            assert child in manifests, f"{p}: {child} was never pushed"
        wanted += referenced(body)[1]
    pulled = {
        f"sha256:{f.name}": f
        for f in out.iterdir()
        if f.name != "version" and not f.name.endswith("manifest.json")
    }
    assert set(pulled) == set(wanted), p
    for blob, file in pulled.items():
        assert blob in blobs, f"{p}: {blob} was never pushed"
        assert file.read_bytes() == blobs[blob], f"{p}: blob {blob} differs"


def verify_pushes(
    registry: Loopback, digests: Mapping[Push, str], blobs: Mapping[str, bytes], work: Path
) -> None:
    """Every push served by tag and by digest (``check_manifest_served``) and pulled by skopeo
    byte for byte (``pull_and_compare``, into ``work``)."""
    work.mkdir(parents=True, exist_ok=True)
    for i, (p, digest) in enumerate(digests.items()):
        check_manifest_served(registry, p, digest)
        pull_and_compare(registry, p, digest, blobs, work / f"pull-{i}")


def expected_tags(pushes: Iterable[Push]) -> dict[str, list[str]]:
    """repository -> the tags pushed to it."""
    tags: dict[str, list[str]] = {}
    for p in pushes:
        tags.setdefault(p.repo, []).append(p.tag)
    return tags


def check_catalog_and_tags(
    registry: Loopback, expected: Mapping[str, list[str]], *, sorted_by_server: bool
) -> None:
    """The catalog is exactly the repositories of ``expected`` and each tag list (over HTTP
    and as skopeo lists it) its tags; ``sorted_by_server``: in sorted order as served."""
    r = requests.get(registry.v2("_catalog"), timeout=30)
    assert r.status_code == 200, r.text
    repositories = r.json()["repositories"]
    if not sorted_by_server:
        repositories = sorted(repositories)
    assert repositories == sorted(expected)
    for repo, tags in expected.items():
        r = requests.get(registry.v2(f"{repo}/tags/list"), timeout=30)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["name"] == repo
        listed = body["tags"] if sorted_by_server else sorted(body["tags"])
        assert listed == sorted(tags)
        listed_by_skopeo = json.loads(
            skopeo("list-tags", "--tls-verify=false", f"docker://{registry.host}/{repo}")
        )
        assert sorted(listed_by_skopeo["Tags"]) == sorted(tags)
