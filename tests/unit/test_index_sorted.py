"""Repositories sorted by name, tag count, size and last push (``repositories_sorted``, what the
web UI lists): the per-repository aggregates the SQLite triggers and the Redis scripts keep agree
with counting after any sequence of writes; pages in every sort and direction, with or without a
filter, concatenate to the whole sorted list; a page costs O(page) however many repositories
there are; Redis lists in SQLite's order; an index written before the aggregates is rebuilt."""

from __future__ import annotations

import asyncio
import math
import os
import random
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from test_index import push_image

from dockyard.oci.digest import Digest
from dockyard.registry import index as sqlite_module
from dockyard.registry import index_redis
from dockyard.registry.cache import redis_client
from dockyard.registry.index import Index, MetadataIndex, RepositorySummary, _LayoutRepository
from dockyard.registry.index_redis import RedisIndex
from dockyard.registry.records import REPOSITORY_SORTS, ManifestRecord, RepositoryKey, TagRecord
from dockyard.registry.repository import Registry
from dockyard.storage.filesystem import FilesystemDriver
from dockyard.storage.store import Store
from harness import flush_redis
from harness import redis_client as sync_redis

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
RANGES = ("ZRANGE", "ZRANGEBYLEX", "ZREVRANGEBYLEX")
ORDERS = [(sort, descending) for sort in REPOSITORY_SORTS for descending in (False, True)]


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def digest_of(text: str) -> Digest:
    return Digest.from_bytes(text.encode())


@pytest.fixture(params=["sqlite", "redis"])
def index(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Index]:
    if request.param == "sqlite":
        made: Index = MetadataIndex(str(tmp_path / "metadata.sqlite3"))
    else:
        addr = request.getfixturevalue("redis_addr")
        flush_redis(addr)
        made = RedisIndex(lambda: redis_client(addr, "", "", 0), namespace="sorted")
    yield made
    run(made.close())


def sorted_as_listed(
    summaries: list[RepositorySummary], sort: str, descending: bool
) -> list[RepositorySummary]:
    """The order ``repositories_sorted`` promises: (value, name) in the direction, names byte
    by byte; by ``pushed``, the repositories without tags last, by name in the direction."""
    if sort == "name":
        return sorted(summaries, key=lambda s: s.name.encode(), reverse=descending)
    present = [s for s in summaries if getattr(s, sort) is not None]
    absent = [s for s in summaries if getattr(s, sort) is None]
    present.sort(key=lambda s: (getattr(s, sort), s.name.encode()), reverse=descending)
    absent.sort(key=lambda s: s.name.encode(), reverse=descending)
    return present + absent


async def walk(
    index: Index,
    sort: str,
    descending: bool,
    limit: int,
    keep: Callable[[str], bool] | None = None,
) -> list[RepositorySummary]:
    """Every page, each starting after the previous page's last row (its key passed through
    the opaque form a URL would carry)."""
    rows: list[RepositorySummary] = []
    seen: set[str] = set()
    after = None
    while True:
        page = await index.repositories_sorted(sort, descending, after, limit, keep)
        assert len(page) <= limit
        repeated = seen & {s.name for s in page}
        assert not repeated, (sort, descending, limit, repeated)  # not looping on a key
        seen.update(s.name for s in page)
        rows += page
        if len(page) < limit:
            return rows
        after = RepositoryKey.decode(RepositoryKey.of(page[-1], sort).encode(), sort)


async def populate(index: Index, count: int, seed: int = 5) -> None:
    """``count`` repositories with many ties in every column: tag counts 0-3 (0: untagged,
    listed by ``pushed`` last), a few sizes and push times; plus some without a manifest
    (never listed) and names that sort differently by bytes than by words."""
    rng = random.Random(seed)
    names = [f"ns{n % 7}/app-{n:04d}" for n in range(count)]
    names += ["a", "a-b", "a.b", "a/b", "a/b/c", "a_b", "ab", "z9"]
    for n, name in enumerate(names):
        record = ManifestRecord(digest_of(f"m{n}"), MANIFEST, 10, 1000.0 + rng.randrange(5))
        tags = [f"t{i}" for i in range(rng.choice([0, 1, 1, 1, 2, 3]))]
        size = rng.choice([100, 200, 300])
        await index.manifest_pushed(name, record, tags, {record.digest: size})
        if rng.random() < 0.3:  # a later push: another manifest, a later time
            later = ManifestRecord(digest_of(f"l{n}"), MANIFEST, 10, 1000.5 + rng.randrange(3))
            await index.manifest_pushed(name, later, ["later"], {later.digest: 7})
        if rng.random() < 0.1:
            await index.set_pulled(name, record.digest, 5000.0 + n)
    for n in range(5):  # blobs without a manifest: not listed
        await index.blob_linked(f"blobs-only-{n}", digest_of(f"b{n}"), 10)


