"""The metadata index: per repository its tags (sorted, with digest and push time), its
manifests (size, push and pull times, subject, children) and the blobs it uses (for usage per
repository and per namespace), in one SQLite file.

It is derived data. registry:2's layout stays the truth: the registry API never answers from the
index, and ``dockyard reindex`` rebuilds it from the layout (keeping the pull times, which only
the index holds). What it serves: sorted, paged listings that cost O(page) (the JSON API and the
web UI), snapshots for retention, usage for quotas and ``du``.

How it stays true:

- Dockyard's own writes update it before the client's request is answered (a push's manifest,
  tags and blob links, a delete), in one transaction, so every worker of the instance reads
  what any of them wrote (SQLite in WAL mode, one file shared by the workers).
- A failed index write never fails the request: the repository is marked stale and is refreshed
  from the layout by the next verification.
- Pulls are counted in memory and written in one transaction every ``index.pullflush`` seconds
  (no write on the pull path); a crash loses at most that long of pull times.
- Verification (at start and every ``index.verifyinterval``) compares each repository's tags,
  revisions and layer links in the layout with the index and refreshes those that differ: what
  registry:2, a restore from backup or a hand edit changed appears within that interval.

Why SQLite: ordered keys (``WHERE tag > ? ORDER BY tag LIMIT n`` on the primary key is a seek
and a page), transactions shared safely by the worker processes of one host, and it ships with
Python. Calls run on one thread per process, so the event loop never waits on the file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from dockyard.errors import RegistryError
from dockyard.oci.digest import Digest
from dockyard.oci.manifest import read_stored
from dockyard.registry import inventory, layout
from dockyard.registry.blobs import BlobStore, read_link
from dockyard.registry.records import (
    REPOSITORY_SORTS,
    ManifestRecord,
    RepositoryKey,
    RepositorySnapshot,
    TagRecord,
    record_of,
)
from dockyard.storage.driver import PathNotFound
from dockyard.storage.store import Store

log = logging.getLogger("dockyard.index")

T = TypeVar("T")

#: bumped when the schema changes: an index of another version is rebuilt from the layout
SCHEMA_VERSION = 3

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS repositories (
    name TEXT PRIMARY KEY,
    stale INTEGER NOT NULL DEFAULT 0,
    -- bumped by every write of the repository: a refresh applies what it read of the layout
    -- only if no write came meanwhile (it would erase that write)
    version INTEGER NOT NULL DEFAULT 0,
    -- its aggregates, kept by the triggers below: its number of tags and of manifests, the
    -- sum of its blobs' sizes, its latest tag push (NULL without tags)
    tags INTEGER NOT NULL DEFAULT 0,
    manifests INTEGER NOT NULL DEFAULT 0,
    size INTEGER NOT NULL DEFAULT 0,
    pushed REAL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tags (
    repository TEXT NOT NULL,
    tag TEXT NOT NULL,
    digest TEXT NOT NULL,
    pushed REAL NOT NULL,
    PRIMARY KEY (repository, tag)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS manifests (
    repository TEXT NOT NULL,
    digest TEXT NOT NULL,
    media_type TEXT NOT NULL,
    size INTEGER NOT NULL,
    pushed REAL NOT NULL,
    pulled REAL,
    subject TEXT,
    artifact_type TEXT,
    children TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (repository, digest)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS blobs (
    repository TEXT NOT NULL,
    digest TEXT NOT NULL,
    size INTEGER NOT NULL,
    PRIMARY KEY (repository, digest)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS uploads (
    repository TEXT NOT NULL,
    id TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    PRIMARY KEY (repository, id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS tags_by_digest ON tags (repository, digest);
-- What an index of another schema knew that the layout does not (when each manifest was last
-- pulled, and pushed as the index saw it), kept when that index is dropped, until the rebuild
-- of each repository takes it back (``_replace_entry``): retention's "pulled within" must not
-- see every manifest as never pulled after an upgrade.
CREATE TABLE IF NOT EXISTS carried_manifests (
    repository TEXT NOT NULL,
    digest TEXT NOT NULL,
    pushed REAL NOT NULL,
    pulled REAL,
    PRIMARY KEY (repository, digest)
) WITHOUT ROWID;
-- The listed repositories (those with a manifest) by each sort of ``repositories_sorted``: a
-- page in either direction is a seek on (value, name) and the page's rows.
CREATE INDEX IF NOT EXISTS repositories_listed ON repositories (name) WHERE manifests > 0;
CREATE INDEX IF NOT EXISTS repositories_by_tags ON repositories (tags, name) WHERE manifests > 0;
CREATE INDEX IF NOT EXISTS repositories_by_size ON repositories (size, name) WHERE manifests > 0;
CREATE INDEX IF NOT EXISTS repositories_by_pushed ON repositories (pushed, name)
    WHERE manifests > 0;
-- The repositories' aggregates. An insert creates the repository's row if it has none. The
-- latest tag push is counted again from the repository's tags (a range of their primary key)
-- only when the tag that held it goes or moves back; NULL stays NULL while a repository's
-- tags are deleted wholesale (``_clear``, which sets it first: no recount per row).
CREATE TRIGGER IF NOT EXISTS repository_tag_in AFTER INSERT ON tags BEGIN
    INSERT INTO repositories (name, tags, pushed) VALUES (NEW.repository, 1, NEW.pushed)
        ON CONFLICT (name) DO UPDATE
        SET tags = tags + 1, pushed = max(coalesce(pushed, excluded.pushed), excluded.pushed);
END;
CREATE TRIGGER IF NOT EXISTS repository_tag_moved AFTER UPDATE OF pushed ON tags BEGIN
    UPDATE repositories SET pushed = CASE
        WHEN pushed IS NULL OR NEW.pushed >= OLD.pushed OR pushed > OLD.pushed
            THEN max(coalesce(pushed, NEW.pushed), NEW.pushed)
        ELSE (SELECT max(t.pushed) FROM tags t WHERE t.repository = NEW.repository) END
        WHERE name = NEW.repository;
END;
CREATE TRIGGER IF NOT EXISTS repository_tag_out AFTER DELETE ON tags BEGIN
    UPDATE repositories SET tags = tags - 1, pushed = CASE
        WHEN pushed IS NULL OR pushed > OLD.pushed THEN pushed
        ELSE (SELECT max(t.pushed) FROM tags t WHERE t.repository = OLD.repository) END
        WHERE name = OLD.repository;
END;
CREATE TRIGGER IF NOT EXISTS repository_manifest_in AFTER INSERT ON manifests BEGIN
    INSERT INTO repositories (name, manifests) VALUES (NEW.repository, 1)
        ON CONFLICT (name) DO UPDATE SET manifests = manifests + 1;
END;
CREATE TRIGGER IF NOT EXISTS repository_manifest_out AFTER DELETE ON manifests BEGIN
    UPDATE repositories SET manifests = manifests - 1 WHERE name = OLD.repository;
END;
CREATE TRIGGER IF NOT EXISTS repository_blob_in AFTER INSERT ON blobs BEGIN
    INSERT INTO repositories (name, size) VALUES (NEW.repository, NEW.size)
        ON CONFLICT (name) DO UPDATE SET size = size + excluded.size;
END;
CREATE TRIGGER IF NOT EXISTS repository_blob_resized AFTER UPDATE OF size ON blobs BEGIN
    UPDATE repositories SET size = size + NEW.size - OLD.size WHERE name = NEW.repository;
END;
CREATE TRIGGER IF NOT EXISTS repository_blob_out AFTER DELETE ON blobs BEGIN
    UPDATE repositories SET size = size - OLD.size WHERE name = OLD.repository;
END;
-- Quota scopes' tallies, kept by triggers on ``blobs`` so that a scope's usage is one row
-- read, whatever its size: per tracked scope (the repositories in [lo, hi)) each blob with
-- the number of its repositories using it, and the scope's total.
CREATE TABLE IF NOT EXISTS scopes (
    scope TEXT PRIMARY KEY,
    lo TEXT NOT NULL,
    hi TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS scope_blobs (
    scope TEXT NOT NULL,
    digest TEXT NOT NULL,
    size INTEGER NOT NULL,
    refs INTEGER NOT NULL,
    PRIMARY KEY (scope, digest)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS scope_totals (
    scope TEXT PRIMARY KEY,
    bytes INTEGER NOT NULL,
    blobs INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS blob_used AFTER INSERT ON blobs BEGIN
    INSERT INTO scope_blobs (scope, digest, size, refs)
        SELECT scope, NEW.digest, NEW.size, 1 FROM scopes
        WHERE NEW.repository >= lo AND NEW.repository < hi
        ON CONFLICT (scope, digest) DO UPDATE
        SET refs = refs + 1, size = max(size, excluded.size);
END;
CREATE TRIGGER IF NOT EXISTS blob_resized AFTER UPDATE OF size ON blobs BEGIN
    UPDATE scope_blobs SET size = max(size, NEW.size)
        WHERE digest = NEW.digest AND scope IN (
            SELECT scope FROM scopes WHERE NEW.repository >= lo AND NEW.repository < hi
        );
END;
CREATE TRIGGER IF NOT EXISTS blob_unused AFTER DELETE ON blobs BEGIN
    UPDATE scope_blobs SET refs = refs - 1
        WHERE digest = OLD.digest AND scope IN (
            SELECT scope FROM scopes WHERE OLD.repository >= lo AND OLD.repository < hi
        );
    DELETE FROM scope_blobs WHERE digest = OLD.digest AND refs <= 0;
END;
CREATE TRIGGER IF NOT EXISTS tally_in AFTER INSERT ON scope_blobs BEGIN
    UPDATE scope_totals SET bytes = bytes + NEW.size, blobs = blobs + 1
        WHERE scope = NEW.scope;
END;
CREATE TRIGGER IF NOT EXISTS tally_resized AFTER UPDATE OF size ON scope_blobs BEGIN
    UPDATE scope_totals SET bytes = bytes + NEW.size - OLD.size WHERE scope = NEW.scope;
END;
CREATE TRIGGER IF NOT EXISTS tally_out AFTER DELETE ON scope_blobs BEGIN
    UPDATE scope_totals SET bytes = bytes - OLD.size, blobs = blobs - 1 WHERE scope = OLD.scope;
END;
"""


