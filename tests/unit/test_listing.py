"""registry.listing: catalog pages from a walk that stops at the page's end, in exactly the
order and with exactly the pages of ``paginate(sorted(every name))``; tag lists cached under
their directory's version, never trusted when the directory changed within the racy margin."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dockyard.registry import layout
from dockyard.registry.listing import Page, TagListings, catalog_page, page_of
from dockyard.registry.repository import repository_dirs
from dockyard.registry.tags import TagStore
from dockyard.storage.driver import Child, FastListings, PathNotFound, Version
from dockyard.storage.filesystem import FilesystemDriver
from dockyard.storage.store import Store

# -- the catalog ------------------------------------------------------------------------------

#: names made of few characters so that prefixes collide, with '-' and '.' (below '/') and '_'
#: (above it), and ``_``-prefixed components that must never be names or entered
component = st.text(alphabet="ab-._", min_size=1, max_size=3).filter(lambda c: c not in (".", ".."))
paths = st.lists(st.lists(component, min_size=1, max_size=3).map("/".join), max_size=25)


class Tree:
    """An in-memory directory tree as a storage driver that can only list (the store then lists
    each batch of the walk concurrently), counting the listings."""

    name = "tree"

    def __init__(self) -> None:
        self.dirs: dict[str, dict[str, bool]] = {"": {}}
        self.listed = 0

    def add(self, path: str, is_dir: bool) -> None:
        parts = path.split("/")
        for i in range(len(parts)):
            parent, here = "/".join(parts[:i]), "/".join(parts[: i + 1])
            leaf = i == len(parts) - 1
            self.dirs.setdefault(parent, {})[parts[i]] = is_dir or not leaf
            if not leaf or is_dir:
                self.dirs.setdefault(here, {})

    async def list(self, path: str) -> list[Child]:
        self.listed += 1
        assert path == "/r" or path.startswith("/r/")
        found = self.dirs.get(path[3:])
        if found is None:
            raise PathNotFound(path)
        return [Child(name, is_dir) for name, is_dir in reversed(found.items())]

    def store(self) -> Store:
        return Store(self)  # type: ignore[arg-type]

    def names(self) -> list[str]:
        """The simple rule, read off the whole tree: a directory holding a ``_manifests``
        directory, no component of it ``_``-prefixed."""
        return sorted(
            d
            for d, kids in self.dirs.items()
            if d and kids.get("_manifests") and not any(p.startswith("_") for p in d.split("/"))
        )


def paginate(items: list[str], n: int | None, last: str | None) -> Page:
    """The reference the listings are checked against: items strictly after ``last`` (in
    sort order), at most ``n`` of them, read from the whole list (what the API answered before
    pages cost O(page)). An empty page (``n=0``) never claims more."""
    if last:
        items = [i for i in items if i > last]
    if n is None or len(items) <= n:
        return Page(items, False)
    return Page(items[:n], n > 0)


def build(repos: list[str], others: list[str], files: list[str]) -> Tree:
    tree = Tree()
    for repo in repos:
        tree.add(f"{repo}/_manifests/tags", True)
        tree.add(f"{repo}/_layers", True)
    for other in others:
        tree.add(other, True)
    for file in files:
        if file not in tree.dirs:
            tree.add(file, False)
    return tree


def lasts(names: list[str], extra: list[str]) -> list[str | None]:
    """Every name, each continued by characters on both sides of '/', and strays."""
    found: list[str | None] = [None, "", *extra]
    for name in names:
        found += [name, name + "-", name + "/", name + "0", name[:-1]]
    return found


@settings(max_examples=300, deadline=None)
@given(
    repos=paths,
    others=paths,
    files=paths,
    extra=st.lists(st.text(alphabet="ab-._/", max_size=6), max_size=4),
    hidden=st.sets(st.sampled_from("ab-._")),
)
def test_catalog_pages_are_those_of_the_sorted_full_list(
    repos: list[str], others: list[str], files: list[str], extra: list[str], hidden: set[str]
) -> None:
    tree = build(repos, others, files)
    everything = tree.names()

    def visible(name: str) -> bool:
        return name[-1] not in hidden

    async def check() -> None:
        store = tree.store()
        for last in lasts(everything, extra):
            for n in (None, 0, 1, 2, 3, 7):
                for only in (None, visible):
                    want = [x for x in everything if only is None or only(x)]
                    got = await catalog_page(store, "/r", n, last, only)
                    assert got == paginate(want, n, last), (n, last, only)

    asyncio.run(check())


def test_catalog_order_is_that_of_full_names() -> None:
    """'a-c' < 'a.b' < 'a/b' ('-' and '.' sort before '/'), though a walk directory by
    directory in sorted order would give 'a/b' right after 'a'."""
    tree = build(["a", "a/b", "a-c", "a.b", "a_b", "a/b-c", "a/b/c"], ["_x/y", "a/_z"], [])
    want = ["a", "a-c", "a.b", "a/b", "a/b-c", "a/b/c", "a_b"]
    assert tree.names() == want
    assert asyncio.run(catalog_page(tree.store(), "/r", None, None)).items == want


def test_a_page_lists_only_what_it_needs() -> None:
    """10,000 repositories under 100 directories: a page of 10 after a name in the middle
    lists the root, one parent (or two) and the page's repositories, give or take one batch
    of directories past the end — not 10,100 directories."""
    repos = [f"org-{i // 100:03d}/repo-{i:05d}" for i in range(10_000)]
    tree = build(repos, [], [])
    page = asyncio.run(catalog_page(tree.store(), "/r", 10, "org-050/repo-05049"))
    assert page.items == repos[5050:5060] and page.more
    assert tree.listed <= 40, tree.listed
    tree.listed = 0
    page = asyncio.run(catalog_page(tree.store(), "/r", 10, None))
    assert page.items == repos[:10]
    assert tree.listed <= 40, tree.listed


class ListOneByOne(FilesystemDriver):
    """The filesystem without its one-thread walk: the store lists each batch itself."""

    drive_listings = None  # type: ignore[assignment]


@pytest.mark.parametrize("driver", [FilesystemDriver, ListOneByOne])
def test_catalog_on_a_filesystem_equals_the_full_walk(
    tmp_path: Path, driver: type[FilesystemDriver]
) -> None:
    """The same on the filesystem driver (its one-thread walk, and the store's), against the
    full walk (``repository_dirs``); a file named ``_manifests`` does not make a repository."""
    root = tmp_path / "root"
    names = ["a", "a/b", "a-c", "a.b/x", "b_c", "z/y/x", "_hidden/q"]
    for name in names:
        (root / "docker/registry/v2/repositories" / name / "_manifests").mkdir(parents=True)
    (root / "docker/registry/v2/repositories/f").mkdir(parents=True)
    (root / "docker/registry/v2/repositories/f/_manifests").write_bytes(b"")

    async def check() -> None:
        store = Store(driver(str(root)))
        assert (FastListings in store.fast_paths) == (driver is FilesystemDriver)
        try:
            everything = await repository_dirs(store, ("_manifests",))
            assert everything == ["a", "a-c", "a.b/x", "a/b", "b_c", "z/y/x"]
            for last in [None, *everything, "a/", "zz"]:
                for n in (None, 0, 1, 2, 4):
                    got = await catalog_page(store, layout.REPOSITORIES, n, last)
                    assert got == paginate(everything, n, last)
        finally:
            await store.close()

    asyncio.run(check())


# -- pages of a sorted list -------------------------------------------------------------------


@given(
    items=st.lists(st.text(alphabet="ab-/", max_size=3), unique=True).map(sorted),
    n=st.none() | st.integers(min_value=0, max_value=5),
    last=st.none() | st.text(alphabet="ab-/", max_size=3),
)
def test_page_of_equals_paginate(items: list[str], n: int | None, last: str | None) -> None:
    assert page_of(tuple(items), n, last) == paginate(items, n, last)


# -- the tag cache ----------------------------------------------------------------------------

SECOND = 10**9


def version(key: int, mtime_ns: int, now_ns: int) -> Version:
    return Version((1, key, mtime_ns, mtime_ns), mtime_ns, now_ns)


def test_racy_listing_is_not_cached() -> None:
    """A listing whose directory changed within the margin before the stat is served but not
    kept: a change in the same clock tick could leave the directory's times as they were."""
    listings = TagListings(margin_ns=2 * SECOND)
    now = time.time_ns()
    assert not listings.put("r", version(1, now - SECOND, now), ("a",))
    assert listings.get("r", version(1, now - SECOND, now)) is None
    assert not listings.put("r", version(1, now, now), ("a",))
    assert listings.size == 0
    assert listings.put("r", version(1, now - 3 * SECOND, now), ("a",))
    assert listings.get("r", version(1, now - 3 * SECOND, now + SECOND)) == ("a",)
    # Another version (another inode, time, change time): a miss, and the entry is replaced.
    assert listings.get("r", version(2, now - 3 * SECOND, now)) is None
    assert not listings.put("r", version(3, now, now), ("a", "b"))
    assert listings.size == 0 and listings.get("r", version(1, now - 3 * SECOND, now)) is None


def test_cache_is_bounded_least_recently_used_first() -> None:
    listings = TagListings(max_names=5, margin_ns=0)
    old = version(1, 0, 10 * SECOND)
    assert listings.put("a", old, ("1", "2"))
    assert listings.put("b", old, ("1", "2"))
    assert listings.get("a", old) is not None  # b is now the least recently used
    assert listings.put("c", old, ("1", "2"))
    assert listings.size == 4
    assert listings.get("b", old) is None and listings.get("a", old) is not None
    assert not listings.put("huge", old, tuple("123456"))
    assert listings.size == 4


def _tag(root: Path, repo: str, tag: str) -> None:
    (root / "docker/registry/v2/repositories" / repo / "_manifests/tags" / tag / "current").mkdir(
        parents=True
    )


def test_tag_store_caches_a_still_directory_and_sees_every_change(tmp_path: Path) -> None:
    """On the filesystem: a listing of a directory changed just now is not cached; one of a
    directory left alone is, and then a page is served from the cache until a tag is created
    or removed (by anyone: here directly on disk), which the very next page shows."""
    root = tmp_path / "root"
    tags_dir = root / "docker/registry/v2/repositories/r/_manifests/tags"
    for tag in ("b", "a", "c"):
        _tag(root, "r", tag)

    def back_date() -> None:
        old = time.time() - 10
        os.utime(tags_dir, (old, old))

    async def check() -> None:
        store = Store(FilesystemDriver(str(root)))
        listings = TagListings()
        tags = TagStore("r", store, None, listings)
        try:
            assert (await tags.page(2, None)).items == ["a", "b"]
            assert listings.size == 0  # just written: racy
            back_date()
            assert (await tags.page(2, "a")).items == ["b", "c"]
            assert listings.size == 3
            hits = listings.hits
            assert (await tags.page(1, "b")).items == ["c"]
            assert listings.hits == hits + 1
            _tag(root, "r", "bb")
            assert (await tags.page(2, "b")).items == ["bb", "c"]
            assert listings.size == 0  # relisted, changed just now: not kept
            back_date()
            assert await tags.all() == ["a", "b", "bb", "c"] and listings.size == 4
            for tag in ("a", "bb"):
                await store.delete(layout.tag_dir("r", tag))
                assert tag not in await tags.all()
            assert await tags.all() == ["b", "c"]
            await store.delete(layout.tags_dir("r"))
            assert await tags.all() == []
        finally:
            await store.close()

    asyncio.run(check())


def test_without_directory_versions_every_page_lists(tmp_path: Path) -> None:
    """A backend without directory times (object storage) lists every time: nothing cached."""

    class NoVersions(FilesystemDriver):
        directory_version = None  # type: ignore[assignment]

    root = tmp_path / "root"
    _tag(root, "r", "a")
    old = time.time() - 10
    os.utime(root / "docker/registry/v2/repositories/r/_manifests/tags", (old, old))

    async def check() -> None:
        store = Store(NoVersions(str(root)))
        listings = TagListings()
        tags = TagStore("r", store, None, listings)
        try:
            assert await store.directory_version(layout.tags_dir("r")) is None
            assert (await tags.page(None, None)).items == ["a"]
            assert listings.size == 0 and listings.hits == listings.misses == 0
        finally:
            await store.close()

    asyncio.run(check())


def test_network_filesystems_list_every_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a filesystem whose clients may answer a stat from an attribute cache (NFS), a
    directory's times can lag another host's change: no versions there, so no cache."""
    from dockyard.storage import filesystem_calls

    assert filesystem_calls.filesystem_type("/proc/self") == "proc"
    monkeypatch.setattr(filesystem_calls, "filesystem_type", lambda path: "nfs4")
    root = tmp_path / "root"
    _tag(root, "r", "a")
    os.utime(root / "docker/registry/v2/repositories/r/_manifests/tags", (time.time() - 10,) * 2)

    async def check() -> None:
        store = Store(FilesystemDriver(str(root)))
        listings = TagListings()
        try:
            assert await store.directory_version(layout.tags_dir("r")) is None
            tags = TagStore("r", store, None, listings)
            assert await tags.all() == ["a"] and listings.size == 0
        finally:
            await store.close()

    asyncio.run(check())


@pytest.mark.parametrize("count", [0, 1, 300])
def test_all_returns_a_fresh_list(tmp_path: Path, count: int) -> None:
    """Callers may change what ``all`` returns without touching the cache."""
    root = tmp_path / "root"
    for i in range(count):
        _tag(root, "r", f"t{i:03d}")
    tags_dir = root / "docker/registry/v2/repositories/r/_manifests/tags"
    if count:
        os.utime(tags_dir, (time.time() - 10,) * 2)

    async def check() -> None:
        store = Store(FilesystemDriver(str(root)))
        tags = TagStore("r", store, None, TagListings())
        try:
            first = await tags.all()
            first.clear()
            assert len(await tags.all()) == count
        finally:
            await store.close()

    asyncio.run(check())
