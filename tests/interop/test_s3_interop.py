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

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from harness import (
    LINK_CONTENT,
    BucketFactory,
    BucketStore,
    Loopback,
    OciLayout,
    Push,
    Registry2Factory,
    S3Endpoint,
    Server,
    ServerFactory,
    check_catalog_and_tags,
    check_manifest_served,
    chunked_push,
    expected_tags,
    gc_summary,
    get_manifest,
    gzip_layer,
    needs_skopeo,
    oci_manifest,
    push,
    push_all,
    referenced,
    sha256,
    verify_pushes,
)
from harness.workloads import dockyard as cli

pytestmark = [needs_skopeo, pytest.mark.s3]  # every test here uses Ceph RGW

MiB = 1024 * 1024
ROOTDIRECTORY = "/prefix"
CHUNKSIZE = 5 * MiB


@pytest.fixture
def store(rgw_s3: S3Endpoint, s3_bucket_factory: BucketFactory) -> BucketStore:
    """A new bucket on Ceph RGW, as registry:2 lays it out: every registry key under
    ``prefix/docker/registry/v2/``."""
    return BucketStore(rgw_s3, s3_bucket_factory(rgw_s3), ROOTDIRECTORY)


def storage_section(store: BucketStore) -> dict[str, Any]:
    """The one ``storage.s3`` section both servers (and the CLI) get."""
    return store.endpoint.storage_config(
        store.bucket,
        rootdirectory=store.rootdirectory,
        chunksize=CHUNKSIZE,
        # Moves of blobs above 5 MiB (upload -> blobs/) become multipart part copies.
        multipartcopythresholdsize=CHUNKSIZE,
        multipartcopychunksize=CHUNKSIZE,
    )


def start_dockyard(start_server: ServerFactory, store: BucketStore, **kwargs: Any) -> Server:
    return start_server(
        storage={"s3": storage_section(store), "delete": {"enabled": True}}, **kwargs
    )


# -- the images ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> OciLayout:
    """An OCI layout: ``v1`` (12 MiB, 700 kB and 4 kB layers: the first spans three 5 MiB
    parts), ``multi`` (an index of two small images), ``old`` and ``new`` (both with the 4 kB
    layer of ``v1``, and a 6 MiB, resp. a 20 kB layer of their own), ``small`` (one 100 kB
    layer)."""
    out = OciLayout(tmp_path_factory.mktemp("oci-layout-s3"), indent=1)
    shared_small = gzip_layer(4096)
    v1 = [gzip_layer(12 * MiB + 321), gzip_layer(700_001), shared_small]
    out.tag("v1", out.image("amd64", v1))
    out.tag("old", out.image("amd64", [shared_small, gzip_layer(6 * MiB + 99)]))
    out.tag("new", out.image("amd64", [shared_small, gzip_layer(20_000)]))
    out.tag("small", out.image("amd64", [gzip_layer(100_000)]))
    out.tag("multi", out.index([("amd64", [gzip_layer(5000)]), ("arm64", [gzip_layer(3000)])]))
    return out


PUSHES = [
    Push("alpha", "v1", "v1", ("--format", "oci")),
    Push("team/multi", "1.0", "multi", ("--all", "--format", "v2s2")),  # a Docker manifest list
]


def listings(registry: Loopback, repos: list[str]) -> tuple[list[str], dict[str, Any]]:
    """(sorted catalog, sorted tag list per repository) as the server answers them."""
    r = requests.get(registry.v2("_catalog"), timeout=30)
    assert r.status_code == 200, r.text
    tags = {}
    for repo in repos:
        t = requests.get(registry.v2(f"{repo}/tags/list"), timeout=30)
        assert t.status_code == 200, t.text
        tags[repo] = sorted(t.json()["tags"])
    return sorted(r.json()["repositories"]), tags


def check_redirects(registry: Loopback, endpoint: S3Endpoint, repo: str, blob: bytes) -> None:
    """Blob GET and HEAD answer 307 to a presigned URL on the S3 server, which serves it."""
    url = registry.v2(f"{repo}/blobs/{sha256(blob)}")
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


