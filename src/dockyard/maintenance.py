"""Scheduled maintenance while serving: upload purging (registry:2's
``storage.maintenance.uploadpurging``, on by default) and online garbage collection
(``storage.maintenance.gc``, off by default) preceded by the retention policies
(``policies[].retention``), and the pull-through cache's expiry (each upstream's ``ttl``). All
are skipped in read-only mode. Across instances, garbage collection and retention each run one
at a time (their leases); purging is idempotent."""

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
from dockyard.registry.retention import RetentionPolicies
from dockyard.registry.retention_run import run_retention
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


async def scheduled_retention(config: Config, registry: Registry, dry_run: bool) -> None:
    """The retention policies, as the schedule runs them: never confirmed, so a policy's first
    run and a repository over its ``maxshare`` are only reported, loudly, and nothing of them
    is deleted until ``dockyard retention --confirm``. A failure is logged, not raised: the
    collection that follows must still run."""
    # Here, not at the top: the server's parent imports this module and must not load the HTTP
    # stack (aiohttp) before it forks its workers.
    from dockyard.events.deletes import delete_listener

    listener = None if dry_run else delete_listener(config, "dockyard retention (scheduled)")
    try:
        report = await run_retention(registry, config.policies, dry_run=dry_run, deletions=listener)
    except LeaseBusy as exc:
        log.info("scheduled retention skipped: %s", exc)
        return
    except (StorageError, OSError) as exc:
        log.error("scheduled retention failed (will retry): %s", exc)
        return
    except Exception:
        log.exception("scheduled retention failed (will retry)")
        return
    for run in report.withheld:
        log.warning(
            "scheduled retention deleted nothing in %s: %s; it would delete %d tags and %d "
            "manifests (dockyard retention --dry-run lists them)",
            run.plan.repository,
            run.withheld,
            len(run.plan.deleted_tags),
            len(run.plan.order),
        )
    for error in report.errors:
        log.error("scheduled retention: %s", error)
    log.info("scheduled %s", report.summary())


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
        retention = bool(RetentionPolicies(config.policies))

        async def collect() -> None:
            if retention:  # first, so that this collection reclaims what it unreferences
                await scheduled_retention(config, registry, gc.dryrun)
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
