"""What only the Redis backend of the metadata index (registry.index_redis) has to show: several
instances share it (reservations atomic across them), refreshes and verification never drop a
concurrent push, reservations of uploads are forgotten only when surely finished, verification
runs once per deployment, and the configuration picks it where instances share a store. The
interface's semantics are tested on both backends in test_index.py."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dockyard.config import load_config
from dockyard.errors import ConfigError
from dockyard.oci.digest import Digest
from dockyard.registry import index_redis, layout
from dockyard.registry.cache import redis_client
from dockyard.registry.configured import open_index
from dockyard.registry.index import TRANSIENT, MetadataIndex
from dockyard.registry.index_redis import RedisIndex
from dockyard.registry.records import ManifestRecord
from dockyard.storage.filesystem import FilesystemDriver
from dockyard.storage.store import Store
from harness import flush_redis
from harness import redis_client as sync_redis

KiB = 1024
MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


@pytest.fixture
def instances(redis_addr: str) -> Iterator[Callable[[int], list[RedisIndex]]]:
    """``instances(n)``: n indexes on one Redis and one namespace, each with its own client (as
    n instances of a deployment are)."""
    flush_redis(redis_addr)
    made: list[RedisIndex] = []

    def make(n: int) -> list[RedisIndex]:
        new = [
            RedisIndex(lambda: redis_client(redis_addr, "", "", 0), namespace="shared")
            for _ in range(n)
        ]
        made.extend(new)
        return new

    yield make


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(FilesystemDriver(str(tmp_path / "store"), max_threads=4))


def digest_of(text: str) -> Digest:
    return Digest.from_bytes(text.encode())


async def close_all(indexes: list[RedisIndex]) -> None:
    for index in indexes:
        await index.close()


def test_concurrent_reservations_across_instances_never_overshoot(
    instances: Callable[[int], list[RedisIndex]],
) -> None:
    """Pushes as uploads.commit makes them (reserve in steps, link, release), 60 at once through
    three instances into one namespace. The bytes really held (blobs linked, plus what each
    upload in flight was granted) never pass the limit (bound 0 bytes); every refusal names a
    usage that really had no room; what was accepted is what is counted. Refused pushes are
    retried one by one afterwards: those still refused would not have fitted.

    (The index's own count may pass the limit for a moment: between a blob's link and its
    upload's release it counts those bytes twice, on the safe side.)"""
    indexes = instances(3)
    limit = 1000 * KiB
    rng = random.Random(7)
    sizes = [rng.randrange(10 * KiB, 60 * KiB) for _ in range(60)]
    accepted: list[int] = []
    refused: list[tuple[int, int]] = []
    # granted but not yet linked, per upload; linked
    granted: dict[str, int] = {}
    linked = [0]
    held: list[int] = []

    def note() -> None:
        held.append(linked[0] + sum(granted.values()))

    async def push(i: int, size: int) -> bool:
        index = indexes[i % 3]
        name, upload = f"ns/repo{i % 4}", f"upload-{i}"
        # in two steps, as a body of unknown length is reserved
        for total in (size // 2, size):
            exceeded = await index.reserve(name, upload, total, [("ns/*", limit)])
            if exceeded is not None:
                assert exceeded.used + exceeded.wanted > exceeded.limit == limit
                granted.pop(upload, None)  # counted down before Redis is: never too high
                await index.release(name, upload)
                return False
            granted[upload] = total
            note()
            await asyncio.sleep(0)
        await index.blob_linked(name, digest_of(f"blob-{i}"), size)
        linked[0] += granted.pop(upload)
        note()
        await index.release(name, upload)
        accepted.append(size)
        return True

    async def go() -> None:
        outcomes = await asyncio.gather(*(push(i, s) for i, s in enumerate(sizes)))
        assert max(held) <= limit, max(held)
        for i, ok in enumerate(outcomes):
            if not ok and not await push(i, sizes[i]):
                refused.append((i, sizes[i]))
        usage = await indexes[1].usage("ns/*")
        assert usage.uploading == 0
        assert usage.bytes == sum(accepted) == linked[0] <= limit
        assert refused and accepted
        assert limit - usage.bytes < min(size for _, size in refused)
        await close_all(indexes)

    run(go())


def test_a_shared_blob_takes_no_room_and_the_first_scope_over_is_named(
    instances: Callable[[int], list[RedisIndex]],
) -> None:
    (index,) = instances(1)

    async def go() -> None:
        await index.blob_linked("team/a", digest_of("base"), 900)
        limits = [("team/*", 1000), ("team/b", 100)]
        # the base layer is in the namespace: mounting it into team/b costs team/* nothing,
        # but team/b holds nothing yet, so it does count there
        refused = await index.reserve("team/b", "m", 900, limits, digest_of("base"))
        assert refused is not None
        assert (refused.scope, refused.limit, refused.used, refused.wanted) == (
            "team/b",
            100,
            0,
            900,
        )
        assert await index.reserve("team/b", "m", 90, limits, digest_of("base")) is None
        assert (await index.usage("team/*")).uploading == 90
        # an upload's reservation replaces its earlier one instead of adding to it
        assert await index.reserve("team/b", "m", 95, limits) is None
        assert (await index.usage("team/b")).bytes == 95
        await index.release("team/b", "m", 10)
        assert (await index.usage("team/b")).bytes == 10
        await index.close()

    run(go())


def test_a_refresh_racing_a_push_loses_nothing(
    instances: Callable[[int], list[RedisIndex]],
    store: Store,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A push indexed (by another instance) while a refresh reads the layout: the refresh reads
    again instead of replacing the entry with the older layout; a refresh that keeps losing the
    race adds the layout to the entry and leaves the repository for the next verification."""
    index, other = instances(2)
    real_read = index_redis._read_layout
    pushes = iter(range(100))

    async def read_while_pushing(storage: Store, name: str) -> Any:
        found = await real_read(storage, name)
        n = next(pushes)
        await other.blob_linked(name, digest_of(f"pushed-{n}"), 10)
        return found

    async def go() -> None:
        monkeypatch.setattr(index_redis, "_read_layout", read_while_pushing)
        assert not await index.refresh(store, "app")
        blobs = (await index.contents())["blobs"]
        # every try lost the race: each push that raced it is still counted
        assert {b[1] for b in blobs} == {str(digest_of(f"pushed-{n}")) for n in range(4)}
        assert "app" in await index.indexed_repositories()
        prefix = await index.prefix()
        assert await index._client().sismember(prefix + "stale", "app")

        # A realistic race: the push links the blob in the layout, then indexes it. The
        # refresh reads again and its entry has the pushed blob.
        calls = iter([True, False])
        data = b"late layer"

        async def racing_once(storage: Store, name: str) -> Any:
            found = await real_read(storage, name)
            if next(calls):
                digest = Digest.from_bytes(data)
                await store.write(layout.blob_data(digest), data)
                await store.write(layout.layer_link(name, digest), str(digest).encode())
                await other.blob_linked(name, digest, len(data))
            return found

        monkeypatch.setattr(index_redis, "_read_layout", racing_once)
        assert await index.refresh(store, "other")
        blobs = [b for b in (await index.contents())["blobs"] if b[0] == "other"]
        assert blobs == [("other", str(Digest.from_bytes(data)), len(data))]
        assert not await index._client().sismember(prefix + "stale", "other")
        await close_all([index, other])

    run(go())


def test_verification_keeps_a_repository_pushed_after_its_listing(
    instances: Callable[[int], list[RedisIndex]],
    store: Store,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A repository indexed but missing from the layout listing is dropped only if no write
    reached it since the index was read: a first push landing between the two stays."""
    index, other = instances(2)
    real_names = index_redis.inventory.repository_names

    async def listing_then_push(storage: Store) -> list[str]:
        names = await real_names(storage)
        await other.blob_linked("new/app", digest_of("first-layer"), 10)
        return names

    async def go() -> None:
        await other.blob_linked("new/app", digest_of("earlier"), 10)
        await other.blob_linked("gone/app", digest_of("x"), 10)
        monkeypatch.setattr(index_redis.inventory, "repository_names", listing_then_push)
        assert await index.verify(store) == ["gone/app"]
        assert await index.indexed_repositories() == {"new/app"}
        monkeypatch.setattr(index_redis.inventory, "repository_names", real_names)
        # nothing raced this time: the layout has no new/app, so it goes
        assert await index.verify(store) == ["new/app"]
        await close_all([index, other])

    run(go())


def test_reservations_are_forgotten_only_when_surely_finished(
    instances: Callable[[int], list[RedisIndex]],
    store: Store,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A session gone at one verification may be a commit between the removal of its
    directory and its blob's link: its bytes stay counted until a second verification finds it
    gone too. A live session's stay; a transient reservation goes after TRANSIENT_MAX_AGE."""
    (index,) = instances(1)

    async def go() -> None:
        await store.write(layout.upload_started_at("r", "live"), b"2024-01-01T00:00:00Z")
        for upload in ("live", "gone", TRANSIENT + "mount"):
            assert await index.reserve("r", upload, 100, [("r", 10_000)]) is None
        assert (await index.usage("r")).uploading == 300
        await index.verify(store)
        assert (await index.usage("r")).uploading == 300
        await index.verify(store)
        assert (await index.usage("r")).uploading == 200  # "gone" released
        monkeypatch.setattr(index_redis, "TRANSIENT_MAX_AGE", 0.0)
        await index.verify(store)
        assert (await index.usage("r")).uploading == 100  # only the live session
        await index.close()

    run(go())


def test_verification_runs_once_per_interval_for_the_deployment(
    instances: Callable[[int], list[RedisIndex]],
    store: Store,
    monkeypatch: pytest.MonkeyPatch,
    redis_addr: str,
) -> None:
    """Two instances' verifiers: one verification per interval between them, not one each;
    and an index whose Redis lost its keys is verified (rebuilt) again within a tick."""
    monkeypatch.setattr(index_redis, "VERIFY_TICK", 0.05)
    indexes = instances(2)
    runs: list[int] = []

    def counting(n: int, index: RedisIndex) -> None:
        real = index.verify

        async def verify(storage: Store) -> list[str]:
            runs.append(n)
            return await real(storage)

        monkeypatch.setattr(index, "verify", verify)

    for n, index in enumerate(indexes):
        counting(n, index)

    async def verifiers(interval: float, seconds: float, between: Any = None) -> None:
        tasks = [asyncio.create_task(i.run_verifier(store, interval, 0.0)) for i in indexes]
        await asyncio.sleep(seconds)
        if between is not None:
            between()
            await asyncio.sleep(seconds)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def go() -> None:
        await verifiers(0.5, 1.6)
        # at 0, 0.5, 1.0, 1.5 (each a little later, more so on a busy machine): at most 5,
        # where two verifiers on their own would have verified every tick (about 60 times)
        assert 2 <= len(runs) <= 5, runs
        runs.clear()
        flush_redis(redis_addr)  # a new deployment

        def lose_everything() -> None:
            assert runs == [runs[0]]  # a long interval: one verification at start
            flush_redis(redis_addr)

        await verifiers(3600.0, 1.0, lose_everything)
        assert len(runs) == 2, runs
        await close_all(indexes)

    run(go())


def test_a_store_id_keeps_stores_sharing_a_redis_apart(redis_addr: str, tmp_path: Path) -> None:
    flush_redis(redis_addr)

    def connect() -> Any:
        return redis_client(redis_addr, "", "", 0)

    def store(name: str) -> Store:
        return Store(FilesystemDriver(str(tmp_path / name), max_threads=2))

    async def go() -> None:
        one, again, two = (
            RedisIndex(connect, storage=store("one")),
            RedisIndex(connect, storage=store("one")),
            RedisIndex(connect, storage=store("two")),
        )
        await one.blob_linked("app", digest_of("a"), 5)
        assert await again.prefix() == await one.prefix() != await two.prefix()
        assert (await again.usage("*")).bytes == 5
        assert (await two.usage("*")).bytes == 0
        record = ManifestRecord(digest_of("m"), MANIFEST, 1, 1.0)
        await two.manifest_pushed("app", record, ["t"], {digest_of("m"): 1})
        assert [r.name for r in await one.repositories()] == []
        await close_all([one, again, two])

    run(go())
    with sync_redis(redis_addr) as client:
        prefixes = {k.split(b"}")[0] for k in client.keys("dockyard:index:*")}
    assert len(prefixes) == 2


def _config(tmp_path: Path, **sections: Any) -> Any:
    import yaml

    raw = {"version": 0.1, "http": {"addr": ":5000"}, **sections}
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(raw))
    return load_config(str(path))


S3 = {"s3": {"bucket": "b", "region": "us-east-1", "regionendpoint": "http://127.0.0.1:1"}}


@pytest.mark.parametrize(
    ("storage", "redis", "backend", "expected"),
    [
        (S3, True, "auto", RedisIndex),
        (S3, False, "auto", MetadataIndex),
        ("filesystem", True, "auto", MetadataIndex),
        (S3, True, "sqlite", MetadataIndex),
        ("filesystem", True, "redis", RedisIndex),
    ],
)
def test_the_configuration_picks_the_backend(
    tmp_path: Path, storage: Any, redis: bool, backend: str, expected: type
) -> None:
    """Redis where instances share a store (S3 with ``redis.addr``), unless told otherwise."""
    if storage == "filesystem":
        storage = {"filesystem": {"rootdirectory": str(tmp_path / "data")}}
    sections: dict[str, Any] = {
        "storage": storage,
        "index": {"backend": backend, "directory": str(tmp_path / "index")},
    }
    if redis:
        sections["redis"] = {"addr": "127.0.0.1:6379"}
    config = _config(tmp_path, **sections)
    index = open_index(config, Store(FilesystemDriver(str(tmp_path / "unused"))))
    assert isinstance(index, expected)


def test_the_redis_backend_needs_redis(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"index\.backend: redis"):
        _config(tmp_path, storage=S3, index={"backend": "redis"})
    with pytest.raises(ConfigError):
        _config(tmp_path, storage=S3, index={"backend": "memcached"})


def test_time_values_round_trip_exactly(instances: Callable[[int], list[RedisIndex]]) -> None:
    """Push and pull times keep every bit (Lua's number formatting would keep 14 digits)."""
    (index,) = instances(1)
    pushed, pulled = 1_722_000_000.123456789, 1_722_000_001.987654321

    async def go() -> None:
        record = ManifestRecord(digest_of("m"), MANIFEST, 10, pushed)
        await index.manifest_pushed("r", record, ["t"], {digest_of("m"): 10})
        index.note_pull("r", digest_of("m"), pulled)
        index.note_pull("r", digest_of("unknown"), pulled)  # not indexed: ignored
        await index.flush_pulls()
        (tag,) = await index.tags("r")
        assert (tag.pushed, tag.pulled) == (pushed, pulled)
        summary = await index.repository("r")
        assert summary is not None and (summary.pushed, summary.pulled) == (pushed, pulled)
        await index.close()

    run(go())


def test_tallies_agree_with_sqlite_through_random_writes(
    instances: Callable[[int], list[RedisIndex]],
    tmp_path: Path,
    store: Store,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The per-scope tallies a reservation reads are kept by every write: after each of 400
    random pushes, links, deletes, refreshes and reservations, applied to both backends, every
    scope's usage in Redis is SQLite's. Tallies being counted (a new scope's, in steps) and
    recounted (verification's shadow) meanwhile come out right too."""
    from dockyard.registry import index as sqlite_index
    from dockyard.registry.index import _LayoutRepository
    from dockyard.registry.records import TagRecord

    (redis_index,) = instances(1)
    sqlite = MetadataIndex(str(tmp_path / "differential.sqlite3"))
    rng = random.Random(11)
    names = ["a/x", "a/y", "a", "ab/w", "b/z"]
    scopes = ["*", "a/*", "a", "a/x", "ab/*", "b/*", "c/*"]
    pool = [digest_of(f"blob-{n}") for n in range(30)]
    size = {d: 100 + 37 * n for n, d in enumerate(pool)}
    layouts: dict[str, Any] = {}

    async def read_layout(storage: Store, name: str) -> Any:
        return layouts.get(name)

    monkeypatch.setattr(index_redis, "_read_layout", read_layout)
    monkeypatch.setattr(sqlite_index, "_read_layout", read_layout)

    def manifest(n: int) -> ManifestRecord:
        return ManifestRecord(digest_of(f"manifest-{n}"), MANIFEST, 10 + n, 1000.0 + n)

    async def both(method: str, *args: Any) -> list[Any]:
        return [await getattr(i, method)(*args) for i in (sqlite, redis_index)]

    async def step() -> str:
        name = rng.choice(names)
        op = rng.choice(
            ["push", "push", "link", "link", "untag", "drop", "gone", "reserve", "refresh"] * 2
            + ["count", "recount"]
        )
        if op == "count":  # a scope starts afresh: its tally counted one repository at a time
            scope = rng.choice(scopes)
            prefix = await redis_index.prefix()
            client = redis_index._client()
            await client.zrem(prefix + "scopes", scope)
            await client.hdel(prefix + "recounting", scope)
            await redis_index._call("begin_tally", scope, "building", "1")
            await redis_index._call("tally_step", scope, "building", 1)
            return f"{op} {scope}"
        if op == "recount":  # verification's recount, left half done
            scope = rng.choice(scopes)
            await redis_index._call("begin_tally", scope, "recounting", "1")
            await redis_index._call("tally_step", scope, "recounting", 1)
            return f"{op} {scope}"
        if op == "push":
            record = manifest(rng.randrange(8))
            used = {d: size[d] for d in rng.sample(pool, rng.randrange(4))}
            used[record.digest] = record.size
            tags = rng.sample(["t1", "t2", "t3"], rng.randrange(3))
            await both("manifest_pushed", name, record, tags, used)
        elif op == "link":
            d = rng.choice(pool)
            await both("blob_linked", name, d, size[d])
        elif op == "untag":
            await both("tag_deleted", name, rng.choice(["t1", "t2", "t3"]))
        elif op == "drop":
            await both("manifest_deleted", name, manifest(rng.randrange(8)).digest)
        elif op == "gone":
            await both("repository_deleted", name)
        elif op == "reserve":
            upload, total = f"u{rng.randrange(3)}", rng.randrange(0, 500)
            digest = rng.choice([None, *pool[:5]])
            limits = [(s, 10**9) for s in scopes]
            assert await both("reserve", name, upload, total, limits, digest) == [None, None]
            if rng.random() < 0.5:
                await both("release", name, upload, rng.choice([None, 7]))
        else:  # the layout differs from what the index was told: a refresh takes it
            if rng.random() < 0.2:
                layouts.pop(name, None)
            else:
                records = {r.digest: r for r in (manifest(rng.randrange(8)) for _ in range(2))}
                tags = [TagRecord("t1", next(iter(records)), 5.0)]
                blobs = {d: size[d] for d in rng.sample(pool, rng.randrange(6))}
                blobs.update({d: r.size for d, r in records.items()})
                layouts[name] = _LayoutRepository(tags, records, blobs)
            await both("refresh", store, name)
        return f"{op} {name}"

    async def go() -> None:
        # every scope gets a tally (as configured quotas do at their first reservation)
        await both("reserve", "a/x", "init", 0, [(s, 10**9) for s in scopes])
        history = []
        for _ in range(400):
            history.append(await step())
            for scope in scopes:
                expected, got = await both("usage", scope)
                assert got == expected, (scope, history[-5:])
        # every tally counted and recounted to the end: still SQLite's usage
        await both("reserve", "a/x", "init", 0, [(s, 10**9) for s in scopes])
        await redis_index._recount()
        prefix = await redis_index.prefix()
        for scope in scopes:
            expected, got = await both("usage", scope)
            assert got == expected, scope
            tally = await redis_index._client().get(f"{prefix}s:{scope}:bytes")
            assert int(tally or 0) == expected.bytes - expected.uploading, scope
        assert not await redis_index._client().exists(prefix + "building", prefix + "recounting")
        assert (await sqlite.contents())["blobs"] == (await redis_index.contents())["blobs"]
        await sqlite.close()
        await redis_index.close()

    run(go())


def test_a_blob_recorded_with_two_sizes_counts_the_larger_until_the_recount(
    instances: Callable[[int], list[RedisIndex]], store: Store
) -> None:
    """One digest with different sizes in two repositories (a manifest's descriptor claimed a
    size): the scope counts the larger, as SQLite does; when the larger entry goes the tally
    keeps it (the safe side) until verification recounts."""
    (index,) = instances(1)
    blob = digest_of("claimed")

    async def go() -> None:
        assert await index.reserve("ns/a", "init", 0, [("ns/*", 10**6)]) is None
        await index.blob_linked("ns/a", blob, 100)
        await index.blob_linked("ns/b", blob, 150)
        assert (await index.usage("ns/*")).bytes == 150
        await index.repository_deleted("ns/b")
        assert (await index.usage("ns/*")).blobs == 1
        await index.blob_linked("ns/a", blob, 100)  # unchanged: nothing to do
        assert (await index.usage("ns/*")).bytes == 150  # kept, on the safe side
        await index._recount()
        assert (await index.usage("ns/*")).bytes == 100
        await index.close()

    run(go())


def test_filtered_repository_pages_and_manifest_records_match_sqlite(
    instances: Callable[[int], list[RedisIndex]], tmp_path: Path
) -> None:
    """What the JSON API reads (``repositories`` with a filter, ``manifests`` of a page of
    tags) is the same from both backends."""
    (redis_index,) = instances(1)
    sqlite = MetadataIndex(str(tmp_path / "same.sqlite3"))
    names = [f"team-{t}/app{n:03d}" for t in "ab" for n in range(150)]

    async def go() -> None:
        for index in (sqlite, redis_index):
            for n, name in enumerate(names):
                record = ManifestRecord(digest_of(f"m{n}"), MANIFEST, n, 1000.0 + n)
                await index.manifest_pushed(name, record, ["t"], {record.digest: n})
            await index.set_pulled(names[3], digest_of("m3"), 5000.0)

        def keep(name: str) -> bool:
            return name.startswith("team-b/") and name.endswith("7")

        for after, limit in [(None, 10), ("team-b/app050", 5), (None, None), ("zzz", 3)]:
            expected = await sqlite.repositories(after, limit, keep)
            assert await redis_index.repositories(after, limit, keep) == expected
        assert len(await redis_index.repositories(None, None, keep)) == 15
        wanted = [digest_of("m3"), digest_of("m4"), digest_of("absent")]
        expected_records = await sqlite.manifests(names[3], wanted)
        assert await redis_index.manifests(names[3], wanted) == expected_records
        assert set(expected_records) == {digest_of("m3")}
        assert expected_records[digest_of("m3")].pulled == 5000.0
        assert await redis_index.manifests(names[3], []) == {}
        await sqlite.close()
        await redis_index.close()

    run(go())


def test_an_unreachable_redis_fails_no_write_and_every_reservation() -> None:
    """As with SQLite: an index write that fails never fails the client's request (the layout
    has the truth; verification catches up), but a reservation that cannot be checked is not
    granted (quotas fail closed)."""
    from redis.backoff import NoBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.retry import Retry

    from harness.net import free_port

    port = free_port()  # nothing listens there
    index = RedisIndex(
        lambda: redis_client(f"127.0.0.1:{port}", "", "", 0, retry=Retry(NoBackoff(), 0)),
        namespace="down",
    )

    async def go() -> None:
        record = ManifestRecord(digest_of("m"), MANIFEST, 1, 1.0)
        await index.manifest_pushed("r", record, ["t"], {record.digest: 1})
        await index.blob_linked("r", digest_of("b"), 1)
        await index.tag_deleted("r", "t")
        await index.manifest_deleted("r", record.digest)
        await index.release("r", "u")
        index.note_pull("r", record.digest)
        await index.flush_pulls()
        with pytest.raises(RedisConnectionError):
            await index.reserve("r", "u", 10, [("r", 100)])
        await index.close()

    run(go())
