"""Tags in the JSON API: a repository's tags with digest, size and times, and deleting one.

``GET .../repositories/<name>/-/tags[?n=&last=]``, ``DELETE .../repositories/<name>/-/tags/<tag>``.
"""

from __future__ import annotations

from aiohttp import web

from dockyard.api.base import require_delete, writable_repository_of
from dockyard.api.v1.common import (
    NAME_PATTERN,
    ROOT,
    index_of,
    last_of,
    page_response,
    page_size,
    timestamp,
)
from dockyard.auth.access import Need, requires
from dockyard.errors import ErrorCode, RegistryError
from dockyard.events import delete_event
from dockyard.http.responses import json_response
from dockyard.oci.digest import Digest
from dockyard.oci.names import validate_name, validate_tag
from dockyard.registry.repository import Repository


@requires(Need.PULL)
async def list_tags(request: web.Request) -> web.Response:
    """A page of tags, sorted, from the index: a seek and ``n`` rows, then one seek per
    manifest the page names for its size and media type (the record of the manifest; an image's
    size is its manifest, config and layers)."""
    name = validate_name(request.match_info["name"])
    index = index_of(request)
    n = page_size(request)
    found = await index.tags(name, last_of(request), n + 1) if n else []
    page = found[:n]
    if not page and await index.repository(name) is None:
        raise RegistryError(ErrorCode.NAME_UNKNOWN, detail={"name": name})
    records = await index.manifests(name, (t.digest for t in page))
    tags = []
    for t in page:
        record = records.get(t.digest)
        tags.append(
            {
                "tag": t.tag,
                "digest": str(t.digest),
                "media_type": record.media_type if record else None,
                "size": record.size if record else None,
                "pushed": timestamp(t.pushed),
                "pulled": timestamp(t.pulled),
            }
        )
    body = {"name": name, "tags": tags}
    return page_response(request, body, n, len(found) > n, page[-1].tag if page else None)


@requires(Need.DELETE)
async def delete_tag(request: web.Request) -> web.Response:
    """Only the tag (its manifest stays), as ``DELETE /v2/<name>/manifests/<tag>``."""
    repo = writable_repository_of(request)
    tag = validate_tag(request.match_info["tag"])
    digest = await untag(request, repo, tag)
    return json_response({"repository": repo.name, "tag": tag, "digest": str(digest)})


async def untag(request: web.Request, repo: Repository, tag: str) -> Digest:
    """Delete ``tag`` for the caller of ``request`` (this route, or the web UI's delete):
    the same right as the registry API's delete (checked by the caller), the same refusals
    (deletes disabled, an immutable tag) and the same delete event. The digest it pointed at;
    MANIFEST_UNKNOWN for no such tag."""
    require_delete(request)
    guard = repo.registry.policies.tag_guard(repo.name)
    refusal = guard(tag) if guard is not None else None
    if refusal is not None:
        raise refusal
    digest = await repo.tags.resolve(tag)
    await repo.tags.untag(tag)
    await delete_event(request, repo.name, tags=[tag])
    return digest


def routes(prefix: str) -> list[web.AbstractRouteDef]:
    base = f"{prefix}{ROOT}/repositories/{{name:{NAME_PATTERN}}}/-/tags"
    return [web.get(base, list_tags), web.delete(base + "/{tag}", delete_tag)]
