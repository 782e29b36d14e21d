"""The configured storage policies and quotas, for administrators:
``GET /dockyard/api/v1/policies``."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from dockyard.api.v1.common import ROOT
from dockyard.auth.access import Need, requires
from dockyard.http.request import CONFIG_KEY
from dockyard.http.responses import json_response
from dockyard.registry.retention import RetentionPolicy


@requires(Need.ADMIN)
async def policies(request: web.Request) -> web.Response:
    """``policies`` in their order (the first whose globs match a repository is its policy),
    each with its retention rules as ``dockyard retention`` reports them and the id a run's
    confirmation is recorded under; then ``quotas``."""
    config = request.app[CONFIG_KEY]
    out: list[dict[str, Any]] = []
    for policy in config.policies:
        retention = RetentionPolicy.from_config(policy)
        out.append(
            {
                "repositories": list(policy.repositories),
                "immutabletags": list(policy.immutabletags),
                "retention": retention.describe() if retention is not None else None,
                "retention_id": retention.id if retention is not None else None,
            }
        )
    quotas = [{"scope": q.scope, "limit": q.limit} for q in config.quotas]
    return json_response({"policies": out, "quotas": quotas})


def routes(prefix: str) -> list[web.AbstractRouteDef]:
    return [web.get(f"{prefix}{ROOT}/policies", policies)]
