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

import re
from pathlib import Path

import pytest
import requests
import yaml

from harness import (
    DiskStore,
    OciLayout,
    Push,
    Registry2Factory,
    content_of,
    gc_summary,
    get_manifest,
    gzip_layer,
    needs_skopeo,
    pull_and_compare,
    push,
    push_all,
    sha256,
)
from harness.workloads import dockyard

pytestmark = needs_skopeo


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> OciLayout:
    """Tags ``a`` (shared 700 kB + shared 4 kB + own layer), ``b`` (shared 700 kB + own),
    ``c`` (shared 4 kB + own 1 MiB: the one deleted), ``multi`` (an index: an amd64 image with
    the shared 700 kB layer and an arm64 image)."""
    out = OciLayout(tmp_path_factory.mktemp("oci-layout"))
    shared_big, shared_small = gzip_layer(700_000), gzip_layer(4096)
    out.tag("a", out.image("amd64", [shared_big, shared_small, gzip_layer(20_000)]))
    out.tag("b", out.image("amd64", [shared_big, gzip_layer(30_000)]))
    out.tag("c", out.image("amd64", [shared_small, gzip_layer(1024 * 1024)]))
    out.tag(
        "multi",
        out.index([("amd64", [shared_big, gzip_layer(5000)]), ("arm64", [gzip_layer(6000)])]),
    )
    return out


PUSHES = [
    Push("alpha", "v1", "a"),
    Push("beta", "v1", "b", ("--format", "v2s2")),
    Push("team/beta-copy", "v1", "b"),  # the same blobs in a second repository
    Push("gamma", "v1", "c"),  # deleted before the collection
    Push("team/multi", "1.0", "multi", ("--all",)),
]
DELETED = PUSHES[3]