def _statements(script: str) -> list[str]:
    """``script`` as statements (a trigger's body holds ``;`` too), to run in a transaction:
    ``executescript`` would commit first."""
    statements, buffer = [], ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            statements.append(buffer.strip())
            buffer = ""
    return statements


_STATEMENTS = _statements(_SCHEMA)


@dataclass(frozen=True, slots=True)
class RepositorySummary:
    name: str
    tags: int
    manifests: int
    #: bytes of the distinct blobs the repository uses (manifests, configs, layers, links)
    size: int
    #: the latest tag push, None for a repository without tags
    pushed: float | None
    pulled: float | None


@dataclass(frozen=True, slots=True)
class Usage:
    scope: str
    #: bytes of the distinct blobs used within the scope (each counted once) plus ``uploading``
    bytes: int
    blobs: int
    repositories: int
    #: bytes of uploads in progress (received or reserved by a request being received)
    uploading: int = 0


@dataclass(frozen=True, slots=True)
class QuotaExceeded:
    """What refused a reservation: the scope, its limit, what it uses, what was asked for."""

    scope: str
    limit: int
    used: int
    wanted: int


def scope_condition(scope: str) -> tuple[str, tuple[str, ...]]:
    """SQL condition and parameters selecting the repositories of ``scope``: ``team-a/*`` is
    every repository under ``team-a/``, ``*`` every repository, anything else one name."""
    if scope == "*":
        return "1", ()
    if scope.endswith("/*"):
        prefix = scope[:-1]
        # A range on the primary key rather than LIKE: names may hold '%' and '_' literally.
        return "repository >= ? AND repository < ?", (prefix, prefix[:-1] + chr(ord("/") + 1))
    return "repository = ?", (scope,)


