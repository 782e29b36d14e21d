"""The collector's batched reads of the store (``Store.scan`` and ``Store.stat_many``, one
thread call on a filesystem) find exactly what the reads one file at a time find: on a layout
with every oddity a store collects (nested repositories, uploads, blob directories without
data, links to absent blobs, links holding another digest, names that are not digests, a
collection's leftovers), the inventory, the collection's report and what a real collection
leaves are the same with the driver's fast paths and with its primitives alone."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dockyard.oci.digest import Digest
from dockyard.oci.manifest import referenced_digests
from dockyard.registry import inventory, layout
from dockyard.registry.gc import GarbageCollector, digest_key, referenced_keys
from dockyard.storage.driver import FastScan
from dockyard.storage.filesystem import FilesystemDriver
from dockyard.storage.store import Store
from driver_contract.base import Bare
from harness.fuzz import fuzz

OLD = time.time() - 30 * 86400
REPOS = ["app", "team/app", "team/app/sub", "lonely"]


def digest(data: bytes) -> Digest:
    return Digest("sha256", hashlib.sha256(data).hexdigest())


class Layout:
    """registry:2's layout written with plain file calls, every file 30 days old."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def write(self, path: str, data: bytes) -> None:
        full = self.root / path.lstrip("/")
        full.parent.mkdir(parents=True, exist_ok=True)
        full.write_bytes(data)
        os.utime(full, (OLD, OLD))

    def blob(self, data: bytes) -> Digest:
        d = digest(data)
        self.write(layout.blob_data(d), data)
        return d

    def link(self, path: str, target: Digest | str) -> None:
        self.write(path, str(target).encode())


def build(root: Path) -> None:
    w = Layout(root)
    shared = w.blob(b"shared layer")
    for n, repo in enumerate(REPOS[:3]):
        layer = w.blob(f"layer of {repo}".encode())
        config = w.blob(f"config of {repo}".encode())
        body = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"digest": str(config), "size": 1},
                "layers": [{"digest": str(d), "size": 1} for d in (layer, shared)],
            }
        ).encode()
        manifest = w.blob(body)
        for d in (layer, shared, config):
            w.link(layout.layer_link(repo, d), d)
        w.link(layout.revision_link(repo, manifest), manifest)
        w.link(layout.tag_current_link(repo, f"v{n}"), manifest)
        w.link(layout.tag_index_link(repo, f"v{n}", manifest), manifest)
        # a tag called "index", which a scan must not take for a tag's index directory
        w.link(layout.tag_current_link(repo, "index"), manifest)
        # an upload in progress: never a blob, never a link
        w.write(layout.upload_started_at(repo, "u1"), b"2026-01-01T00:00:00Z")
        w.write(layout.upload_chunk(repo, "u1", "c0"), b"partial")
    # garbage: an image whose manifest was deleted (blobs and layer links stay)
    gone_layer = w.blob(b"layer of a deleted image")
    w.link(layout.layer_link("app", gone_layer), gone_layer)
    w.blob(b"a deleted manifest")
    # a link to a blob that is not stored; one that holds another digest; one not a digest
    absent = digest(b"never stored")
    w.link(layout.layer_link("lonely", absent), absent)
    w.link(layout.layer_link("lonely", digest(b"x")), digest(b"y"))
    w.link(layout.revision_link("lonely", digest(b"z")), "not a digest")
    w.link(layout.tag_current_link("lonely", "broken"), "sha256:short")
    # a revision whose manifest blob is missing
    w.link(layout.revision_link("lonely", absent), absent)
    # a link directory spelt in capitals, and one too short
    upper = digest(b"upper")
    w.write(
        f"{layout.layers_dir('lonely')}/sha256/{upper.hex.upper()}/link",
        f"sha256:{upper.hex.upper()}".encode(),
    )
    w.write(f"{layout.layers_dir('lonely')}/sha256/abc/link", b"sha256:abc")
    w.write(f"{layout.layers_dir('lonely')}/md5/{'0' * 32}/link", b"md5:" + b"0" * 32)
    # blobs/: a directory without data, a collection's leftover, a stray name, a prefix
    # directory holding a blob of another prefix, a capitalised blob
    (root / layout.blob_dir(digest(b"no data")).lstrip("/")).mkdir(parents=True)
    leftover = w.blob(b"left aside")
    os.rename(
        root / layout.blob_data(leftover).lstrip("/"),
        root / f"{layout.blob_data(leftover)}.gc-abc".lstrip("/"),
    )
    w.write(f"{layout.BLOBS}/sha256/zz/README", b"not a blob")
    misplaced = digest(b"misplaced")
    w.write(f"{layout.BLOBS}/sha256/00/{misplaced.hex}/data", b"misplaced")
    w.write(f"{layout.BLOBS}/sha256/{upper.hex[:2]}/{upper.hex.upper()}/data", b"upper")
    w.write(f"{layout.BLOBS}/md5/00/{'0' * 32}/data", b"unknown algorithm")