def test_pages_in_every_order_concatenate_to_the_sorted_list(index: Index) -> None:
    """Walked page by page (sizes 1, 7 and 50), with a filter refusing about half the names or
    without, every sort in both directions gives the whole list in order: no repeat, no gap,
    ties by name, untagged repositories last by ``pushed``; ``repositories`` (by name) is the
    ascending name listing."""

    def keep(name: str) -> bool:
        return name.endswith(("1", "3", "5", "b")) or name.startswith("ns2/")

    async def go() -> None:
        await populate(index, 120)
        everything = await index.repositories()
        assert len(everything) == 128
        assert all(s.manifests > 0 for s in everything)
        assert any(s.pushed is None for s in everything)
        for sort, descending in ORDERS:
            expected = sorted_as_listed(everything, sort, descending)
            whole = await index.repositories_sorted(sort, descending, None, 1000)
            assert whole == expected, (sort, descending)
            for limit in (1, 7, 50):
                assert await walk(index, sort, descending, limit) == expected
                kept = [s for s in expected if keep(s.name)]
                assert await walk(index, sort, descending, limit, keep) == kept
        # nothing after the last, and a key between rows starts at the next
        last = RepositoryKey.of(sorted_as_listed(everything, "size", False)[-1], "size")
        assert await index.repositories_sorted("size", False, last, 10) == []
        by_size = sorted_as_listed(everything, "size", False)
        page = await index.repositories_sorted("size", False, RepositoryKey(200, "ns3"), 1000)
        assert page == [s for s in by_size if (s.size, s.name) > (200, "ns3")]

    run(go())


def test_a_search_by_substring_pages_like_the_filtered_list(index: Index) -> None:
    """``contains`` on repositories (every sort) and on tags: the names holding it, in the same
    order and pages as the whole list filtered."""

    async def go() -> None:
        await populate(index, 60)
        everything = await index.repositories()
        for sort, descending in ORDERS:
            expected = [
                s for s in sorted_as_listed(everything, sort, descending) if "app-00" in s.name
            ]
            rows: list[RepositorySummary] = []
            after = None
            while True:
                page = await index.repositories_sorted(
                    sort, descending, after, 4, None, contains="app-00"
                )
                rows += page
                if len(page) < 4:
                    break
                after = RepositoryKey.of(page[-1], sort)
            assert rows == expected, (sort, descending)
        record = ManifestRecord(digest_of("tags"), MANIFEST, 10, 1000.0)
        tags = [f"v{n}-{'rc' if n % 5 == 0 else 'final'}" for n in range(40)]
        await index.manifest_pushed("tagged", record, tags, {record.digest: 1})
        found: list[str] = []
        after_tag = None
        while True:
            page = await index.tags("tagged", after_tag, 3, contains="-rc")
            found += [t.tag for t in page]
            if len(page) < 3:
                break
            after_tag = page[-1].tag
        assert found == sorted(t for t in tags if "-rc" in t)

    run(go())


def test_bad_sorts_and_keys_are_refused(index: Index) -> None:
    async def go() -> None:
        await populate(index, 3)
        with pytest.raises(ValueError):
            await index.repositories_sorted("stars")
        with pytest.raises(ValueError):
            await index.repositories_sorted("tags", after=RepositoryKey(None, "a"))
        with pytest.raises(ValueError):
            await index.repositories_sorted("name", after=RepositoryKey(3, "a"))
        with pytest.raises(ValueError):
            await index.repositories_sorted("pushed", after=RepositoryKey(math.nan, "a"))
        # a (value, name) tuple is a key too
        assert await index.repositories_sorted("tags", True, (99, "zzz"), 2) == (
            await index.repositories_sorted("tags", True, None, 2)
        )
        assert await index.repositories_sorted("name", limit=0) == []

    run(go())


