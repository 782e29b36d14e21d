"""The registry model on a real filesystem driver, without HTTP."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from dockyard.errors import ErrorCode, RegistryError
from dockyard.oci import mediatypes as mt
from dockyard.oci.digest import Digest
from dockyard.registry import layout
from dockyard.registry.listing import page_of
from dockyard.registry.repository import Registry
from dockyard.registry.uploads import Chain, ContentRange, HasherCache, Part, RunningHash
from dockyard.storage.filesystem import FilesystemDriver
from dockyard.storage.store import LocalRange, Store

V2 = "docker/registry/v2"


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    registry = Registry(
        Store(FilesystemDriver(str(tmp_path), max_threads=8)), secret="s", delete_enabled=True
    )
    yield registry
    asyncio.run(registry.close())


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


async def body(*chunks: bytes) -> AsyncIterator[bytes]:
    for c in chunks:
        yield c


async def failing_body(*chunks: bytes) -> AsyncIterator[bytes]:
    for c in chunks:
        yield c
    raise ConnectionResetError("client went away")


def digest_of(data: bytes, alg: str = "sha256") -> Digest:
    return Digest(alg, hashlib.new(alg, data).hexdigest())


async def upload(registry: Registry, name: str, data: bytes) -> Digest:
    repo = registry.repository(name)
    session = await repo.uploads.start()
    await repo.uploads.append(session, body(data))
    d = digest_of(data)
    await repo.uploads.commit(session, d)
    return d


def test_layout_paths_match_registry2() -> None:
    d = Digest("sha256", "ab" + "c" * 62)
    assert layout.blob_data(d) == f"/{V2}/blobs/sha256/ab/{d.hex}/data"
    assert layout.layer_link("a/b", d) == f"/{V2}/repositories/a/b/_layers/sha256/{d.hex}/link"
    assert layout.revision_link("a", d) == (
        f"/{V2}/repositories/a/_manifests/revisions/sha256/{d.hex}/link"
    )
    assert (
        layout.tag_current_link("a", "v1")
        == f"/{V2}/repositories/a/_manifests/tags/v1/current/link"
    )
    assert layout.tag_index_link("a", "v1", d) == (
        f"/{V2}/repositories/a/_manifests/tags/v1/index/sha256/{d.hex}/link"
    )
    assert layout.upload_part("a", "u", 7) == f"/{V2}/repositories/a/_uploads/u/parts/7"
    assert layout.upload_started_at("a", "u") == f"/{V2}/repositories/a/_uploads/u/startedat"


def test_chunked_upload_commit_and_links(registry: Registry, tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 5)

    async def go() -> None:
        repo = registry.repository("lib/app")
        s = await repo.uploads.start()
        assert await repo.uploads.append(s, body(data[:1000]), ContentRange(0, 999), 1000) == 1000
        size = await repo.uploads.append(s, body(data[1000:]), ContentRange(1000, len(data) - 1))
        assert size == len(data)
        d = digest_of(data)
        with pytest.raises(RegistryError):
            await repo.blobs.stat(d)  # not visible before commit
        info = await repo.uploads.commit(s, d)
        assert info.size == len(data)
        assert (await repo.blobs.stat(d)).size == len(data)

    run(go())
    d = digest_of(data)
    assert (tmp_path / V2 / "blobs/sha256" / d.hex[:2] / d.hex / "data").read_bytes() == data
    link = tmp_path / V2 / "repositories/lib/app/_layers/sha256" / d.hex / "link"
    assert link.read_bytes() == str(d).encode()  # no newline, as registry:2 writes it
    assert not list((tmp_path / V2 / "repositories/lib/app/_uploads").iterdir())


def test_out_of_order_chunk_is_416_and_keeps_state(registry: Registry) -> None:
    async def go() -> None:
        repo = registry.repository("x")
        s = await repo.uploads.start()
        await repo.uploads.append(s, body(b"abcd"), ContentRange(0, 3))
        for bad in (ContentRange(0, 3), ContentRange(5, 8), ContentRange(2, 5)):
            with pytest.raises(RegistryError) as err:
                await repo.uploads.append(s, body(b"efgh"), bad)
            assert err.value.status == 416
        assert await repo.uploads.size(s) == 4
        with pytest.raises(RegistryError) as err:
            await repo.uploads.append(s, body(b"efgh"), ContentRange(4, 7), content_length=3)
        assert err.value.status == 416
        await repo.uploads.append(s, body(b"efgh"), ContentRange(4, 7))
        await repo.uploads.commit(s, digest_of(b"abcdefgh"))

    run(go())


def test_interrupted_chunk_is_rolled_back(registry: Registry) -> None:
    async def go() -> None:
        repo = registry.repository("x")
        s = await repo.uploads.start()
        await repo.uploads.append(s, body(b"good"))
        with pytest.raises(ConnectionResetError):
            await repo.uploads.append(s, failing_body(b"partial" * 300000))
        assert await repo.uploads.size(s) == 4
        # A short body is refused and rolled back too.
        with pytest.raises(RegistryError) as err:
            await repo.uploads.append(s, body(b"ab"), content_length=10)
        assert err.value.code is ErrorCode.SIZE_INVALID
        assert await repo.uploads.size(s) == 4
        await repo.uploads.append(s, body(b"more"))
        await repo.uploads.commit(s, digest_of(b"goodmore"))

    run(go())


def test_wrong_digest_discards_upload(registry: Registry, tmp_path: Path) -> None:
    async def go() -> None:
        repo = registry.repository("x")
        s = await repo.uploads.start()
        await repo.uploads.append(s, body(b"content"))
        wrong = digest_of(b"other")
        with pytest.raises(RegistryError) as err:
            await repo.uploads.commit(s, wrong)
        assert err.value.code is ErrorCode.DIGEST_INVALID
        with pytest.raises(RegistryError) as err:
            await repo.uploads.size(s)
        assert err.value.code is ErrorCode.BLOB_UPLOAD_UNKNOWN
        assert not await registry.blobs.exists(wrong)
        assert not await registry.blobs.exists(digest_of(b"content"))

    run(go())
    assert not (tmp_path / V2 / "blobs").exists()


def test_upload_continues_on_another_worker(registry: Registry, tmp_path: Path) -> None:
    """A second Registry over the same storage (another worker, or after a restart) has no
    hasher in memory: the digest is computed from the stored bytes."""
    data = os.urandom(2_500_000)
    other = Registry(
        Store(FilesystemDriver(str(tmp_path), max_threads=4)), secret="s", delete_enabled=True
    )

    async def go() -> None:
        s = await registry.repository("x").uploads.start()
        await registry.repository("x").uploads.append(s, body(data[:1_000_000]))
        repo2 = other.repository("x")
        s2 = await repo2.uploads.resume(s.id, registry.repository("x").uploads.token(s, 1))
        await repo2.uploads.append(s2, body(data[1_000_000:]))
        await repo2.uploads.commit(s2, digest_of(data))
        assert (await registry.repository("x").blobs.stat(digest_of(data))).size == len(data)

    run(go())


def test_state_token_from_another_secret_is_refused(registry: Registry, tmp_path: Path) -> None:
    other = Registry(
        Store(FilesystemDriver(str(tmp_path), max_threads=4)),
        secret="different",
        delete_enabled=True,
    )

    async def go() -> None:
        repo = registry.repository("x")
        s = await repo.uploads.start()
        token = repo.uploads.token(s, 0)
        with pytest.raises(RegistryError) as err:
            await other.repository("x").uploads.resume(s.id, token)
        assert err.value.code is ErrorCode.BLOB_UPLOAD_INVALID
        assert "http.secret" in err.value.message
        with pytest.raises(RegistryError):  # a token for another repository
            await registry.repository("y").uploads.resume(s.id, token)
        with pytest.raises(RegistryError) as err:
            await repo.uploads.resume("not-a-uuid", None)
        assert err.value.code is ErrorCode.BLOB_UPLOAD_UNKNOWN

    run(go())


def test_sha512_upload(registry: Registry) -> None:
    data = os.urandom(100_000)

    async def go() -> None:
        repo = registry.repository("x")
        s = await repo.uploads.start("sha512")
        await repo.uploads.append(s, body(data))
        d = digest_of(data, "sha512")
        await repo.uploads.commit(s, d)
        assert (await repo.blobs.stat(d)).size == len(data)

    run(go())


def test_concurrent_uploads_of_same_blob(registry: Registry) -> None:
    data = os.urandom(1_500_000)

    async def go() -> None:
        digests = await asyncio.gather(*(upload(registry, f"r{i % 3}", data) for i in range(12)))
        assert len(set(digests)) == 1
        for i in range(3):
            assert (await registry.repository(f"r{i}").blobs.stat(digests[0])).size == len(data)

    run(go())


def test_blob_opened_for_a_response(registry: Registry, tmp_path: Path) -> None:
    """The model opens a blob's range for the HTTP layer (a local file for sendfile on a
    filesystem); a blob removed since it was found is BLOB_UNKNOWN, never an OSError."""
    data = os.urandom(10_000)

    async def go() -> None:
        repo = registry.repository("x")
        d = await upload(registry, "x", data)
        assert (await repo.blobs.stat(d)).size == len(data)
        opened = await repo.blobs.open(d, 100, 50)
        assert isinstance(opened, LocalRange)
        assert os.pread(opened.file.fileno(), opened.length, opened.offset) == data[100:150]
        opened.close()
        (tmp_path / layout.blob_data(d).lstrip("/")).unlink()  # a collection took it
        with pytest.raises(RegistryError) as err:
            await repo.blobs.open(d, 0, len(data))
        assert err.value.code is ErrorCode.BLOB_UNKNOWN

    run(go())


async def push_image(
    registry: Registry, name: str, tag: str | None, **extra: Any
) -> tuple[Digest, bytes]:
    config = json.dumps({"os": "linux", "n": os.urandom(4).hex()}).encode()
    layer = os.urandom(100)
    c, layer_digest = await upload(registry, name, config), await upload(registry, name, layer)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": mt.OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": str(c),
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": str(layer_digest),
                    "size": len(layer),
                }
            ],
            **extra,
        }
    ).encode()
    pushed = await registry.repository(name).manifests.put(
        manifest, mt.OCI_MANIFEST, None, [tag] if tag else []
    )
    return pushed.digest, manifest


def test_manifest_roundtrip_tags_and_delete(registry: Registry) -> None:
    async def go() -> None:
        repo = registry.repository("app")
        d, body_bytes = await push_image(registry, "app", "v1")
        await repo.tags.tag("v2", d)
        stored = await repo.manifests.get(await repo.tags.resolve("v1"))
        assert stored.body == body_bytes and stored.media_type == mt.OCI_MANIFEST
        assert await repo.tags.all() == ["v1", "v2"]
        assert await repo.tags.pointing_to(d) == ["v1", "v2"]
        await repo.tags.untag("v2")
        assert await repo.tags.all() == ["v1"]
        await repo.manifests.get(d)  # deleting a tag keeps the manifest
        await repo.manifests.delete(d)
        assert await repo.tags.all() == []
        with pytest.raises(RegistryError) as err:
            await repo.manifests.get(d)
        assert err.value.code is ErrorCode.MANIFEST_UNKNOWN

    run(go())


def test_manifest_needs_its_blobs_in_this_repository(registry: Registry) -> None:
    async def go() -> None:
        _d, body_bytes = await push_image(registry, "a", "v1")
        with pytest.raises(RegistryError) as err:
            await registry.repository("b").manifests.put(body_bytes, mt.OCI_MANIFEST, None, [])
        assert err.value.code is ErrorCode.MANIFEST_BLOB_UNKNOWN
        assert len(err.value.detail["digests"]) == 2

    run(go())


def test_index_children_must_exist(registry: Registry) -> None:
    async def go() -> None:
        d, _body_bytes = await push_image(registry, "a", None)
        missing = digest_of(b"nothing")

        def index(*digests: Digest) -> bytes:
            return json.dumps(
                {
                    "schemaVersion": 2,
                    "mediaType": mt.OCI_INDEX,
                    "manifests": [
                        {"mediaType": mt.OCI_MANIFEST, "digest": str(x), "size": 1} for x in digests
                    ],
                }
            ).encode()

        repo = registry.repository("a")
        with pytest.raises(RegistryError) as err:
            await repo.manifests.put(index(d, missing), mt.OCI_INDEX, None, ["multi"])
        assert err.value.code is ErrorCode.MANIFEST_BLOB_UNKNOWN
        assert err.value.detail == {"digests": [str(missing)]}
        pushed = await repo.manifests.put(index(d), mt.OCI_INDEX, None, ["multi"])
        assert (await repo.manifests.get(pushed.digest)).media_type == mt.OCI_INDEX

    run(go())


def test_sparse_put_stores_what_is_absent_and_stamps_what_is_held(tmp_path: Path) -> None:
    """``put(sparse=True)`` (the cache's call, and client pushes with
    ``validation.manifests.sparse``): absent config, layers and children are accepted; what the
    repository holds is still stamped, as for any push (registry.gc, rule 1)."""
    storage = Store(FilesystemDriver(str(tmp_path), max_threads=8))
    registry = Registry(storage, secret="s", delete_enabled=True, touch_interval=0.0)
    absent = digest_of(b"never pushed")

    def aged(path: str) -> Path:
        file = tmp_path / path.lstrip("/")
        os.utime(file, (time.time() - 1000, time.time() - 1000))
        return file

    async def go() -> None:
        repo = registry.repository("a")
        child, child_body = await push_image(registry, "a", None)
        config = Digest.parse(json.loads(child_body)["config"]["digest"])
        index = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": mt.OCI_INDEX,
                "manifests": [
                    {"mediaType": mt.OCI_MANIFEST, "digest": str(d), "size": 1}
                    for d in (child, absent)
                ],
            }
        ).encode()
        with pytest.raises(RegistryError) as err:
            await repo.manifests.put(index, mt.OCI_INDEX, None, ["multi"])
        assert err.value.code is ErrorCode.MANIFEST_BLOB_UNKNOWN
        assert err.value.detail == {"digests": [str(absent)]}

        link = aged(layout.revision_link("a", child))
        pushed = await repo.manifests.put(index, mt.OCI_INDEX, None, ["multi"], sparse=True)
        assert time.time() - link.stat().st_mtime < 100  # the child held is stamped
        assert (await repo.manifests.get(await repo.tags.resolve("multi"))).body == index
        with pytest.raises(RegistryError) as err:
            await repo.manifests.get(absent)
        assert err.value.code is ErrorCode.MANIFEST_UNKNOWN
        assert pushed.manifest.children[1].digest == absent

        image = json.loads(child_body)
        image["layers"].append({**image["layers"][0], "digest": str(absent)})
        data = aged(layout.blob_data(config))
        await repo.manifests.put(json.dumps(image).encode(), mt.OCI_MANIFEST, None, [], sparse=True)
        assert time.time() - data.stat().st_mtime < 100  # the config held is stamped
        # still parsed and validated
        with pytest.raises(RegistryError) as err:
            await repo.manifests.put(b"[]", mt.OCI_MANIFEST, None, [], sparse=True)
        assert err.value.code is ErrorCode.MANIFEST_INVALID
        await registry.close()

    run(go())


def test_pushed_by_digest_must_match(registry: Registry) -> None:
    async def go() -> None:
        _d, body_bytes = await push_image(registry, "a", None)
        with pytest.raises(RegistryError) as err:
            await registry.repository("a").manifests.put(
                body_bytes, mt.OCI_MANIFEST, digest_of(b"x"), []
            )
        assert err.value.code is ErrorCode.DIGEST_INVALID
        sha512 = digest_of(body_bytes, "sha512")
        pushed = await registry.repository("a").manifests.put(
            body_bytes, mt.OCI_MANIFEST, sha512, []
        )
        assert pushed.digest == sha512

    run(go())


def test_referrers_index(registry: Registry) -> None:
    async def go() -> None:
        subject, subject_body = await push_image(registry, "a", "v1")
        sub = {"mediaType": mt.OCI_MANIFEST, "digest": str(subject), "size": len(subject_body)}
        r1, _ = await push_image(
            registry,
            "a",
            None,
            subject=sub,
            artifactType="application/x.sig",
            annotations={"k": "v"},
        )
        r2, _ = await push_image(registry, "a", None, subject=sub)
        repo = registry.repository("a")
        found = await repo.referrers.list(subject)
        assert sorted(str(d.digest) for d in found) == sorted([str(r1), str(r2)])
        sig = await repo.referrers.list(subject, "application/x.sig")
        assert [d.digest for d in sig] == [r1]
        assert sig[0].annotations == {"k": "v"}
        await repo.manifests.delete(r1)
        assert [d.digest for d in await repo.referrers.list(subject)] == [r2]
        assert await repo.referrers.list(digest_of(b"unknown")) == []

    run(go())


def test_catalog_walks_nested_names(registry: Registry) -> None:
    async def go() -> None:
        for name in ("b", "a/x", "a", "a/x/y", "c-d/e"):
            await push_image(registry, name, "t")
        # an upload alone does not make a repository
        await registry.repository("only/uploads").uploads.start()
        assert await registry.repositories() == ["a", "a/x", "a/x/y", "b", "c-d/e"]
        page = await registry.catalog(2, None)
        assert page.items == ["a", "a/x"] and page.more
        page = await registry.catalog(2, "a/x")
        assert page.items == ["a/x/y", "b"] and page.more
        page = await registry.catalog(10, "b")
        assert page.items == ["c-d/e"] and not page.more

    run(go())


def test_page_of() -> None:
    items = ["a", "b", "c"]
    assert page_of(items, None, None).items == items
    assert page_of(items, 0, None).items == [] and not page_of(items, 0, None).more
    assert page_of(items, 3, None).more is False
    assert page_of(items, 1, "a").items == ["b"]
    assert page_of(items, 5, "c").items == []


def test_hasher_cache_offsets() -> None:
    """A cached hasher is handed out only for exactly the chain it covers: same end, same last
    chunk (claimed by the worker that hashed it), same algorithm."""
    cache = HasherCache(capacity=2)
    h = hashlib.sha256()
    chain = Chain((Part(0, 10, "a" * 32),), end=10)
    cache.put("u", RunningHash(10, "sha256", "a" * 32, h))
    assert cache.take("u", Chain((Part(0, 9, "a" * 32),), end=9), "sha256") is None  # gone
    cache.put("u", RunningHash(10, "sha256", "a" * 32, h))
    assert cache.take("u", chain, "sha512") is None
    cache.put("u", RunningHash(10, "sha256", "a" * 32, h))
    other = Chain((Part(0, 10, "b" * 32),), end=10)  # same size, another request's chunk
    assert cache.take("u", other, "sha256") is None
    cache.put("u", RunningHash(10, "sha256", "a" * 32, h))
    assert cache.take("u", chain, "sha256") is h
    for i in range(3):
        cache.put(str(i), RunningHash(0, "sha256", None, h))
    assert cache.take("0", Chain(), "sha256") is None  # evicted
    assert cache.take("2", Chain(), "sha256") is h


async def held_body(gate: asyncio.Event, *chunks: bytes) -> AsyncIterator[bytes]:
    """A body that sends nothing until ``gate`` opens (a PATCH with its body held back)."""
    await gate.wait()
    for c in chunks:
        yield c


@pytest.mark.parametrize("existing", [True, False], ids=["existing-blob", "new-blob"])
def test_commit_racing_a_held_append_publishes_exactly_what_it_verified(
    registry: Registry, tmp_path: Path, existing: bool
) -> None:
    """The model alone (no upload locks): an append whose body is held back while the upload
    is committed. The commit seals the chain and publishes what it hashed; the append's bytes
    never reach the blob, and an existing blob is not even touched (same file, same bytes)."""
    data = os.urandom(300_000)
    digest = digest_of(data)

    async def go() -> None:
        if existing:
            await upload(registry, "victim", data)
        blob = tmp_path / layout.blob_data(digest).lstrip("/")
        before = blob.stat().st_ino if existing else None
        repo = registry.repository("attacker")
        session = await repo.uploads.start()
        await repo.uploads.append(session, body(data))
        gate = asyncio.Event()
        held = asyncio.create_task(repo.uploads.append(session, held_body(gate, b"X" * 100)))
        await asyncio.sleep(0.05)  # the append has opened its chunk and is waiting for bytes
        await repo.uploads.commit(session, digest)
        gate.set()
        with pytest.raises(RegistryError) as err:
            await held
        assert err.value.code in (ErrorCode.BLOB_UPLOAD_INVALID, ErrorCode.BLOB_UPLOAD_UNKNOWN)
        assert blob.read_bytes() == data
        if existing:
            assert blob.stat().st_ino == before  # never replaced
        assert await registry.repository("attacker").blobs.is_linked(digest)

    run(go())
    assert not list((tmp_path / V2 / "repositories/attacker/_uploads").glob("*"))


def test_concurrent_appends_without_locks_keep_one_chain(registry: Registry) -> None:
    """Two appends on one session at once, no locks: one claims the offset, the other is
    refused whole (416), and the upload commits exactly the winner's bytes."""
    first, second = os.urandom(200_000), os.urandom(200_000)

    async def go() -> None:
        repo = registry.repository("x")
        session = await repo.uploads.start()
        gate_a, gate_b = asyncio.Event(), asyncio.Event()
        a = asyncio.create_task(repo.uploads.append(session, held_body(gate_a, first)))
        b = asyncio.create_task(repo.uploads.append(session, held_body(gate_b, second)))
        await asyncio.sleep(0.05)
        gate_a.set()
        assert await a == len(first)
        gate_b.set()
        with pytest.raises(RegistryError) as err:
            await b
        assert err.value.status == 416
        assert await repo.uploads.size(session) == len(first)
        info = await repo.uploads.commit(session, digest_of(first))
        assert info.size == len(first)

    run(go())
