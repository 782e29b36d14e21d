"""Dockyard's built-in web UI at ``<http.prefix>/ui/`` (``ui.enabled``, on by default).

Server-rendered pages (Jinja2, autoescaped) over the same registry model and JSON API
functions as everything else, never another way into storage; a little progressive script
from its own static files; sessions in signed cookies (dockyard.ui.sessions) with the
registry's own accounts (dockyard.auth.accounts). One module per page: repositories,
repository (tags), manifests (tag, manifest, compare), layers (file lists), usage, delete,
login."""

from __future__ import annotations

from importlib import resources

import jinja2
from aiohttp import web

from dockyard.api.v1.common import NAME_PATTERN
from dockyard.auth.accounts import Accounts
from dockyard.clientaddress import TrustedProxies
from dockyard.config import Config
from dockyard.ui import delete, layers, login, manifests, repositories, repository, usage
from dockyard.ui.core import UI_STATE, UiState, ui_middleware, ui_root
from dockyard.ui.sessions import SessionCodec

__all__ = ["setup", "ui_middleware"]


def templates() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("dockyard.ui", "templates"),
        autoescape=True,  # every template, whatever its name
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def setup(app: web.Application, config: Config, accounts: Accounts, secret: str) -> None:
    """Add the UI's routes and state to ``app`` (whose middlewares include
    :func:`ui_middleware`, after auth's)."""
    prefix = config.http.prefix
    root = prefix + "/ui"
    app[UI_STATE] = UiState(
        config=config,
        accounts=accounts,
        codec=SessionCodec(secret, config.ui.sessionlifetime),
        trusted=TrustedProxies(config.http.trustedproxies),
        templates=templates(),
        layers=layers.listings_for(app, config),
    )
    static = resources.files("dockyard.ui") / "static"
    app.router.add_static(root + "/static", str(static), show_index=False, follow_symlinks=False)
    routes: list[web.AbstractRouteDef] = [web.get(root, _to_root)]
    routes += repositories.routes(root)
    routes += login.routes(root)
    routes += usage.routes(root)
    for module in (repository, manifests, layers, delete):
        routes += module.routes(root, NAME_PATTERN)
    app.add_routes(routes)


async def _to_root(request: web.Request) -> web.StreamResponse:
    raise web.HTTPMovedPermanently(location=ui_root(request) + "/")
