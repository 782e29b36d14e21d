"""Deleting a manifest in the JSON API: ``DELETE .../repositories/<name>/-/manifests/<digest>``."""

from __future__ import annotations

from aiohttp import web

from dockyard.api.base import digest_param, require_delete, writable_repository_of
from dockyard.api.v1.common import NAME_PATTERN, ROOT
from dockyard.auth.access import Need, requires
from dockyard.events import delete_event
from dockyard.http.responses import json_response
from dockyard.oci.digest import Digest
from dockyard.registry.repository import Repository


@requires(Need.DELETE)
async def delete_manifest(request: web.Request) -> web.Response:
    """The manifest and every tag on it, as ``DELETE /v2/<name>/manifests/<digest>``."""
    repo = writable_repository_of(request)
    digest = digest_param(request)
    tags = await delete_with_tags(request, repo, digest)
    return json_response({"repository": repo.name, "digest": str(digest), "tags": tags})


async def delete_with_tags(request: web.Request, repo: Repository, digest: Digest) -> list[str]:
    """Delete the manifest and its tags for the caller of ``request`` (this route, or the web
    UI's delete): the same right as the registry API's delete (checked by the caller), the
    same refusals (deletes disabled, an immutable tag on it, checked before anything is
    removed) and the same delete events. The tags that went with it."""
    require_delete(request)
    tags = await repo.manifests.delete(digest, repo.registry.policies.tag_guard(repo.name))
    await delete_event(request, repo.name, digest, tags)
    return tags


def routes(prefix: str) -> list[web.AbstractRouteDef]:
    path = f"{prefix}{ROOT}/repositories/{{name:{NAME_PATTERN}}}/-/manifests/{{digest}}"
    return [web.delete(path, delete_manifest)]
