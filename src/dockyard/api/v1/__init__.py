"""The JSON API, version 1, under ``<http.prefix>/dockyard/api/v1/``: repositories, tags, usage
and policies from the metadata index for the web UI and ``dockyard --url``, and deletes and
retention runs through the model, authenticated and authorised by the same middleware as
``/v2/`` (each handler declares its ``Need``). One module per resource; the OpenAPI description
is ``openapi.py``, served at ``openapi.json``."""

from __future__ import annotations

from aiohttp import web

from dockyard.api.v1 import manifests, openapi, policies, repositories, retention, tags, usage
from dockyard.api.v1.common import ROOT, WRITES_KEY

__all__ = ["ROOT", "WRITES_KEY", "routes"]


def routes(prefix: str) -> list[web.AbstractRouteDef]:
    # No two patterns overlap (a name never has a segment starting with "-"), so order is free.
    out: list[web.AbstractRouteDef] = []
    for module in (repositories, tags, manifests, usage, policies, retention, openapi):
        out += module.routes(prefix)
    return out
