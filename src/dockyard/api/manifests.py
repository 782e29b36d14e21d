"""Manifests: ``/v2/<name>/manifests/<reference>`` (end-3, end-7a/b, end-9)."""

from __future__ import annotations

from aiohttp import web

from dockyard.api.base import (
    body_stream,
    cache_headers,
    proxied_of,
    registry_of,
    repository_of,
    require_delete,
    writable_repository_of,
)
from dockyard.auth.access import Need, requires
from dockyard.errors import ErrorCode, RegistryError
from dockyard.events import delete_event, manifest_event
from dockyard.http.request import url_for
from dockyard.oci.digest import Digest, is_digest
from dockyard.oci.manifest import MAX_MANIFEST_BYTES
from dockyard.oci.names import validate_tag
from dockyard.registry.manifests import StoredManifest
from dockyard.registry.repository import Repository


def _parse_reference(reference: str) -> Digest | str:
    """GET and HEAD: a reference that is neither a valid tag nor a digest this registry can
    hold names no manifest, so 404 MANIFEST_UNKNOWN (the OCI conformance suite asks for it, e.g.
    for ``.INVALID_MANIFEST_NAME``); a PUT to one is still refused as TAG_INVALID."""
    try:
        return Digest.parse(reference) if is_digest(reference) else validate_tag(reference)
    except RegistryError:
        raise RegistryError(
            ErrorCode.MANIFEST_UNKNOWN,
            "no manifest can have this reference: it is neither a tag nor a digest",
            {"reference": reference},
        ) from None


async def _stored(request: web.Request) -> tuple[StoredManifest, dict[str, str]]:
    """The manifest asked for, and headers saying where it came from when that matters."""
    reference = _parse_reference(request.match_info["reference"])
    proxied = proxied_of(request)
    if proxied is not None:
        answer = await proxied.manifest(reference)
        return answer.manifest, cache_headers(answer.stale)
    repo: Repository = repository_of(request)
    digest = reference if isinstance(reference, Digest) else await repo.tags.resolve(reference)
    return await repo.manifests.get(digest), {}


def _not_modified(request: web.Request, digest: Digest) -> bool:
    tags = request.headers.get("If-None-Match", "")
    return any(t.strip().strip('"') == str(digest) for t in tags.split(","))


@requires(Need.PULL)
async def get_manifest(request: web.Request) -> web.Response:
    stored, headers = await _stored(request)
    headers |= {
        "Content-Type": stored.media_type,
        "Docker-Content-Digest": str(stored.digest),
        "ETag": f'"{stored.digest}"',
    }
    index = registry_of(request).index
    if index is not None:  # in memory until the next flush: no write on the pull path
        index.note_pull(request.match_info["name"], stored.digest)
    if _not_modified(request, stored.digest):
        return web.Response(status=304, headers=headers)
    reference = request.match_info["reference"]
    await manifest_event(
        request,
        "pull",
        request.match_info["name"],
        stored.digest,
        stored.media_type,
        stored.body,
        None if is_digest(reference) else reference,
    )
    if request.method == "HEAD":
        headers["Content-Length"] = str(len(stored.body))
        return web.Response(status=200, headers=headers)
    return web.Response(status=200, body=stored.body, headers=headers)


async def _read_manifest_body(request: web.Request) -> bytes:
    declared = request.content_length
    if declared is not None and declared > MAX_MANIFEST_BYTES:
        raise _too_large(declared)
    body = bytearray()
    async for chunk in body_stream(request):
        body += chunk
        if len(body) > MAX_MANIFEST_BYTES:
            raise _too_large(len(body))
    return bytes(body)


def _too_large(size: int) -> RegistryError:
    return RegistryError(
        ErrorCode.MANIFEST_INVALID,
        f"manifest is larger than {MAX_MANIFEST_BYTES} bytes",
        {"size": size, "limit": MAX_MANIFEST_BYTES},
        status=413,
    )


@requires(Need.PUSH)
async def put_manifest(request: web.Request) -> web.Response:
    repo = writable_repository_of(request)
    reference = request.match_info["reference"]
    if is_digest(reference):
        digest: Digest | None = Digest.parse(reference)
        tags = [validate_tag(t) for t in request.query.getall("tag", [])]
    else:
        digest = None
        tags = [validate_tag(reference)]
    body = await _read_manifest_body(request)
    pushed = await repo.manifests.put(
        body,
        request.headers.get("Content-Type"),
        digest,
        tags,
        sparse=repo.registry.sparse_manifests,
        guard=repo.registry.policies.tag_guard(repo.name),
    )
    headers = {
        "Location": url_for(request, f"/v2/{repo.name}/manifests/{pushed.digest}"),
        "Docker-Content-Digest": str(pushed.digest),
    }
    if pushed.manifest.subject is not None:
        headers["OCI-Subject"] = str(pushed.manifest.subject.digest)
    response = web.Response(status=201, headers=headers)
    if digest is not None:
        for tag in tags:
            response.headers.add("OCI-Tag", tag)
    media_type = pushed.manifest.media_type
    for tag in tags or [None]:
        await manifest_event(request, "push", repo.name, pushed.digest, media_type, body, tag)
    return response


@requires(Need.DELETE)
async def delete_manifest(request: web.Request) -> web.Response:
    """By digest: the manifest and every tag on it. By tag: only the tag."""
    repo = writable_repository_of(request)
    require_delete(request)
    reference = request.match_info["reference"]
    guard = repo.registry.policies.tag_guard(repo.name)
    if is_digest(reference):
        digest = Digest.parse(reference)
        tags = await repo.manifests.delete(digest, guard)
        await delete_event(request, repo.name, digest, tags)
    else:
        tag = validate_tag(reference)
        refusal = guard(tag) if guard is not None else None
        if refusal is not None:
            raise refusal
        await repo.tags.untag(tag)
        await delete_event(request, repo.name, tags=[tag])
    return web.Response(status=202)


def routes(prefix: str) -> list[web.AbstractRouteDef]:
    path = prefix + "/v2/{name:.+}/manifests/{reference}"
    return [
        web.get(path, get_manifest),
        web.put(path, put_manifest),
        web.delete(path, delete_manifest),
    ]
