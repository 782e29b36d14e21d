"""Repositories in the JSON API: the list (what the caller may pull), one repository's summary,
and deleting a whole repository.

``GET /dockyard/api/v1/repositories[?n=&last=&q=]``, ``GET|DELETE .../repositories/<name>``."""

from __future__ import annotations

from aiohttp import web

from dockyard.api.base import registry_of, require_delete, writable_repository_of
from dockyard.api.v1.common import (
    NAME_PATTERN,
    ROOT,
    flag_query,
    index_of,
    last_of,
    page_response,
    page_size,
    timestamp,
)
from dockyard.auth.access import ADMIN_SCOPE, Need, requires
from dockyard.auth.middleware import identity_of
from dockyard.errors import ErrorCode, RegistryError
from dockyard.events import repository_deleted
from dockyard.http.responses import json_response
from dockyard.oci.names import validate_name
from dockyard.registry.index import RepositorySummary


def summary_json(summary: RepositorySummary) -> dict[str, object]:
    return {
        "name": summary.name,
        "tags": summary.tags,
        "manifests": summary.manifests,
        "size": summary.size,
        "pushed": timestamp(summary.pushed),
        "pulled": timestamp(summary.pulled),
    }


@requires(Need.CATALOG)
async def list_repositories(request: web.Request) -> web.Response:
    """The repositories the caller may pull, as the catalog shows them (the same check:
    everything with htpasswd, the token server's rules with its tokens), with ``q`` a substring
    of the name. A page is read from the index in one scan that stops when it is full."""
    identity = identity_of(request)
    n = page_size(request)
    query = request.query.get("q", "")

    def visible(name: str) -> bool:
        return query in name and identity.lists(name)

    found = await index_of(request).repositories(last_of(request), n + 1, visible) if n else []
    page = found[:n]
    body = {"repositories": [summary_json(s) for s in page]}
    return page_response(request, body, n, len(found) > n, page[-1].name if page else None)


@requires(Need.PULL)
async def get_repository(request: web.Request) -> web.Response:
    name = validate_name(request.match_info["name"])
    summary = await index_of(request).repository(name)
    if summary is None:
        raise RegistryError(ErrorCode.NAME_UNKNOWN, detail={"name": name})
    return json_response(summary_json(summary))


@requires(Need.DELETE)
async def delete_repository(request: web.Request) -> web.Response:
    """The whole repository (``Registry.delete_repository``): its tags, manifests, layer links
    and uploads; blobs only it used go with the next garbage collection. The registry API's
    rules for a delete apply: the delete right on the repository, ``storage.delete.enabled``,
    no pull-through cache. ``?dry_run=true``: what would go, nothing changed."""
    repo = writable_repository_of(request)
    dry_run = flag_query(request, "dry_run")
    if not dry_run:
        require_delete(request)
    registry = registry_of(request)
    guard = registry.policies.tag_guard(repo.name)
    if guard is not None and not dry_run and not identity_of(request).is_admin:
        # Deleting the repository deletes its tags: one the policy makes immutable is refused
        # as deleting it alone would be. Administrators may, as the operator's dockyard rm
        # does. (A tag made between this look and the deletion is not checked: the model's
        # delete takes no guard.)
        planned = await registry.delete_repository(repo.name, dry_run=True)
        for tag in sorted(planned.tags):
            refusal = guard(tag)
            if refusal is not None:
                raise RegistryError(
                    ErrorCode.DENIED,
                    f"{repo.name} holds the immutable tag {tag}: only an administrator (a "
                    f"token with {ADMIN_SCOPE}) may delete the repository",
                    refusal.detail,
                )
    deletion = await registry.delete_repository(repo.name, dry_run=dry_run)
    if not dry_run:
        await repository_deleted(
            request, deletion.name, deletion.manifest_tags(), deletion.stray_tags()
        )
    return json_response(deletion.to_json())


def routes(prefix: str) -> list[web.AbstractRouteDef]:
    one = f"{prefix}{ROOT}/repositories/{{name:{NAME_PATTERN}}}"
    return [
        web.get(f"{prefix}{ROOT}/repositories", list_repositories),
        web.get(one, get_repository),
        web.delete(one, delete_repository),
    ]
