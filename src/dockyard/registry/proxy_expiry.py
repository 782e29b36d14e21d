"""Expiry of cached content (``ttl`` of each upstream, distribution 3's ``proxy.ttl``).

Content fetched from an upstream is unlinked from its cache repository ``ttl`` after it was
fetched (or confirmed with the upstream): blobs by their layer link's time, manifests by the
layer link the cache writes beside them when it fetches them (their revision link is stamped
each time they are used, registry.gc). Expiry only unlinks -- a manifest's tags go with it --
and never deletes blob data: garbage collection reclaims what nothing references any more, so a
blob another repository uses stays (registry:2's expiry deletes it: distribution issue #2367).
The next pull fetches again.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field

from dockyard.errors import RegistryError
from dockyard.registry import inventory, layout
from dockyard.registry.repository import Registry
from dockyard.storage.driver import PathNotFound
from dockyard.upstream.routing import Router

log = logging.getLogger("dockyard.proxy")


@dataclass
class ExpiryReport:
    repositories: int = 0
    manifests: int = 0
    blobs: int = 0
    expired: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{self.manifests} manifests and {self.blobs} blob links expired in "
            f"{self.repositories} cache repositories"
        )


def cache_repositories(names: list[str], router: Router) -> dict[str, float]:
    """The stored repositories that are caches (their canonical names), with their ttl."""
    caches = {}
    for name in names:
        try:
            route = router.route(name)
        except RegistryError:
            continue
        if route is not None and route.local_name == name:
            caches[name] = route.upstream.ttl
    return caches


async def expire(
    registry: Registry, router: Router, *, now: float | None = None, dry_run: bool = False
) -> ExpiryReport:
    storage = registry.storage
    now = time.time() if now is None else now
    report = ExpiryReport()
    names = await inventory.repository_names(storage)
    for name, ttl in cache_repositories(names, router).items():
        report.repositories += 1
        if ttl <= 0:
            continue
        repo = registry.repository(name)
        stored = await inventory.read_repository(storage, name)
        for digest in sorted(stored.layers, key=str):
            try:
                fetched = (await storage.stat(layout.layer_link(name, digest))).modified
            except PathNotFound:
                continue
            if fetched > now - ttl:
                continue
            if digest in stored.revisions:
                report.manifests += 1
                report.expired.append(f"manifest {name}@{digest}")
                if not dry_run:
                    with contextlib.suppress(RegistryError):  # gone meanwhile
                        await repo.manifests.delete(digest)
            else:
                report.blobs += 1
                report.expired.append(f"blob {name}@{digest}")
            if not dry_run:
                with contextlib.suppress(RegistryError):
                    await repo.blobs.unlink(digest)
    if report.manifests or report.blobs:
        log.info("cache expiry: %s", report.summary())
    return report
