"""The metadata index (registry.index) on a real filesystem store, without HTTP: what pushes and
deletes write into it, that a rebuild from the layout gives the same content, that it notices
changes made behind its back, and that paging costs O(page). Every test runs on both backends:
SQLite (``MetadataIndex``) and Redis (``RedisIndex``, the S3 + Redis deployments')."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dockyard.oci import mediatypes as mt
from dockyard.oci.digest import Digest
from dockyard.registry import layout
from dockyard.registry.cache import redis_client
from dockyard.registry.index import Index, MetadataIndex
from dockyard.registry.index_redis import RedisIndex
from dockyard.registry.repository import Registry
from dockyard.storage.filesystem import FilesystemDriver
from dockyard.storage.store import Store
from harness import flush_redis
from harness import redis_client as sync_redis

V2 = "docker/registry/v2"
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


#: ``open_index(name)``: an index of the test's backend; the same name is the same index (as
#: another worker, or another instance, sees it), another name a separate one
IndexFactory = Callable[[str], Index]


#: the scopes the tests ask the usage of: tallied by "sqlite-tallied" (kept by triggers),
#: counted when asked by "sqlite"
TALLIED = ("*", "team-a/*", "team-a/app", "team-a/db", "team-b/*", "ns", "ns/*", "ns/a", "ns/b")


@pytest.fixture(params=["sqlite", "sqlite-tallied", "redis"])
def open_index(request: pytest.FixtureRequest, tmp_path: Path) -> IndexFactory:
    if request.param == "sqlite":
        return lambda name: MetadataIndex(str(tmp_path / name / "metadata.sqlite3"))
    if request.param == "sqlite-tallied":
        return lambda name: MetadataIndex(
            str(tmp_path / name / "metadata.sqlite3"), scopes=(*TALLIED, "n_s/*")
        )
    addr = request.getfixturevalue("redis_addr")
    flush_redis(addr)
    return lambda name: RedisIndex(lambda: redis_client(addr, "", "", 0), namespace=name)


async def lose_tags_and_mark_stale(index: Index, name: str) -> None:
    """What a failed index write leaves: rows missing, the repository marked stale."""
    if isinstance(index, MetadataIndex):
        await index._write(lambda c: c.execute("DELETE FROM tags"))
        await index._write(lambda c: c.execute("UPDATE repositories SET stale=1"))
        return
    assert isinstance(index, RedisIndex)
    keys = [await index._key(name, kind) for kind in ("tags", "tagdigest", "tagpushed")]
    await index._client().delete(*keys)
    await index._call("stale", name)


@pytest.fixture
def registry(tmp_path: Path, open_index: IndexFactory) -> Iterator[Registry]:
    registry = Registry(
        Store(FilesystemDriver(str(tmp_path / "store"), max_threads=8)),
        secret="s",
        delete_enabled=True,
        index=open_index("index"),
    )
    yield registry
    run(registry.close())


async def _blob(registry: Registry, name: str, data: bytes) -> dict[str, Any]:
    repo = registry.repository(name)
    session = await repo.uploads.start()

    async def body() -> Any:
        yield data

    await repo.uploads.append(session, body())
    digest = Digest.from_bytes(data)
    await repo.uploads.commit(session, digest)
    return {"mediaType": "application/octet-stream", "digest": str(digest), "size": len(data)}


async def push_image(
    registry: Registry, name: str, tags: list[str], layers: list[bytes], **extra: Any
) -> Digest:
    # A config of its own per push, so that only the layers are shared between pushes.
    config = await _blob(registry, name, json.dumps({"nonce": os.urandom(8).hex()}).encode())
    config["mediaType"] = "application/vnd.oci.image.config.v1+json"
    descriptors = [await _blob(registry, name, data) for data in layers]
    manifest = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_MANIFEST,
        "config": config,
        "layers": [
            {**d, "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip"} for d in descriptors
        ],
        **extra,
    }
    body = json.dumps(manifest).encode()
    pushed = await registry.repository(name).manifests.put(body, mt.OCI_MANIFEST, None, tags)
    return pushed.digest


async def push_index(
    registry: Registry, name: str, tags: list[str], children: list[Digest]
) -> Digest:
    entries = []
    for child in children:
        stored = await registry.repository(name).manifests.get(child)
        entries.append(
            {"mediaType": mt.OCI_MANIFEST, "digest": str(child), "size": len(stored.body)}
        )
    body = json.dumps(
        {"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": entries}
    ).encode()
    return (await registry.repository(name).manifests.put(body, mt.OCI_INDEX, None, tags)).digest


def test_pushes_and_deletes_keep_the_index(registry: Registry) -> None:
    index = registry.index
    assert index is not None

    async def go() -> None:
        shared = os.urandom(3000)
        before = time.time()
        one = await push_image(registry, "team-a/app", ["v1", "latest"], [shared, os.urandom(100)])
        two = await push_image(registry, "team-a/app", ["v2"], [shared])
        other = await push_image(registry, "team-a/db", ["1.0"], [shared])
        nested = await push_index(registry, "team-a/app", ["multi"], [one, two])
        signature = await push_image(
            registry,
            "team-a/app",
            [],
            [os.urandom(10)],
            subject={"mediaType": mt.OCI_MANIFEST, "digest": str(one), "size": 1},
            artifactType="application/vnd.example.signature",
        )
        tags = await index.tags("team-a/app")
        assert [(t.tag, t.digest) for t in tags] == [
            ("latest", one),
            ("multi", nested),
            ("v1", one),
            ("v2", two),
        ]
        assert all(before <= t.pushed <= time.time() for t in tags)
        snap = await index.snapshot("team-a/app")
        assert set(snap.manifests) == {one, two, nested, signature}
        assert snap.manifests[nested].children == (one, two)
        assert snap.manifests[signature].subject == one
        assert snap.manifests[signature].artifact_type == "application/vnd.example.signature"
        assert snap.manifests[one].size > 3100  # its own bytes, config and layers
        # Usage counts each blob once per scope: the shared layer once for the namespace.
        app = await index.usage("team-a/app")
        db = await index.usage("team-a/db")
        namespace = await index.usage("team-a/*")
        assert namespace.bytes == app.bytes + db.bytes - len(shared)
        assert namespace.repositories == 2
        assert (await index.usage("*")).bytes == namespace.bytes
        assert (await index.usage("team-b/*")).bytes == 0
        # Deletes: a tag, then a manifest with the tags pointing at it.
        await registry.repository("team-a/app").tags.untag("latest")
        await registry.repository("team-a/app").manifests.delete(two)
        assert [t.tag for t in await index.tags("team-a/app")] == ["multi", "v1"]
        assert two not in (await index.snapshot("team-a/app")).manifests
        summary = await index.repository("team-a/db")
        assert summary is not None and summary.tags == 1 and summary.manifests == 1
        assert [r.name for r in await index.repositories()] == ["team-a/app", "team-a/db"]
        assert [r.name for r in await index.repositories(after="team-a/app")] == ["team-a/db"]
        assert other in (await index.snapshot("team-a/db")).manifests

    run(go())


def test_usage_counts_each_blob_once_per_scope(registry: Registry) -> None:
    index = registry.index
    assert index is not None

    async def go() -> None:
        shared, a_only, b_only = os.urandom(5000), os.urandom(700), os.urandom(900)
        await push_image(registry, "ns/a", ["1"], [shared, a_only])
        await push_image(registry, "ns/b", ["1"], [shared, b_only])
        a, b, ns = [await index.usage(s) for s in ("ns/a", "ns/b", "ns/*")]
        assert ns.bytes == a.bytes + b.bytes - len(shared)
        assert ns.blobs == a.blobs + b.blobs - 1
        # A blob uploaded without any manifest counts too (a team cannot fill the disk with
        # blobs nothing references).
        await _blob(registry, "ns/a", os.urandom(4321))
        assert (await index.usage("ns/*")).bytes == ns.bytes + 4321

    run(go())


def test_scope_names_are_not_patterns(registry: Registry) -> None:
    """'_' in names is literal (no LIKE pattern); 'ns/*' is the names under 'ns/', not 'ns'
    itself or 'ns-other'."""
    index = registry.index
    assert index is not None

    async def go() -> None:
        for name in ("ns", "ns/x", "ns-other/y", "n_s/z", "nxs/z", "ns/deep/er"):
            await push_image(registry, name, ["t"], [name.encode() * 100])
        scoped = await index.usage("ns/*")
        assert scoped.repositories == 2
        assert (await index.usage("n_s/*")).repositories == 1
        assert (await index.usage("ns")).repositories == 1

    run(go())


def test_a_rebuild_from_the_layout_gives_the_same_index(
    registry: Registry, open_index: IndexFactory
) -> None:
    async def go() -> None:
        one = await push_image(registry, "a/app", ["v1", "v2"], [os.urandom(2000)])
        await push_index(registry, "a/app", ["multi"], [one])
        await push_image(registry, "b", ["x"], [os.urandom(10)])
        await push_image(registry, "b", [], [os.urandom(10)])  # untagged
        await registry.repository("b").tags.untag("x")
        assert registry.index is not None
        registry.index.note_pull("a/app", one, 1234.0)
        await registry.index.flush_pulls()
        built = await registry.index.contents()

        fresh = open_index("fresh")
        try:
            assert await fresh.reindex(registry.storage) == ["a/app", "b"]
            rebuilt = await fresh.contents()
        finally:
            await fresh.close()
        # Tag push times come from the link files' times: equal to the push's to a second.
        for key in ("manifests", "blobs"):
            assert rebuilt[key] == built[key]
        assert [t[:3] for t in rebuilt["tags"]] == [t[:3] for t in built["tags"]]
        for a, b in zip(rebuilt["tags"], built["tags"], strict=True):
            assert abs(a[3] - b[3]) < 1.0

        # Reindexing the index itself keeps what only it knows: the pull times.
        await registry.index.reindex(registry.storage)
        assert await registry.index.contents() == built
        snap = await registry.index.snapshot("a/app")
        assert snap.manifests[one].pulled == 1234.0

    run(go())


def test_verification_notices_changes_made_behind_its_back(
    registry: Registry, tmp_path: Path
) -> None:
    """What registry:2 (or a restore) does to the layout: a tag moved, a tag deleted, a whole
    repository added or removed. Verification refreshes exactly what differs."""
    root = tmp_path / "store" / V2 / "repositories"
    index = registry.index
    assert index is not None

    async def go() -> None:
        one = await push_image(registry, "r", ["a", "b"], [os.urandom(100)])
        two = await push_image(registry, "r", ["c"], [os.urandom(100)])
        await push_image(registry, "same", ["t"], [os.urandom(100)])
        assert await index.verify(registry.storage) == []

        # Move tag a to two and delete tag b, by hand as registry:2 writes links.
        (root / "r/_manifests/tags/a/current/link").write_text(str(two))
        shutil.rmtree(root / "r/_manifests/tags/b")
        # A repository copied in from elsewhere (a restore), and one removed.
        shutil.copytree(root / "same", root / "restored")
        shutil.rmtree(root / "same")
        assert sorted(await index.verify(registry.storage)) == ["r", "restored", "same"]
        assert [(t.tag, t.digest) for t in await index.tags("r")] == [("a", two), ("c", two)]
        assert [t.tag for t in await index.tags("restored")] == ["t"]
        assert await index.repository("same") is None
        assert one in (await index.snapshot("r")).manifests  # still stored, untagged
        assert await index.verify(registry.storage) == []

    run(go())


def test_a_failed_index_write_marks_the_repository_for_refresh(registry: Registry) -> None:
    index = registry.index
    assert index is not None

    async def go() -> None:
        await push_image(registry, "r", ["a"], [os.urandom(100)])
        # The index loses a row (as a failed write would): verification restores it.
        await lose_tags_and_mark_stale(index, "r")
        assert await index.verify(registry.storage) == ["r"]
        assert [t.tag for t in await index.tags("r")] == ["a"]

    run(go())


def test_pull_times_are_batched_and_keep_the_latest(
    registry: Registry, open_index: IndexFactory
) -> None:
    index = registry.index
    assert index is not None

    async def go() -> None:
        digest = await push_image(registry, "r", ["a"], [os.urandom(100)])
        index.note_pull("r", digest, 2000.0)
        assert (await index.snapshot("r")).manifests[digest].pulled is None  # not yet written
        await index.flush_pulls()
        assert (await index.snapshot("r")).tags[0].pulled == 2000.0
        # Another worker (another index object on the same file) wrote an older pull later.
        other = open_index("index")
        try:
            other.note_pull("r", digest, 1000.0)
            await other.flush_pulls()
        finally:
            await other.close()
        assert (await index.snapshot("r")).manifests[digest].pulled == 2000.0

    run(go())


def test_paging_through_100k_tags_costs_o_page_in_sqlite(tmp_path: Path) -> None:
    """Each page is a seek on the primary key and ``limit`` rows: the SQLite VM executes about
    the same number of instructions for the first page as for the last, and for a repository
    of 100 000 tags as for one of 1 000."""
    index = MetadataIndex(str(tmp_path / "metadata.sqlite3"))
    digest = "sha256:" + "0" * 64

    def fill(name: str, count: int) -> Any:
        rows = [(name, f"tag-{i:06d}", digest, 1.0) for i in range(count)]
        return index._write(lambda c: c.executemany("INSERT INTO tags VALUES (?, ?, ?, ?)", rows))

    async def steps_of(name: str, after: str | None) -> int:
        counted = [0]

        def counting() -> int:
            counted[0] += 1
            return 0

        await index._run(lambda c: c.set_progress_handler(counting, 1))
        page = await index.tags(name, after=after, limit=100)
        await index._run(lambda c: c.set_progress_handler(None, 1))
        assert len(page) == 100
        return counted[0]

    async def go() -> None:
        await fill("big", 100_000)
        await fill("small", 1_000)
        first = await steps_of("big", None)
        last = await steps_of("big", "tag-099899")
        middle = await steps_of("big", "tag-050000")
        small = await steps_of("small", "tag-000500")
        assert max(first, last, middle, small) < 1.5 * min(first, last, middle, small)
        # and it is the page: 100 rows take a few thousand instructions, not 100 000
        assert first < 20 * 100
        await index.close()

    run(go())


def test_paging_through_100k_tags_costs_o_page_in_redis(redis_addr: str) -> None:
    """Each page is one ``ZRANGEBYLEX`` with ``LIMIT`` (O(log N + page) in Redis) and ``HMGET``s
    of the page's fields: MONITOR shows the same commands, moving the same number of entries,
    for the first page as for the last, and for 100 000 tags as for 1 000."""
    flush_redis(redis_addr)
    index = RedisIndex(lambda: redis_client(redis_addr, "", "", 0), namespace="paging")
    digest = "sha256:" + "0" * 64
    watcher = sync_redis(redis_addr)

    async def fill(name: str, count: int) -> None:
        tags = [f"tag-{i:06d}" for i in range(count)]
        client = index._client()
        for start in range(0, count, 10_000):
            part = tags[start : start + 10_000]
            async with client.pipeline(transaction=False) as pipe:
                pipe.zadd(await index._key(name, "tags"), dict.fromkeys(part, 0))
                pipe.hset(await index._key(name, "tagdigest"), mapping=dict.fromkeys(part, digest))
                pipe.hset(await index._key(name, "tagpushed"), mapping=dict.fromkeys(part, "1.0"))
                await pipe.execute()

    async def commands_of(name: str, after: str | None) -> list[list[str]]:
        """The commands one page runs inside Redis (its script's calls), split into words."""
        marker = f"end-of-page-{os.urandom(4).hex()}"
        with watcher.monitor() as monitor:
            page = await index.tags(name, after=after, limit=100)
            watcher.echo(marker)
            seen = []
            while marker not in (command := monitor.next_command())["command"]:
                if command["client_type"] == "lua":
                    seen.append(command["command"].split())
        assert len(page) == 100
        assert page[0].tag > (after or "")
        return seen

    def shape(commands: list[list[str]]) -> list[tuple[str, int]]:
        return [(c[0], len(c)) for c in commands]

    async def go() -> None:
        await fill("big", 100_000)
        await fill("small", 1_000)
        await index.tags("big", limit=1)  # loads the script: later calls are EVALSHA alone
        first = await commands_of("big", None)
        last = await commands_of("big", "tag-099899")
        middle = await commands_of("big", "tag-050000")
        small = await commands_of("small", "tag-000500")
        assert shape(first) == shape(last) == shape(middle) == shape(small)
        names = [c[0] for c in first]
        assert names == ["ZRANGEBYLEX", "HMGET", "HMGET", "HMGET"], first
        # ZRANGEBYLEX <key> <min> + LIMIT 0 100: a seek and 100 entries
        assert first[0][-3:] == ["LIMIT", "0", "100"]
        # each HMGET asks for the page's 100 fields: digests, push times, the digests' pulls
        assert [len(c) - 2 for c in first[1:]] == [100, 100, 100]
        await index.close()

    try:
        run(go())
    finally:
        watcher.close()


def test_reindex_drops_what_the_layout_no_longer_has(registry: Registry, tmp_path: Path) -> None:
    index = registry.index
    assert index is not None

    async def go() -> None:
        await push_image(registry, "gone", ["a"], [os.urandom(100)])
        shutil.rmtree(tmp_path / "store" / V2 / "repositories" / "gone")
        assert await index.reindex(registry.storage) == []
        assert await index.repositories() == []
        assert (await index.usage("*")).bytes == 0

    run(go())


def test_layout_paths_are_the_index_sources() -> None:
    # The index reads only registry:2's own files (the layout module is the one place paths are
    # built): a tag's time is its current link's.
    assert layout.tag_current_link("a", "t").endswith("/_manifests/tags/t/current/link")


def test_tallies_match_counting_after_any_sequence_of_changes(tmp_path: Path) -> None:
    """The triggers' tallies (O(1) usage for quota scopes) equal the usage counted from the
    blobs after pushes sharing layers, blob links replacing claimed sizes, tag and manifest
    deletes, refreshes, a repository deleted and a reindex, in a random order."""
    import random

    from dockyard.registry.index import _counted_usage, _usage

    rng = random.Random(1234)
    scopes = ("*", "a/*", "a/x", "b/*", "a/x/y")
    index = MetadataIndex(str(tmp_path / "i.sqlite3"), scopes=scopes)
    registry = Registry(
        Store(FilesystemDriver(str(tmp_path / "store"), max_threads=8)),
        secret="s",
        delete_enabled=True,
        index=index,
    )
    names = ["a/x", "a/y", "a/x/y", "b/z", "c"]
    layers = [os.urandom(rng.randrange(100, 5000)) for _ in range(6)]

    async def check() -> None:
        for scope in scopes:
            tallied = await index._run(lambda c, s=scope: _usage(c, s))
            counted = await index._run(lambda c, s=scope: _counted_usage(c, s))
            assert (tallied.bytes, tallied.blobs) == (counted.bytes, counted.blobs), scope

    async def go() -> None:
        pushed: dict[str, list[Digest]] = {n: [] for n in names}
        for step in range(60):
            name = rng.choice(names)
            action = rng.random()
            if action < 0.5 or not pushed[name]:
                chosen = rng.sample(layers, rng.randrange(1, 3))
                digest = await push_image(registry, name, [f"t{step}"], chosen)
                pushed[name].append(digest)
            elif action < 0.65:
                digest = pushed[name].pop(rng.randrange(len(pushed[name])))
                await registry.repository(name).manifests.delete(digest)
            elif action < 0.75:
                await index.refresh(registry.storage, name)
            elif action < 0.8:
                await index.repository_deleted(name)
                pushed[name] = []
            elif action < 0.9:
                tags = await registry.repository(name).tags.all()
                if tags:
                    await registry.repository(name).tags.untag(rng.choice(tags))
            else:
                await index.reindex(registry.storage)
            await check()
        # a scope tallied only now is counted from what is there
        late = MetadataIndex(index.path, scopes=("c",))
        try:
            tallied = await late.usage("c")
        finally:
            await late.close()
        counted = await index._run(lambda c: _counted_usage(c, "c"))
        assert tallied.bytes == counted.bytes

    try:
        run(go())
    finally:
        run(registry.close())


def test_sqlite_refresh_and_verification_never_lose_a_racing_push(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A push indexed while a refresh reads the layout survives the refresh (it reads again);
    a repository whose first push lands after verification listed the layout is kept; an
    upload whose session is gone stops counting only at the second verification that finds
    it gone (a commit removes the session just before it links the blob)."""
    import dockyard.registry.index as index_module

    index = MetadataIndex(str(tmp_path / "i.sqlite3"), scopes=("*",))
    registry = Registry(
        Store(FilesystemDriver(str(tmp_path / "store"), max_threads=8)),
        secret="s",
        delete_enabled=True,
        index=index,
    )
    read_layout = index_module._read_layout
    racing: list[str] = []

    async def read_with_a_push_meanwhile(storage: Store, name: str) -> Any:
        found = await read_layout(storage, name)
        if racing:
            await push_image(registry, name, [racing.pop()], [os.urandom(100)])
        return found

    async def go() -> None:
        await push_image(registry, "r", ["a"], [os.urandom(100)])
        monkeypatch.setattr(index_module, "_read_layout", read_with_a_push_meanwhile)
        racing.append("b")
        await index.refresh(registry.storage, "r")
        assert [t.tag for t in await index.tags("r")] == ["a", "b"]
        monkeypatch.setattr(index_module, "_read_layout", read_layout)

        listing = index_module.inventory.repository_names

        async def listed_before_the_push(storage: Store) -> list[str]:
            names = await listing(storage)
            await push_image(registry, "new", ["1"], [os.urandom(100)])
            return names

        monkeypatch.setattr(index_module.inventory, "repository_names", listed_before_the_push)
        await index.verify(registry.storage)
        monkeypatch.setattr(index_module.inventory, "repository_names", listing)
        assert [t.tag for t in await index.tags("new")] == ["1"]

        assert await index.reserve("r", "gone-session", 1000, [("*", 10**9)]) is None
        await index.verify(registry.storage)
        assert (await index.usage("*")).uploading == 1000
        await index.verify(registry.storage)
        assert (await index.usage("*")).uploading == 0

    try:
        run(go())
    finally:
        run(registry.close())


def test_an_index_of_another_schema_is_rebuilt(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "i.sqlite3"
    with sqlite3.connect(path) as c:
        c.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        c.execute("INSERT INTO meta VALUES ('schema', '1')")
        c.execute("CREATE TABLE repositories (name TEXT PRIMARY KEY, stale INTEGER)")
        c.execute("INSERT INTO repositories VALUES ('old', 0)")
    index = MetadataIndex(str(path))

    async def go() -> set[str]:
        try:
            return await index.indexed_repositories()
        finally:
            await index.close()

    assert run(go()) == set()
    from dockyard.registry.index import SCHEMA_VERSION

    with sqlite3.connect(path) as c:
        assert c.execute("SELECT value FROM meta").fetchone() == (str(SCHEMA_VERSION),)
        columns = [r[1] for r in c.execute("PRAGMA table_info(repositories)")]
        assert {"version", "tags", "manifests", "size", "pushed"} <= set(columns)


def test_a_scope_tallied_later_counts_the_same(registry: Registry) -> None:
    """``tally`` (the metrics ask it for ``*``) makes a scope's usage a read; what it reads is
    what counting gave, before and after more pushes."""
    index = registry.index
    assert index is not None

    async def go() -> None:
        shared = os.urandom(3000)
        await push_image(registry, "p/a", ["1"], [shared, os.urandom(500)])
        await push_image(registry, "p/b", ["1"], [shared])
        counted = await index.usage("p/*")
        await index.tally(["p/*", "*"])
        assert (await index.usage("p/*")).bytes == counted.bytes
        assert (await index.usage("*")).bytes == counted.bytes
        extra = os.urandom(777)
        await push_image(registry, "p/c", ["1"], [shared, extra])
        grown = await index.usage("p/*")
        config_and_manifest = grown.bytes - counted.bytes - len(extra)
        assert 0 < config_and_manifest < 2000  # its own config and manifest, not the shared
        assert (await index.usage("*")).bytes == grown.bytes

    run(go())


def _open_and_reserve(path: str, barrier: Any, results: Any) -> None:
    barrier.wait()
    try:
        index = MetadataIndex(path, scopes=("*", "ns/*"))
        asyncio.run(index.reserve("ns/a", f"u{os.getpid()}", 10, [("*", 10**9)]))
        results.put("ok")
    except Exception as exc:  # reported to the test, which fails on it
        results.put(repr(exc))


def test_workers_opening_a_fresh_index_at_once(tmp_path: Path) -> None:
    """Every worker of a server starting on a new store opens the file at the same moment:
    the WAL switch and the schema are made once, none sees another's half-made schema (a
    500 on the first pushes, found by the concurrent quota test in CI)."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    for trial in range(30):
        path = str(tmp_path / str(trial) / "metadata.sqlite3")
        barrier, results = context.Barrier(8), context.Queue()
        processes = [
            context.Process(target=_open_and_reserve, args=(path, barrier, results))
            for _ in range(8)
        ]
        for p in processes:
            p.start()
        for p in processes:
            p.join(30)
        assert [results.get(timeout=5) for _ in processes] == ["ok"] * 8