class Index(Protocol):
    """What the registry, quotas, retention, ``du`` and ``reindex`` use of a metadata index; two
    backends with the same semantics: :class:`MetadataIndex` (SQLite, shared by the workers of
    one host) and :class:`dockyard.registry.index_redis.RedisIndex` (Redis, shared by every
    instance of an S3 + Redis deployment). ``registry.configured.open_index`` picks one."""

    pull_flush: float

    async def manifest_pushed(
        self, name: str, record: ManifestRecord, tags: Iterable[str], blobs: dict[Digest, int]
    ) -> None: ...
    async def blob_linked(self, name: str, digest: Digest, size: int) -> None: ...
    async def tag_deleted(self, name: str, tag: str) -> None: ...
    async def manifest_deleted(self, name: str, digest: Digest) -> None: ...
    async def repository_deleted(self, name: str) -> None: ...
    def note_pull(self, name: str, digest: Digest | str, when: float | None = None) -> None: ...
    async def flush_pulls(self) -> None: ...
    async def set_pulled(self, name: str, digest: Digest, when: float) -> None: ...
    async def run_pull_flusher(self) -> None: ...
    async def tags(
        self, name: str, after: str | None = None, limit: int = 100, contains: str = ""
    ) -> list[TagRecord]:
        """Up to ``limit`` tags of ``name`` after ``after``, sorted; with ``contains``, only
        the tags holding it."""
        ...

    async def snapshot(self, name: str) -> RepositorySnapshot: ...
    async def repositories(
        self,
        after: str | None = None,
        limit: int | None = None,
        keep: Callable[[str], bool] | None = None,
    ) -> list[RepositorySummary]: ...
    async def repositories_sorted(
        self,
        sort: str = "name",
        descending: bool = False,
        after: RepositoryKey | tuple[Any, str] | None = None,
        limit: int = 100,
        keep: Callable[[str], bool] | None = None,
        contains: str = "",
    ) -> list[RepositorySummary]:
        """Up to ``limit`` repositories with at least one manifest, sorted by ``sort`` (one
        of :data:`~dockyard.registry.records.REPOSITORY_SORTS`), after ``after`` (the
        :class:`~dockyard.registry.records.RepositoryKey` of the previous page's last row, or
        the same as a ``(value, name)`` tuple).

        The order is (value, name) ascending, or both descending: ties go by name (compared
        byte by byte) in the direction of the sort. Sorted by ``pushed``, the repositories
        without tags (``pushed`` None) come after all the others in both directions, among
        themselves by name in the direction of the sort. With ``keep`` (called on the
        index's side: quick and thread-safe), only the names it accepts: those it refuses are
        read past in the same scan and never summarised. A page costs a seek and the rows read
        (the page and the names refused), however many repositories there are. ValueError for
        an unknown sort or a key that is not one of that sort."""
        ...

    async def manifests(
        self, name: str, digests: Iterable[Digest]
    ) -> dict[Digest, ManifestRecord]: ...
    async def repository(self, name: str) -> RepositorySummary | None: ...
    async def usage(self, scope: str) -> Usage: ...
    async def tally(self, scopes: Iterable[str]) -> None: ...
    async def unique_bytes(self, names: Iterable[str]) -> dict[str, int]:
        """For each of ``names``, the bytes of its blobs that no other repository uses (what
        deleting it alone would let a collection reclaim), read from the registry's tally
        (``*``, kept from now on): a seek per blob of each repository."""
        ...

    async def reserve(
        self,
        name: str,
        upload: str,
        total: int,
        limits: list[tuple[str, int]],
        digest: Digest | None = None,
    ) -> QuotaExceeded | None: ...
    async def release(self, name: str, upload: str, total: int | None = None) -> None: ...
    async def contents(self) -> dict[str, Any]: ...
    async def refresh(self, storage: Store, name: str) -> bool: ...
    async def indexed_repositories(self) -> set[str]: ...
    async def reindex(self, storage: Store) -> list[str]: ...
    async def verify(self, storage: Store) -> list[str]: ...
    async def run_verifier(self, storage: Store, interval: float, first_delay: float) -> None: ...
    async def close(self) -> None: ...


