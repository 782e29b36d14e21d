"""Dockyard and registry:2 (distribution 2.8) share one S3 bucket (Ceph RGW), both ways.

Both servers get registry:2's ``storage.s3`` section for the same bucket with
``rootdirectory: /prefix`` and ``chunksize: 5242880``, so every key is
``prefix/docker/registry/v2/...``, the filesystem layout's paths. Blob GET and HEAD are
redirected (307) to presigned RGW URLs, as registry:2 does by default; skopeo follows them.

registry:2's S3 driver crashes when ``AWS_CA_BUNDLE`` is set (this machine sets it), so it runs
without it; Dockyard runs with it set in test 1 (on purpose) and without it in test 2.

1. registry:2 pushes (a 12 MiB layer, so it writes S3 multipart uploads and, with
   ``multipartcopythresholdsize: 5242880``, part copies; small layers; a Docker manifest list);
   Dockyard serves all of it to skopeo byte for byte, and both list the same catalog and
   tags.
2. Dockyard pushes the same images plus a blob uploaded by hand in five uneven chunks (four
   PATCHes and the PUT); its keys are the ones registry:2 writes for the same pushes into
   another bucket, and registry:2 serves all of it.
3. ``dockyard du --json``, ``gc --dry-run``, ``gc --delete-untagged --grace 0s`` (after a tag is
   deleted) and ``fsck`` on a bucket both servers wrote; registry:2 serves what remains.
4. ``dockyard fsck`` finds a blob whose object was overwritten with other bytes in the bucket
   and exits non-zero.
"""

from __future__ import annotations

import itertools
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
from urllib.parse import urljoin

import pytest
import requests
import yaml
from pushload import oci_manifest
from services import Registry2Process
from test_registry2_interop import (
    LINK_CONTENT,
    OciLayout,
    Push,
    _image_manifest,
    _layer,
    check_catalog_and_tags,
    check_manifest_served,
    get_manifest,
    pull_and_compare,
    referenced,
    skopeo,
)

from s3support import S3Endpoint
from support import OCI_INDEX, OCI_MANIFEST, Server, ServerFactory, free_port, sha256

pytestmark = pytest.mark.e2e

REGISTRY2 = shutil.which("docker-registry")
SKOPEO = shutil.which("skopeo")
MiB = 1024 * 1024
ROOTDIRECTORY = "/prefix"
V2 = "prefix/docker/registry/v2"  # every registry key, in the bucket
CHUNKSIZE = 5 * MiB
BucketFactory = Callable[[S3Endpoint], str]


@pytest.fixture(autouse=True)
def _need_binaries() -> None:
    if REGISTRY2 is None:
        pytest.skip("docker-registry (registry:2) binary is not installed")
    if SKOPEO is None:
        pytest.skip("skopeo binary is not installed")


def storage_section(endpoint: S3Endpoint, bucket: str) -> dict[str, Any]:
    """The one ``storage.s3`` section both servers (and the CLI) get."""
    return endpoint.storage_config(
        bucket,
        rootdirectory=ROOTDIRECTORY,
        chunksize=CHUNKSIZE,
        # Moves of blobs above 5 MiB (upload -> blobs/) become multipart part copies.
        multipartcopythresholdsize=CHUNKSIZE,
        multipartcopychunksize=CHUNKSIZE,
    )


# -- registry:2 on S3 ---------------------------------------------------------------------------


@dataclass(kw_only=True)
class Registry2(Registry2Process):
    """registry:2 on an S3 bucket."""

    bucket: str

    def errors(self) -> list[str]:
        """Lines logged at level=error, other than the 404s tests ask for on purpose."""
        return [
            line
            for line in self.log().splitlines()
            if "level=error" in line and "http.response.status=404" not in line
        ]


