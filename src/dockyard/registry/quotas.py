"""Quotas (``quotas`` in the configuration, Dockyard's addition): the most space the
repositories of a scope (one repository, a namespace ``team-a/*``, or ``*``) may use together.

Usage is the metadata index's: every blob a repository of the scope uses (linked layers and
configs, manifests, what manifests reference), each counted once within the scope, plus every
upload in progress, so that a team cannot fill the disk with blobs no manifest references.

Where it is enforced, so that a client learns early and nothing half-written stays:

- starting an upload (``POST``) while a scope is at or over its limit is refused;
- every request that brings bytes (``PATCH``, the ``PUT`` that ends an upload, a monolithic
  ``POST``) reserves them before reading them: the announced length at once, or 8 MiB steps
  while reading a body of unknown length; a reservation that would cross a limit is refused and
  the chunk discarded;
- a cross-repository mount reserves the blob's size (nothing when the scope holds it already);
- a manifest ``PUT`` reserves its own bytes too (a manifest is a blob of the repository).

Each reservation is one transaction of the index with the check inside it, excluding every
other writer: with SQLite every worker of the host, with the index in Redis (S3 + Redis
deployments, ``registry.index_redis``) every worker of every instance (one Lua script). A
push's bytes are counted from their reservation, before they are read, until its blob is
counted (the link is indexed before the reservation is released), so concurrent pushes never
take a scope over its limit: the overshoot bound is **0 bytes**, within one instance (SQLite)
and across instances (Redis). What can exceed it: an index write failing between a reservation
and the link (the blob is uncounted until the next verification), and with Redis, a Redis that
lost its data (usage counts only what arrived since, until the rebuild that follows within
seconds). Refusals are 403 DENIED with a message naming the scope, its usage and its limit,
which docker and podman print."""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from dockyard.config import QuotaConfig
from dockyard.config_base import format_size
from dockyard.errors import ErrorCode, RegistryError
from dockyard.oci.digest import Digest
from dockyard.registry.index import TRANSIENT, Index, QuotaExceeded

log = logging.getLogger("dockyard.quotas")

#: the reservation step while reading a body of unknown length
STEP = 8 * 1024 * 1024


def in_scope(scope: str, repository: str) -> bool:
    if scope == "*":
        return True
    if scope.endswith("/*"):
        return repository.startswith(scope[:-1])
    return repository == scope


def quota_exceeded(repository: str, exceeded: QuotaExceeded) -> RegistryError:
    # What docker and podman print after "denied:": scope, usage and limit, so the pusher knows
    # which quota and by how much.
    return RegistryError(
        ErrorCode.DENIED,
        f"quota exceeded for {exceeded.scope}: {format_size(exceeded.used)} used of "
        f"{format_size(exceeded.limit)}; this needs {format_size(exceeded.wanted)} more "
        f"(pushing to {repository})",
        {
            "scope": exceeded.scope,
            "limit": exceeded.limit,
            "used": exceeded.used,
            "wanted": exceeded.wanted,
        },
    )


def _unavailable(repository: str) -> RegistryError:
    return RegistryError(
        ErrorCode.UNAVAILABLE,
        "the quota accounting is unavailable for a moment: retry",
        {"repository": repository},
        headers={"Retry-After": "5"},
    )


@dataclass(frozen=True, slots=True)
class Quota:
    scope: str
    limit: int


