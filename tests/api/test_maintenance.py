"""Garbage collection, du, fsck, upload purging and read-only mode on stores built through the
API of a running server."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import requests

from harness import OCI_INDEX, OCI_MANIFEST, Server, ServerFactory, assert_error, sha256
from harness.dockyard import run_command as dockyard

V2 = "docker/registry/v2"


#: the shortest grace period of an online collection (zero would ask for an immediate one,
#: refused while these tests' writable servers run: see test_gc_immediate.py)
ONLINE_GRACE = "1ms"


def gc(s: Server, *flags: str) -> str:
    result = dockyard("gc", str(s.config_path), "--grace", ONLINE_GRACE, *flags)
    assert result.returncode == 0, result.stderr
    return result.stdout


def blob_exists(s: Server, digest: str) -> bool:
    hexpart = digest.split(":")[1]
    return (s.root / V2 / "blobs/sha256" / hexpart[:2] / hexpart / "data").exists()


def tree(root: Path) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime for p in root.rglob("*")}


def layer(n: int) -> bytes:
    return os.urandom(1000 + n)


#: a server whose grace period is zero: it stamps content on every use, so `gc --grace 1ms`
#: may collect anything unreferenced right away
NO_GRACE = {"maintenance": {"gc": {"grace": "0s"}}}


@pytest.mark.slow
@pytest.mark.filesystem
def test_gc_removes_only_what_nothing_references(start_server: ServerFactory) -> None:
    s = start_server(storage=NO_GRACE)
    shared = layer(1)
    kept_digest, kept = s.push_image("app", "keep", [shared, layer(2)])
    gone_digest, gone = s.push_image("app", "gone", [shared, layer(3)])
    other_digest, _ = s.push_image("other", "v1", [shared])
    unique_gone = gone["layers"][1]["digest"]
    gone_config = gone["config"]["digest"]
    untagged_digest, untagged = s.push_image("app", None, [layer(4)])  # by digest, no tag
    # deleting a tag leaves the manifest (untagged); deleting by digest removes it
    assert requests.delete(s.v2(f"app/manifests/{gone_digest}")).status_code == 202

    before = tree(s.root / V2)
    dry = gc(s, "--dry-run")
    assert f"would remove blob {unique_gone}" in dry
    assert tree(s.root / V2) == before  # a dry run changes nothing in the store
    # the same summary for scripts; progress bars only ever go to a terminal
    dry_json = dockyard("gc", str(s.config_path), "--grace", ONLINE_GRACE, "--dry-run", "--json")
    assert dry_json.returncode == 0 and dry_json.stderr == "", dry_json.stderr
    summary = json.loads(dry_json.stdout)
    assert summary["dry_run"] is True and summary["repositories"] == 2
    assert f"blob {unique_gone} ({gone['layers'][1]['size']} bytes)" in summary["removed"]
    assert summary["blobs_removed"] == dry.count("would remove blob ")
    assert tree(s.root / V2) == before

    out = gc(s)
    assert f"removed blob {unique_gone}" in out and f"removed blob {gone_config}" in out
    assert f"removed blob {gone_digest}" in out  # the manifest's own bytes
    for digest in (unique_gone, gone_config, gone_digest):
        assert not blob_exists(s, digest)
    assert blob_exists(s, sha256(shared))
    # untagged manifests stay without --delete-untagged
    assert requests.get(s.v2(f"app/manifests/{untagged_digest}")).status_code == 200
    for digest in (kept_digest, other_digest, untagged_digest):
        assert blob_exists(s, digest)
    for layer_desc in kept["layers"]:
        r = requests.get(s.v2(f"app/blobs/{layer_desc['digest']}"))
        assert r.status_code == 200 and sha256(r.content) == layer_desc["digest"]
    # the dangling layer link of the swept blob went too
    assert not (s.root / V2 / "repositories/app/_layers/sha256" / unique_gone[7:]).exists()
    # nothing left to do
    assert "removed 0 blobs" in gc(s)

    out = gc(s, "--delete-untagged")
    assert f"removed manifest app@{untagged_digest}" in out
    assert_error(requests.get(s.v2(f"app/manifests/{untagged_digest}")), 404, "MANIFEST_UNKNOWN")
    assert not blob_exists(s, untagged["layers"][0]["digest"])
    assert requests.get(s.v2("app/manifests/keep")).status_code == 200
    assert dockyard("fsck", str(s.config_path)).returncode == 0


@pytest.mark.slow
def test_delete_untagged_keeps_index_children_and_referrers(start_server: ServerFactory) -> None:
    s = start_server(storage=NO_GRACE)
    children = [s.push_image("multi", None, [layer(i)]) for i in range(2)]
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": d, "size": len(json.dumps(m).encode())}
            for d, m in children
        ],
    }
    assert s.push_manifest("multi", "latest", index).status_code == 201
    subject, subject_manifest = s.push_image("multi", "signed", [layer(9)])
    s.push_blob("multi", b"{}")
    empty = {"mediaType": "application/vnd.oci.empty.v1+json", "digest": sha256(b"{}"), "size": 2}
    signature = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": "x/sig",
        "config": empty,
        "layers": [empty],
        "subject": {
            "mediaType": OCI_MANIFEST,
            "digest": subject,
            "size": len(json.dumps(subject_manifest).encode()),
        },
    }
    sig_body = json.dumps(signature).encode()
    assert s.push_manifest("multi", sha256(sig_body), sig_body, OCI_MANIFEST).status_code == 201
    orphan_digest, _ = s.push_image("multi", None, [layer(7)])

    out = gc(s, "--delete-untagged")
    assert f"removed manifest multi@{orphan_digest}" in out
    for digest, _ in children:
        assert requests.get(s.v2(f"multi/manifests/{digest}")).status_code == 200
    assert requests.get(s.v2(f"multi/manifests/{sha256(sig_body)}")).status_code == 200
    referrers = requests.get(s.v2(f"multi/referrers/{subject}")).json()["manifests"]
    assert [r["digest"] for r in referrers] == [sha256(sig_body)]
    # untag the subject: its referrer goes with it on the next collection
    assert requests.delete(s.v2("multi/manifests/signed")).status_code == 202
    out = gc(s, "--delete-untagged")
    assert f"removed manifest multi@{subject}" in out
    assert f"removed manifest multi@{sha256(sig_body)}" in out


@pytest.mark.slow
@pytest.mark.filesystem
def test_grace_period_protects_recent_content(start_server: ServerFactory) -> None:
    s = start_server(storage=NO_GRACE)
    digest = s.push_blob("fresh", b"uploaded but not referenced yet")
    result = dockyard("gc", str(s.config_path), "--grace", "1h")
    assert result.returncode == 0
    assert "kept 1 unreferenced blobs used within the grace period" in result.stdout
    assert blob_exists(s, digest)
    gc(s)
    assert not blob_exists(s, digest)


@pytest.mark.slow
@pytest.mark.filesystem
def test_one_collection_at_a_time(start_server: ServerFactory) -> None:
    s = start_server()
    lease = s.root / "dockyard/leases/gc"
    lease.parent.mkdir(parents=True)
    lease.write_text(json.dumps({"holder": "elsewhere:1", "expires": time.time() + 60}))
    result = dockyard("gc", str(s.config_path))
    assert result.returncode == 3 and "another garbage collection" in result.stderr
    lease.write_text(json.dumps({"holder": "dead:1", "expires": time.time() - 1}))
    assert dockyard("gc", str(s.config_path)).returncode == 0  # an expired lease is taken over
    assert not lease.exists()


@pytest.mark.slow
@pytest.mark.filesystem
def test_scheduled_collection_while_serving(start_server: ServerFactory) -> None:
    s = start_server(
        storage={"maintenance": {"gc": {"enabled": True, "interval": "1s", "grace": "0s"}}}
    )
    digest, manifest = s.push_image("sched", "v1", [layer(1)])
    requests.delete(s.v2(f"sched/manifests/{digest}"))
    garbage = manifest["layers"][0]["digest"]
    deadline = time.monotonic() + 45  # generous: CI machines may be busy
    while blob_exists(s, garbage) and time.monotonic() < deadline:
        time.sleep(0.3)
    assert not blob_exists(s, garbage)
    # The run logs its report after its last deletion: give it the moment it needs.
    while "scheduled garbage collection" not in s.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "scheduled garbage collection" in s.log()


@pytest.mark.slow
@pytest.mark.filesystem
def test_du(start_server: ServerFactory) -> None:
    s = start_server()
    shared = layer(5000)
    s.push_image("a", "v1", [shared, b"x" * 3000])
    s.push_image("b", "v1", [shared])
    s.push_blob("c", b"z" * 777)  # linked, no manifest
    result = dockyard("du", str(s.config_path), "--json")
    assert result.returncode == 0, result.stderr
    usage = json.loads(result.stdout)
    by_name = {r["name"]: r for r in usage["repositories"]}
    assert by_name["a"]["shared_bytes"] == len(shared)
    assert by_name["b"]["shared_bytes"] == len(shared)
    assert by_name["a"]["unique_bytes"] > 3000
    assert by_name["c"]["unique_bytes"] == 777 and by_name["c"]["manifests"] == 0
    total = sum(p.stat().st_size for p in (s.root / V2 / "blobs").rglob("data"))
    assert usage["store"]["total_bytes"] == total
    assert usage["store"]["unreferenced_bytes"] == 0
    table = dockyard("du", str(s.config_path)).stdout
    assert "REPOSITORY" in table and "\na " in table and "store:" in table
    # piped: plain aligned columns, nothing drawn
    assert "\x1b" not in table
    header, *rows = table.split("\n\nstore:")[0].splitlines()
    assert header.split() == ["REPOSITORY", "MANIFESTS", "TAGS", "UNIQUE", "SHARED", "TOTAL"]
    assert [row.split()[0] for row in rows] == [r["name"] for r in usage["repositories"]]
    assert {len(row) for row in rows} == {len(header)}  # sizes right-aligned under the header


@pytest.mark.slow
@pytest.mark.filesystem
def test_fsck_finds_and_quarantines_corruption(start_server: ServerFactory) -> None:
    s = start_server()
    _, manifest = s.push_image("fs", "v1", [layer(1), layer(2)])
    assert dockyard("fsck", str(s.config_path)).returncode == 0
    victim = manifest["layers"][0]["digest"]
    data = s.root / V2 / "blobs/sha256" / victim[7:9] / victim[7:] / "data"
    data.write_bytes(b"bit rot")
    result = dockyard("fsck", str(s.config_path))
    assert result.returncode == 1
    assert f"blob {victim}: content hashes to" in result.stdout
    result = dockyard("fsck", str(s.config_path), "--json")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["clean"] is False and report["quarantined"] == []
    assert [p for p in report["problems"] if p.startswith(f"blob {victim}: content hashes to")]
    result = dockyard("fsck", str(s.config_path), "--repair")
    assert f"quarantined: {victim}" in result.stdout
    quarantined = list((s.root / "dockyard/quarantine/sha256").iterdir())
    assert len(quarantined) == 1 and quarantined[0].read_bytes() == b"bit rot"
    # no longer served; fsck now names the link left without its blob
    assert requests.get(s.v2(f"fs/blobs/{victim}")).status_code == 404
    result = dockyard("fsck", str(s.config_path))
    assert f"layer link {victim} points to a missing blob" in result.stdout


@pytest.mark.slow
@pytest.mark.filesystem
def test_upload_purging(start_server: ServerFactory) -> None:
    s = start_server(
        storage={
            "maintenance": {
                "uploadpurging": {"enabled": True, "age": "2s", "interval": "1s", "dryrun": False}
            }
        }
    )
    loc = requests.post(s.v2("purge/blobs/uploads/")).headers["Location"]
    requests.patch(loc, data=b"abandoned")
    uploads = s.root / V2 / "repositories/purge/_uploads"
    assert len(list(uploads.iterdir())) == 1
    deadline = time.monotonic() + 70  # the first purge starts after up to the interval
    while list(uploads.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not list(uploads.iterdir())
    assert_error(requests.get(loc), 404, "BLOB_UPLOAD_UNKNOWN")


@pytest.mark.slow
def test_purge_uploads_command_honours_age(start_server: ServerFactory) -> None:
    s = start_server(storage={"maintenance": {"uploadpurging": {"enabled": False}}})
    loc = requests.post(s.v2("p/blobs/uploads/")).headers["Location"]
    result = dockyard("purge-uploads", str(s.config_path), "--age", "1h")
    assert "0 abandoned uploads" in result.stdout
    result = dockyard("purge-uploads", str(s.config_path), "--age", "0s", "--dry-run")
    assert "would remove p/_uploads/" in result.stdout
    result = dockyard("purge-uploads", str(s.config_path), "--age", "0s", "--dry-run", "--json")
    report = json.loads(result.stdout)
    assert report["dry_run"] is True and report["removed"][0].startswith("p/_uploads/")
    assert requests.get(loc).status_code == 204
    dockyard("purge-uploads", str(s.config_path), "--age", "0s")
    assert requests.get(loc).status_code == 404


def test_read_only_mode(start_server: ServerFactory, tmp_path: Path) -> None:
    root = tmp_path / "store"
    writable = start_server(root=root)
    digest, _ = writable.push_image("ro", "v1", [layer(1)])
    loc = requests.post(writable.v2("ro/blobs/uploads/")).headers["Location"]
    writable.stop()
    s = start_server(root=root, storage={"maintenance": {"readonly": {"enabled": True}}})
    assert requests.get(s.v2("ro/manifests/v1")).status_code == 200
    assert requests.head(s.v2(f"ro/manifests/{digest}")).status_code == 200
    assert requests.get(s.v2("ro/tags/list")).json()["tags"] == ["v1"]
    loc = loc.replace(writable.host, s.host)
    assert requests.get(loc).status_code == 204  # upload status is a read
    for method, url in [
        ("POST", s.v2("ro/blobs/uploads/")),
        ("PATCH", loc),
        ("PUT", loc),
        ("DELETE", loc),
        ("PUT", s.v2("ro/manifests/v2")),
        ("DELETE", s.v2(f"ro/manifests/{digest}")),
        ("DELETE", s.v2(f"ro/blobs/{digest}")),
    ]:
        err = assert_error(requests.request(method, url), 405, "UNSUPPORTED")
        assert "read-only" in err["message"]