@pytest.fixture
def start_registry2(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[[S3Endpoint, str], Registry2]]:
    started: list[Registry2] = []

    def start(endpoint: S3Endpoint, bucket: str) -> Registry2:
        assert REGISTRY2 is not None
        work = tmp_path_factory.mktemp("registry2-s3")
        port = free_port()
        config = {
            "version": 0.1,
            "log": {"level": "info"},
            "storage": {"s3": storage_section(endpoint, bucket), "delete": {"enabled": True}},
            "http": {"addr": f"127.0.0.1:{port}", "secret": "registry2-s3-test-secret"},
        }
        # registry:2's S3 driver fails on AWS_CA_BUNDLE (see /work/shared/guide/s3.md).
        env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}
        registry = Registry2.launch(REGISTRY2, work, config, port, env=env, bucket=bucket)
        started.append(registry)
        return registry

    yield start
    for registry in started:
        registry.stop()


def start_dockyard(
    start_server: ServerFactory, endpoint: S3Endpoint, bucket: str, **kwargs: Any
) -> Server:
    return start_server(
        storage={"s3": storage_section(endpoint, bucket), "delete": {"enabled": True}},
        **kwargs,
    )


# -- the images ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> OciLayout:
    """An OCI layout: ``v1`` (12 MiB, 700 kB and 4 kB layers: the first spans three 5 MiB
    parts), ``multi`` (an index of two small images), ``old`` and ``new`` (both with the 4 kB
    layer of ``v1``, and a 6 MiB, resp. a 20 kB layer of their own), ``small`` (one 100 kB
    layer)."""
    path = tmp_path_factory.mktemp("oci-layout-s3")
    (path / "blobs" / "sha256").mkdir(parents=True)
    blobs: dict[str, bytes] = {}

    def put(media_type: str, data: bytes, **extra: Any) -> dict[str, Any]:
        digest = sha256(data)
        (path / "blobs" / "sha256" / digest.removeprefix("sha256:")).write_bytes(data)
        blobs[digest] = data
        return {"mediaType": media_type, "digest": digest, "size": len(data), **extra}

    shared_small = _layer(4096)
    images = {
        "v1": _image_manifest(
            put,
            "amd64",
            [_layer(12 * MiB + 321), _layer(700_001), shared_small],
        ),
        "old": _image_manifest(put, "amd64", [shared_small, _layer(6 * MiB + 99)]),
        "new": _image_manifest(put, "amd64", [shared_small, _layer(20_000)]),
        "small": _image_manifest(put, "amd64", [_layer(100_000)]),
    }
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                put(
                    OCI_MANIFEST,
                    _image_manifest(put, arch, [_layer(size)]),
                    platform={"architecture": arch, "os": "linux"},
                )
                for arch, size in (("amd64", 5000), ("arm64", 3000))
            ],
        },
        indent=1,
    ).encode()
    refs = [
        put(OCI_MANIFEST, body, annotations={"org.opencontainers.image.ref.name": tag})
        for tag, body in images.items()
    ]
    refs.append(put(OCI_INDEX, index, annotations={"org.opencontainers.image.ref.name": "multi"}))
    (path / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": refs}))
    (path / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    return OciLayout(path=path, blobs=blobs)


PUSHES = [
    Push("alpha", "v1", "v1", ("--format", "oci")),
    Push("team/multi", "1.0", "multi", ("--all", "--format", "v2s2")),  # a Docker manifest list
]


def push(registry: Server | Registry2, layout: OciLayout, p: Push, work: Path) -> str:
    """skopeo copy from the layout; the manifest digest skopeo reports."""
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


def verify(
    registry: Server | Registry2, digests: dict[Push, str], blobs: dict[str, bytes], work: Path
) -> None:
    """Every push served by tag and digest, and pulled by skopeo byte for byte."""
    work.mkdir(parents=True, exist_ok=True)
    for i, (p, digest) in enumerate(digests.items()):
        check_manifest_served(registry, p, digest)
        pull_and_compare(registry, p, digest, blobs, work / f"pull-{i}")


def tags_of(pushes: list[Push]) -> dict[str, list[str]]:
    tags: dict[str, list[str]] = {}
    for p in pushes:
        tags.setdefault(p.repo, []).append(p.tag)
    return tags


def listings(registry: Server | Registry2, repos: list[str]) -> tuple[list[str], dict[str, Any]]:
    """(sorted catalog, sorted tag list per repository) as the server answers them."""
    r = requests.get(f"{registry.url}/v2/_catalog", timeout=30)
    assert r.status_code == 200, r.text
    tags = {}
    for repo in repos:
        t = requests.get(f"{registry.url}/v2/{repo}/tags/list", timeout=30)
        assert t.status_code == 200, t.text
        tags[repo] = sorted(t.json()["tags"])
    return sorted(r.json()["repositories"]), tags


# -- the bucket ---------------------------------------------------------------------------------


_clients: dict[str, Any] = {}


def s3_client(endpoint: S3Endpoint) -> Any:
    """One boto3 client per endpoint for the module (making one takes about 0.5 s)."""
    if endpoint.url not in _clients:
        _clients[endpoint.url] = endpoint.client()
    return _clients[endpoint.url]


def objects(endpoint: S3Endpoint, bucket: str) -> dict[str, dict[str, Any]]:
    """Every object in the bucket: key -> size, ETag, LastModified."""
    s3 = s3_client(endpoint)
    found = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for o in page.get("Contents", []):
            found[o["Key"]] = {"size": o["Size"], "etag": o["ETag"], "time": o["LastModified"]}
    return found


def registry_keys(endpoint: S3Endpoint, bucket: str) -> set[str]:
    """Keys of blobs and repositories (uploads in progress aside), relative to the v2 root."""
    return {
        key.removeprefix(V2 + "/")
        for key in objects(endpoint, bucket)
        if key.startswith(V2 + "/") and "/_uploads/" not in key
    }


def links(endpoint: S3Endpoint, bucket: str) -> dict[str, bytes]:
    """Every ``link`` object under ``repositories/`` (uploads aside): path -> content."""
    s3 = s3_client(endpoint)
    base = f"{V2}/repositories/"
    return {
        key.removeprefix(base): s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        for key in objects(endpoint, bucket)
        if key.startswith(base) and key.endswith("/link") and "/_uploads/" not in key
    }


def blob_key(digest: str) -> str:
    hexa = digest.removeprefix("sha256:")
    return f"{V2}/blobs/sha256/{hexa[:2]}/{hexa}/data"


def stored_blobs(endpoint: S3Endpoint, bucket: str) -> dict[str, int]:
    """digest -> size of every blob object."""
    pattern = re.compile(rf"{V2}/blobs/sha256/[0-9a-f]{{2}}/([0-9a-f]{{64}})/data")
    found = {}
    for key, o in objects(endpoint, bucket).items():
        match = pattern.fullmatch(key)
        if match:
            found[f"sha256:{match.group(1)}"] = o["size"]
    return found


def read_blob(endpoint: S3Endpoint, bucket: str, digest: str) -> bytes:
    return s3_client(endpoint).get_object(Bucket=bucket, Key=blob_key(digest))["Body"].read()


def expected_links(endpoint: S3Endpoint, bucket: str, pushes: dict[Push, str]) -> dict[str, bytes]:
    """The link objects registry:2 keeps for these pushes, derived from the manifests in the
    bucket: each tag's ``current`` and ``index`` entry, a revision for every manifest (an
    index and its children) and a ``_layers`` link for every config and layer."""
    found: dict[str, bytes] = {}
    for p, digest in pushes.items():
        hexa = digest.removeprefix("sha256:")
        found[f"{p.repo}/_manifests/tags/{p.tag}/current/link"] = digest.encode()
        found[f"{p.repo}/_manifests/tags/{p.tag}/index/sha256/{hexa}/link"] = digest.encode()
        todo = [digest]
        while todo:
            m = todo.pop()
            found[f"{p.repo}/_manifests/revisions/sha256/{m.removeprefix('sha256:')}/link"] = (
                m.encode()
            )
            children, layers = referenced(read_blob(endpoint, bucket, m))
            todo += children
            for b in layers:
                found[f"{p.repo}/_layers/sha256/{b.removeprefix('sha256:')}/link"] = b.encode()
    return found


def multipart_uploads(endpoint: S3Endpoint, bucket: str) -> list[str]:
    s3 = s3_client(endpoint)
    return [
        u["Key"]
        for page in s3.get_paginator("list_multipart_uploads").paginate(Bucket=bucket)
        for u in page.get("Uploads", [])
    ]


def check_redirects(
    registry: Server | Registry2, endpoint: S3Endpoint, repo: str, blob: bytes
) -> None:
    """Blob GET and HEAD answer 307 to a presigned URL on the S3 server, which serves it."""
    url = f"{registry.url}/v2/{repo}/blobs/{sha256(blob)}"
    for method in ("GET", "HEAD"):
        r = requests.request(method, url, allow_redirects=False, timeout=30)
        assert r.status_code == 307, (method, r.status_code, r.text)
        location = r.headers["Location"]
        assert location.startswith(endpoint.url + "/"), location
        assert "X-Amz-Signature=" in location, location
        followed = requests.request(method, location, timeout=30)
        assert followed.status_code == 200, (method, followed.status_code, followed.text)
        if method == "GET":
            assert followed.content == blob
        else:
            assert int(followed.headers["Content-Length"]) == len(blob)


# -- 1. registry:2 writes, Dockyard reads -------------------------------------------------------


def test_dockyard_serves_what_registry2_pushed_to_s3(
    rgw_s3: S3Endpoint,
    s3_bucket_factory: BucketFactory,
    start_registry2: Callable[[S3Endpoint, str], Registry2],
    start_server: ServerFactory,
    layout: OciLayout,
    tmp_path: Path,
) -> None:
    bucket = s3_bucket_factory(rgw_s3)
    registry2 = start_registry2(rgw_s3, bucket)
    digests = {p: push(registry2, layout, p, tmp_path) for p in PUSHES}
    for p, digest in digests.items():
        check_manifest_served(registry2, p, digest)

    # registry:2 wrote the filesystem layout's keys under the root directory, and the 12 MiB
    # layer as a multipart object (part copies: above the multipart-copy threshold).
    stored = objects(rgw_s3, bucket)
    assert all(k.startswith("prefix/docker/registry/v2/") for k in stored), sorted(stored)[:5]
    assert links(rgw_s3, bucket) == expected_links(rgw_s3, bucket, digests)
    big = max(layout.blobs, key=lambda d: len(layout.blobs[d]))
    assert stored[blob_key(big)]["size"] == len(layout.blobs[big])
    assert "-" in stored[blob_key(big)]["etag"], stored[blob_key(big)]
    assert multipart_uploads(rgw_s3, bucket) == []

    # Dockyard, on the same bucket while registry:2 still runs, with AWS_CA_BUNDLE set.
    ca_bundle = os.environ.get("AWS_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
    dockyard = start_dockyard(
        start_server, rgw_s3, bucket, workers=2, env={"AWS_CA_BUNDLE": ca_bundle}
    )
    verify(dockyard, digests, layout.blobs, tmp_path / "dockyard")
    expected = tags_of(PUSHES)
    check_catalog_and_tags(dockyard, expected, sorted_by_server=True)
    check_catalog_and_tags(registry2, expected, sorted_by_server=False)
    assert listings(dockyard, list(expected)) == listings(registry2, list(expected))
    # Blobs registry:2 wrote, redirected to RGW by both servers (presigned URLs RGW accepts).
    for registry in (dockyard, registry2):
        check_redirects(registry, rgw_s3, "alpha", layout.blobs[big])

    dockyard.stop()
    registry2.stop()
    assert "Traceback" not in dockyard.log(), dockyard.log()
    assert "level=error" not in dockyard.log(), dockyard.log()
    assert registry2.errors() == [], registry2.errors()


# -- 2. Dockyard writes, registry:2 reads -------------------------------------------------------

CHUNKED = Push("team/chunked", "v1", "", ())


def chunked_push(registry: Server | Registry2, blobs: dict[str, bytes]) -> str:
    """An 11.5 MiB layer uploaded by hand: POST, four PATCHes of uneven sizes (some below the
    5 MiB part size, one above it, none aligned to it), a GET of the upload's state, and the
    last chunk in the PUT ?digest=; a config uploaded whole; a manifest. Returns the manifest
    digest."""
    base = f"{registry.url}/v2/{CHUNKED.repo}"
    layer = blobs["layer"]
    cuts = [0, MiB + 17, 4 * MiB + 17, 10 * MiB + 22, 10 * MiB + 512 * 1024 + 22, len(layer)]
    r = requests.post(f"{base}/blobs/uploads/", timeout=30)
    assert r.status_code == 202, r.text
    location = urljoin(registry.url, r.headers["Location"])
    for start, end in itertools.pairwise(cuts[:-1]):
        r = requests.patch(
            location,
            data=layer[start:end],
            headers={
                "Content-Type": "application/octet-stream",
                "Content-Range": f"{start}-{end - 1}",
            },
            timeout=60,
        )
        assert r.status_code == 202, r.text
        assert r.headers["Range"] == f"0-{end - 1}"
        location = urljoin(registry.url, r.headers["Location"])
    status = requests.get(location, timeout=30)
    assert status.status_code == 204, status.text
    assert status.headers["Range"] == f"0-{cuts[-2] - 1}"
    r = requests.put(
        location,
        params={"digest": sha256(layer)},
        data=layer[cuts[-2] :],
        headers={"Content-Type": "application/octet-stream"},
        timeout=60,
    )
    assert r.status_code == 201, r.text
    assert r.headers["Docker-Content-Digest"] == sha256(layer)

    config = blobs["config"]
    r = requests.post(f"{base}/blobs/uploads/", timeout=30)
    assert r.status_code == 202, r.text
    r = requests.put(
        urljoin(registry.url, r.headers["Location"]),
        params={"digest": sha256(config)},
        data=config,
        headers={"Content-Type": "application/octet-stream"},
        timeout=30,
    )
    assert r.status_code == 201, r.text

    manifest = blobs["manifest"]
    r = requests.put(
        f"{base}/manifests/{CHUNKED.tag}",
        data=manifest,
        headers={"Content-Type": OCI_MANIFEST},
        timeout=30,
    )
    assert r.status_code == 201, r.text
    assert r.headers["Docker-Content-Digest"] == sha256(manifest)
    return sha256(manifest)


def chunked_blobs() -> dict[str, bytes]:
    layer = _layer(11 * MiB + 512 * 1024)
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {}}).encode()
    return {"layer": layer, "config": config, "manifest": oci_manifest(config, [layer])}


def test_registry2_serves_what_dockyard_pushed_to_s3(
    rgw_s3: S3Endpoint,
    s3_bucket_factory: BucketFactory,
    start_registry2: Callable[[S3Endpoint, str], Registry2],
    start_server: ServerFactory,
    layout: OciLayout,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    chunked = chunked_blobs()
    blobs = {**layout.blobs, **{sha256(b): b for b in chunked.values()}}

    # Dockyard, this time without AWS_CA_BUNDLE, two workers (the PATCHes may hop between them).
    bucket = s3_bucket_factory(rgw_s3)
    monkeypatch.delenv("AWS_CA_BUNDLE", raising=False)
    dockyard = start_dockyard(start_server, rgw_s3, bucket, workers=2)
    monkeypatch.undo()
    digests = {p: push(dockyard, layout, p, tmp_path) for p in PUSHES}
    digests[CHUNKED] = chunked_push(dockyard, chunked)
    for p, digest in digests.items():
        check_manifest_served(dockyard, p, digest)
    assert dockyard.stop() == 0, dockyard.log()
    assert "Traceback" not in dockyard.log(), dockyard.log()

    # The keys registry:2 uses, links holding plain "sha256:<hex>"; no upload left behind,
    # neither as keys nor as S3 multipart uploads in progress.
    stored = objects(rgw_s3, bucket)
    registry_objects = [k for k in stored if not k.startswith("prefix/dockyard/")]
    assert all(k.startswith(V2 + "/") for k in registry_objects), registry_objects
    assert [k for k in stored if "/_uploads/" in k] == []
    assert multipart_uploads(rgw_s3, bucket) == []
    written = links(rgw_s3, bucket)
    for path, content in written.items():
        assert LINK_CONTENT.fullmatch(content), (path, content)
    assert written == expected_links(rgw_s3, bucket, digests)
    for digest in {sha256(b) for b in chunked.values()}:
        assert stored[blob_key(digest)]["size"] == len(blobs[digest])

    # registry:2 itself, given the same pushes in another bucket, writes the same keys.
    reference_bucket = s3_bucket_factory(rgw_s3)
    reference = start_registry2(rgw_s3, reference_bucket)
    reference_digests = {p: push(reference, layout, p, tmp_path / "ref") for p in PUSHES}
    reference_digests[CHUNKED] = chunked_push(reference, chunked)
    reference.stop()
    assert reference_digests == digests
    assert registry_keys(rgw_s3, bucket) == registry_keys(rgw_s3, reference_bucket)
    assert links(rgw_s3, reference_bucket) == written

    # registry:2 serves the bucket Dockyard wrote.
    registry2 = start_registry2(rgw_s3, bucket)
    verify(registry2, digests, blobs, tmp_path / "registry2")
    expected = tags_of([*PUSHES, CHUNKED])
    check_catalog_and_tags(registry2, expected, sorted_by_server=False)
    check_redirects(registry2, rgw_s3, CHUNKED.repo, chunked["layer"])
    # ... and Dockyard, started again, lists the same.
    dockyard = start_dockyard(start_server, rgw_s3, bucket)
    assert listings(dockyard, list(expected)) == listings(registry2, list(expected))
    check_redirects(dockyard, rgw_s3, CHUNKED.repo, chunked["layer"])
    registry2.stop()
    assert registry2.errors() == [], registry2.errors()


# -- 3. dockyard du / gc / fsck on the bucket ---------------------------------------------------

SUMMARY = re.compile(
    r"(?P<verb>would remove|removed) (?P<blobs>\d+) blobs \((?P<bytes>\d+) bytes\), "
    r"(?P<manifests>\d+) untagged manifests, (?P<links>\d+) dangling layer links"
)


def summary(output: str) -> dict[str, Any]:
    match = SUMMARY.search(output)
    assert match, output
    return {k: (v if k == "verb" else int(v)) for k, v in match.groupdict().items()}


def cli(command: str, config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dockyard", command, str(config), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def cli_config(path: Path, endpoint: S3Endpoint, bucket: str) -> Path:
    """The maintenance commands' configuration: the servers' storage, and a zero grace period
    (no server runs meanwhile: nothing needs protecting by stamps)."""
    storage = {"s3": storage_section(endpoint, bucket), "maintenance": {"gc": {"grace": "0s"}}}
    path.write_text(yaml.safe_dump({"version": 0.1, "storage": storage}))
    return path


GC_PUSHES = [
    Push("team/multi", "1.0", "multi", ("--all",)),
    Push("gamma", "old", "old", ()),  # its tag is deleted before the collection
    Push("gamma", "new", "new", ()),
]
DOCKYARD_PUSH = Push("delta", "v1", "small", ())
UNTAGGED = GC_PUSHES[1]


def test_dockyard_maintenance_on_a_shared_bucket(
    rgw_s3: S3Endpoint,
    s3_bucket_factory: BucketFactory,
    start_registry2: Callable[[S3Endpoint, str], Registry2],
    start_server: ServerFactory,
    layout: OciLayout,
    tmp_path: Path,
) -> None:
    bucket = s3_bucket_factory(rgw_s3)
    registry2 = start_registry2(rgw_s3, bucket)
    digests = {p: push(registry2, layout, p, tmp_path) for p in GC_PUSHES}
    registry2.stop()
    dockyard = start_dockyard(start_server, rgw_s3, bucket)
    digests[DOCKYARD_PUSH] = push(dockyard, layout, DOCKYARD_PUSH, tmp_path)
    # Deleting a tag (through Dockyard: registry:2 2.8 cannot): the image stays, untagged.
    r = requests.delete(f"{dockyard.url}/v2/{UNTAGGED.repo}/manifests/{UNTAGGED.tag}", timeout=30)
    assert r.status_code == 202, r.text
    assert get_manifest(dockyard, UNTAGGED.repo, digests[UNTAGGED]).status_code == 200
    assert dockyard.stop() == 0, dockyard.log()

    untagged_manifest = digests[UNTAGGED]
    _, untagged_blobs = referenced(layout.blobs[untagged_manifest])
    kept = [p for p in digests if p != UNTAGGED]
    kept_links = expected_links(rgw_s3, bucket, {p: digests[p] for p in kept})
    kept_blobs = {
        line.decode() for path, line in kept_links.items() if "/_manifests/tags/" not in path
    }
    own = set(untagged_blobs) - kept_blobs  # the old image's config and 6 MiB layer
    assert len(own) == 2
    garbage = own | {untagged_manifest}
    before = stored_blobs(rgw_s3, bucket)
    assert set(before) == kept_blobs | garbage
    config = cli_config(tmp_path / "dockyard-cli.yml", rgw_s3, bucket)

    # du: every repository, every blob and byte in the bucket; nothing unreferenced yet (the
    # untagged manifest is still in its repository).
    du = cli("du", config, "--json")
    assert du.returncode == 0, du.stdout + du.stderr
    usage = json.loads(du.stdout)
    assert sorted(r["name"] for r in usage["repositories"]) == sorted({p.repo for p in digests})
    assert usage["store"]["blobs"] == len(before)
    assert usage["store"]["total_bytes"] == sum(before.values())
    assert usage["store"]["unreferenced_blobs"] == 0
    by_name = {r["name"]: r for r in usage["repositories"]}
    assert by_name["gamma"]["tags"] == 1 and by_name["gamma"]["manifests"] == 2
    assert by_name["team/multi"]["manifests"] == 3  # the index and its two children
    assert by_name["delta"]["unique_bytes"] == sum(
        before[d]
        for d in [digests[DOCKYARD_PUSH], *referenced(layout.blobs[digests[DOCKYARD_PUSH]])[1]]
    )

    # gc --dry-run: the untagged image's manifest and own blobs reported, nothing changed in
    # the registry's keys (Dockyard's lease lives beside them, under prefix/dockyard/).
    def registry_state() -> dict[str, dict[str, Any]]:
        return {k: v for k, v in objects(rgw_s3, bucket).items() if k.startswith(V2 + "/")}

    untouched = registry_state()
    dry = cli("gc", config, "--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert summary(dry.stdout)["blobs"] == 0, dry.stdout  # without -m the image is kept
    dry = cli("gc", config, "--dry-run", "--delete-untagged", "--grace", "0s")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert registry_state() == untouched
    assert set(re.findall(r"would remove blob (sha256:[0-9a-f]{64})", dry.stdout)) == garbage
    assert re.findall(r"would remove manifest (\S+)", dry.stdout) == [
        f"{UNTAGGED.repo}@{untagged_manifest}"
    ]
    predicted = summary(dry.stdout)
    assert predicted["blobs"] == 3 and predicted["manifests"] == 1, dry.stdout
    assert predicted["bytes"] == sum(before[d] for d in garbage)

    collected = cli("gc", config, "--delete-untagged", "--grace", "0s")
    assert collected.returncode == 0, collected.stdout + collected.stderr
    done = summary(collected.stdout)
    # The untagged image's repository linked its two own blobs: now dangling, they go too.
    assert done["links"] == 2, collected.stdout
    assert done == {**predicted, "verb": "removed"}, (dry.stdout, collected.stdout)
    after = stored_blobs(rgw_s3, bucket)
    assert set(after) == kept_blobs
    # The links the kept images need, and no other (the untagged image's are gone).
    remaining_links = links(rgw_s3, bucket)
    shared_link = (
        f"{UNTAGGED.repo}/_layers/sha256/{(set(untagged_blobs) & kept_blobs).pop()[7:]}/link"
    )
    assert shared_link in remaining_links
    assert set(remaining_links) == set(kept_links)
    assert multipart_uploads(rgw_s3, bucket) == []
    leftovers = [k for k in objects(rgw_s3, bucket) if ".gc-" in k or ".tmp-" in k]
    assert leftovers == []

    fsck = cli("fsck", config)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    assert f"checked {len(after)} blobs" in fsck.stdout and "clean" in fsck.stdout, fsck.stdout
    again = cli("gc", config, "--delete-untagged", "--grace", "0s")
    assert again.returncode == 0, again.stdout + again.stderr
    assert summary(again.stdout)["blobs"] == 0, again.stdout

    # registry:2 serves every remaining image, and nothing of the untagged one.
    registry2 = start_registry2(rgw_s3, bucket)
    verify(registry2, {p: digests[p] for p in kept}, layout.blobs, tmp_path / "after")
    assert get_manifest_status(registry2, UNTAGGED.repo, UNTAGGED.tag) == 404
    assert get_manifest_status(registry2, UNTAGGED.repo, untagged_manifest) == 404
    for digest in own:
        r = requests.head(f"{registry2.url}/v2/{UNTAGGED.repo}/blobs/{digest}", timeout=30)
        assert r.status_code == 404, digest
    for digest in set(untagged_blobs) & kept_blobs:  # the shared layer stays, redirected
        r = requests.head(f"{registry2.url}/v2/{UNTAGGED.repo}/blobs/{digest}", timeout=30)
        assert r.status_code == 307, digest
    registry2.stop()
    assert registry2.errors() == [], registry2.errors()
    assert "panic" not in registry2.log()


def get_manifest_status(registry: Registry2, repo: str, reference: str) -> int:
    r = requests.get(
        f"{registry.url}/v2/{repo}/manifests/{reference}",
        headers={"Accept": f"{OCI_MANIFEST}, {OCI_INDEX}"},
        timeout=30,
    )
    return r.status_code


# -- 4. fsck finds an object overwritten in the bucket ------------------------------------------


def test_fsck_finds_a_blob_overwritten_in_the_bucket(
    rgw_s3: S3Endpoint,
    s3_bucket_factory: BucketFactory,
    start_registry2: Callable[[S3Endpoint, str], Registry2],
    layout: OciLayout,
    tmp_path: Path,
) -> None:
    bucket = s3_bucket_factory(rgw_s3)
    registry2 = start_registry2(rgw_s3, bucket)
    p = Push("victim", "v1", "old", ())
    digest = push(registry2, layout, p, tmp_path)
    registry2.stop()
    config = cli_config(tmp_path / "dockyard-cli.yml", rgw_s3, bucket)
    clean = cli("fsck", config)
    assert clean.returncode == 0, clean.stdout + clean.stderr

    # Other bytes of the same length under the 6 MiB layer's key: only hashing can tell.
    layer = max(referenced(layout.blobs[digest])[1], key=lambda d: len(layout.blobs[d]))
    other = os.urandom(len(layout.blobs[layer]))
    s3_client(rgw_s3).put_object(Bucket=bucket, Key=blob_key(layer), Body=other)
    broken = cli("fsck", config)
    assert broken.returncode == 1, broken.stdout + broken.stderr
    assert f"problem: blob {layer}: content hashes to {sha256(other)}" in broken.stdout
    assert f"problem: {p.repo}: layer link {layer} points to a missing blob" in broken.stdout
    # Nothing but that blob is reported; the check changed nothing.
    problems = [line for line in broken.stdout.splitlines() if line.startswith("problem:")]
    assert len(problems) == 2, broken.stdout
    s3 = s3_client(rgw_s3)
    assert s3.get_object(Bucket=bucket, Key=blob_key(layer))["Body"].read() == other