# -- the test -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_dockyard_gc_on_a_store_registry2_wrote(
    layout: OciLayout, start_registry2: Registry2Factory, tmp_path: Path
) -> None:
    store = DiskStore(tmp_path / "store")
    registry2 = start_registry2(root=store.root)
    digests = push_all(registry2, layout, PUSHES, tmp_path)
    contents = {p: content_of(registry2, p.repo, digests[p]) for p in PUSHES}
    manifests = {sha256(get_manifest(registry2, p.repo, d).content): p for p, d in digests.items()}
    pushed_manifests: dict[str, bytes] = {}
    for p, (ms, _) in contents.items():
        for m in ms:
            pushed_manifests[m] = get_manifest(registry2, p.repo, m).content
    assert set(manifests) == set(digests.values())

    # Delete one image through registry:2's API (by digest: its tag goes with it).
    r = requests.delete(registry2.v2(f"{DELETED.repo}/manifests/{digests[DELETED]}"), timeout=30)
    assert r.status_code == 202, r.text
    get_manifest(registry2, DELETED.repo, DELETED.tag, status=404)
    registry2.stop()

    kept_blobs = set().union(*(b for p, (_, b) in contents.items() if p != DELETED))
    kept_manifests = set().union(*(m for p, (m, _) in contents.items() if p != DELETED))
    deleted_manifest = digests[DELETED]
    deleted_blobs = contents[DELETED][1]
    own = deleted_blobs - kept_blobs  # the deleted image's config and its 1 MiB layer
    shared = deleted_blobs & kept_blobs  # the 4 kB layer image "a" uses too
    assert len(own) == 2 and len(shared) == 1
    garbage = own | {deleted_manifest}
    before = set(store.stored_blobs())
    assert before == kept_blobs | kept_manifests | garbage

    # registry:2's own collector names the same garbage.
    reference = registry2.garbage_collect("--dry-run")
    assert reference.returncode == 0, reference.stdout + reference.stderr
    eligible = set(
        re.findall(r"blob eligible for deletion: (sha256:[0-9a-f]{64})", reference.stdout)
    )
    assert eligible == garbage, reference.stdout

    # Dockyard's view of the store. registry:2 is stopped, so nothing is in use: the grace period
    # is zero, for the collections below and in the configuration (nothing needs stamping).
    config = tmp_path / "dockyard.yml"
    storage = {
        "filesystem": {"rootdirectory": str(store.root)},
        "maintenance": {"gc": {"grace": "0s"}},
    }
    config.write_text(yaml.safe_dump({"version": 0.1, "storage": storage}))

    # --dry-run: the same garbage reported, not a byte, name or time changed in registry:2's
    # tree; beside it, only Dockyard's own: the (empty) directory of its lease, and the run's
    # figures for the web UI's usage page.
    untouched = store.snapshot()

    def unchanged() -> bool:
        now = store.snapshot()
        extra = {k: v[0] for k, v in now.items() if k not in untouched}
        own = {"dockyard": "dir", "dockyard/leases": "dir"}
        figures = {**own, "dockyard/gc": "dir", "dockyard/gc/last-run.json": "file"}
        allowed = extra in ({}, own, figures)
        return allowed and {k: v for k, v in now.items() if k in untouched} == untouched

    dry = dockyard(config, "gc", "--grace", "0s", "--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert unchanged()
    reported = set(re.findall(r"would remove blob (sha256:[0-9a-f]{64})", dry.stdout))
    assert reported == garbage, dry.stdout
    predicted = gc_summary(dry.stdout)
    assert predicted["verb"] == "would remove"
    assert predicted["blobs"] == 3, dry.stdout
    assert predicted["bytes"] == sum(store.blob_path(d).stat().st_size for d in garbage)
    assert predicted["manifests"] == 0, dry.stdout
    # With --delete-untagged the same: the index's untagged children are kept through the index.
    dry_untagged = dockyard(config, "gc", "--grace", "0s", "--dry-run", "--delete-untagged")
    assert dry_untagged.returncode == 0, dry_untagged.stdout + dry_untagged.stderr
    assert unchanged()
    removals = set(re.findall(r"would remove (?:blob|manifest) (\S+)", dry_untagged.stdout))
    assert removals == garbage, dry_untagged.stdout

    # The collection itself.
    collected = dockyard(config, "gc", "--grace", "0s")
    assert collected.returncode == 0, collected.stdout + collected.stderr
    assert set(re.findall(r"removed blob (sha256:[0-9a-f]{64})", collected.stdout)) == garbage
    done = gc_summary(collected.stdout)
    assert done["blobs"] == 3, collected.stdout
    # The deleted image's repository linked its two own blobs (registry:2 leaves _layers links
    # behind when a manifest is deleted): now dangling, they go too.
    assert done["links"] == 2, collected.stdout
    assert set(store.stored_blobs()) == before - garbage
    for digest in garbage:
        assert not store.blob_path(digest).parent.exists(), digest  # no empty directory left
    for digest in kept_blobs | kept_manifests:
        assert store.blob_path(digest).is_file(), digest
    # The deleted image's repository keeps its link to the shared layer, not to its own blobs.
    for digest in own:
        assert not store.layer_link(DELETED.repo, digest).exists(), digest
    for digest in shared:
        assert store.layer_link(DELETED.repo, digest).read_text() == digest
    # Nothing of Dockyard's own is left in registry:2's tree.
    assert store.leftovers() == []

    fsck = dockyard(config, "fsck")
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    assert "clean" in fsck.stdout

    # A second collection finds nothing more.
    again = dockyard(config, "gc", "--grace", "0s")
    assert again.returncode == 0, again.stderr
    assert gc_summary(again.stdout)["blobs"] == 0, again.stdout

    # registry:2 serves every remaining image, byte for byte, and nothing of the deleted one.
    registry2 = start_registry2(root=store.root)
    for i, p in enumerate(PUSHES):
        if p == DELETED:
            continue
        r = get_manifest(registry2, p.repo, p.tag)
        assert r.headers["Docker-Content-Digest"] == digests[p]
        pull_and_compare(
            registry2, p, digests[p], layout.blobs, tmp_path / f"pull{i}", pushed_manifests
        )
    get_manifest(registry2, DELETED.repo, DELETED.tag, status=404)
    for digest in own:
        r = requests.head(registry2.v2(f"{DELETED.repo}/blobs/{digest}"), timeout=30)
        assert r.status_code == 404, digest
    for digest in shared:
        r = requests.head(registry2.v2(f"{DELETED.repo}/blobs/{digest}"), timeout=30)
        assert r.status_code == 200, digest

    # The deleted image can be pushed again (its blobs uploaded anew) and pulled.
    assert push(registry2, layout, DELETED, tmp_path / "again") == digests[DELETED]
    pull_and_compare(
        registry2,
        DELETED,
        digests[DELETED],
        layout.blobs,
        tmp_path / "pull-again",
        pushed_manifests,
    )
    registry2.stop()
    # registry:2 logs the 404s asked for above at level=error; anything else is a real error.
    assert registry2.errors() == [], registry2.errors()
    assert "panic" not in registry2.log()

    fsck = dockyard(config, "fsck")
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr

    # Last (so that a mismatch does not hide the checks above): the dry run predicted what the
    # collection did, counts included.
    assert {**predicted, "verb": "removed"} == done, (dry.stdout, collected.stdout)
