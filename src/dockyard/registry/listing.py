"""Pages of the two long listings, ``tags/list`` and ``_catalog``, at a cost that grows with the
page rather than with everything listed — without answering from the metadata index (the
registry:2 layout stays the truth: registry:2 may write the same store).

**Tags.** :class:`TagListings` keeps, per process, the sorted tag names of recently listed
repositories under the *version* of their ``_manifests/tags`` directory (device, inode,
modification and change times in ns: ``storage.driver.Version``). Every request stats the
directory once; if the version is the cached one, the names are those cached, and a page is a
bisection and a slice. Creating or removing a tag creates or removes an entry of that directory,
which sets its times, so a change made by any worker, process or registry:2 is seen by the very
next request anywhere — except that file times come from a coarse clock (a kernel tick; whole
seconds on some filesystems), so two changes within one tick can leave the times as they were.
Hence the "racy git" rule: a listing is cached only if the directory's modification time was at
least :data:`RACY_MARGIN_NS` older than the clock read just before the stat. Any change after
that stat is then stamped later than the cached time, so the version differs and the cache
misses. A listing taken while the directory is changing is served, not cached. On object
storage, which has no directories, every request lists the tags as before.

**Catalog.** :func:`catalog_page` walks ``repositories/`` best first: a heap of directories not
yet listed, each keyed by its path (no name below it sorts before it), and of names found.
What comes off the heap first is the smallest, so names come out in exactly the order of
``sorted()`` of the full names (which is not the order of a walk directory by directory:
``a-c`` sorts before ``a/b``), and the walk stops once it has one name more than the page. A
directory all of whose names sort at or before ``last`` is never listed. So a page costs the
directories on the way to ``last`` and those of the page, not the whole tree. On a filesystem
the walk runs on one thread (``Store.drive_listings``: an ``os.scandir`` per directory, no trip
through the event loop for each); on S3 each listing is one delimited request, several at once,
the same walk.
"""

from __future__ import annotations

import heapq
import threading
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dockyard.storage.driver import FastListings, ListingSteps, Version

if TYPE_CHECKING:
    from dockyard.storage.store import Store

