"""Immediate garbage collection, ``dockyard gc --grace 0``, against running servers: everything
no manifest references goes at once; it is refused while a writable server runs and accepted
with read-only servers or none (a dead server's record stops counting); a writable server
started during one accepts no pushes; on S3 with the Redis cache, a read-only server stops
answering for what was deleted, and a re-push uploads it again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from harness import (
    OCI_MANIFEST,
    S3Endpoint,
    Server,
    ServerFactory,
    assert_error,
    flush_redis,
    redis_client,
    sha256,
)
from harness.dockyard import run_command as dockyard

V2 = "docker/registry/v2"
#: servers refresh their presence every second, so a dead one's record is stale after four
#: intervals and a second of margin (registry.presence.stale_after); a writable one may write
#: for two intervals after a refresh began, ample on a local disk however busy the machine
PRESENCE = {"presence": {"interval": "1s"}}
STALE_AFTER = 4 * 1 + 1
WRITABLE: dict[str, Any] = {"storage": {"maintenance": PRESENCE}}
READ_ONLY: dict[str, Any] = {
    "storage": {"maintenance": {"readonly": {"enabled": True}, **PRESENCE}}
}


def gc_now(config: Path, *flags: str, grace: str = "0s") -> subprocess.CompletedProcess[str]:
    return dockyard("gc", str(config), "--grace", grace, *flags)


def blob_file(root: Path, digest: str) -> Path:
    hexpart = digest.split(":")[1]
    return root / V2 / "blobs/sha256" / hexpart[:2] / hexpart / "data"


@dataclass
class Image:
    """An image whose bytes the test keeps, so that it can be pushed again identically."""

    repo: str
    tag: str | None
    config: bytes
    layers: list[bytes]

    @classmethod
    def make(cls, repo: str, tag: str | None, layers: list[bytes]) -> Image:
        config = json.dumps({"architecture": "amd64", "os": "linux", "n": os.urandom(8).hex()})
        return cls(repo, tag, config.encode(), layers)

    @property
    def blobs(self) -> list[bytes]:
        return [self.config, *self.layers]

    @property
    def manifest(self) -> bytes:
        def descriptor(media_type: str, blob: bytes) -> dict[str, Any]:
            return {"mediaType": media_type, "digest": sha256(blob), "size": len(blob)}

        return json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": descriptor("application/vnd.oci.image.config.v1+json", self.config),
                "layers": [
                    descriptor("application/vnd.oci.image.layer.v1.tar+gzip", layer)
                    for layer in self.layers
                ],
            }
        ).encode()

    @property
    def digest(self) -> str:
        return sha256(self.manifest)

    @property
    def reference(self) -> str:
        return self.tag or self.digest


def push(s: Server, image: Image) -> set[str]:
    """Push as docker does (a HEAD per blob, an upload only for those missing); return the
    digests uploaded."""
    uploaded = set()
    for blob in image.blobs:
        digest = sha256(blob)
        head = requests.head(s.v2(f"{image.repo}/blobs/{digest}"))
        if head.status_code == 404:
            s.push_blob(image.repo, blob)
            uploaded.add(digest)
        else:
            assert head.status_code == 200, head.status_code
    r = s.push_manifest(image.repo, image.reference, image.manifest, OCI_MANIFEST)
    assert r.status_code == 201, r.text
    return uploaded


def pull(s: Server, image: Image) -> None:
    """The manifest and every blob, byte for byte."""
    r = requests.get(
        s.v2(f"{image.repo}/manifests/{image.reference}"), headers={"Accept": OCI_MANIFEST}
    )
    assert r.status_code == 200, r.text
    assert sha256(r.content) == image.digest
    for blob in image.blobs:
        r = requests.get(s.v2(f"{image.repo}/blobs/{sha256(blob)}"))
        assert r.status_code == 200, (sha256(blob), r.status_code)
        assert sha256(r.content) == sha256(blob)


def cache_entries(redis: Any, name: str, digest: str) -> list[bytes]:
    """The Redis cache's entry saying ``name`` may serve ``digest`` (not its tombstone)."""
    return [k for k in redis.keys(f"dockyard:*:link:{name}:{digest}") if b":forgotten:" not in k]


def own_blobs(image: Image, *others: Image) -> set[str]:
    """Digests of ``image``'s config and layers that none of ``others`` uses."""
    shared = {sha256(b) for other in others for b in other.blobs}
    return {sha256(b) for b in image.blobs} - shared


