"""Repository delete on the registry model (``Registry.delete_repository``,
``registry.deletion``), on a filesystem and on S3 (moto, where there is no rename): what goes
and what stays, dry runs, garbage collection afterwards, a push racing the delete, the shared
cache, and the delete events."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_model import digest_of, upload

from dockyard.config import S3Config, validate
from dockyard.errors import ErrorCode, RegistryError
from dockyard.events import command_request, record_from_command, repository_delete_events
from dockyard.events.outbox import Outbox
from dockyard.oci import mediatypes as mt
from dockyard.oci.digest import Digest
from dockyard.registry import inventory, layout
from dockyard.registry.blobs import read_link
from dockyard.registry.cache import NoCache
from dockyard.registry.deletion import TRASH_AGE, _withdraw_unlinked
from dockyard.registry.fsck import check
from dockyard.registry.gc import GarbageCollector
from dockyard.registry.index import MetadataIndex
from dockyard.registry.repository import Registry
from dockyard.storage.driver import PathNotFound
from dockyard.storage.filesystem import FilesystemDriver
from dockyard.storage.s3 import S3Driver
from dockyard.storage.store import Store
from harness import S3Endpoint

Opener = Callable[..., Registry]


@pytest.fixture(params=["filesystem", pytest.param("s3", marks=pytest.mark.slow)])
def open_registry(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    """Opens a registry on a fresh store (inside the test's event loop: the S3 client belongs
    to the loop that first uses it); the test closes it."""
    if request.param == "filesystem":

        def driver() -> Any:
            return FilesystemDriver(str(tmp_path), max_threads=8)

    else:
        endpoint: S3Endpoint = request.getfixturevalue("moto_s3")
        bucket = request.getfixturevalue("s3_bucket_factory")(endpoint)
        settings = S3Config.model_validate(endpoint.storage_config(bucket))

        def driver() -> Any:
            return S3Driver(settings)

    def make(**options: Any) -> Registry:
        return Registry(Store(driver()), secret="s", delete_enabled=True, **options)

    yield make


def on_disk(tmp_path: Path) -> Registry:
    return Registry(
        Store(FilesystemDriver(str(tmp_path), max_threads=8)), secret="s", delete_enabled=True
    )


async def link(registry: Registry, name: str, data: bytes) -> Digest:
    """A blob stored and linked into ``name`` as an upload's commit leaves it (without the
    upload's requests, which cost on S3: the upload protocol has tests of its own)."""
    digest = digest_of(data)
    await registry.blobs.put(digest, data)
    await registry.repository(name).blobs.link(digest)
    return digest


async def push(
    registry: Registry, name: str, tags: list[str], layers: list[bytes]
) -> tuple[Digest, set[Digest]]:
    """An image of ``layers`` and a config of its own; returns its digest and its blobs'."""
    config = json.dumps({"os": "linux", "n": os.urandom(4).hex()}).encode()
    blobs = [await link(registry, name, data) for data in (config, *layers)]
    body = manifest_body(config, layers)
    pushed = await registry.repository(name).manifests.put(body, mt.OCI_MANIFEST, None, tags)
    return pushed.digest, set(blobs)


def manifest_body(config: bytes, layers: list[bytes]) -> bytes:
    def descriptor(media_type: str, data: bytes) -> dict[str, Any]:
        return {"mediaType": media_type, "digest": str(digest_of(data)), "size": len(data)}

    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": mt.OCI_MANIFEST,
            "config": descriptor("application/vnd.oci.image.config.v1+json", config),
            "layers": [descriptor("application/vnd.oci.image.layer.v1.tar", d) for d in layers],
        }
    ).encode()


async def tree(storage: Store, *paths: str) -> set[str]:
    """Every path under ``paths``."""
    walks = await asyncio.gather(*(storage.walk(p, lambda _: True) for p in paths))
    return {e.path for entries in walks for e in entries}


def code_of(err: pytest.ExceptionInfo[RegistryError]) -> ErrorCode:
    return err.value.code