class MetadataIndex:
    """The index of one store, in the SQLite file at ``path`` (``":memory:"`` for a private
    one in tests). Safe to share between the worker processes of one host; each process opens
    its own connection on its own thread (after a fork, a new one)."""

    def __init__(self, path: str, *, pull_flush: float = 5.0, scopes: Iterable[str] = ()) -> None:
        self.path = path
        self.pull_flush = pull_flush
        #: the quota scopes whose usage is tallied (kept by triggers; any other scope's
        #: usage is counted when asked)
        self.scopes = tuple(sorted(set(scopes)))
        #: (repository, digest) -> latest pull time not yet written
        self._pulls: dict[tuple[str, str], float] = {}
        self._pid = -1
        self._executor: ThreadPoolExecutor | None = None
        self._local = threading.local()
        #: uploads counted whose session the last verification found gone
        self._missing_uploads: set[tuple[str, str]] = set()

    # -- plumbing -------------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            if self.path != ":memory:":
                os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            _use_wal(conn)
            # Derived data: losing the last transactions on a power cut costs a refresh, not
            # data; a sync per push would cost every push.
            conn.execute("PRAGMA synchronous=NORMAL")
            # INSERT OR REPLACE on blobs must fire the delete trigger of the row it replaces,
            # or a scope's tally would count the blob twice.
            conn.execute("PRAGMA recursive_triggers=ON")
            # Every worker opens the file at once on a fresh start: the schema is checked and
            # made in one exclusive transaction, so none sees another's half-made one.
            conn.execute("BEGIN IMMEDIATE")
            try:
                carried = _replace_other_schema(conn)
                for statement in _STATEMENTS:
                    conn.execute(statement)
                conn.executemany(
                    "INSERT OR REPLACE INTO carried_manifests VALUES (?, ?, ?, ?)", carried
                )
                conn.execute(
                    "INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),)
                )
                _track_scopes(conn, self.scopes)
            except BaseException:
                conn.execute("ROLLBACK")
                conn.close()
                raise
            conn.execute("COMMIT")
            self._local.conn = conn
        return conn

    def _run(self, work: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        if self._pid != os.getpid() or self._executor is None:
            # A forked worker gets its own thread (threads do not survive fork) and so its
            # own connection (SQLite connections must not cross a fork).
            self._pid = os.getpid()
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="dockyard-index")
            self._local = threading.local()
        return asyncio.get_running_loop().run_in_executor(
            self._executor, lambda: work(self._connection())
        )

    def _write(self, work: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        def transaction(conn: sqlite3.Connection) -> T:
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = work(conn)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return result

        return self._run(transaction)

    async def _safely(self, name: str, work: Callable[[sqlite3.Connection], Any]) -> None:
        """A write on a client's path: a failure marks the repository stale for the next
        verification instead of failing the request (the layout has the truth already)."""
        try:
            await self._write(work)
        except sqlite3.Error as exc:
            log.error(
                "index write for %s failed (refreshed at the next verification): %s", name, exc
            )
            with contextlib.suppress(sqlite3.Error):
                await self._write(
                    lambda c: c.execute(
                        "INSERT INTO repositories (name, stale) VALUES (?, 1) "
                        "ON CONFLICT(name) DO UPDATE SET stale=1, version=version+1",
                        (name,),
                    )
                )

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.flush_pulls()
        executor = self._executor
        if executor is not None and self._pid == os.getpid():

            def close_connection() -> None:
                conn = getattr(self._local, "conn", None)
                if conn is not None:
                    conn.close()
                    self._local.conn = None

            with contextlib.suppress(RuntimeError):
                await asyncio.get_running_loop().run_in_executor(executor, close_connection)
            executor.shutdown(wait=False)
        self._executor = None

    # -- what the registry's writes tell it -----------------------------------------------

    async def manifest_pushed(
        self, name: str, record: ManifestRecord, tags: Iterable[str], blobs: dict[Digest, int]
    ) -> None:
        """A manifest stored in ``name`` and ``tags`` pointed at it, all at ``record.pushed``;
        ``blobs`` (digest -> size) are the blobs it makes the repository use: the manifest's
        own bytes and what it references."""
        tags = list(tags)

        def work(c: sqlite3.Connection) -> None:
            _touch(c, name)
            _put_manifest(c, name, record, keep_times=True)
            for tag in tags:
                # an update, not a replace: the latest push of the repository moves without
                # a recount
                c.execute(
                    "INSERT INTO tags VALUES (?, ?, ?, ?) ON CONFLICT (repository, tag) "
                    "DO UPDATE SET digest = excluded.digest, pushed = excluded.pushed",
                    (name, tag, str(record.digest), record.pushed),
                )
            rows = [(name, str(d), s) for d, s in blobs.items()]
            c.executemany("INSERT OR IGNORE INTO blobs VALUES (?, ?, ?)", rows)

        await self._safely(name, work)

    async def blob_linked(self, name: str, digest: Digest, size: int) -> None:
        def work(c: sqlite3.Connection) -> None:
            _touch(c, name)
            # The stored size is the truth; it replaces a size a manifest's descriptor claimed.
            c.execute("INSERT OR REPLACE INTO blobs VALUES (?, ?, ?)", (name, str(digest), size))

        await self._safely(name, work)

    async def tag_deleted(self, name: str, tag: str) -> None:
        def work(c: sqlite3.Connection) -> None:
            _touch(c, name)
            c.execute("DELETE FROM tags WHERE repository=? AND tag=?", (name, tag))

        await self._safely(name, work)

    async def manifest_deleted(self, name: str, digest: Digest) -> None:
        """The manifest and the tags that pointed at it are gone; the blobs it used are still
        linked (registry:2 keeps ``_layers`` links until garbage collection), so usage stays
        until the collector's refresh."""

        def work(c: sqlite3.Connection) -> None:
            _touch(c, name)
            c.execute("DELETE FROM tags WHERE repository=? AND digest=?", (name, str(digest)))
            c.execute("DELETE FROM manifests WHERE repository=? AND digest=?", (name, str(digest)))

        await self._safely(name, work)

    async def repository_deleted(self, name: str) -> None:
        def work(c: sqlite3.Connection) -> None:
            _clear(c, name)
            c.execute("DELETE FROM uploads WHERE repository=?", (name,))
            c.execute("DELETE FROM repositories WHERE name=?", (name,))

        await self._write(work)

    def note_pull(self, name: str, digest: Digest | str, when: float | None = None) -> None:
        """A pull of a manifest: kept in memory until the next flush (no write on the pull
        path)."""
        self._pulls[(name, str(digest))] = time.time() if when is None else when

    async def flush_pulls(self) -> None:
        if not self._pulls:
            return
        pulls, self._pulls = self._pulls, {}
        rows = [(when, name, digest) for (name, digest), when in pulls.items()]

        def work(c: sqlite3.Connection) -> None:
            # max(): another worker may have written a later pull of the same manifest.
            c.executemany(
                "UPDATE manifests SET pulled = max(coalesce(pulled, 0), ?) "
                "WHERE repository=? AND digest=?",
                rows,
            )

        try:
            await self._write(work)
        except sqlite3.Error as exc:
            log.warning("writing %d pull times failed (they are lost): %s", len(rows), exc)

    async def set_pulled(self, name: str, digest: Digest, when: float) -> None:
        """Set a manifest's last pull time (tests and imports; pulls go through
        :meth:`note_pull`)."""
        await self._write(
            lambda c: c.execute(
                "UPDATE manifests SET pulled=? WHERE repository=? AND digest=?",
                (when, name, str(digest)),
            )
        )

    async def run_pull_flusher(self) -> None:
        """Write the pulls noted in this process every ``pull_flush`` seconds, until
        cancelled (and once more then)."""
        try:
            while True:
                await asyncio.sleep(self.pull_flush)
                await self.flush_pulls()
        finally:
            with contextlib.suppress(Exception):
                await asyncio.shield(self.flush_pulls())

    # -- reads ----------------------------------------------------------------------------

    async def tags(
        self, name: str, after: str | None = None, limit: int = 100, contains: str = ""
    ) -> list[TagRecord]:
        """Up to ``limit`` tags of ``name`` after ``after``, sorted: a seek on the primary key
        and ``limit`` rows, however many tags there are. With ``contains``, the tags holding
        it: the rows refused are read past in SQLite, never built into records."""

        search, wanted = ("AND instr(t.tag, ?) > 0 ", (contains,)) if contains else ("", ())

        def work(c: sqlite3.Connection) -> list[TagRecord]:
            rows = c.execute(
                "SELECT t.tag, t.digest, t.pushed, m.pulled FROM tags t "
                "LEFT JOIN manifests m ON m.repository = t.repository AND m.digest = t.digest "
                f"WHERE t.repository = ? AND t.tag > ? {search}ORDER BY t.tag LIMIT ?",
                (name, after or "", *wanted, limit),
            ).fetchall()
            return [TagRecord(r[0], Digest.parse(r[1]), r[2], r[3]) for r in rows]

        return await self._run(work)

    async def snapshot(self, name: str) -> RepositorySnapshot:
        def work(c: sqlite3.Connection) -> RepositorySnapshot:
            snap = RepositorySnapshot(name)
            for row in c.execute(
                "SELECT digest, media_type, size, pushed, pulled, subject, artifact_type, "
                "children FROM manifests WHERE repository=?",
                (name,),
            ):
                record = _manifest_from_row(row)
                snap.manifests[record.digest] = record
            for tag, digest, pushed in c.execute(
                "SELECT tag, digest, pushed FROM tags WHERE repository=? ORDER BY tag", (name,)
            ):
                m = snap.manifests.get(Digest.parse(digest))
                snap.tags.append(
                    TagRecord(tag, Digest.parse(digest), pushed, m.pulled if m else None)
                )
            return snap

        return await self._run(work)

    async def repositories(
        self,
        after: str | None = None,
        limit: int | None = None,
        keep: Callable[[str], bool] | None = None,
    ) -> list[RepositorySummary]:
        """Repositories with at least one manifest, sorted by name, after ``after``. With
        ``keep`` (called on the index's thread: it must be quick and thread-safe), only the
        names it accepts, ``limit`` of them: the names it refuses are read past in the same
        scan and summarised never, so a page costs the names skipped plus the page."""

        key = RepositoryKey(None, after) if after else None
        return await self._run(lambda c: _sorted_page(c, "name", False, key, limit, keep))

    async def repositories_sorted(
        self,
        sort: str = "name",
        descending: bool = False,
        after: RepositoryKey | tuple[Any, str] | None = None,
        limit: int = 100,
        keep: Callable[[str], bool] | None = None,
        contains: str = "",
    ) -> list[RepositorySummary]:
        """See :meth:`Index.repositories_sorted`. Each sort has its partial index on the
        repositories' aggregates, (value, name) of those with a manifest: a page is a seek
        and the rows read (by ``pushed``: those with tags, then those without, two ranges of
        the same index), in one read transaction; only ``pulled`` is counted, for the rows of
        the page."""
        key = checked_key(sort, after)
        if limit <= 0:
            return []
        return await self._run(
            lambda c: _sorted_page(c, sort, descending, key, limit, keep, contains)
        )

    async def manifests(self, name: str, digests: Iterable[Digest]) -> dict[Digest, ManifestRecord]:
        """The records of those of ``digests`` that ``name`` holds (a page's worth: one seek
        each)."""
        wanted = sorted({str(d) for d in digests})

        def work(c: sqlite3.Connection) -> dict[Digest, ManifestRecord]:
            found: dict[Digest, ManifestRecord] = {}
            for digest in wanted:
                row = c.execute(
                    "SELECT digest, media_type, size, pushed, pulled, subject, artifact_type, "
                    "children FROM manifests WHERE repository=? AND digest=?",
                    (name, digest),
                ).fetchone()
                if row is not None:
                    record = _manifest_from_row(row)
                    found[record.digest] = record
            return found

        return await self._run(work)

    async def repository(self, name: str) -> RepositorySummary | None:
        def work(c: sqlite3.Connection) -> RepositorySummary | None:
            row = c.execute(f"{_LISTED} WHERE name=? AND manifests > 0", (name,)).fetchone()
            return _summarised(c, row) if row is not None else None

        return await self._run(work)

    async def usage(self, scope: str) -> Usage:
        """Space used within ``scope`` (see :func:`scope_condition`), each blob once, with
        the uploads in progress."""
        return await self._run(lambda c: _usage(c, scope))

    async def unique_bytes(self, names: Iterable[str]) -> dict[str, int]:
        """See :meth:`Index.unique_bytes`: ``scope_blobs`` of ``*`` counts each blob's
        repositories; those its repository alone uses have ``refs`` 1."""
        await self.tally(["*"])
        wanted = list(dict.fromkeys(names))

        def work(c: sqlite3.Connection) -> dict[str, int]:
            return {
                name: c.execute(
                    "SELECT coalesce(sum(b.size), 0) FROM blobs b JOIN scope_blobs s "
                    "ON s.scope = '*' AND s.digest = b.digest "
                    "WHERE b.repository = ? AND s.refs = 1",
                    (name,),
                ).fetchone()[0]
                for name in wanted
            }

        return await self._run(work)

    async def tally(self, scopes: Iterable[str]) -> None:
        """Keep ``scopes`` tallied from now on, so their usage is one row read (the quotas'
        scopes are from the start; the metrics add ``*``)."""
        wanted = tuple(sorted(set(self.scopes) | set(scopes)))
        if wanted != self.scopes:
            self.scopes = wanted
            await self._write(lambda c: _track_scopes(c, wanted))

    # -- quotas: reservations for uploads -------------------------------------------------

    async def reserve(
        self,
        name: str,
        upload: str,
        total: int,
        limits: list[tuple[str, int]],
        digest: Digest | None = None,
    ) -> QuotaExceeded | None:
        """Count ``total`` bytes for the upload ``upload`` of ``name`` (replacing what it
        counted before) unless that takes a scope of ``limits`` (scope, bytes) over its limit;
        then nothing changes and the scope is returned. ``digest``: the blob the bytes are, when
        known: within a scope that uses it already they take no space.

        The check and the update are one transaction that excludes every other writer (of
        every worker sharing the file), so concurrent reservations never overshoot a limit."""

        def work(c: sqlite3.Connection) -> QuotaExceeded | None:
            row = c.execute(
                "SELECT bytes FROM uploads WHERE repository=? AND id=?", (name, upload)
            ).fetchone()
            before = row[0] if row else 0
            for scope, limit in limits:
                wanted = total
                if digest is not None and _uses(c, scope, digest):
                    wanted = 0
                used = _usage(c, scope).bytes - before
                if used + wanted > limit:
                    return QuotaExceeded(scope, limit, used, wanted)
            c.execute("INSERT OR REPLACE INTO uploads VALUES (?, ?, ?)", (name, upload, total))
            return None

        return await self._write(work)

    async def release(self, name: str, upload: str, total: int | None = None) -> None:
        """The upload counts ``total`` bytes from now on (what it really holds after a
        request), or nothing (``None``: committed, cancelled, or a transient reservation)."""
        if total is None:
            await self._safely(
                name,
                lambda c: c.execute(
                    "DELETE FROM uploads WHERE repository=? AND id=?", (name, upload)
                ),
            )
        else:
            await self._safely(
                name,
                lambda c: c.execute(
                    "INSERT OR REPLACE INTO uploads VALUES (?, ?, ?)", (name, upload, total)
                ),
            )

    async def contents(self) -> dict[str, Any]:
        """Everything but pull times, canonically ordered: what a rebuild must reproduce."""

        def work(c: sqlite3.Connection) -> dict[str, Any]:
            return {
                "tags": c.execute(
                    "SELECT repository, tag, digest, pushed FROM tags ORDER BY 1, 2"
                ).fetchall(),
                "manifests": c.execute(
                    "SELECT repository, digest, media_type, size, subject, artifact_type, "
                    "children FROM manifests ORDER BY 1, 2"
                ).fetchall(),
                "blobs": c.execute("SELECT * FROM blobs ORDER BY 1, 2").fetchall(),
            }

        return await self._run(work)

    # -- rebuilding from the layout -------------------------------------------------------

    async def refresh(self, storage: Store, name: str) -> bool:
        """Make the index's entry for ``name`` what the layout holds now; pull times and the
        push times of manifests and tags still there are kept. Returns whether the repository
        exists.

        A write of the repository while the layout is read (a push on any worker) would be
        erased by what was read before it: the entry is replaced only if the repository's
        version did not move meanwhile, else the layout is read again; after three tries the
        repository is marked stale for the next verification (the pushes stay indexed)."""
        for _ in range(3):
            before = await self._run(lambda c: _version(c, name))
            found = await _read_layout(storage, name)

            def work(
                c: sqlite3.Connection,
                found: _LayoutRepository | None = found,
                before: int | None = before,
            ) -> bool:
                if _version(c, name) != before:
                    return False
                _replace_entry(c, name, found)
                return True

            if await self._write(work):
                return found is not None
        await self._write(lambda c: _mark_stale(c, name))
        return True

    async def indexed_repositories(self) -> set[str]:
        def work(c: sqlite3.Connection) -> set[str]:
            return {r[0] for r in c.execute("SELECT name FROM repositories")}

        return await self._run(work)

    async def reindex(self, storage: Store) -> list[str]:
        """Rebuild every repository's entry from the layout; returns the repositories indexed."""
        names = await inventory.repository_names(storage)
        for name in names:
            await self.refresh(storage, name)
        for gone in await self.indexed_repositories() - set(names):
            # Refreshed, not dropped: its first push may have come after the listing.
            await self.refresh(storage, gone)
        return names

    async def verify(self, storage: Store) -> list[str]:
        """Refresh every repository whose tags, revisions or layer links in the layout differ
        from the index (or that a failed write marked stale); returns their names."""
        names = await inventory.repository_names(storage)
        changed = []
        for name in names:
            if not await self._matches_layout(storage, name):
                await self.refresh(storage, name)
                changed.append(name)
        for gone in await self.indexed_repositories() - set(names):
            # Refreshed, not dropped: its first push may have come after the listing (then the
            # layout has it now, and it stays).
            await self.refresh(storage, gone)
            changed.append(gone)
        await self._forget_finished_uploads(storage)
        if changed:
            log.info("index verification refreshed %d repositories: %s", len(changed), changed[:10])
        return changed

    async def _forget_finished_uploads(self, storage: Store) -> None:
        """Uploads whose session is gone from the layout (purged as abandoned, or ended by a
        server that died before it could say so) count no more. Only once gone at two
        verifications running: a commit removes the session just before it links the blob and
        releases the reservation itself, and the bytes must count all along."""
        counted = await self._run(
            lambda c: c.execute("SELECT repository, id FROM uploads").fetchall()
        )
        missing = set()
        for name, upload in counted:
            if upload.startswith(TRANSIENT):
                continue
            try:
                await storage.stat(layout.upload_started_at(name, upload))
            except PathNotFound:
                if (name, upload) in self._missing_uploads:
                    await self.release(name, upload)
                else:
                    missing.add((name, upload))
        self._missing_uploads = missing

    async def _matches_layout(self, storage: Store, name: str) -> bool:
        repo = await _glance(storage, name)

        def work(c: sqlite3.Connection) -> bool:
            row = c.execute("SELECT stale FROM repositories WHERE name=?", (name,)).fetchone()
            if row is None or row[0]:
                return False
            tags = dict(c.execute("SELECT tag, digest FROM tags WHERE repository=?", (name,)))
            manifests = {
                r[0] for r in c.execute("SELECT digest FROM manifests WHERE repository=?", (name,))
            }
            blobs = {
                r[0] for r in c.execute("SELECT digest FROM blobs WHERE repository=?", (name,))
            }
            return same_as_layout(repo, tags, manifests, blobs)

        return await self._run(work)

    async def run_verifier(self, storage: Store, interval: float, first_delay: float) -> None:
        """Verify against the layout after ``first_delay`` and then every ``interval`` seconds,
        until cancelled."""
        await asyncio.sleep(first_delay)
        while True:
            try:
                await self.verify(storage)
            except Exception:  # a bug or a storage failure must not end verification for good
                log.exception("index verification failed (will retry)")
            await asyncio.sleep(interval)


async def _glance(storage: Store, name: str) -> inventory.RepositoryInventory:
    """What verification compares: the tags with their targets, and the revisions and layer
    links by their directories alone (a link's content is its directory's name, so listing is
    enough); the tag links are read together. Several times cheaper than reading every link."""
    repo = inventory.RepositoryInventory(name)
    revisions, layers = await asyncio.gather(
        inventory.digests_under(storage, layout.revisions_dir(name)),
        inventory.digests_under(storage, f"{layout.repository(name)}/_layers"),
    )
    repo.revisions = dict.fromkeys(revisions, 0.0)
    repo.layers = set(layers)
    try:
        tags = await storage.list(layout.tags_dir(name))
    except PathNotFound:
        tags = []
    targets = await asyncio.gather(
        *(read_link(storage, layout.tag_current_link(name, tag)) for tag in tags)
    )
    repo.tags = {t: d for t, d in zip(tags, targets, strict=True) if d is not None}
    return repo


def same_as_layout(
    repo: inventory.RepositoryInventory, tags: dict[str, str], manifests: set[str], blobs: set[str]
) -> bool:
    """Whether an index entry (tag -> digest, manifest digests, blob digests) agrees with what
    :func:`_glance` found: the same tags and revisions, and every layer link counted (the index
    also counts blobs that manifests reference without a link, so a superset)."""
    return (
        tags == {t: str(d) for t, d in repo.tags.items()}
        and manifests == {str(d) for d in repo.revisions}
        and {str(d) for d in repo.layers} <= blobs
    )


@dataclass
class _LayoutRepository:
    tags: list[TagRecord]
    manifests: dict[Digest, ManifestRecord]
    blobs: dict[Digest, int]


async def _read_layout(storage: Store, name: str) -> _LayoutRepository | None:
    repo = await inventory.read_repository(storage, name)
    if not repo.revisions and not repo.tags and not repo.layers:
        return None
    store = BlobStore(storage)
    found = _LayoutRepository([], {}, {})
    for digest in repo.layers:
        with contextlib.suppress(RegistryError, PathNotFound):
            found.blobs[digest] = (await storage.stat(layout.blob_data(digest))).size
    for digest, modified in repo.revisions.items():
        try:
            body = await store.read(digest)
        except RegistryError:
            continue
        manifest = read_stored(body)
        found.manifests[digest] = record_of(digest, body, manifest, modified, None)
        found.blobs[digest] = len(body)
        for d in manifest.blobs if manifest else ():
            found.blobs.setdefault(d.digest, d.size)
    for tag in sorted(repo.tags):
        digest = repo.tags[tag]
        try:
            pushed = (await storage.stat(layout.tag_current_link(name, tag))).modified
        except PathNotFound:
            continue
        found.tags.append(TagRecord(tag, digest, pushed))
    return found


#: the prefix of reservations that are not upload sessions (a mount, a manifest being stored)
TRANSIENT = "transient-"


def scope_range(scope: str) -> tuple[str, str]:
    """The repository names of ``scope`` as a range [lo, hi) (names are lower-case ASCII:
    nothing sorts after DEL; a name is never followed by NUL in another)."""
    if scope == "*":
        return "", "\x7f"
    if scope.endswith("/*"):
        prefix = scope[:-1]
        return prefix, prefix[:-1] + chr(ord("/") + 1)
    return scope, scope + "\x00"


def _track_scopes(c: sqlite3.Connection, scopes: tuple[str, ...]) -> None:
    """Tally ``scopes`` from now on, within the caller's write transaction: a scope not tallied
    yet is counted from ``blobs`` once (every worker races to do it: the transaction serialises
    them, and the later ones find it done).
    A tally is never dropped: another process may open the index with other scopes (a command
    with another configuration), and a tally kept current costs only its triggers."""
    tracked = {row[0] for row in c.execute("SELECT scope FROM scopes")}
    for scope in set(scopes) - tracked:
        lo, hi = scope_range(scope)
        c.execute("INSERT INTO scope_totals VALUES (?, 0, 0)", (scope,))
        c.execute(
            "INSERT INTO scope_blobs SELECT ?, digest, max(size), count(*) FROM blobs "
            "WHERE repository >= ? AND repository < ? GROUP BY digest",
            (scope, lo, hi),
        )
        c.execute("INSERT INTO scopes VALUES (?, ?, ?)", (scope, lo, hi))


def _usage(c: sqlite3.Connection, scope: str) -> Usage:
    condition, params = scope_condition(scope)
    tallied = c.execute("SELECT bytes, blobs FROM scope_totals WHERE scope=?", (scope,)).fetchone()
    if tallied is not None:
        size, count = tallied
        (uploading,) = c.execute(
            f"SELECT coalesce(sum(bytes), 0) FROM uploads WHERE {condition}", params
        ).fetchone()
        # the repositories: a seek per distinct name, cheap next to the tally it replaces
        (repos,) = c.execute(
            "SELECT count(*) FROM repositories WHERE name >= ? AND name < ?",
            scope_range(scope),
        ).fetchone()
        return Usage(scope, size + uploading, count, repos, uploading)
    return _counted_usage(c, scope)


def _counted_usage(c: sqlite3.Connection, scope: str) -> Usage:
    """A scope's usage counted from ``blobs`` (O(its blobs)): for a scope without a tally."""
    condition, params = scope_condition(scope)
    if condition == "repository = ?":
        # One repository: its rows are one per digest already (the primary key), so a sum and
        # a count on the key's prefix, without grouping (the usage page asks this per row).
        size, count = c.execute(
            "SELECT coalesce(sum(size), 0), count(*) FROM blobs WHERE repository = ?", params
        ).fetchone()
        (uploading,) = c.execute(
            "SELECT coalesce(sum(bytes), 0) FROM uploads WHERE repository = ?", params
        ).fetchone()
        return Usage(scope, size + uploading, count, 1 if count else 0, uploading)
    size, count = c.execute(
        "SELECT coalesce(sum(size), 0), count(*) FROM (SELECT digest, max(size) AS size "
        f"FROM blobs WHERE {condition} GROUP BY digest)",
        params,
    ).fetchone()
    (repos,) = c.execute(
        f"SELECT count(DISTINCT repository) FROM blobs WHERE {condition}", params
    ).fetchone()
    (uploading,) = c.execute(
        f"SELECT coalesce(sum(bytes), 0) FROM uploads WHERE {condition}", params
    ).fetchone()
    return Usage(scope, size + uploading, count, repos, uploading)


def _uses(c: sqlite3.Connection, scope: str, digest: Digest) -> bool:
    condition, params = scope_condition(scope)
    row = c.execute(
        f"SELECT 1 FROM blobs WHERE digest=? AND ({condition}) LIMIT 1", (str(digest), *params)
    ).fetchone()
    return row is not None


def _touch(c: sqlite3.Connection, name: str) -> None:
    """A write of ``name``: its version moves (see :meth:`MetadataIndex.refresh`)."""
    c.execute(
        "INSERT INTO repositories (name, version) VALUES (?, 1) "
        "ON CONFLICT(name) DO UPDATE SET version=version+1",
        (name,),
    )


def _version(c: sqlite3.Connection, name: str) -> int | None:
    row = c.execute("SELECT version FROM repositories WHERE name=?", (name,)).fetchone()
    return row[0] if row else None


def _mark_stale(c: sqlite3.Connection, name: str) -> None:
    c.execute(
        "INSERT INTO repositories (name, stale) VALUES (?, 1) "
        "ON CONFLICT(name) DO UPDATE SET stale=1",
        (name,),
    )


def _replace_other_schema(c: sqlite3.Connection) -> list[tuple[str, str, float, float | None]]:
    """An index written by another version of Dockyard is dropped (it is derived data): the
    next verification, at start, rebuilds it from the layout. What only it knew, the
    manifests' pull and push times, is returned for ``carried_manifests`` when its
    ``manifests`` table has them. Called in the exclusive transaction that makes the
    schema."""
    has_meta = c.execute(
        "SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'"
    ).fetchone()
    if not has_meta:
        return []
    row = c.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
    if row is None or row[0] == str(SCHEMA_VERSION):
        return []
    log.warning("the metadata index has another schema: rebuilding it from the layout")
    carried = _manifest_times(c)
    for kind, name in c.execute(
        "SELECT type, name FROM sqlite_master WHERE type IN ('table', 'trigger') "
        "AND name NOT LIKE 'sqlite_%'"
    ).fetchall():
        c.execute(f'DROP {kind.upper()} IF EXISTS "{name}"')
    return carried


def _manifest_times(c: sqlite3.Connection) -> list[tuple[str, str, float, float | None]]:
    """(repository, digest, pushed, pulled) of every manifest an index of another schema
    holds, or of its carried ones; nothing when it has no such columns."""
    rows: list[tuple[str, str, float, float | None]] = []
    for table in ("manifests", "carried_manifests"):
        columns = {row[1] for row in c.execute(f'PRAGMA table_info("{table}")')}
        if {"repository", "digest", "pushed", "pulled"} <= columns:
            rows += c.execute(
                f'SELECT repository, digest, pushed, pulled FROM "{table}"'
            ).fetchall()
    return rows


def _use_wal(c: sqlite3.Connection) -> None:
    """WAL mode (readers never wait for the writer). Switching a new file to it takes a lock
    that SQLite's busy handler does not wait for: several workers opening a fresh file at once
    retry for a while."""
    for _ in range(200):
        try:
            c.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError:
            time.sleep(0.05)
    c.execute("PRAGMA journal_mode=WAL")


def _replace_entry(c: sqlite3.Connection, name: str, found: _LayoutRepository | None) -> None:
    """The entry of ``name`` becomes ``found`` (None: the repository is gone from the layout),
    keeping what only the index knows of what is still there: pull times, push times."""
    old = {
        row[0]: (row[1], row[2])
        for row in c.execute(
            "SELECT digest, pushed, pulled FROM carried_manifests WHERE repository=?", (name,)
        )
    }
    old.update(
        (row[0], (row[1], row[2]))
        for row in c.execute(
            "SELECT digest, pushed, pulled FROM manifests WHERE repository=?", (name,)
        )
    )
    c.execute("DELETE FROM carried_manifests WHERE repository=?", (name,))
    old_tags = {
        (row[0], row[1]): row[2]
        for row in c.execute("SELECT tag, digest, pushed FROM tags WHERE repository=?", (name,))
    }
    _clear(c, name)
    if found is None:
        c.execute("DELETE FROM repositories WHERE name=?", (name,))
        return
    c.execute(
        "INSERT INTO repositories (name, stale) VALUES (?, 0) "
        "ON CONFLICT(name) DO UPDATE SET stale=0",
        (name,),
    )
    for record in found.manifests.values():
        pushed, pulled = old.get(str(record.digest), (record.pushed, None))
        _put_manifest(
            c,
            name,
            ManifestRecord(
                record.digest,
                record.media_type,
                record.size,
                min(pushed, record.pushed),
                pulled,
                record.subject,
                record.artifact_type,
                record.children,
            ),
            keep_times=False,
        )
    c.executemany(
        "INSERT INTO tags VALUES (?, ?, ?, ?)",
        [
            (name, t.tag, str(t.digest), old_tags.get((t.tag, str(t.digest)), t.pushed))
            for t in found.tags
        ],
    )
    c.executemany(
        "INSERT OR REPLACE INTO blobs VALUES (?, ?, ?)",
        [(name, str(d), s) for d, s in found.blobs.items()],
    )


def _put_manifest(
    c: sqlite3.Connection, name: str, record: ManifestRecord, *, keep_times: bool
) -> None:
    values = (
        name,
        str(record.digest),
        record.media_type,
        record.size,
        record.pushed,
        record.pulled,
        str(record.subject) if record.subject else None,
        record.artifact_type,
        " ".join(str(d) for d in record.children),
    )
    if keep_times:
        # A manifest pushed again keeps its first push and its last pull.
        c.execute(
            "INSERT INTO manifests VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT(repository, digest) DO NOTHING",
            values,
        )
    else:
        c.execute("INSERT OR REPLACE INTO manifests VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", values)


def _manifest_from_row(row: tuple[Any, ...]) -> ManifestRecord:
    digest, media_type, size, pushed, pulled, subject, artifact_type, children = row
    return ManifestRecord(
        digest=Digest.parse(digest),
        media_type=media_type,
        size=size,
        pushed=pushed,
        pulled=pulled,
        subject=Digest.parse(subject) if subject else None,
        artifact_type=artifact_type,
        children=tuple(Digest.parse(d) for d in children.split()) if children else (),
    )


def _summarised(c: sqlite3.Connection, row: tuple[Any, ...]) -> RepositorySummary:
    """The summary of a row (name, tags, manifests, size, pushed) of ``repositories``: its
    aggregates, and the latest pull of its manifests, counted here (kept as an aggregate, it
    would add a write per repository to every flush of pull times)."""
    name, tags, manifests, size, pushed = row
    (pulled,) = c.execute(
        "SELECT max(pulled) FROM manifests WHERE repository=?", (name,)
    ).fetchone()
    return RepositorySummary(name, tags, manifests, size, pushed, pulled)


def checked_key(sort: str, after: RepositoryKey | tuple[Any, str] | None) -> RepositoryKey | None:
    """``after`` as a key of a listing sorted by ``sort`` (a ``(value, name)`` tuple is
    taken too); ValueError for an unknown sort or a key that does not fit it."""
    if sort not in REPOSITORY_SORTS:
        raise ValueError(f"unknown sort {sort!r}; one of {', '.join(REPOSITORY_SORTS)}")
    if after is None:
        return None
    if not isinstance(after, RepositoryKey):
        after = RepositoryKey(*after)
    return after.checked(sort)


#: what a page reads of each listed repository
_LISTED = "SELECT name, tags, manifests, size, pushed FROM repositories"


def _sorted_ranges(
    sort: str, descending: bool, after: RepositoryKey | None, contains: str = ""
) -> list[tuple[str, tuple[Any, ...]]]:
    """The queries (without LIMIT) whose rows, one range after the other, are the listing
    after ``after``: each a seek on the sort's partial index (``INDEXED BY``: an error, not a
    scan, if SQLite could not use it) and its rows in order."""
    op, order = ("<", " DESC") if descending else (">", "")
    search, wanted = ("AND instr(name, ?) > 0", (contains,)) if contains else ("", ())
    if sort == "name":
        where, params = ("AND name " + op + " ?", (after.name,)) if after else ("", ())
        return [
            (
                f"{_LISTED} INDEXED BY repositories_listed WHERE manifests > 0 {where} {search} "
                f"ORDER BY name{order}",
                (*params, *wanted),
            )
        ]
    index = f"repositories_by_{sort}"
    ranges = []
    if sort != "pushed" or after is None or after.value is not None:
        where, params = "", ()
        if after is not None:
            where, params = f"AND ({sort}, name) {op} (?, ?)", (after.value, after.name)
        present = "AND pushed IS NOT NULL" if sort == "pushed" else ""
        ranges.append(
            (
                f"{_LISTED} INDEXED BY {index} WHERE manifests > 0 {present} {where} {search} "
                f"ORDER BY {sort}{order}, name{order}",
                (*params, *wanted),
            )
        )
    if sort == "pushed":  # without tags: last, by name
        where, params = "", ()
        if after is not None and after.value is None:
            where, params = f"AND name {op} ?", (after.name,)
        ranges.append(
            (
                f"{_LISTED} INDEXED BY {index} WHERE manifests > 0 AND pushed IS NULL {where} "
                f"{search} ORDER BY name{order}",
                (*params, *wanted),
            )
        )
    return ranges


def _sorted_page(
    c: sqlite3.Connection,
    sort: str,
    descending: bool,
    after: RepositoryKey | None,
    limit: int | None,
    keep: Callable[[str], bool] | None,
    contains: str = "",
) -> list[RepositorySummary]:
    """Up to ``limit`` (None: all) listed repositories in the order of ``sort``, after
    ``after``, whose names hold ``contains`` (refused in SQLite: a search of 10,000 names
    builds no row for the others) and that ``keep`` accepts, summarised, in one read
    transaction."""
    rows: list[tuple[Any, ...]] = []
    c.execute("BEGIN")
    try:
        for query, params in _sorted_ranges(sort, descending, after, contains):
            wanted = -1 if limit is None or keep is not None else limit - len(rows)
            cursor = c.execute(f"{query} LIMIT ?", (*params, wanted))
            try:
                for row in cursor:
                    if limit is not None and len(rows) >= limit:
                        break
                    if keep is None or keep(row[0]):
                        rows.append(row)
            finally:
                cursor.close()
            if limit is not None and len(rows) >= limit:
                break
        return [_summarised(c, row) for row in rows]
    finally:
        c.execute("COMMIT")


def _clear(c: sqlite3.Connection, name: str) -> None:
    """Delete every tag, manifest and blob of ``name``: its latest push is set to NULL first,
    so that the tags' delete trigger does not count it again for each (see the schema)."""
    c.execute("UPDATE repositories SET pushed = NULL WHERE name=?", (name,))
    for table in ("tags", "manifests", "blobs"):
        c.execute(f"DELETE FROM {table} WHERE repository=?", (name,))
