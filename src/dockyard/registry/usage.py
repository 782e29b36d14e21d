"""Space used, per repository and for the whole store (``dockyard du``).

A repository uses the blobs its manifests reference (configs, layers, the manifests themselves)
and the blobs linked into it. A blob used by exactly one repository is *unique* to it; one used
by several is *shared* (counted once in the store's total). Blobs nothing uses are *unreferenced*:
garbage collection reclaims them."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from dockyard.errors import RegistryError
from dockyard.oci.digest import Digest
from dockyard.oci.manifest import referenced_digests
from dockyard.registry import inventory
from dockyard.registry.blobs import BlobStore
from dockyard.registry.quotas import in_scope
from dockyard.storage.store import Store


@dataclass
class RepositoryUsage:
    name: str
    manifests: int = 0
    tags: int = 0
    blobs: int = 0
    unique_bytes: int = 0
    shared_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return self.unique_bytes + self.shared_bytes


@dataclass
class ScopeUsage:
    """A quota's scope: the distinct blobs its repositories use, from the walk (``used``), and
    the metadata index's count, which adds uploads in progress (what quotas enforce)."""

    scope: str
    limit: int
    used: int = 0
    indexed: int | None = None
    uploading: int = 0


@dataclass
class StoreUsage:
    repositories: list[RepositoryUsage] = field(default_factory=list)
    scopes: list[ScopeUsage] = field(default_factory=list)
    blobs: int = 0
    total_bytes: int = 0
    referenced_bytes: int = 0
    unreferenced_blobs: int = 0
    unreferenced_bytes: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "repositories": [
                {**asdict(r), "total_bytes": r.total_bytes} for r in self.repositories
            ],
            "quotas": [asdict(s) for s in self.scopes],
            "store": {
                "blobs": self.blobs,
                "total_bytes": self.total_bytes,
                "referenced_bytes": self.referenced_bytes,
                "unreferenced_blobs": self.unreferenced_blobs,
                "unreferenced_bytes": self.unreferenced_bytes,
            },
        }


async def measure(storage: Store, quotas: Sequence[tuple[str, int]] = ()) -> StoreUsage:
    """Walk the store; ``quotas`` (scope, limit) are measured too."""
    store = BlobStore(storage)
    sizes = {b.digest: b.size async for b in inventory.blobs(storage)}
    users: dict[Digest, set[str]] = {}
    usage = StoreUsage()
    per_repo: dict[str, RepositoryUsage] = {}
    for name in await inventory.repository_names(storage):
        repo = await inventory.read_repository(storage, name)
        used = set(repo.layers)
        for digest in repo.revisions:
            used.add(digest)
            with contextlib.suppress(RegistryError):
                used |= referenced_digests(await store.read(digest))
        per_repo[name] = RepositoryUsage(name, manifests=len(repo.revisions), tags=len(repo.tags))
        for digest in used:
            if digest in sizes:
                users.setdefault(digest, set()).add(name)
    for digest, names in users.items():
        for name in names:
            entry = per_repo[name]
            entry.blobs += 1
            if len(names) == 1:
                entry.unique_bytes += sizes[digest]
            else:
                entry.shared_bytes += sizes[digest]
    usage.repositories = sorted(per_repo.values(), key=lambda r: (-r.total_bytes, r.name))
    for scope, limit in quotas:
        used = sum(sizes[d] for d, names in users.items() if any(in_scope(scope, n) for n in names))
        usage.scopes.append(ScopeUsage(scope, limit, used))
    usage.blobs = len(sizes)
    usage.total_bytes = sum(sizes.values())
    usage.referenced_bytes = sum(sizes[d] for d in users)
    unreferenced = [d for d in sizes if d not in users]
    usage.unreferenced_blobs = len(unreferenced)
    usage.unreferenced_bytes = sum(sizes[d] for d in unreferenced)
    return usage