def test_delete_removes_the_repository_and_nothing_else(open_registry: Opener) -> None:
    async def go() -> None:
        reg = open_registry()
        try:
            app = reg.repository("team/app")
            tagged, _ = await push(reg, "team/app", ["v1", "latest"], [b"shared", b"app"])
            untagged, _ = await push(reg, "team/app", [], [b"app 2"])
            session = await app.uploads.start()
            # nested in it, and a name it is a prefix of: neither is part of it
            sub, _ = await push(reg, "team/app/sub", ["v1"], [b"shared", b"sub"])
            sibling, _ = await push(reg, "team/application", ["v1"], [b"sibling"])
            blobs = set(await inventory.blob_digests(reg.storage))
            # what the deletion may touch: the repository's tree (with its child's) and trash
            touched = (layout.repository("team/app"), layout.DOCKYARD)
            before = await tree(reg.storage, *touched)

            dry = await reg.delete_repository("team/app", dry_run=True)
            assert dry.tags == {"v1": tagged, "latest": tagged}
            assert dry.manifests == {tagged, untagged}
            assert len(dry.layers) == 5 and dry.uploads == {session.id} and dry.passes == 0
            assert dry.summary().startswith("would remove repository team/app: 2 tags")
            assert await tree(reg.storage, *touched) == before  # a dry run changes nothing

            done = await reg.delete_repository("team/app", settle=0)
            assert (done.tags, done.manifests, done.layers) == (dry.tags, dry.manifests, dry.layers)
            assert done.settled and done.passes == 2  # the second pass found nothing
            assert done.manifest_tags() == {
                str(d): (["latest", "v1"] if d == tagged else []) for d in (tagged, untagged)
            }
            assert done.to_json()["layer_links"] == 5

            assert await reg.repositories() == ["team/app/sub", "team/application"]
            assert "team/app" not in await inventory.repository_names(reg.storage)
            assert not await app.exists()
            with pytest.raises(RegistryError) as err:
                await app.tags.resolve("v1")
            assert code_of(err) is ErrorCode.MANIFEST_UNKNOWN
            with pytest.raises(RegistryError) as err:
                await app.manifests.get(untagged)
            assert code_of(err) is ErrorCode.MANIFEST_UNKNOWN
            with pytest.raises(RegistryError) as err:
                await app.uploads.resume(session.id, None)
            assert code_of(err) is ErrorCode.BLOB_UPLOAD_UNKNOWN
            for name, digest in (("team/app/sub", sub), ("team/application", sibling)):
                repo = reg.repository(name)
                assert await repo.tags.resolve("v1") == digest
                await repo.manifests.get(digest)
            # content is never touched (garbage collection reclaims it), nor is trash left
            assert set(await inventory.blob_digests(reg.storage)) == blobs
            assert not [p for p in await tree(reg.storage, layout.DOCKYARD) if "trash/" in p]
            assert (await check(reg.storage)).clean

            for name, code in (("team/app", ErrorCode.NAME_UNKNOWN), ("Team", None)):
                with pytest.raises(RegistryError) as err:
                    await reg.delete_repository(name, dry_run=code is None)
                assert code_of(err) is (code or ErrorCode.NAME_INVALID)
        finally:
            await reg.close()

    asyncio.run(go())


def test_gc_then_reclaims_only_what_the_deleted_repository_used(tmp_path: Path) -> None:
    async def go() -> None:
        reg = on_disk(tmp_path)
        try:
            app, app_blobs = await push(reg, "app", ["v1"], [b"shared layer", b"app only"])
            other, other_blobs = await push(reg, "other", ["v1"], [b"shared layer"])
            # the web UI's file lists of two layers: one that goes, one that stays
            listings = {d: layout.layer_listing(d) for d in app_blobs}
            for path in listings.values():
                await reg.storage.write(path, b"{}")
            await reg.delete_repository("app", settle=0)
            report = await GarbageCollector(
                reg.storage, grace=0, touch_interval=3600, immediate=True
            ).run()
            unique = {app, *(app_blobs - other_blobs)}  # its manifest, config and own layer
            assert report.blobs_removed == len(unique) == 3
            for digest in unique:
                assert not await reg.blobs.exists(digest)
            for digest, path in listings.items():  # a listing goes with its blob
                kept = digest in other_blobs
                assert await reg.storage.delete_if_present(path) == kept, digest
            repo = reg.repository("other")
            assert await repo.tags.resolve("v1") == other
            await repo.manifests.get(other)
            for digest in other_blobs:  # the shared layer among them
                await repo.blobs.stat(digest)
            assert (await check(reg.storage)).clean
        finally:
            await reg.close()

    asyncio.run(go())