class Quotas:
    def __init__(self, configs: Sequence[QuotaConfig] = (), index: Index | None = None):
        self.quotas = tuple(Quota(c.scope, c.limit) for c in configs)
        self.index = index
        #: whether this process has asked the index to keep the quota scopes tallied
        self._tallied = False

    def __bool__(self) -> bool:
        return bool(self.quotas) and self.index is not None

    def limits(self, repository: str) -> list[tuple[str, int]]:
        """(scope, limit) of every quota that holds ``repository``."""
        return [(q.scope, q.limit) for q in self.quotas if in_scope(q.scope, repository)]

    def applies(self, repository: str) -> bool:
        return self.index is not None and any(in_scope(q.scope, repository) for q in self.quotas)

    async def check_start(self, repository: str) -> None:
        """Refuse a new upload while a scope of ``repository`` is at or over its limit: a read
        of each scope's tally (nothing is reserved yet, so no write is needed; the bytes are
        reserved when they come)."""
        limits = self.limits(repository)
        if self.index is None or not limits:
            return
        try:
            if not self._tallied:  # a scope's first reading counts it, then it is kept
                await self.index.tally([q.scope for q in self.quotas])
                self._tallied = True
            for scope, limit in limits:
                used = (await self.index.usage(scope)).bytes
                if used >= limit:
                    raise quota_exceeded(repository, QuotaExceeded(scope, limit, used, 1))
        except RegistryError:
            raise
        except Exception as exc:  # as in reserve: fail closed, and say to come back
            log.error("quota check for %s failed: %s", repository, exc)
            raise _unavailable(repository) from exc

    async def reserve(
        self,
        repository: str,
        upload: str,
        total: int,
        digest: Digest | None = None,
    ) -> None:
        """Count ``total`` bytes for ``upload``; DENIED if a scope would go over its limit."""
        if self.index is None:
            return
        limits = self.limits(repository)
        if not limits:
            return
        try:
            exceeded = await self.index.reserve(repository, upload, total, limits, digest)
        except Exception as exc:
            # Whatever the backend (SQLite, Redis) failed with: quotas fail closed, and the
            # client is told to come back (503, which clients retry), not that it erred.
            log.error("quota reservation for %s failed: %s", repository, exc)
            raise _unavailable(repository) from exc
        if exceeded is not None:
            raise quota_exceeded(repository, exceeded)

    async def release(self, repository: str, upload: str, total: int | None = None) -> None:
        if self.index is not None and self.limits(repository):
            await self.index.release(repository, upload, total)

    def transient(self) -> str:
        """A reservation id for something that is not an upload session."""
        return TRANSIENT + secrets.token_hex(8)

    async def metered(
        self, repository: str, upload: str, start: int, body: AsyncIterator[bytes]
    ) -> AsyncIterator[bytes]:
        """``body``, reserving in :data:`STEP` s ahead of what it yields (the upload holds
        ``start`` bytes already): a body that would cross a limit fails with DENIED before the
        bytes beyond the reservation are written."""
        reserved = start
        received = start
        async for chunk in body:
            received += len(chunk)
            if received > reserved:
                try:
                    await self.reserve(repository, upload, received + STEP)
                    reserved = received + STEP
                except RegistryError:
                    # Near the limit: no step ahead, only what has arrived (refused if even
                    # that does not fit).
                    await self.reserve(repository, upload, received)
                    reserved = received
            yield chunk


class QuotaGauges:
    """The quotas' usage for Prometheus (``dockyard_quota_used_bytes``,
    ``dockyard_quota_limit_bytes``, labelled by the configured scope: few, chosen by the
    operator) and the space the registry's repositories use (``dockyard_index_used_bytes``,
    each blob once). A scrape reads the values :meth:`refresh` last read from the index, so a
    scrape never waits on the index."""

    def __init__(self, quotas: Quotas) -> None:
        self.quotas = quotas
        self.used: dict[str, int] = {}
        self.total: int | None = None
        self.tallied = False

    async def refresh(self) -> None:
        index = self.quotas.index
        if index is None:
            return
        if not self.tallied:  # the registry's total is read every few seconds: keep a tally
            await index.tally(["*", *(q.scope for q in self.quotas.quotas)])
            self.tallied = True
        self.used = {q.scope: (await index.usage(q.scope)).bytes for q in self.quotas.quotas}
        self.total = (await index.usage("*")).bytes

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        used = GaugeMetricFamily(
            "dockyard_quota_used_bytes",
            "Space the repositories of a quota's scope use (each blob once, uploads in progress "
            "included), from the metadata index",
            labels=["scope"],
        )
        limit = GaugeMetricFamily("dockyard_quota_limit_bytes", "A quota's limit", labels=["scope"])
        for quota in self.quotas.quotas:
            limit.add_metric([quota.scope], quota.limit)
            if quota.scope in self.used:
                used.add_metric([quota.scope], self.used[quota.scope])
        yield used
        yield limit
        if self.total is not None:
            yield GaugeMetricFamily(
                "dockyard_index_used_bytes",
                "Space every repository uses together (each blob once, uploads in progress "
                "included), from the metadata index",
                value=self.total,
            )