def test_repository_keys_round_trip_as_opaque_text() -> None:
    pushed = 1_722_000_000.123456789
    for key, sort in [
        (RepositoryKey(pushed, "ns/app"), "pushed"),
        (RepositoryKey(None, "ns/app"), "pushed"),
        (RepositoryKey(12, "a"), "tags"),
        (RepositoryKey(2**40, "a/b"), "size"),
        (RepositoryKey(None, "x.y_z"), "name"),
    ]:
        text = key.encode()
        assert text.isascii() and all(c.isalnum() or c in "-_" for c in text)
        assert RepositoryKey.decode(text, sort) == key
    assert RepositoryKey.decode(RepositoryKey(5, "a").encode(), "pushed") == RepositoryKey(5.0, "a")
    for text, sort in [
        ("", "name"),
        ("!!", "name"),
        ("bm90IGpzb24", "name"),  # "not json"
        (RepositoryKey(5, "a").encode(), "name"),
        (RepositoryKey(None, "a").encode(), "size"),
        (RepositoryKey(1.5, "a").encode(), "tags"),
        (RepositoryKey(True, "a").encode(), "tags"),
        (RepositoryKey(1, "a").encode(), "stars"),
    ]:
        with pytest.raises(ValueError):
            RepositoryKey.decode(text, sort)
    summary = RepositorySummary("r", 2, 3, 400, None, None)
    assert RepositoryKey.of(summary, "size") == RepositoryKey(400, "r")
    assert RepositoryKey.of(summary, "pushed") == RepositoryKey(None, "r")
    assert RepositoryKey.of(summary, "name") == RepositoryKey(None, "r")


# -- the aggregates ------------------------------------------------------------------------------


async def sqlite_aggregates_are_counts(index: MetadataIndex) -> None:
    """Every repository's kept aggregates are what counting its rows gives; every repository
    with rows has its row of aggregates."""

    def work(c: sqlite3.Connection) -> None:
        kept = c.execute(
            "SELECT name, tags, manifests, size, pushed FROM repositories ORDER BY name"
        ).fetchall()
        counted = c.execute(
            "SELECT name, (SELECT count(*) FROM tags WHERE repository = name), "
            "(SELECT count(*) FROM manifests WHERE repository = name), "
            "(SELECT coalesce(sum(size), 0) FROM blobs WHERE repository = name), "
            "(SELECT max(pushed) FROM tags WHERE repository = name) "
            "FROM repositories ORDER BY name"
        ).fetchall()
        assert kept == counted
        orphans = c.execute(
            "SELECT repository FROM tags UNION SELECT repository FROM manifests "
            "UNION SELECT repository FROM blobs EXCEPT SELECT name FROM repositories"
        ).fetchall()
        assert orphans == []

    await index._run(work)


async def redis_aggregates_are_counts(index: RedisIndex) -> None:
    """Every indexed repository's ``sum`` is what counting gives, and the sorted sets by column
    hold exactly the listed repositories, scored by it. (In an index written before the
    aggregates, an unlisted repository is counted at its next write: it may have none.)"""
    client = index._client()
    prefix = await index.prefix()
    names = {n.decode() for n in await client.zrange(prefix + "repos", 0, -1)}
    listed = set()
    for name in names:
        async with client.pipeline(transaction=True) as pipe:
            pipe.hvals(await index._key(name, "blobs"))
            pipe.hvals(await index._key(name, "tagpushed"))
            pipe.zcard(await index._key(name, "tags"))
            pipe.hgetall(await index._key(name, "sum"))
            pipe.hlen(await index._key(name, "manifests"))
            for column in ("bytags", "bysize", "bypushed"):
                pipe.zscore(prefix + column, name)
            blobs, times, tags, total, manifests, *scores = await pipe.execute()
        pushed = [float(p) for p in times]
        if not total and not manifests:
            continue
        assert int(total[b"size"]) == sum(int(b) for b in blobs), name
        assert (float(total[b"pushed"]) if b"pushed" in total else None) == (
            max(pushed) if pushed else None
        ), name
        if manifests:
            listed.add(name)
            assert scores == [tags, int(total[b"size"]), max(pushed) if pushed else -math.inf]
    for column in ("listed", "bytags", "bysize", "bypushed"):
        members = {n.decode() for n in await client.zrange(prefix + column, 0, -1)}
        assert members == listed, column