@pytest.fixture
def stores(tmp_path: Path) -> tuple[Store, Store]:
    """The same layout in two directories: one read with the filesystem driver's fast paths,
    one with its primitives and capabilities only (each file read on its own, as before)."""
    build(tmp_path / "fast")
    shutil.copytree(tmp_path / "fast", tmp_path / "bare", copy_function=shutil.copy2)
    fast = Store(FilesystemDriver(str(tmp_path / "fast"), max_threads=4))
    bare = Store(Bare(FilesystemDriver(str(tmp_path / "bare")), capabilities=True))  # type: ignore[arg-type]
    assert FastScan in fast.fast_paths and FastScan not in bare.fast_paths
    return fast, bare


def tree(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file below ``root`` (but the collection's figures), with its content and time."""
    out = {}
    for path in root.rglob("*"):
        if path.is_file() and "gc" not in path.relative_to(root).parts[:2]:
            out[str(path.relative_to(root))] = (path.read_bytes(), int(path.stat().st_mtime))
    return out


def test_the_inventory_is_the_same_read_in_batches(stores: tuple[Store, Store]) -> None:
    fast, bare = stores

    async def read(store: Store) -> dict[str, object]:
        names = await inventory.repository_names(store)
        repos = {}
        for name in names:
            repo = await inventory.read_repository(store, name)
            repos[name] = (repo.revisions, repo.tags, repo.layers)
            assert set(await inventory.layer_link_candidates(store, name)) >= repo.layers
            partial = await inventory.read_repository(store, name, tags=False, layers=False)
            assert partial.revisions == repo.revisions and not partial.tags and not partial.layers
        listed = await inventory.blob_digests(store)
        return {
            "names": names,
            "repos": repos,
            "blobs": sorted([b async for b in inventory.blobs(store)], key=str),
            # the old way: every digest listed first, then a stat of each
            "blobs one by one": sorted([b async for b in inventory.blobs(store, listed)], key=str),
        }

    got, expected = asyncio.run(read(fast)), asyncio.run(read(bare))
    assert got == expected
    assert got["blobs"] == got["blobs one by one"]
    repos = got["repos"]
    assert isinstance(repos, dict)
    assert set(repos) == {*REPOS} and repos["app"][1].keys() == {"v0", "index"}
    revisions, tags, layers = repos["lonely"]
    # only the links that hold their own digest count; a tag holding none is no tag
    assert set(revisions) == {digest(b"never stored")} and tags == {}
    assert layers == {digest(b"never stored")}
    asyncio.run(fast.close())
    asyncio.run(bare.close())


def test_scan_stat_many_and_read_many_match_their_generic_forms(
    stores: tuple[Store, Store],
) -> None:
    fast, bare = stores

    async def scans(store: Store) -> list[object]:
        base = layout.REPOSITORIES
        out: list[object] = []
        for read in (False, True):
            found = await store.scan(
                base, lambda p: not p.endswith("/_uploads"), lambda n: n == "link", read
            )
            out.append(sorted((f.path, f.size, int(f.modified), f.content) for f in found))
        out.append(await store.scan("/nowhere", lambda p: True, lambda n: True))
        paths = [layout.blob_data(digest(b"shared layer")), "/nowhere/data", layout.BLOBS]
        out.append(
            [
                (i.size, int(i.modified), i.is_dir) if i else None
                for i in await store.stat_many(paths)
            ]
        )
        links = [
            layout.revision_link("app", d)
            for d in await inventory.digests_under(store, layout.revisions_dir("app"))
        ]
        read = await store.read_many([*links, "/nowhere/link", layout.blob_data(digest(b"upper"))])
        out.append([(f.size, int(f.modified), f.content) if f else None for f in read])
        return out

    got, expected = asyncio.run(scans(fast)), asyncio.run(scans(bare))
    assert got == expected
    assert not any("_uploads" in entry[0] for entry in got[0])  # type: ignore[union-attr]
    assert got[3][1] is None and got[3][2][2] is True  # type: ignore[index]
    assert got[4][1] is None and got[4][2] is None  # type: ignore[index]
    assert got[4][0][2].startswith(b"sha256:")  # type: ignore[index]
    asyncio.run(fast.close())
    asyncio.run(bare.close())


@pytest.mark.parametrize("delete_untagged", [False, True])
def test_a_collection_does_the_same_either_way(
    stores: tuple[Store, Store], tmp_path: Path, delete_untagged: bool
) -> None:
    fast, bare = stores

    async def collect(store: Store, dry_run: bool) -> tuple[object, ...]:
        report = await GarbageCollector(
            store, grace=3600, touch_interval=3600, delete_untagged=delete_untagged, dry_run=dry_run
        ).run()
        return (
            report.repositories,
            report.manifests_kept,
            report.blobs_marked,
            report.blobs_removed,
            report.bytes_removed,
            report.blobs_recent,
            report.manifests_removed,
            report.links_removed,
            sorted(report.removed),
        )

    dry = asyncio.run(collect(fast, True))
    assert dry == asyncio.run(collect(bare, True))
    assert tree(tmp_path / "fast") == tree(tmp_path / "bare")
    # what it found: the deleted image's layer and manifest, the capitalised and misplaced
    # blobs' data stay unreferenced too; the dangling links are the deleted layer's and the
    # absent blob's
    removed = dry[-1]
    assert isinstance(removed, list)
    assert f"blob {digest(b'layer of a deleted image')} (24 bytes)" in removed
    assert dry[7] == 2
    real = asyncio.run(collect(fast, False))
    assert real[:-1] == asyncio.run(collect(bare, False))[:-1] and real[3:8] == dry[3:8]
    assert tree(tmp_path / "fast") == tree(tmp_path / "bare")
    # a second collection finds nothing left, either way
    again = asyncio.run(collect(fast, True))
    assert again[3] == 0 and again[7] == 0
    asyncio.run(fast.close())
    asyncio.run(bare.close())


@pytest.mark.parametrize(
    "body",
    [
        json.dumps(
            {
                "config": {"digest": str(digest(b"c"))},
                "layers": [{"digest": str(digest(b"l"))}, {"digest": str(digest(b"l"))}],
                "subject": {"digest": "sha512:" + hashlib.sha512(b"s").hexdigest()},
                "fsLayers": [{"blobSum": str(digest(b"b"))}],
                "annotations": {"digest": "sha256:" + "A" * 64, "x": {"digest": "md5:00"}},
                "nested": [[{"digest": str(digest(b"deep"))}], "digest"],
                "other": {"digests": str(digest(b"not this key"))},
                "spaced": {"digest": f" {digest(b'space')}"},
                "newline": {"digest": f"{digest(b'nl')}\n"},
            }
        ).encode(),
        b"not json",
        b"\xff\xfe",
        b"[" * 100_000 + str(digest(b"too deep")).encode(),  # the text scan
        b"{}",
        b"[]",
    ],
)
def test_the_marks_keys_are_referenced_digests(body: bytes) -> None:
    expected = {digest_key(d) for d in referenced_digests(body)}
    assert referenced_keys(body) == expected
    assert None not in expected or not expected


_DIGESTS = st.sampled_from(
    [
        str(digest(b"a")),
        str(digest(b"b")),
        "sha512:" + hashlib.sha512(b"c").hexdigest(),
        "sha256:" + "A" * 64,
        "sha256:abc",
        "md5:00",
        "",
    ]
)
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5) | _DIGESTS,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(["digest", "blobSum", "layers", "config", "x", "digests"]),
            children,
            max_size=4,
        )
    ),
    max_leaves=20,
)


@fuzz(300)
@given(_JSON)
def test_the_marks_keys_are_referenced_digests_for_any_document(doc: object) -> None:
    """The mark's own reader of a manifest (for speed) must find exactly what the registry's
    referenced_digests finds: a digest it missed would be a referenced blob collected."""
    body = json.dumps(doc).encode()
    assert referenced_keys(body) == {digest_key(d) for d in referenced_digests(body)}