@pytest.mark.slow
@pytest.mark.filesystem
@pytest.mark.parametrize("delete_untagged", [False, True], ids=["all-manifests", "tagged-only"])
def test_unreferenced_content_goes_at_once(
    start_server: ServerFactory, tmp_path: Path, delete_untagged: bool
) -> None:
    root = tmp_path / "store"
    shared = os.urandom(3000)
    kept = Image.make("app", "kept", [shared, os.urandom(2000)])
    leaked = Image.make("app", "leaked", [shared, os.urandom(2100)])
    untagged = Image.make("app", None, [os.urandom(2200)])
    writable = start_server(root=root, **WRITABLE)
    for image in (kept, leaked, untagged):
        push(writable, image)
    r = requests.delete(writable.v2(f"app/manifests/{leaked.digest}"))
    assert r.status_code == 202
    writable.stop()

    reader = start_server(root=root, **READ_ONLY)
    gone = own_blobs(leaked, kept) | {leaked.digest}
    # Clients go on pulling from the read-only server: it still serves the leaked layers (their
    # links are there) and stamps them, and keeps the untagged manifest's bytes in memory.
    for digest in own_blobs(leaked, kept):
        assert requests.head(reader.v2(f"app/blobs/{digest}")).status_code == 200
    pull(reader, untagged)

    flags = ["--delete-untagged"] if delete_untagged else []
    collected = gc_now(reader.config_path, *flags)
    assert collected.returncode == 0, collected.stderr
    for digest in gone:
        assert not blob_file(root, digest).exists(), digest
        assert f"removed blob {digest}" in collected.stdout
        assert requests.head(reader.v2(f"app/blobs/{digest}")).status_code == 404
    assert "immediate collection" in collected.stdout
    assert blob_file(root, sha256(shared)).exists()
    pull(reader, kept)
    if delete_untagged:
        assert f"removed manifest app@{untagged.digest}" in collected.stdout
        for digest in own_blobs(untagged) | {untagged.digest}:
            assert not blob_file(root, digest).exists(), digest
        # The bytes the server remembers do not bring the manifest back.
        r = requests.get(reader.v2(f"app/manifests/{untagged.digest}"))
        assert_error(r, 404, "MANIFEST_UNKNOWN")
        assert requests.get(reader.v2(f"app/blobs/{untagged.digest}")).status_code == 404
    else:
        pull(reader, untagged)
    reader.stop()

    # Writable again: the leaked image pushed anew has its own blobs uploaded again.
    writable = start_server(root=root, **WRITABLE)
    assert push(writable, leaked) == own_blobs(leaked, kept)
    pull(writable, leaked)
    pull(writable, kept)
    assert dockyard("fsck", str(writable.config_path)).returncode == 0