@pytest.mark.slow
def test_dockyard_serves_what_registry2_pushed_to_s3(
    store: BucketStore,
    start_registry2: Registry2Factory,
    start_server: ServerFactory,
    layout: OciLayout,
    tmp_path: Path,
) -> None:
    registry2 = start_registry2(s3=storage_section(store))
    digests = push_all(registry2, layout, PUSHES, tmp_path)
    for p, digest in digests.items():
        check_manifest_served(registry2, p, digest)

    # registry:2 wrote the filesystem layout's keys under the root directory, and the 12 MiB
    # layer as a multipart object (part copies: above the multipart-copy threshold).
    stored = store.objects()
    assert all(k.startswith("prefix/docker/registry/v2/") for k in stored), sorted(stored)[:5]
    assert store.links() == store.expected_links(digests)
    big = max(layout.blobs, key=lambda d: len(layout.blobs[d]))
    assert stored[store.blob_key(big)]["size"] == len(layout.blobs[big])
    assert "-" in stored[store.blob_key(big)]["etag"], stored[store.blob_key(big)]
    assert store.multipart_uploads() == []

    # Dockyard, on the same bucket while registry:2 still runs, with AWS_CA_BUNDLE set.
    ca_bundle = os.environ.get("AWS_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
    dockyard = start_dockyard(start_server, store, workers=2, env={"AWS_CA_BUNDLE": ca_bundle})
    verify_pushes(dockyard, digests, layout.blobs, tmp_path / "dockyard")
    expected = expected_tags(PUSHES)
    check_catalog_and_tags(dockyard, expected, sorted_by_server=True)
    check_catalog_and_tags(registry2, expected, sorted_by_server=False)
    assert listings(dockyard, list(expected)) == listings(registry2, list(expected))
    # Blobs registry:2 wrote, redirected to RGW by both servers (presigned URLs RGW accepts).
    for registry in (dockyard, registry2):
        check_redirects(registry, store.endpoint, "alpha", layout.blobs[big])

    dockyard.stop()
    registry2.stop()
    assert "Traceback" not in dockyard.log(), dockyard.log()
    assert "level=error" not in dockyard.log(), dockyard.log()
    assert registry2.errors() == [], registry2.errors()


# -- 2. Dockyard writes, registry:2 reads -------------------------------------------------------

CHUNKED = Push("team/chunked", "v1", "")


def push_chunked(registry: Loopback, blobs: dict[str, bytes]) -> str:
    """An 11.5 MiB layer uploaded by hand: POST, four PATCHes of uneven sizes (some below the
    5 MiB part size, one above it, none aligned to it), a GET of the upload's state, and the
    last chunk in the PUT ?digest=; a config uploaded whole; a manifest. Returns the manifest
    digest."""
    layer = blobs["layer"]
    cuts = [0, MiB + 17, 4 * MiB + 17, 10 * MiB + 22, 10 * MiB + 512 * 1024 + 22, len(layer)]
    return chunked_push(
        registry,
        CHUNKED.repo,
        CHUNKED.tag,
        layer,
        blobs["config"],
        blobs["manifest"],
        cuts,
        last_in_put=True,
    )


def chunked_blobs() -> dict[str, bytes]:
    layer = gzip_layer(11 * MiB + 512 * 1024)
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {}}).encode()
    return {"layer": layer, "config": config, "manifest": oci_manifest(config, [layer])}


