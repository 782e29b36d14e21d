"""Reading the whole store: every repository's manifests, tags, layer links and uploads, and
every blob. Shared by garbage collection, ``du``, ``fsck`` and upload purging; it only reads."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field

from dockyard.errors import RegistryError
from dockyard.oci.digest import SUPPORTED_ALGORITHMS, Digest
from dockyard.registry import layout
from dockyard.registry.blobs import read_link
from dockyard.registry.repository import repository_dirs
from dockyard.storage.driver import FastScan, PathNotFound, ScannedFile
from dockyard.storage.store import Store

_LOWER_HEX = re.compile(r"[0-9a-f]+")

#: the directories registry:2 keeps inside a repository
REPOSITORY_MARKERS = ("_manifests", "_layers", "_uploads")


@dataclass
class RepositoryInventory:
    name: str
    #: manifest digest -> modification time of its revision link
    revisions: dict[Digest, float] = field(default_factory=dict)
    tags: dict[str, Digest] = field(default_factory=dict)
    layers: set[Digest] = field(default_factory=set)


@dataclass(frozen=True, slots=True)
class StoredBlob:
    digest: Digest
    size: int
    modified: float


async def _list(storage: Store, path: str) -> list[str]:
    try:
        return await storage.list(path)
    except PathNotFound:
        return []


async def repository_names(storage: Store) -> list[str]:
    """Every directory that holds repository data (manifests, layer links or uploads), sorted;
    a superset of the catalog, which needs ``_manifests``."""
    return await repository_dirs(storage, REPOSITORY_MARKERS)


async def digests_under(storage: Store, path: str) -> list[Digest]:
    """``<path>/<alg>/<hex>`` entries as digests (skipping anything that is not one)."""
    out = []
    for algorithm in await _list(storage, path):
        if algorithm not in SUPPORTED_ALGORITHMS:
            continue
        for hexpart in await _list(storage, f"{path}/{algorithm}"):
            if len(hexpart) == SUPPORTED_ALGORITHMS[algorithm]:
                out.append(Digest(algorithm, hexpart))
    return out


async def layer_digests(storage: Store, layers: str) -> list[Digest]:
    """The digests with an entry under a ``_layers`` directory, wherever it is: a repository's,
    or one a repository delete moved aside (registry.deletion)."""
    return await digests_under(storage, layers)


def _scans(storage: Store) -> bool:
    """True where the driver reads a whole subtree in one call (a filesystem). Elsewhere
    (object storage) the listings and reads below are done one by one, as a scan would do
    them with more listings (one per directory where a link lives)."""
    return FastScan in storage.fast_paths


def _is_link(name: str) -> bool:
    return name == "link"


def _links(
    digests: list[Digest], files: list[ScannedFile | None]
) -> Iterator[tuple[Digest, float]]:
    """Of the links read for ``digests`` (``<alg>/<hex>/link``), those that hold their own
    digest (what ``read_link`` and a comparison would accept), with their times."""
    for digest, f in zip(digests, files, strict=True):
        if (
            f is None
            or not _LOWER_HEX.fullmatch(digest.hex)
            # read_link's decoding; equal to the path's digest, which is valid, so it parses
            or f.content is None
            or f.content.decode("ascii", "replace").strip() != f"{digest.algorithm}:{digest.hex}"
        ):
            continue
        yield digest, f.modified


async def read_repository(
    storage: Store, name: str, *, tags: bool = True, layers: bool = True
) -> RepositoryInventory:
    """The repository's revisions (with their links' times), and unless told not to, its tags
    and layer links (left empty then: a caller that does not need them saves their reads)."""
    inventory = RepositoryInventory(name)
    if _scans(storage):
        # A listing and one batch of reads each, instead of a read and a stat per link.
        revisions = layout.revisions_dir(name)
        listed = await digests_under(storage, revisions)
        found = await storage.read_many([layout.revision_link(name, d) for d in listed])
        inventory.revisions.update(_links(listed, found))
        if tags:
            inventory.tags.update(await _tags(storage, name))
        if layers:
            inventory.layers.update(await layer_links(storage, name))
        return inventory
    for digest in await digests_under(storage, layout.revisions_dir(name)):
        path = layout.revision_link(name, digest)
        if await read_link(storage, path) != digest:
            continue
        try:
            inventory.revisions[digest] = (await storage.stat(path)).modified
        except PathNotFound:
            continue
    for tag in await _list(storage, layout.tags_dir(name)) if tags else []:
        target = await read_link(storage, layout.tag_current_link(name, tag))
        if target is not None:
            inventory.tags[tag] = target
    if layers:
        inventory.layers.update(await layer_links(storage, name))
    return inventory


async def _tags(storage: Store, name: str) -> dict[str, Digest]:
    """Each tag's ``current`` link (a scan entering ``<tag>`` and ``<tag>/current`` only: a
    tag's ``index`` holds a link per digest it ever pointed to)."""
    base = layout.tags_dir(name)
    skip = len(base) + 1

    def descend(path: str) -> bool:
        below = path[skip:].partition("/")[2]  # what follows the tag's name
        return below in ("", "current")

    tags = {}
    for f in await storage.scan(base, descend, _is_link, read=True):
        tag, _, rest = f.path[skip:].partition("/")
        if rest != "current/link" or f.content is None:
            continue
        try:  # as read_link reads it
            tags[tag] = Digest.parse(f.content.decode("ascii", "replace").strip())
        except RegistryError:
            continue
    return tags