#: A directory is trusted only when its modification time is this much older than the clock
#: read before its stat: more than a coarse kernel tick (1-10 ms) and than the one-second
#: timestamps of filesystems without finer ones, so that any later change is stamped later.
RACY_MARGIN_NS = 2 * 10**9
#: Tag names kept in all of one process's cached listings together (least recently used go
#: first). A name costs about 60-80 bytes (the str and its slot), so about 30 MB per worker.
CACHE_NAMES = 400_000


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a sorted listing; ``more`` says whether items follow ``items[-1]``."""

    items: list[str]
    more: bool


def page_of(items: Sequence[str], n: int | None, last: str | None) -> Page:
    """Items strictly after ``last`` (in sort order), at most ``n`` of them, from the sorted
    ``items``: a bisection and a slice. An empty page (``n=0``) never claims more: there is no
    last item to continue from."""
    start = bisect_right(items, last) if last else 0
    if n is None:
        return Page(list(items[start:]), False)
    # One more than the page, to know whether anything follows.
    window = list(items[start : start + n + 1])
    if len(window) <= n:
        return Page(window, False)
    return Page(window[:n], n > 0)


@dataclass(slots=True)
class _Listing:
    key: tuple[int, int, int, int]
    names: tuple[str, ...]


class TagListings:
    """Sorted tag names per repository, valid while their directory's version is unchanged
    (module docstring). One per Registry, so per worker process; bounded by ``max_names``."""

    def __init__(self, max_names: int = CACHE_NAMES, margin_ns: int = RACY_MARGIN_NS) -> None:
        self.max_names = max_names
        self.margin_ns = margin_ns
        self._entries: OrderedDict[str, _Listing] = OrderedDict()
        self._names = 0
        # Handlers run on one event loop, but a Registry may be shared by commands on threads.
        self._lock = threading.Lock()
        #: hits and misses, for tests and the benchmark's notes
        self.hits = 0
        self.misses = 0

    @property
    def size(self) -> int:
        """Names held now, across every cached repository."""
        return self._names

    def get(self, repository: str, version: Version) -> tuple[str, ...] | None:
        """The cached names if they were listed under this very version."""
        with self._lock:
            entry = self._entries.get(repository)
            if entry is None or entry.key != version.key:
                self.misses += 1
                return None
            self._entries.move_to_end(repository)
            self.hits += 1
            return entry.names

    def put(self, repository: str, version: Version, names: tuple[str, ...]) -> bool:
        """Keep ``names``, listed after the stat that gave ``version``, unless the directory
        changed too recently to be sure a later change will show (the racy rule) or the
        listing alone exceeds the budget. True if kept."""
        with self._lock:
            self._drop(repository)
            if version.mtime_ns >= version.now_ns - self.margin_ns or len(names) > self.max_names:
                return False
            self._entries[repository] = _Listing(version.key, names)
            self._names += len(names)
            while self._names > self.max_names:
                self._drop(next(iter(self._entries)))
            return True

    def forget(self, repository: str) -> None:
        with self._lock:
            self._drop(repository)

    def _drop(self, repository: str) -> None:
        entry = self._entries.pop(repository, None)
        if entry is not None:
            self._names -= len(entry.names)


# -- the catalog ----------------------------------------------------------------------------

#: directories listed at once when the next ones on the heap are all directories, where each
#: listing is a network round trip (object storage); at most this many minus one are listed
#: for nothing past the end of a page
WALK_BATCH = 16

#: what a directory holds to be a repository (registry:2's rule)
MARKER = "_manifests"


async def catalog_page(
    storage: Store,
    root: str,
    n: int | None,
    last: str | None,
    visible: Callable[[str], bool] | None = None,
) -> Page:
    """The names after ``last`` of the repositories under ``root`` (directories holding a
    ``_manifests`` directory; ``_``-prefixed directories are never names and never entered),
    the first ``n`` of those ``visible`` accepts, in ``sorted()`` order: what
    ``page_of(sorted(every name), n, last)`` gives, listing only what the page needs (on a
    filesystem all on one thread: ``Store.drive_listings``). ``visible`` must be pure: it may be
    called on another thread."""
    if n == 0:
        return Page([], False)
    # Listed on one thread, one directory at a time is cheapest: nothing is listed for nothing.
    batch = 1 if FastListings in storage.fast_paths else WALK_BATCH
    return await storage.drive_listings(catalog_steps(root, n, last, visible, batch))


def catalog_steps(
    root: str,
    n: int | None,
    last: str | None,
    visible: Callable[[str], bool] | None,
    batch_size: int = WALK_BATCH,
) -> ListingSteps[Page]:
    """:func:`catalog_page`'s walk: yields batches of up to ``batch_size`` directories, is sent
    their listings."""
    want = None if n is None else n + 1  # one more than the page: is anything after it?
    # (key, is_name): a name found, keyed by itself; or a directory not listed yet, keyed by its
    # path, which every name below it starts with and so sorts at or after. A directory and the
    # name it turns out to be share a key, but the name is pushed only once it is listed.
    heap: list[tuple[str, bool]] = [("", False)]
    found: list[str] = []

    def worth(name: str) -> bool:
        # The names at or below ``name`` are ``name`` and ``name/...``: some sort after
        # ``last`` iff ``name`` does not sort before it, or ``last`` continues ``name`` with a
        # character that ``/...`` can exceed ('/' itself or one below it, such as '-' and '.').
        if not last or name >= last:
            return True
        return last.startswith(name) and last[len(name)] <= "/"

    while heap and (want is None or len(found) < want):
        key, is_name = heapq.heappop(heap)
        if is_name:
            if (not last or key > last) and (visible is None or visible(key)):
                found.append(key)
            continue
        # The next directories too, while no name comes first: listed at once (concurrently
        # on object storage), though the page may end before them.
        batch = [key]
        while heap and len(batch) < batch_size and not heap[0][1]:
            batch.append(heapq.heappop(heap)[0])
        listings = yield [f"{root}/{d}" if d else root for d in batch]
        for directory, listed in zip(batch, listings, strict=True):
            prefix = f"{directory}/" if directory else ""
            for child in listed or ():  # None: gone meanwhile (a repository deleted), or a file
                if not child.is_dir:
                    continue
                if child.name == MARKER:
                    if directory:
                        heapq.heappush(heap, (directory, True))
                elif not child.name.startswith("_"):
                    path = prefix + child.name
                    if worth(path):
                        heapq.heappush(heap, (path, False))
    if want is None or len(found) < want:
        return Page(found, False)
    return Page(found[: want - 1], True)