@pytest.mark.slow
@pytest.mark.filesystem
def test_refused_while_a_writable_server_runs(start_server: ServerFactory, tmp_path: Path) -> None:
    root = tmp_path / "store"
    s = start_server(root=root, process=True, **WRITABLE)  # the message names its pid
    garbage = s.push_blob("app", b"unreferenced")
    refused = gc_now(s.config_path)
    assert refused.returncode == 4, (refused.stdout, refused.stderr)
    message = refused.stderr
    assert "nothing was deleted" in message and "writable server" in message
    assert f"pid {s.proc.pid}" in message and f"http.addr 127.0.0.1:{s.port}" in message
    assert "storage.maintenance.readonly.enabled: true" in message
    assert "REGISTRY_STORAGE_MAINTENANCE_READONLY_ENABLED=true" in message
    assert blob_file(root, garbage).exists()
    assert not (root / "dockyard/leases/gc").exists()
    s.push_blob("app", b"pushes go on")  # refused before its marker held them back
    # A dry run says what would go, and that it would be refused.
    dry = dockyard("gc", str(s.config_path), "--grace", "0", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"would remove blob {garbage}" in dry.stdout
    assert "would be refused" in dry.stderr
    s.stop()

    reader = start_server(root=root, **READ_ONLY)
    collected = gc_now(reader.config_path, grace="0h")
    assert collected.returncode == 0, collected.stderr
    assert not blob_file(root, garbage).exists()
    reader.stop()
    nobody = gc_now(reader.config_path, grace="0ms")
    assert nobody.returncode == 0, nobody.stderr
    assert not list((root / "dockyard/instances").iterdir())  # stopped servers withdrew


@pytest.mark.slow
@pytest.mark.filesystem
def test_a_killed_servers_record_stops_counting(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    root = tmp_path / "store"
    s = start_server(root=root, process=True, **WRITABLE)
    garbage = s.push_blob("app", b"unreferenced")
    s.stop(signal.SIGKILL)
    records = list((root / "dockyard/instances").iterdir())
    assert len(records) == 1  # never withdrawn
    time.sleep(STALE_AFTER + 0.2)
    collected = gc_now(s.config_path)
    assert collected.returncode == 0, collected.stderr
    assert not blob_file(root, garbage).exists()
    assert not records[0].exists()  # the dead server's record is cleared away


@pytest.mark.slow
@pytest.mark.filesystem
def test_a_writable_server_started_during_an_immediate_collection_accepts_no_pushes(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    root = tmp_path / "store"
    # An immediate collection in progress: its marker is its lease, held and renewed.
    marker = root / "dockyard/leases/gc"
    marker.parent.mkdir(parents=True)
    state = {"holder": "collector:4242:abcd", "purpose": "immediate", "taken": time.time()}
    marker.write_text(json.dumps({**state, "expires": time.time() + 120}))
    s = start_server(root=root, **WRITABLE)
    r = requests.post(s.v2("app/blobs/uploads/"), params={"digest": sha256(b"x")}, data=b"x")
    error = assert_error(r, 503, "UNAVAILABLE")
    assert "immediate garbage collection" in error["message"]
    assert r.headers["Retry-After"].isdigit()
    r = requests.delete(s.v2(f"app/manifests/{sha256(b'm')}"))
    assert_error(r, 503, "UNAVAILABLE")
    assert requests.get(s.v2("")).status_code == 200  # reads are served meanwhile
    assert requests.get(s.v2("app/tags/list")).status_code == 404
    time.sleep(1.5)  # it keeps looking: still held
    r = requests.post(s.v2("app/blobs/uploads/"))
    assert_error(r, 503, "UNAVAILABLE")
    marker.unlink()  # the collection ended
    deadline = time.monotonic() + 10
    while requests.post(s.v2("app/blobs/uploads/")).status_code == 503:
        assert time.monotonic() < deadline, "pushes were not accepted again"
        time.sleep(0.2)
    s.push_blob("app", b"accepted again")
    assert "an immediate garbage collection is running" in s.log()


@pytest.mark.slow
def test_on_s3_with_the_redis_cache(
    start_server: ServerFactory,
    moto_s3: S3Endpoint,
    s3_bucket_factory: Any,
    redis_addr: str,
) -> None:
    flush_redis(redis_addr)
    bucket = s3_bucket_factory(moto_s3)
    storage = {
        "s3": moto_s3.storage_config(bucket),
        "redirect": {"disable": True},
        "cache": {"blobdescriptor": "redis"},
    }
    # The default refresh interval (15 s): moto, in this busy process, can take longer than a
    # short interval allows for a refresh, and the writable server would then refuse pushes.
    writable_config = {"storage": storage, "redis": {"addr": redis_addr}}
    read_only = {"maintenance": {"readonly": {"enabled": True}}}
    read_only_config = {**writable_config, "storage": {**storage, **read_only}}
    shared = os.urandom(3000)
    kept = Image.make("app", "kept", [shared, os.urandom(2000)])
    leaked = Image.make("app", "leaked", [shared, os.urandom(2100)])
    s = start_server(**writable_config)
    push(s, kept)
    push(s, leaked)
    assert requests.delete(s.v2(f"app/manifests/{leaked.digest}")).status_code == 202

    # The writable server's presence is found in the bucket (and in Redis).
    refused = gc_now(s.config_path)
    assert refused.returncode == 4 and "writable server" in refused.stderr, refused.stderr
    redis = redis_client(redis_addr)
    try:
        assert redis.keys("dockyard:*:instance:*")
        s.stop()

        reader = start_server(**read_only_config)
        leaked_layers = own_blobs(leaked, kept)
        for digest in leaked_layers:  # answered, and now cached in Redis for an hour
            assert requests.head(reader.v2(f"app/blobs/{digest}")).status_code == 200
            assert cache_entries(redis, "app", digest)
        collected = gc_now(reader.config_path)
        assert collected.returncode == 0, collected.stderr
        for digest in leaked_layers:
            assert requests.head(reader.v2(f"app/blobs/{digest}")).status_code == 404
            assert not cache_entries(redis, "app", digest)
    finally:
        redis.close()
    keys = {
        o["Key"]
        for o in moto_s3.client().list_objects_v2(Bucket=bucket).get("Contents", [])
        if o["Key"].endswith("/data")
    }
    for digest in own_blobs(leaked, kept) | {leaked.digest}:
        hexpart = digest.split(":")[1]
        assert f"{V2}/blobs/sha256/{hexpart[:2]}/{hexpart}/data" not in keys
    pull(reader, kept)
    reader.stop()

    again = start_server(**writable_config)
    assert push(again, leaked) == own_blobs(leaked, kept)
    pull(again, leaked)