async def layer_links(storage: Store, name: str) -> set[Digest]:
    """The digests the repository links under ``_layers`` (each link holding its digest)."""
    layers = layout.layers_dir(name)
    listed = await digests_under(storage, layers)
    if _scans(storage):
        found = await storage.read_many([layout.layer_link(name, d) for d in listed])
        return {digest for digest, _ in _links(listed, found)}
    return {d for d in listed if await read_link(storage, layout.layer_link(name, d)) == d}


async def layer_link_candidates(storage: Store, name: str) -> list[Digest]:
    """The digests with an entry under the repository's ``_layers``, from two listings (no
    link is read: :func:`layer_links` has only those holding their own digest). For a caller
    that reads the few links it acts on (the collector's dangling ones) rather than every one."""
    return await digests_under(storage, layout.layers_dir(name))


async def blob_digests(storage: Store) -> list[Digest]:
    """Every digest with a directory in ``blobs/``, from listings alone: cheap enough to count
    what a walk over the blobs will visit before it starts."""
    out = []
    for algorithm, directory in await blob_prefixes(storage):
        prefix = directory.rsplit("/", 1)[-1]
        length = SUPPORTED_ALGORITHMS[algorithm]
        for hexpart in await _list(storage, directory):
            if len(hexpart) == length and hexpart.startswith(prefix):
                out.append(Digest(algorithm, hexpart))
    return out


async def blob_prefixes(storage: Store) -> list[tuple[str, str]]:
    """``(algorithm, blobs/<alg>/<xx>)`` for every prefix directory of ``blobs/``: a sweep
    visits them one at a time, so what it holds at once is one directory's blobs."""
    out = []
    for algorithm in await _list(storage, layout.BLOBS):
        if algorithm not in SUPPORTED_ALGORITHMS:
            continue
        for prefix in await _list(storage, f"{layout.BLOBS}/{algorithm}"):
            out.append((algorithm, f"{layout.BLOBS}/{algorithm}/{prefix}"))
    return out


async def blobs_in(storage: Store, algorithm: str, directory: str) -> list[StoredBlob]:
    """The blobs with data in one prefix directory of :func:`blob_prefixes`: one listing and
    one batch of stats (a single call on a filesystem, not an await per blob)."""
    length = SUPPORTED_ALGORITHMS[algorithm]
    prefix = directory.rsplit("/", 1)[-1]
    digests = [
        Digest(algorithm, hexpart)
        for hexpart in await _list(storage, directory)
        if len(hexpart) == length and hexpart.startswith(prefix)
    ]
    infos = await storage.stat_many([layout.blob_data(d) for d in digests])
    return [
        StoredBlob(digest, info.size, info.modified)
        for digest, info in zip(digests, infos, strict=True)
        if info is not None
    ]


async def blobs(
    storage: Store, digests: Iterable[Digest] | None = None
) -> AsyncIterator[StoredBlob]:
    """Every blob with data in ``blobs/`` (of ``digests``, when the caller listed them already
    with :func:`blob_digests`)."""
    if digests is None:
        for algorithm, directory in await blob_prefixes(storage):
            for blob in await blobs_in(storage, algorithm, directory):
                yield blob
        return
    for digest in digests:
        try:
            info = await storage.stat(layout.blob_data(digest))
        except PathNotFound:
            continue
        yield StoredBlob(digest, info.size, info.modified)


async def uploads(storage: Store, name: str) -> list[str]:
    return await _list(storage, layout.uploads_dir(name))
