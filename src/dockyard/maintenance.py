"""Scheduled maintenance while serving: upload purging (registry:2's
``storage.maintenance.uploadpurging``, on by default) and online garbage collection
(``storage.maintenance.gc``, off by default), and the pull-through cache's expiry (each
upstream's ``ttl``). All are skipped in read-only mode. Across
instances, garbage collection runs one at a time (its lease); purging is idempotent."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable

from dockyard.config import Config
from dockyard.registry.gc import GarbageCollector
from dockyard.registry.lease import LeaseBusy
from dockyard.registry.purge import purge_uploads
from dockyard.registry.repository import Registry
from dockyard.storage.driver import StorageError

log = logging.getLogger("dockyard.maintenance")


def wanted(config: Config) -> bool:
    m = config.storage.maintenance
    return not m.readonly.enabled and (
        m.uploadpurging.enabled or m.gc.enabled or _expiry_interval(config) is not None
    )


def _expiry_interval(config: Config) -> float | None:
    """How often the cache's expiry runs: a quarter of the shortest ``ttl``, between a minute
    and an hour; None without upstreams whose content expires."""
    ttls = [u.ttl for u in config.proxy.all_upstreams() if u.ttl > 0]
    if not ttls:
        return None
    return max(60.0, min(3600.0, min(ttls) / 4))


async def _every(
    interval: float, first_delay: float, job_name: str, job: Callable[[], Awaitable[object]]
) -> None:
    await asyncio.sleep(first_delay)
    while True:
        try:
            await job()
        except LeaseBusy as exc:
            log.info("%s skipped: %s", job_name, exc)
        except (StorageError, OSError) as exc:
            log.error("%s failed (will retry): %s", job_name, exc)
        except Exception:  # a bug must not end the schedule for good
            log.exception("%s failed (will retry)", job_name)
        await asyncio.sleep(interval)


async def run(config: Config, registry: Registry) -> None:
    """Run the configured schedules on ``registry`` (the server's) until cancelled."""
    storage = registry.storage
    m = config.storage.maintenance
    jobs = []
    if m.uploadpurging.enabled:
        purging = m.uploadpurging
        jobs.append(
            _every(
                purging.interval,
                random.uniform(0, min(60.0, purging.interval)),
                "upload purging",
                lambda: purge_uploads(storage, purging.age, purging.dryrun),
            )
        )
    if m.gc.enabled:
        gc = m.gc

        async def collect() -> None:
            report = await GarbageCollector(
                storage,
                grace=gc.grace,
                touch_interval=gc.touch_interval,
                delete_untagged=gc.deleteuntagged,
                dry_run=gc.dryrun,
                cache=registry.blobs.cache,
                index=registry.index,
            ).run()
            log.info("scheduled garbage collection: %s", report.summary())

        jobs.append(_every(gc.interval, gc.interval, "garbage collection", collect))
    expiry_interval = _expiry_interval(config)
    if expiry_interval is not None:
        from dockyard.registry.proxy_expiry import expire
        from dockyard.upstream.routing import Router

        router = Router(config.proxy)
        jobs.append(
            _every(
                expiry_interval,
                random.uniform(0, expiry_interval),
                "cache expiry",
                lambda: expire(registry, router),
            )
        )
    if jobs:
        await asyncio.gather(*jobs)