@pytest.mark.slow
def test_registry2_serves_what_dockyard_pushed_to_s3(
    store: BucketStore,
    s3_bucket_factory: BucketFactory,
    start_registry2: Registry2Factory,
    start_server: ServerFactory,
    layout: OciLayout,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    chunked = chunked_blobs()
    blobs = {**layout.blobs, **{sha256(b): b for b in chunked.values()}}

    # Dockyard, this time without AWS_CA_BUNDLE, two workers (the PATCHes may hop between them).
    monkeypatch.delenv("AWS_CA_BUNDLE", raising=False)
    dockyard = start_dockyard(start_server, store, workers=2)
    monkeypatch.undo()
    digests = push_all(dockyard, layout, PUSHES, tmp_path)
    digests[CHUNKED] = push_chunked(dockyard, chunked)
    for p, digest in digests.items():
        check_manifest_served(dockyard, p, digest)
    assert dockyard.stop() == 0, dockyard.log()
    assert "Traceback" not in dockyard.log(), dockyard.log()

    # The keys registry:2 uses, links holding plain "sha256:<hex>"; no upload left behind,
    # neither as keys nor as S3 multipart uploads in progress.
    stored = store.objects()
    registry_objects = [k for k in stored if not k.startswith("prefix/dockyard/")]
    assert all(k.startswith(store.v2 + "/") for k in registry_objects), registry_objects
    assert [k for k in stored if "/_uploads/" in k] == []
    assert store.multipart_uploads() == []
    written = store.links()
    for path, content in written.items():
        assert LINK_CONTENT.fullmatch(content), (path, content)
    assert written == store.expected_links(digests)
    for digest in {sha256(b) for b in chunked.values()}:
        assert stored[store.blob_key(digest)]["size"] == len(blobs[digest])

    # registry:2 itself, given the same pushes in another bucket, writes the same keys.
    reference_store = BucketStore(
        store.endpoint, s3_bucket_factory(store.endpoint), store.rootdirectory
    )
    reference = start_registry2(s3=storage_section(reference_store))
    reference_digests = push_all(reference, layout, PUSHES, tmp_path / "ref")
    reference_digests[CHUNKED] = push_chunked(reference, chunked)
    reference.stop()
    assert reference_digests == digests
    assert store.registry_keys() == reference_store.registry_keys()
    assert reference_store.links() == written

    # registry:2 serves the bucket Dockyard wrote.
    registry2 = start_registry2(s3=storage_section(store))
    verify_pushes(registry2, digests, blobs, tmp_path / "registry2")
    expected = expected_tags([*PUSHES, CHUNKED])
    check_catalog_and_tags(registry2, expected, sorted_by_server=False)
    check_redirects(registry2, store.endpoint, CHUNKED.repo, chunked["layer"])
    # ... and Dockyard, started again, lists the same.
    dockyard = start_dockyard(start_server, store)
    assert listings(dockyard, list(expected)) == listings(registry2, list(expected))
    check_redirects(dockyard, store.endpoint, CHUNKED.repo, chunked["layer"])
    registry2.stop()
    assert registry2.errors() == [], registry2.errors()


# -- 3. dockyard du / gc / fsck on the bucket ---------------------------------------------------


def cli_config(path: Path, store: BucketStore) -> Path:
    """The maintenance commands' configuration: the servers' storage, and a zero grace period
    (no server runs meanwhile: nothing needs protecting by stamps)."""
    storage = {"s3": storage_section(store), "maintenance": {"gc": {"grace": "0s"}}}
    path.write_text(yaml.safe_dump({"version": 0.1, "storage": storage}))
    return path


GC_PUSHES = [
    Push("team/multi", "1.0", "multi", ("--all",)),
    Push("gamma", "old", "old", ()),  # its tag is deleted before the collection
    Push("gamma", "new", "new", ()),
]
DOCKYARD_PUSH = Push("delta", "v1", "small", ())
UNTAGGED = GC_PUSHES[1]


@pytest.mark.slow
def test_dockyard_maintenance_on_a_shared_bucket(
    store: BucketStore,
    start_registry2: Registry2Factory,
    start_server: ServerFactory,
    layout: OciLayout,
    tmp_path: Path,
) -> None:
    registry2 = start_registry2(s3=storage_section(store))
    digests = push_all(registry2, layout, GC_PUSHES, tmp_path)
    registry2.stop()
    dockyard = start_dockyard(start_server, store)
    digests[DOCKYARD_PUSH] = push(dockyard, layout, DOCKYARD_PUSH, tmp_path)
    # Deleting a tag (through Dockyard: registry:2 2.8 cannot): the image stays, untagged.
    r = requests.delete(dockyard.v2(f"{UNTAGGED.repo}/manifests/{UNTAGGED.tag}"), timeout=30)
    assert r.status_code == 202, r.text
    assert get_manifest(dockyard, UNTAGGED.repo, digests[UNTAGGED]).status_code == 200
    assert dockyard.stop() == 0, dockyard.log()

    untagged_manifest = digests[UNTAGGED]
    _, untagged_blobs = referenced(layout.blobs[untagged_manifest])
    kept = [p for p in digests if p != UNTAGGED]
    kept_links = store.expected_links({p: digests[p] for p in kept})
    kept_blobs = {
        line.decode() for path, line in kept_links.items() if "/_manifests/tags/" not in path
    }
    own = set(untagged_blobs) - kept_blobs  # the old image's config and 6 MiB layer
    assert len(own) == 2
    garbage = own | {untagged_manifest}
    before = store.stored_blobs()
    assert set(before) == kept_blobs | garbage
    config = cli_config(tmp_path / "dockyard-cli.yml", store)

    # du: every repository, every blob and byte in the bucket; nothing unreferenced yet (the
    # untagged manifest is still in its repository).
    du = cli(config, "du", "--json")
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
        return {k: v for k, v in store.objects().items() if k.startswith(store.v2 + "/")}

    untouched = registry_state()
    dry = cli(config, "gc", "--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert gc_summary(dry.stdout)["blobs"] == 0, dry.stdout  # without -m the image is kept
    dry = cli(config, "gc", "--dry-run", "--delete-untagged", "--grace", "0s")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert registry_state() == untouched
    assert set(re.findall(r"would remove blob (sha256:[0-9a-f]{64})", dry.stdout)) == garbage
    assert re.findall(r"would remove manifest (\S+)", dry.stdout) == [
        f"{UNTAGGED.repo}@{untagged_manifest}"
    ]
    predicted = gc_summary(dry.stdout)
    assert predicted["blobs"] == 3 and predicted["manifests"] == 1, dry.stdout
    assert predicted["bytes"] == sum(before[d] for d in garbage)

    collected = cli(config, "gc", "--delete-untagged", "--grace", "0s")
    assert collected.returncode == 0, collected.stdout + collected.stderr
    done = gc_summary(collected.stdout)
    # The untagged image's repository linked its two own blobs: now dangling, they go too.
    assert done["links"] == 2, collected.stdout
    assert done == {**predicted, "verb": "removed"}, (dry.stdout, collected.stdout)
    after = store.stored_blobs()
    assert set(after) == kept_blobs
    # The links the kept images need, and no other (the untagged image's are gone).
    remaining_links = store.links()
    shared_link = (
        f"{UNTAGGED.repo}/_layers/sha256/{(set(untagged_blobs) & kept_blobs).pop()[7:]}/link"
    )
    assert shared_link in remaining_links
    assert set(remaining_links) == set(kept_links)
    assert store.multipart_uploads() == []
    assert store.leftovers() == []

    fsck = cli(config, "fsck")
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    assert f"checked {len(after)} blobs" in fsck.stdout and "clean" in fsck.stdout, fsck.stdout
    again = cli(config, "gc", "--delete-untagged", "--grace", "0s")
    assert again.returncode == 0, again.stdout + again.stderr
    assert gc_summary(again.stdout)["blobs"] == 0, again.stdout

    # registry:2 serves every remaining image, and nothing of the untagged one.
    registry2 = start_registry2(s3=storage_section(store))
    verify_pushes(registry2, {p: digests[p] for p in kept}, layout.blobs, tmp_path / "after")
    get_manifest(registry2, UNTAGGED.repo, UNTAGGED.tag, status=404)
    get_manifest(registry2, UNTAGGED.repo, untagged_manifest, status=404)
    for digest in own:
        r = requests.head(registry2.v2(f"{UNTAGGED.repo}/blobs/{digest}"), timeout=30)
        assert r.status_code == 404, digest
    for digest in set(untagged_blobs) & kept_blobs:  # the shared layer stays, redirected
        r = requests.head(registry2.v2(f"{UNTAGGED.repo}/blobs/{digest}"), timeout=30)
        assert r.status_code == 307, digest
    registry2.stop()
    assert registry2.errors() == [], registry2.errors()
    assert "panic" not in registry2.log()


# -- 4. fsck finds an object overwritten in the bucket ------------------------------------------


@pytest.mark.slow
def test_fsck_finds_a_blob_overwritten_in_the_bucket(
    store: BucketStore,
    start_registry2: Registry2Factory,
    layout: OciLayout,
    tmp_path: Path,
) -> None:
    registry2 = start_registry2(s3=storage_section(store))
    p = Push("victim", "v1", "old", ())
    digest = push(registry2, layout, p, tmp_path)
    registry2.stop()
    config = cli_config(tmp_path / "dockyard-cli.yml", store)
    clean = cli(config, "fsck")
    assert clean.returncode == 0, clean.stdout + clean.stderr

    # Other bytes of the same length under the 6 MiB layer's key: only hashing can tell.
    layer = max(referenced(layout.blobs[digest])[1], key=lambda d: len(layout.blobs[d]))
    other = os.urandom(len(layout.blobs[layer]))
    store.client.put_object(Bucket=store.bucket, Key=store.blob_key(layer), Body=other)
    broken = cli(config, "fsck")
    assert broken.returncode == 1, broken.stdout + broken.stderr
    assert f"problem: blob {layer}: content hashes to {sha256(other)}" in broken.stdout
    assert f"problem: {p.repo}: layer link {layer} points to a missing blob" in broken.stdout
    # Nothing but that blob is reported; the check changed nothing.
    problems = [line for line in broken.stdout.splitlines() if line.startswith("problem:")]
    assert len(problems) == 2, broken.stdout
    assert store.read_blob(layer) == other