@pytest.mark.parametrize("when", ["before its tags", "before its revision"])
def test_a_push_racing_the_delete_fails_and_leaves_nothing(
    open_registry: Opener, when: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The two ways a delete can cut under a manifest push: after the revision link was
    written, the tag lands in a fresh ``_manifests`` (its revision went with the old one); after
    the blobs were checked, revision and tag land with the blobs' links gone. Either way the
    push fails and withdraws, and the repository is not listed again, empty or broken."""

    async def go() -> None:
        reg = open_registry()
        try:
            config, layer = b'{"os": "linux"}', b"racing layer"
            for data in (config, layer):
                await link(reg, "app", data)
            body = manifest_body(config, [layer])
            manifests = reg.repository("app").manifests

            async def delete() -> None:
                await reg.delete_repository("app", settle=0)

            if when == "before its tags":
                tag = manifests.tags.tag

                async def tag_after_delete(*args: Any) -> None:
                    await delete()
                    await tag(*args)

                monkeypatch.setattr(manifests.tags, "tag", tag_after_delete)
                expected = ErrorCode.NAME_UNKNOWN
            else:
                checked = manifests._check_references

                async def delete_after_check(*args: Any) -> Any:
                    found = await checked(*args)
                    await delete()
                    return found

                monkeypatch.setattr(manifests, "_check_references", delete_after_check)
                expected = ErrorCode.MANIFEST_BLOB_UNKNOWN
            with pytest.raises(RegistryError) as err:
                await manifests.put(body, mt.OCI_MANIFEST, None, ["v1"])
            assert code_of(err) is expected
            assert await reg.repositories() == []
            assert await manifests.tags.all() == []
            assert (await check(reg.storage)).clean
            monkeypatch.undo()

            # A push entirely after the delete completes, and the repository is back, whole.
            for data in (config, layer):
                await link(reg, "app", data)
            pushed = await reg.repository("app").manifests.put(body, mt.OCI_MANIFEST, None, ["v1"])
            assert await reg.repositories() == ["app"]
            assert await reg.repository("app").tags.resolve("v1") == pushed.digest
            assert (await check(reg.storage)).clean
        finally:
            await reg.close()

    asyncio.run(go())


def test_the_metadata_index_forgets_the_repository(tmp_path: Path) -> None:
    index = MetadataIndex(str(tmp_path / "index.sqlite3"))
    storage = Store(FilesystemDriver(str(tmp_path / "store"), max_threads=8))

    async def go() -> None:
        reg = Registry(storage, secret="s", delete_enabled=True, index=index)
        try:
            await push(reg, "team/app", ["v1"], [b"layer"])
            await push(reg, "team/app/sub", ["v1"], [b"layer"])
            assert await index.repository("team/app") is not None
            await reg.delete_repository("team/app", settle=0)
            assert await index.repository("team/app") is None
            assert await index.repository("team/app/sub") is not None
        finally:
            await reg.close()

    asyncio.run(go())


def test_links_are_forgotten_in_the_cache_before_they_go(tmp_path: Path) -> None:
    class Recording(NoCache):
        def __init__(self) -> None:
            self.forgotten: dict[tuple[str, Digest], bool] = {}

        async def forget_link(self, name: str, digest: Digest) -> None:
            link = await read_link(storage, layout.layer_link(name, digest))
            self.forgotten[(name, digest)] = link == digest  # still there

    storage = Store(FilesystemDriver(str(tmp_path), max_threads=8))
    cache = Recording()

    async def go() -> None:
        reg = Registry(storage, secret="s", delete_enabled=True, cache=cache)
        try:
            _, blobs = await push(reg, "app", ["v1"], [b"one", b"two"])
            await reg.delete_repository("app", settle=0)
            assert cache.forgotten == {("app", d): True for d in blobs}
        finally:
            await reg.close()

    asyncio.run(go())


def test_what_a_crashed_delete_left_in_the_trash_goes_with_the_next(tmp_path: Path) -> None:
    old = tmp_path / layout.trash(f"{int(1e9)}-dead").lstrip("/") / "0" / "_manifests"
    recent = tmp_path / layout.trash(f"{int(time.time())}-live").lstrip("/")
    old.mkdir(parents=True)
    recent.mkdir(parents=True)
    assert time.time() - 1e9 > TRASH_AGE

    async def go() -> None:
        reg = on_disk(tmp_path)
        try:
            await upload(reg, "app", b"x")
            await reg.delete_repository("app", settle=0)
            # another deletion's (it may still run) stays
            assert await reg.storage.list(layout.trash_dir()) == [recent.name]
            with pytest.raises(PathNotFound):
                await reg.storage.stat(layout.trash(f"{int(1e9)}-dead"))
        finally:
            await reg.close()

    asyncio.run(go())


def outbox_config(tmp_path: Path, **endpoint: Any) -> Any:
    return validate(
        {
            "version": "0.1",
            "storage": {"filesystem": {"rootdirectory": str(tmp_path)}},
            "notifications": {
                "endpoints": [{"name": "hook", "url": "http://127.0.0.1:9/", **endpoint}],
                "outbox": {"directory": str(tmp_path / "events")},
            },
        }
    )


def test_delete_events_and_the_outbox_a_command_writes(tmp_path: Path) -> None:
    request = command_request("rm")
    assert request["method"] == "DELETE" and request["useragent"].endswith(" rm")
    events = repository_delete_events(
        "team/app",
        {"sha256:" + "a" * 64: ["latest", "v1"], "sha256:" + "b" * 64: []},
        ["stray"],
        request,
        None,
        {"addr": "host:5000", "instanceID": "i"},
    )
    assert [(e["action"], e["target"]) for e in events] == [
        ("delete", {"digest": "sha256:" + "a" * 64, "repository": "team/app"}),
        ("delete", {"repository": "team/app", "tag": "latest"}),
        ("delete", {"repository": "team/app", "tag": "v1"}),
        ("delete", {"digest": "sha256:" + "b" * 64, "repository": "team/app"}),
        ("delete", {"repository": "team/app", "tag": "stray"}),
        ("delete", {"repository": "team/app", "dockyard": {"kind": "repository"}}),
    ]
    assert all(e["actor"] == {} and e["request"] == request for e in events)

    assert record_from_command(outbox_config(tmp_path), events) == len(events)
    written = [event for _, event in Outbox(str(tmp_path / "events")).events()]
    assert written == events
    # an endpoint that ignores deletes gets none: nothing is written for it
    ignoring = outbox_config(tmp_path / "quiet", ignore={"actions": ["delete"]})
    assert record_from_command(ignoring, events) == 0
    assert not (tmp_path / "quiet" / "events").exists()


def test_an_unsettled_delete_leaves_no_manifest_without_its_links(tmp_path: Path) -> None:
    """Writes still arriving in a deletion's last pass: a push that confirmed between the pass
    taking ``_manifests`` and taking ``_layers`` is left as a revision and a tag whose blobs'
    links went. The deletion then removes what stands without its links (here the state is
    made directly: the race itself is rare, test_rm.py runs it), and keeps what is whole."""

    async def go() -> None:
        reg = on_disk(tmp_path)
        try:
            _, broken_blobs = await push(reg, "app", ["late"], [b"late layer"])
            whole, _ = await push(reg, "app", ["whole"], [b"whole layer"])
            for digest in broken_blobs:  # what the last pass's move of _layers took
                await reg.storage.delete_if_present(layout.layer_link("app", digest))
            assert (await check(reg.storage)).sparse_manifests == 1  # fsck's name for it
            await _withdraw_unlinked(reg.storage, "app")
            repo = await inventory.read_repository(reg.storage, "app")
            assert repo.tags == {"whole": whole}
            assert set(repo.revisions) == {whole}
            after = await check(reg.storage)
            assert after.clean and after.sparse_manifests == 0
        finally:
            await reg.close()

    asyncio.run(go())
