"""Blob uploads: ``/v2/<name>/blobs/uploads/`` (end-4a/b/c, end-5, end-6, end-11, end-13, end-14).

Every response about a session carries its ``Location`` (with a freshly signed ``_state``), the
``Range`` received so far (``0-<last byte>``, without the ``bytes=`` prefix, which docker refuses)
and ``Docker-Upload-UUID``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re

from aiohttp import web

from dockyard.api.base import body_stream, content_length, writable_repository_of
from dockyard.auth.access import Need, requires
from dockyard.auth.middleware import identity_of
from dockyard.errors import ErrorCode, RegistryError
from dockyard.events import blob_event
from dockyard.http.request import url_for
from dockyard.oci.digest import CANONICAL_ALGORITHM, Digest
from dockyard.oci.names import validate_name
from dockyard.registry.repository import Repository
from dockyard.registry.uploads import ContentRange, UploadSession

#: ASCII digits only, at most 18 of them: a byte offset, never a number int() chokes on
_CONTENT_RANGE = re.compile(r"^(?:bytes[= ])?([0-9]{1,18})-([0-9]{1,18})\Z")


def upload_headers(
    request: web.Request, repo: Repository, session: UploadSession, size: int
) -> dict[str, str]:
    token = repo.uploads.token(session, size)
    return {
        "Location": url_for(request, f"/v2/{repo.name}/blobs/uploads/{session.id}?_state={token}"),
        "Range": f"0-{max(size - 1, 0)}",
        "Docker-Upload-UUID": session.id,
        "Blob-Upload-Session-ID": session.id,
    }


def blob_created(request: web.Request, repo: Repository, digest: Digest) -> web.Response:
    return web.Response(
        status=201,
        headers={
            "Location": url_for(request, f"/v2/{repo.name}/blobs/{digest}"),
            "Docker-Content-Digest": str(digest),
        },
    )


def parse_content_range(header: str | None, session_id: str) -> ContentRange | None:
    if header is None:
        return None
    match = _CONTENT_RANGE.match(header.strip())
    if not match or int(match.group(2)) < int(match.group(1)):
        raise RegistryError(
            ErrorCode.BLOB_UPLOAD_INVALID,
            f"invalid Content-Range {header!r}: expected <start>-<end>",
            {"id": session_id},
            status=416,
        )
    return ContentRange(int(match.group(1)), int(match.group(2)))


def _requested_digest(request: web.Request) -> Digest:
    values = request.query.getall("digest", [])
    if not values:
        raise RegistryError(ErrorCode.DIGEST_INVALID, "the digest query parameter is required")
    return Digest.parse(values[0])


async def _try_mount(request: web.Request, repo: Repository) -> web.Response | None:
    """end-11: link a blob from another repository; None to fall back to a new upload (the
    spec's answer when the source or digest is invalid or lacks the blob)."""
    try:
        digest = Digest.parse(request.query["mount"])
        source = request.query.get("from")
        if not source:
            return None
        validate_name(source)
    except RegistryError:
        return None
    if not identity_of(request).may_pull(source):
        return None  # not allowed to read the source: upload instead, revealing nothing
    # Also from the repository itself: the mount stamps the blob as in use (registry.gc).
    info = await repo.uploads.mount(repo.registry.repository(source).blobs, digest)
    if info is None:
        return None
    await blob_event(request, "mount", repo.name, digest, info.size, source)
    return blob_created(request, repo, digest)


@requires(Need.PUSH)
async def start_upload(request: web.Request) -> web.Response:
    repo = writable_repository_of(request)
    if "mount" in request.query:
        mounted = await _try_mount(request, repo)
        if mounted is not None:
            return mounted
    algorithm = request.query.get("digest-algorithm", CANONICAL_ALGORITHM)
    if "digest" in request.query:
        # end-4b: the whole blob in the POST body.
        digest = _requested_digest(request)
        session = await repo.uploads.start(digest.algorithm)
        try:
            await repo.uploads.append(
                session, body_stream(request), content_length=content_length(request)
            )
            info = await repo.uploads.commit(session, digest)
        except BaseException:
            with contextlib.suppress(RegistryError):
                await asyncio.shield(repo.uploads.cancel(session))
            raise
        await blob_event(request, "push", repo.name, digest, info.size)
        return blob_created(request, repo, digest)
    session = await repo.uploads.start(algorithm)
    return web.Response(status=202, headers=upload_headers(request, repo, session, 0))


async def _session(request: web.Request) -> tuple[Repository, UploadSession]:
    repo = writable_repository_of(request)
    session = await repo.uploads.resume(
        request.match_info["upload_id"], request.query.get("_state")
    )
    return repo, session


async def _append(request: web.Request, repo: Repository, session: UploadSession) -> int:
    """Append the request body; a 416 carries the session's current headers."""
    try:
        content_range = parse_content_range(request.headers.get("Content-Range"), session.id)
        return await repo.uploads.append(
            session, body_stream(request), content_range, content_length(request)
        )
    except RegistryError as exc:
        if exc.status == 416:
            size = await repo.uploads.size(session)
            exc.headers.update(upload_headers(request, repo, session, size))
        raise


@requires(Need.PUSH)
async def patch_upload(request: web.Request) -> web.Response:
    """end-5: a chunk (with ``Content-Range``) or docker's streamed body (without)."""
    repo, session = await _session(request)
    async with repo.uploads.hold(session):
        size = await _append(request, repo, session)
    return web.Response(status=202, headers=upload_headers(request, repo, session, size))


@requires(Need.PUSH)
async def finish_upload(request: web.Request) -> web.Response:
    """end-6: optionally a last chunk, then verify the digest and make the blob visible."""
    repo, session = await _session(request)
    digest = _requested_digest(request)
    async with repo.uploads.hold(session):
        if request.can_read_body:
            await _append(request, repo, session)
        info = await repo.uploads.commit(session, digest)
    await blob_event(request, "push", repo.name, digest, info.size)
    return blob_created(request, repo, digest)


@requires(Need.PUSH)
async def upload_status(request: web.Request) -> web.Response:
    """end-13: where the upload stands."""
    repo, session = await _session(request)
    size = await repo.uploads.size(session)
    return web.Response(status=204, headers=upload_headers(request, repo, session, size))


@requires(Need.PUSH)
async def cancel_upload(request: web.Request) -> web.Response:
    """end-14: drop the upload and its data."""
    repo, session = await _session(request)
    async with repo.uploads.hold(session):
        await repo.uploads.cancel(session)
    return web.Response(status=204)


def routes(prefix: str) -> list[web.AbstractRouteDef]:
    start = prefix + "/v2/{name:.+}/blobs/uploads/"
    session = prefix + "/v2/{name:.+}/blobs/uploads/{upload_id}"
    return [
        web.post(start, start_upload),
        web.post(start.rstrip("/"), start_upload),
        web.patch(session, patch_upload),
        web.put(session, finish_upload),
        web.get(session, upload_status, allow_head=False),
        web.delete(session, cancel_upload),
    ]
