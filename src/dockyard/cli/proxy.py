"""``dockyard proxy list|warm|expire``: the pull-through cache's upstreams, pre-fetching images
into it, and expiring what is older than each upstream's ``ttl``."""

from __future__ import annotations

import asyncio
import sys
from dataclasses import asdict
from typing import Any

import click

from dockyard.cli import load, main
from dockyard.cli.maintenance import _run, config_argument, json_option
from dockyard.cli.output import Column, echo_json, echo_table, format_size
from dockyard.config import Config
from dockyard.registry.repository import Registry


def _require_proxy(config: Config) -> None:
    if not config.proxy.enabled:
        click.echo("dockyard: the configuration has no proxy upstreams", err=True)
        sys.exit(2)


@main.group()
def proxy() -> None:
    """The pull-through cache: upstreams, pre-fetching, expiry."""


@proxy.command("list")
@config_argument
@json_option
def list_upstreams(config_path: str | None, as_json: bool) -> None:
    """Each upstream: where it is mounted, whether it answers now, what its cache holds."""
    from dockyard.registry.proxy import PullThroughCache
    from dockyard.registry.proxy_expiry import cache_repositories
    from dockyard.registry.usage import measure

    config = load(config_path)
    _require_proxy(config)

    async def work(registry: Registry) -> list[dict[str, Any]]:
        cache = PullThroughCache(registry, config.proxy)
        try:
            statuses = await asyncio.gather(*(c.ping() for c in cache.clients.values()))
            usage = await measure(registry.storage)
        finally:
            await cache.close()
        caches = cache_repositories([r.name for r in usage.repositories], cache.router)
        rows = []
        for upstream, status in zip(cache.router.upstreams, statuses, strict=True):
            mine = [
                r
                for r in usage.repositories
                if r.name in caches and cache.router.upstream_of(r.name) is upstream
            ]
            rows.append(
                {
                    "name": upstream.name,
                    "prefix": upstream.prefix,
                    "remoteurl": upstream.remoteurl,
                    "default": upstream.default,
                    "status": status,
                    "repositories": len(mine),
                    "bytes": sum(r.total_bytes for r in mine),
                    "ttl_seconds": upstream.ttl,
                }
            )
        return rows

    rows = _run(config, work)
    if as_json:
        echo_json(rows)
        return
    columns = [
        Column("UPSTREAM"),
        Column("PREFIX"),
        Column("URL"),
        Column("STATUS"),
        Column("REPOSITORIES", numeric=True),
        Column("CACHED", numeric=True),
    ]
    echo_table(
        columns,
        [
            [
                r["name"],
                (r["prefix"] or "(every name)") + (" (default)" if r["default"] else ""),
                r["remoteurl"],
                r["status"],
                str(r["repositories"]),
                format_size(r["bytes"]),
            ]
            for r in rows
        ],
    )


@proxy.command()
@click.argument("images", nargs=-1, required=True)
@click.option("--config", "config_path", default=None, help="Configuration file.")
@json_option
def warm(images: tuple[str, ...], config_path: str | None, as_json: bool) -> None:
    """Fetch IMAGES (name[:tag] or name@digest, as clients name them on this registry, e.g.
    docker.io/library/alpine:3.20) into the cache, every platform of a multi-platform image."""
    from dockyard.registry.proxy import PullThroughCache
    from dockyard.registry.proxy_warm import warm as warm_image

    config = load(config_path)
    _require_proxy(config)

    async def work(registry: Registry) -> list[Any]:
        cache = PullThroughCache(registry, config.proxy, registry.upload_locks.redis_client)
        try:
            return [await warm_image(cache, image) for image in images]
        finally:
            await cache.close()

    reports = _run(config, work)
    if as_json:
        echo_json([asdict(r) for r in reports])
    else:
        for r in reports:
            outcome = "; ".join(r.errors) if r.errors else "cached"
            click.echo(
                f"{r.image}: {r.manifests} manifests, {r.blobs} blobs "
                f"({format_size(r.fetched_bytes)} fetched now): {outcome}"
            )
    sys.exit(1 if any(r.errors for r in reports) else 0)


@proxy.command()
@config_argument
@click.option("--dry-run", is_flag=True, help="Only report what would expire.")
@json_option
def expire(config_path: str | None, dry_run: bool, as_json: bool) -> None:
    """Unlink cached content older than its upstream's ttl (scheduled servers do it too);
    garbage collection then reclaims the space."""
    from dockyard.registry.proxy_expiry import expire as expire_cache
    from dockyard.upstream.routing import Router

    config = load(config_path)
    _require_proxy(config)
    router = Router(config.proxy)
    report = _run(config, lambda registry: expire_cache(registry, router, dry_run=dry_run))
    if as_json:
        echo_json(asdict(report))
        return
    for item in report.expired:
        click.echo(f"{'would expire' if dry_run else 'expired'}: {item}")
    click.echo(report.summary())
