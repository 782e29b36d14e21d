"""Deleting a manifest in the JSON API: ``DELETE .../repositories/<name>/-/manifests/<digest>``."""

from __future__ import annotations

from aiohttp import web

from dockyard.api.base import digest_param, require_delete, writable_repository_of
from dockyard.api.v1.common import NAME_PATTERN, ROOT
from dockyard.auth.access import Need, requires
from dockyard.events import delete_event
from dockyard.http.responses import json_response


@requires(Need.DELETE)
async def delete_manifest(request: web.Request) -> web.Response:
    """The manifest and every tag on it, as ``DELETE /v2/<name>/manifests/<digest>``: the same
    right, the same refusals (deletes disabled, a pull-through cache, an immutable tag on it,
    checked before anything is removed) and the same delete events."""
    repo = writable_repository_of(request)
    require_delete(request)
    digest = digest_param(request)
    tags = await repo.manifests.delete(digest, repo.registry.policies.tag_guard(repo.name))
    await delete_event(request, repo.name, digest, tags)
    return json_response({"repository": repo.name, "digest": str(digest), "tags": tags})


def routes(prefix: str) -> list[web.AbstractRouteDef]:
    path = f"{prefix}{ROOT}/repositories/{{name:{NAME_PATTERN}}}/-/manifests/{{digest}}"
    return [web.delete(path, delete_manifest)]
