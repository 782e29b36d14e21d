"""Reading the whole store: every repository's manifests, tags, layer links and uploads, and
every blob. Shared by garbage collection, ``du``, ``fsck`` and upload purging; it only reads."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field

from dockyard.oci.digest import SUPPORTED_ALGORITHMS, Digest
from dockyard.registry import layout
from dockyard.registry.blobs import read_link
from dockyard.registry.repository import repository_dirs
from dockyard.storage.driver import PathNotFound
from dockyard.storage.store import Store

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


async def read_repository(storage: Store, name: str) -> RepositoryInventory:
    inventory = RepositoryInventory(name)
    for digest in await digests_under(storage, layout.revisions_dir(name)):
        path = layout.revision_link(name, digest)
        if await read_link(storage, path) != digest:
            continue
        try:
            inventory.revisions[digest] = (await storage.stat(path)).modified
        except PathNotFound:
            continue
    for tag in await _list(storage, layout.tags_dir(name)):
        target = await read_link(storage, layout.tag_current_link(name, tag))
        if target is not None:
            inventory.tags[tag] = target
    for digest in await digests_under(storage, f"{layout.repository(name)}/_layers"):
        if await read_link(storage, layout.layer_link(name, digest)) == digest:
            inventory.layers.add(digest)
    return inventory


async def blob_digests(storage: Store) -> list[Digest]:
    """Every digest with a directory in ``blobs/``, from listings alone: cheap enough to count
    what a walk over the blobs will visit before it starts."""
    out = []
    for algorithm in await _list(storage, layout.BLOBS):
        length = SUPPORTED_ALGORITHMS.get(algorithm)
        if length is None:
            continue
        for prefix in await _list(storage, f"{layout.BLOBS}/{algorithm}"):
            for hexpart in await _list(storage, f"{layout.BLOBS}/{algorithm}/{prefix}"):
                if len(hexpart) == length and hexpart.startswith(prefix):
                    out.append(Digest(algorithm, hexpart))
    return out


async def blobs(
    storage: Store, digests: Iterable[Digest] | None = None
) -> AsyncIterator[StoredBlob]:
    """Every blob with data in ``blobs/`` (of ``digests``, when the caller listed them already
    with :func:`blob_digests`)."""
    for digest in digests if digests is not None else await blob_digests(storage):
        try:
            info = await storage.stat(layout.blob_data(digest))
        except PathNotFound:
            continue
        yield StoredBlob(digest, info.size, info.modified)


async def uploads(storage: Store, name: str) -> list[str]:
    return await _list(storage, layout.uploads_dir(name))
