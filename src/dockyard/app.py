"""Assemble the aiohttp application: storage -> registry model -> HTTP routes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from dockyard import metrics, tracing
from dockyard.api import blobs, catalog, health, manifests, referrers, tags, uploads, v1, version
from dockyard.api.base import PROXY_KEY, REGISTRY_KEY
from dockyard.api.middleware import (
    encoded_separator_middleware,
    error_middleware,
    read_only_middleware,
)
from dockyard.auth.accounts import OPEN
from dockyard.auth.setup import build_auth
from dockyard.clientaddress import TrustedProxies
from dockyard.config import Config
from dockyard.events import EVENTS_KEY, Events
from dockyard.heartbeat import Heartbeat
from dockyard.http.request import CONFIG_KEY, TRACE_ID, client_address_middleware
from dockyard.http.responses import add_common_headers
from dockyard.lifecycle import InFlight
from dockyard.registry.configured import open_store
from dockyard.registry.index import Index
from dockyard.shared import Shared

INFLIGHT_KEY = web.AppKey("inflight", InFlight)


def metrics_wanted(config: Config) -> bool:
    """Metrics are collected only where they can be scraped: on the debug address."""
    debug = config.http.debug
    return bool(debug.addr) and debug.prometheus.enabled


def build_app(config: Config, secret: str, shared: Shared | None = None) -> web.Application:
    """``shared``: what the workers of this instance share (see dockyard.shared); without it,
    this process keeps its own."""
    registry = open_store(config, secret=secret)
    inflight = InFlight()
    heartbeat = Heartbeat.for_config(config, registry.storage, registry.blobs.cache.kind)
    auth = build_auth(config, shared.login_failures if shared is not None else None)
    trusted = TrustedProxies(config.http.trustedproxies)
    middlewares = []
    collected = metrics.enable() if metrics_wanted(config) else None
    if collected is not None:
        from dockyard.api.metrics import metrics_middleware

        # Outermost: it sees every request's final status, errors included.
        middlewares.append(metrics_middleware(collected))
    middlewares.append(client_address_middleware(trusted))
    if tracing.configure():  # OTEL_* variables; nothing of OpenTelemetry is loaded otherwise
        middlewares.append(tracing.middleware(TRACE_ID))
    middlewares += [
        inflight.middleware,
        error_middleware,
        encoded_separator_middleware(config.http.prefix),
    ]
    if auth is not None:
        middlewares.append(auth.middleware)
    if config.ui.enabled:
        from dockyard import ui  # Jinja2 is loaded only when the UI is on

        # After auth's, which lets the UI's paths through: the UI signs its visitors in itself.
        middlewares.append(ui.ui_middleware(config.http.prefix))
    if config.storage.maintenance.readonly.enabled:
        middlewares.append(read_only_middleware)
    else:
        middlewares.append(heartbeat.write_gate)
    app = web.Application(middlewares=middlewares)
    if not config.storage.maintenance.readonly.enabled:
        app[v1.WRITES_KEY] = heartbeat.accepting_writes  # the retention route's own gate
    app[INFLIGHT_KEY] = inflight
    app[REGISTRY_KEY] = registry
    cache = None
    if config.proxy.enabled:
        from dockyard.registry.proxy import PullThroughCache

        cache = PullThroughCache(registry, config.proxy, registry.upload_locks.redis_client)
        app[PROXY_KEY] = cache
    checks = app[health.HEALTH_KEY] = health.HealthCheck(registry, config.health.storagedriver)
    app[CONFIG_KEY] = config
    events = Events.for_config(config)
    if events is not None:
        app[EVENTS_KEY] = events
    prefix = config.http.prefix
    # Order matters only where patterns could overlap; the most specific come first.
    for module in (version, catalog, tags, manifests, referrers, uploads, blobs, health, v1):
        app.add_routes(module.routes(prefix))
    if auth is not None and auth.token_server is not None:
        from dockyard.api import token  # loads the JWT stack only when it is used

        app[token.TOKEN_SERVER_KEY] = auth.token_server
        app.add_routes(token.routes(prefix))
    if config.ui.enabled:
        ui.setup(app, config, auth.accounts if auth is not None else OPEN, secret)
    app.on_response_prepare.append(add_common_headers(config.http.headers))
    app.on_response_prepare.append(inflight.on_prepare)

    async def record_presence(_: web.Application) -> None:
        await heartbeat.start()  # before the worker listens (registry.presence)
        await checks.start()
        if events is not None:
            await events.start()

    async def close_registry(_: web.Application) -> None:
        await heartbeat.stop()  # the last request has finished: the record can go
        await checks.stop()
        if events is not None:
            await events.close()
        tracing.flush()
        if auth is not None and auth.throttle is not None:
            await auth.throttle.close()
        if cache is not None:
            await cache.close()
        await registry.close()

    app.on_startup.append(record_presence)
    app.on_cleanup.append(close_registry)
    if collected is not None:
        app.cleanup_ctx.append(_flushing(collected))
    if registry.index is not None:
        app.cleanup_ctx.append(_writing_pulls(registry.index))
    return app


def _writing_pulls(index: Index) -> Callable[[web.Application], AsyncIterator[None]]:
    """The pull times this worker noted reach the index every ``index.pullflush`` seconds."""

    async def writing(_: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(index.run_pull_flusher())
        yield
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    return writing


def _flushing(collected: metrics.Metrics) -> Callable[[web.Application], AsyncIterator[None]]:
    """The hot path's counts reach the exported values every second, and once more at the end."""

    async def flushing(_: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(collected.flush_forever())
        yield
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        collected.flush()

    return flushing