@pytest.mark.slow  # 300 random writes on both backends, each checked against a count
def test_aggregates_agree_with_counting_through_random_writes(
    redis_addr: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same random pushes (tags moving, also back in time, which makes the latest push
    counted again), blob links replacing claimed sizes, tag deletes, manifest deletes,
    repository deletes and refreshes from a layout that differs, applied to both backends:
    after each, every aggregate is what counting gives, summaries are equal, and every sorted
    listing is the same from Redis as from SQLite."""
    flush_redis(redis_addr)
    sqlite = MetadataIndex(str(tmp_path / "differential.sqlite3"))
    redis = RedisIndex(lambda: redis_client(redis_addr, "", "", 0), namespace="aggregates")
    rng = random.Random(23)
    names = ["a", "a/x", "a/y", "ab", "b/z", "c"]
    pool = [digest_of(f"blob-{n}") for n in range(20)]
    size = {d: 100 + 37 * n for n, d in enumerate(pool)}
    layouts: dict[str, Any] = {}

    async def read_layout(storage: Store, name: str) -> Any:
        return layouts.get(name)

    monkeypatch.setattr(index_redis, "_read_layout", read_layout)
    monkeypatch.setattr(sqlite_module, "_read_layout", read_layout)

    def manifest(n: int, when: float) -> ManifestRecord:
        return ManifestRecord(digest_of(f"manifest-{n}"), MANIFEST, 10 + n, when)

    async def both(method: str, *args: Any) -> list[Any]:
        return [await getattr(i, method)(*args) for i in (sqlite, redis)]

    async def step(n: int) -> str:
        name = rng.choice(names)
        op = rng.choice(["push"] * 4 + ["link", "untag", "untag", "drop", "gone", "refresh"])
        if op == "push":
            when = 1000.0 + rng.choice([n, n, n - 50, 3.25])  # sometimes back in time
            record = manifest(rng.randrange(6), when)
            used = {d: size[d] for d in rng.sample(pool, rng.randrange(4))}
            used[record.digest] = record.size
            tags = rng.sample(["t1", "t2", "t3", "t4"], rng.randrange(4))
            await both("manifest_pushed", name, record, tags, used)
        elif op == "link":
            d = rng.choice(pool)
            await both("blob_linked", name, d, size[d] + rng.choice([0, 0, 5]))
        elif op == "untag":
            await both("tag_deleted", name, rng.choice(["t1", "t2", "t3", "t4"]))
        elif op == "drop":
            await both("manifest_deleted", name, manifest(rng.randrange(6), 0).digest)
        elif op == "gone":
            await both("repository_deleted", name)
        elif rng.random() < 0.2:
            layouts.pop(name, None)
            await both("refresh", None, name)
        else:
            records = {r.digest: r for r in (manifest(rng.randrange(6), 900.0) for _ in range(2))}
            first = next(iter(records))
            tags = [TagRecord(t, first, 800.0 + rng.randrange(3)) for t in ("t1", "t9")]
            blobs = {d: size[d] for d in rng.sample(pool, rng.randrange(5))}
            blobs.update({d: r.size for d, r in records.items()})
            layouts[name] = _LayoutRepository(tags[: rng.randrange(3)], records, blobs)
            await both("refresh", None, name)
        return f"{op} {name}"

    async def go() -> None:
        history = []
        for n in range(300):
            history.append(await step(n))
            await sqlite_aggregates_are_counts(sqlite)
            await redis_aggregates_are_counts(redis)
            for name in names:
                expected, got = await both("repository", name)
                assert got == expected, (name, history[-5:])
            for sort, descending in ORDERS:
                expected, got = await both("repositories_sorted", sort, descending, None, 100)
                assert got == expected, (sort, descending, history[-5:])
                assert got == sorted_as_listed(got, sort, descending)
        await sqlite.close()
        await redis.close()

    run(go())


def test_sqlite_aggregates_agree_with_counting_through_registry_operations(
    tmp_path: Path,
) -> None:
    """Through the registry itself on a real layout: pushes sharing layers, tags pushed again,
    blobs uploaded alone, tag and manifest deletes, refreshes, repository deletes and
    reindexes, in a random order."""
    rng = random.Random(77)
    index = MetadataIndex(str(tmp_path / "i.sqlite3"), scopes=("*",))
    registry = Registry(
        Store(FilesystemDriver(str(tmp_path / "store"), max_threads=8)),
        secret="s",
        delete_enabled=True,
        index=index,
    )
    names = ["a/x", "a/y", "b", "c/d/e"]
    layers = [os.urandom(rng.randrange(100, 3000)) for _ in range(5)]

    async def go() -> None:
        pushed: dict[str, list[Digest]] = {n: [] for n in names}
        for step in range(60):
            name = rng.choice(names)
            action = rng.random()
            if action < 0.45 or not pushed[name]:
                tags = rng.sample(["latest", "v1", f"s{step}"], rng.randrange(0, 3))
                chosen = rng.sample(layers, rng.randrange(1, 3))
                pushed[name].append(await push_image(registry, name, tags, chosen))
            elif action < 0.55:
                repo = registry.repository(name)
                session = await repo.uploads.start()
                data = os.urandom(rng.randrange(10, 500))

                async def body(data: bytes = data) -> Any:
                    yield data

                await repo.uploads.append(session, body())
                await repo.uploads.commit(session, Digest.from_bytes(data))
            elif action < 0.65:
                digest = pushed[name].pop(rng.randrange(len(pushed[name])))
                await registry.repository(name).manifests.delete(digest)
            elif action < 0.75:
                tags = await registry.repository(name).tags.all()
                if tags:
                    await registry.repository(name).tags.untag(rng.choice(tags))
            elif action < 0.82:
                await index.refresh(registry.storage, name)
            elif action < 0.88:
                await index.repository_deleted(name)
                pushed[name] = []
            else:
                await index.reindex(registry.storage)
            await sqlite_aggregates_are_counts(index)

    try:
        run(go())
    finally:
        run(registry.close())


# -- what a page costs ---------------------------------------------------------------------------


async def fill_sqlite(index: MetadataIndex, count: int) -> None:
    """``count`` listed repositories written straight into the tables (the triggers keep the
    aggregates): large tie groups in every column (a third untagged), and as many again
    without a manifest (never listed, never read)."""
    rng = random.Random(count)
    manifests, tags, blobs = [], [], []
    for n in range(count):
        name = f"repo-{n:06d}"
        digest = str(digest_of(name))
        manifests.append((name, digest, MANIFEST, 10, 1.0, None, None, None, ""))
        for t in range(rng.choice([0, 1, 1, 2])):
            tags.append((name, f"t{t}", digest, float(rng.randrange(3))))
        blobs.append((name, digest, rng.choice([100, 200])))
        blobs.append((f"unlisted-{n:06d}", digest, 5))

    def work(c: sqlite3.Connection) -> None:
        c.executemany("INSERT INTO manifests VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", manifests)
        c.executemany("INSERT INTO tags VALUES (?, ?, ?, ?)", tags)
        c.executemany("INSERT INTO blobs VALUES (?, ?, ?)", blobs)

    await index._write(work)


def test_a_sorted_page_costs_o_page_in_sqlite(tmp_path: Path) -> None:
    """Each page is a seek on the sort's index and ``limit`` rows: the SQLite VM executes about
    the same number of instructions for the first page, a page from the middle of a group of
    tied values, and the last, in every sort and direction, for 20 000 listed repositories
    (and as many unlisted) as for 1 000."""
    big = MetadataIndex(str(tmp_path / "big.sqlite3"))
    small = MetadataIndex(str(tmp_path / "small.sqlite3"))
    limit = 50

    async def steps_of(index: MetadataIndex, sort: str, desc: bool, after: Any) -> int:
        counted = [0]

        def counting() -> int:
            counted[0] += 1
            return 0

        await index._run(lambda c: c.set_progress_handler(counting, 1))
        page = await index.repositories_sorted(sort, desc, after, limit)
        await index._run(lambda c: c.set_progress_handler(None, 1))
        assert len(page) == limit
        return counted[0]

    async def positions(index: MetadataIndex, sort: str, desc: bool) -> list[Any]:
        """No key, the middle of the listing (inside a tie group), and a page before the
        end; by ``pushed`` also the middle of the untagged, and the page crossing into them."""
        everything = await index.repositories_sorted(sort, desc, None, 10**6)
        keys = [RepositoryKey.of(s, sort) for s in everything]
        chosen = [None, keys[len(keys) // 2], keys[-limit - 1]]
        if sort == "pushed":
            untagged = [n for n, s in enumerate(everything) if s.pushed is None]
            chosen += [keys[untagged[len(untagged) // 2]], keys[untagged[0] - limit // 2]]
        return chosen

    async def go() -> None:
        await fill_sqlite(big, 20_000)
        await fill_sqlite(small, 1_000)
        for sort, desc in ORDERS:
            steps = []
            for index in (big, small):
                for after in await positions(index, sort, desc):
                    steps.append(await steps_of(index, sort, desc, after))
            assert max(steps) < 1.5 * min(steps), (sort, desc, steps)
            # and it is the page: 50 rows take a few thousand instructions, not 20 000
            assert max(steps) < 100 * limit, (sort, desc, steps)
        await big.close()
        await small.close()

    run(go())


def test_a_sorted_page_costs_o_log_n_plus_page_in_redis(redis_addr: str) -> None:
    """Each page is a seek (two ZCOUNTs and a binary search by rank among the repositories of
    the key's score, one ZRANGE of one entry per step) and one ZRANGE of the page: MONITOR
    shows no command reading more than the page, and a number of commands that grows with the
    logarithm of the number of repositories, not with it."""
    flush_redis(redis_addr)
    watcher = sync_redis(redis_addr)
    limit = 50

    async def commands_of(index: RedisIndex, sort: str, desc: bool, after: Any) -> list[list[str]]:
        marker = f"end-of-page-{os.urandom(4).hex()}"
        with watcher.monitor() as monitor:
            page = await index.repositories_sorted(sort, desc, after, limit)
            watcher.echo(marker)
            seen = []
            while marker not in (command := monitor.next_command())["command"]:
                if command["client_type"] == "lua":
                    seen.append(command["command"].split())
        assert len(page) == limit
        return seen

    async def go() -> None:
        for count in (10_000, 500):
            index = RedisIndex(lambda: redis_client(redis_addr, "", "", 0), namespace=str(count))
            rng = random.Random(count)
            pushes = []
            for n in range(count):
                name = f"repo-{n:06d}"
                record = ManifestRecord(digest_of(name), MANIFEST, 10, float(rng.randrange(3)))
                tags = ["t"] * rng.choice([0, 1, 1])
                pushes.append((name, record, tags, {record.digest: 100}))
            for start in range(0, count, 20):
                await asyncio.gather(
                    *(index.manifest_pushed(*push) for push in pushes[start : start + 20])
                )
            await index.repositories_sorted("name", limit=1)  # loads the scripts
            summaries = [
                RepositorySummary(name, len(tags), 1, 100, record.pushed if tags else None, None)
                for name, record, tags, _ in pushes
            ]
            for sort, desc in ORDERS:
                everything = sorted_as_listed(summaries, sort, desc)
                middle = RepositoryKey.of(everything[len(everything) // 2], sort)
                assert (
                    await index.repositories_sorted(sort, desc, middle, 3)
                    == (everything[len(everything) // 2 + 1 :][:3])
                )
                for after in (None, middle):
                    commands = await commands_of(index, sort, desc, after)
                    # the page: one ZRANGE(BYLEX) of ``limit`` entries (then each row's summary)
                    ranges = [c for c in commands if c[0] in RANGES]
                    wide = [c for c in ranges if c[0] != "ZRANGE" or c[2] != c[3]]
                    assert len(wide) == 1, wide
                    if wide[0][0] == "ZRANGE":
                        assert int(wide[0][3]) - int(wide[0][2]) + 1 == limit
                    else:
                        assert wide[0][-1] == str(limit)
                    seek = len(ranges) - 1 + sum(c[0] == "ZCOUNT" for c in commands)
                    assert seek <= 3 + 2 * math.log2(count), (sort, desc, seek)
                    per_row = (
                        len(commands)
                        - len(ranges)
                        - sum(
                            c[0] in ("ZCOUNT", "ZCARD") and c[1].endswith(f"by{sort}")
                            for c in commands
                        )
                    )
                    assert per_row <= 5 * limit
            await index.close()

    try:
        run(go())
    finally:
        watcher.close()


# -- an index written before the aggregates -----------------------------------------------------


def test_a_sqlite_index_of_schema_2_is_rebuilt_with_its_aggregates(tmp_path: Path) -> None:
    """An index file of the previous schema is dropped when opened and rebuilt from the layout
    by the verification that runs at start: sorted listings are complete again, and the pull
    times only the old index knew are kept."""
    path = str(tmp_path / "i.sqlite3")

    async def go() -> None:
        store = Store(FilesystemDriver(str(tmp_path / "store"), max_threads=8))
        registry = Registry(store, secret="s", delete_enabled=True, index=MetadataIndex(path))
        await push_image(registry, "a", ["1", "2"], [os.urandom(300)])
        await push_image(registry, "b", ["1"], [os.urandom(900)])
        assert registry.index is not None
        pulled = (await registry.index.tags("a"))[0]
        await registry.index.set_pulled("a", pulled.digest, 4242.0)
        before = await registry.index.repositories_sorted("size", True)
        await registry.close()
        with sqlite3.connect(path) as c:
            c.execute("UPDATE meta SET value='2' WHERE key='schema'")
            c.execute("DROP TABLE carried_manifests")  # schema 2 had none
        store = Store(FilesystemDriver(str(tmp_path / "store"), max_threads=8))
        index = MetadataIndex(path)
        assert await index.repositories_sorted("size", True) == []
        assert await index.verify(store) == ["a", "b"]
        after = await index.repositories_sorted("size", True)
        # tag push times come from the link files' times now: the push's to a second
        assert [replace(s, pushed=None) for s in after] == [replace(s, pushed=None) for s in before]
        for rebuilt, pushed in zip(after, before, strict=True):
            assert rebuilt.pushed is not None and pushed.pushed is not None
            assert abs(rebuilt.pushed - pushed.pushed) < 1.0
        await sqlite_aggregates_are_counts(index)
        # what only the old index knew came through: the pull time (retention reads it)
        assert (await index.tags("a"))[0].pulled == 4242.0
        await index.close()
        await store.close()

    run(go())


def test_a_redis_index_written_before_the_aggregates_lists_them_all(redis_addr: str) -> None:
    """A Redis index written by a version without the aggregates (no ``sum`` per repository,
    no sorted sets by column): the first sorted listing scores every listed repository, and a
    write to a repository not counted yet counts it before changing it."""
    flush_redis(redis_addr)
    index = RedisIndex(lambda: redis_client(redis_addr, "", "", 0), namespace="old")

    async def forget_aggregates() -> None:
        client = index._client()
        prefix = await index.prefix()
        keys = [k async for k in client.scan_iter(match=prefix + "r:*:sum")]
        await client.delete(*keys, *(prefix + k for k in ("bytags", "bysize", "bypushed")))
        await client.delete(prefix + "ranked")

    async def go() -> None:
        await populate(index, 40)
        expected = {o: await index.repositories_sorted(*o, None, 1000) for o in ORDERS}
        await forget_aggregates()
        for order, listing in expected.items():
            assert await index.repositories_sorted(*order, None, 1000) == listing
        await redis_aggregates_are_counts(index)

        await forget_aggregates()
        record = ManifestRecord(digest_of("new"), MANIFEST, 10, 9999.0)
        await index.manifest_pushed("ns1/app-0001", record, ["t0"], {record.digest: 5})
        await index.blob_linked("ns2/app-0002", digest_of("linked"), 50)
        await index.tag_deleted("ns3/app-0003", "t0")
        await index.manifest_deleted("ns4/app-0004", digest_of("m4"))
        await index.repositories_sorted("tags")
        await redis_aggregates_are_counts(index)
        summary = await index.repository("ns1/app-0001")
        assert summary is not None and summary.pushed == 9999.0

    run(go())


def test_unique_bytes_are_what_no_other_repository_uses(index: Index) -> None:
    async def go() -> None:
        x, y, z = (digest_of(n) for n in "xyz")
        for name, blobs in (("a", {x: 100, y: 20}), ("b", {y: 20, z: 3})):
            record = ManifestRecord(digest_of(name), MANIFEST, 10, 1000.0)
            await index.manifest_pushed(name, record, ["1"], {record.digest: 10, **blobs})
        assert await index.unique_bytes(["a", "b", "none"]) == {"a": 110, "b": 13, "none": 0}
        await index.repository_deleted("b")
        assert await index.unique_bytes(["a"]) == {"a": 130}  # y is a's alone now
        await index.blob_linked("c", x, 100)
        assert await index.unique_bytes(["a", "c"]) == {"a": 30, "c": 0}

    run(go())
