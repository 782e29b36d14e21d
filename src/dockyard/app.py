"""Assemble the aiohttp application: storage -> registry model -> HTTP routes."""

from __future__ import annotations

from aiohttp import web

from dockyard import tracing
from dockyard.api import blobs, catalog, health, manifests, referrers, tags, uploads, version
from dockyard.api.base import PROXY_KEY, REGISTRY_KEY
from dockyard.api.middleware import (
    encoded_separator_middleware,
    error_middleware,
    read_only_middleware,
)
from dockyard.auth.setup import build_auth
from dockyard.clientaddress import TrustedProxies
from dockyard.config import Config
from dockyard.events import EVENTS_KEY, Events
from dockyard.heartbeat import Heartbeat
from dockyard.http.request import CONFIG_KEY, TRACE_ID, client_address_middleware
from dockyard.http.responses import add_common_headers
from dockyard.lifecycle import InFlight
from dockyard.registry.configured import open_store
from dockyard.shared import Shared

INFLIGHT_KEY = web.AppKey("inflight", InFlight)


def build_app(config: Config, secret: str, shared: Shared | None = None) -> web.Application:
    """``shared``: what the workers of this instance share (see dockyard.shared); without it,
    this process keeps its own."""
    registry = open_store(config, secret=secret)
    inflight = InFlight()
    heartbeat = Heartbeat.for_config(config, registry.storage, registry.blobs.cache.kind)
    auth = build_auth(config, shared.login_failures if shared is not None else None)
    trusted = TrustedProxies(config.http.trustedproxies)
    middlewares = [client_address_middleware(trusted)]
    if tracing.configure():  # OTEL_* variables; nothing of OpenTelemetry is loaded otherwise
        middlewares.append(tracing.middleware(TRACE_ID))
    middlewares += [
        inflight.middleware,
        error_middleware,
        encoded_separator_middleware(config.http.prefix),
    ]
    if auth is not None:
        middlewares.append(auth.middleware)
    if config.storage.maintenance.readonly.enabled:
        middlewares.append(read_only_middleware)
    else:
        middlewares.append(heartbeat.write_gate)
    app = web.Application(middlewares=middlewares)
    app[INFLIGHT_KEY] = inflight
    app[REGISTRY_KEY] = registry
    cache = None
    if config.proxy.enabled:
        from dockyard.registry.proxy import PullThroughCache

        cache = PullThroughCache(registry, config.proxy, registry.upload_locks.redis_client)
        app[PROXY_KEY] = cache
    app[health.HEALTH_KEY] = health.HealthCheck(registry)
    app[CONFIG_KEY] = config
    events = Events.for_config(config)
    if events is not None:
        app[EVENTS_KEY] = events
    prefix = config.http.prefix
    # Order matters only where patterns could overlap; the most specific come first.
    for module in (version, catalog, tags, manifests, referrers, uploads, blobs, health):
        app.add_routes(module.routes(prefix))
    if auth is not None and auth.token_server is not None:
        from dockyard.api import token  # loads the JWT stack only when it is used

        app[token.TOKEN_SERVER_KEY] = auth.token_server
        app.add_routes(token.routes(prefix))
    app.on_response_prepare.append(add_common_headers(config.http.headers))
    app.on_response_prepare.append(inflight.on_prepare)

    async def record_presence(_: web.Application) -> None:
        await heartbeat.start()  # before the worker listens (registry.presence)
        if events is not None:
            await events.start()

    async def close_registry(_: web.Application) -> None:
        await heartbeat.stop()  # the last request has finished: the record can go
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
    return app
