"""Blobs: ``GET|HEAD|DELETE /v2/<name>/blobs/<digest>`` (end-2, end-10)."""

from __future__ import annotations

import re

from aiohttp import web

from dockyard import metrics
from dockyard.api.base import (
    digest_param,
    proxied_of,
    repository_of,
    require_delete,
    writable_repository_of,
)
from dockyard.api.sendfile import SendfileResponse
from dockyard.auth.access import Need, requires
from dockyard.errors import ErrorCode, RegistryError
from dockyard.events import blob_event, delete_event
from dockyard.oci.digest import Digest
from dockyard.registry.blobs import BlobInfo, LocalRange, StreamedRange
from dockyard.registry.proxy import ProxiedRepository
from dockyard.registry.repository import Repository

# ASCII digits: \d also matches other scripts' digits.
_RANGE = re.compile(r"^bytes=([0-9]*)-([0-9]*)\Z", re.IGNORECASE)
#: Beyond any blob: a position written with more digits than this is treated as this.
_FAR = 10**18


def _position(digits: str) -> int:
    # int() refuses more than 4300 digits (ValueError); a header may carry 1 MiB of them.
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) <= 18 else _FAR


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``(offset, length)`` for a single-range ``Range: bytes=...`` header, None to serve the
    whole blob (no header, another unit, or several ranges, which RFC 9110 lets us ignore).
    Raises 416 for a range that is malformed or lies outside the blob."""
    if not header:
        return None
    header = header.strip()
    if not header.lower().startswith("bytes=") or "," in header:
        return None
    match = _RANGE.match(header.replace(" ", ""))
    if not match or match.group(1) == match.group(2) == "":
        raise _unsatisfiable(size, f"malformed range {header!r}")
    first, last = match.group(1), match.group(2)
    if first == "":  # suffix: the last N bytes
        length = min(_position(last), size)
        if length == 0:
            raise _unsatisfiable(size, "empty suffix range")
        return size - length, length
    start = _position(first)
    end = _position(last) if last else size - 1
    if start >= size or end < start:
        raise _unsatisfiable(size, f"range {header!r} is outside a blob of {size} bytes")
    end = min(end, size - 1)
    return start, end - start + 1


def _unsatisfiable(size: int, reason: str) -> RegistryError:
    return RegistryError(
        ErrorCode.RANGE_INVALID,
        reason,
        {"size": size},
        headers={"Content-Range": f"bytes */{size}"},
    )


def blob_headers(digest: Digest, size: int) -> dict[str, str]:
    return {
        "Docker-Content-Digest": str(digest),
        "ETag": f'"{digest}"',
        "Accept-Ranges": "bytes",
        "Cache-Control": "max-age=31536000",
        "Content-Type": "application/octet-stream",
        "Content-Length": str(size),
    }


def _not_modified(request: web.Request, digest: Digest) -> bool:
    tags = request.headers.get("If-None-Match", "")
    return any(t.strip().strip('"') in (str(digest), "*") for t in tags.split(",") if t.strip())


@requires(Need.PULL)
async def get_blob(request: web.Request) -> web.StreamResponse:
    """Served (GET, HEAD, a redirect): a pull event, as registry:2 sends."""
    response, size = await _get_blob(request)
    await blob_event(request, "pull", request.match_info["name"], digest_param(request), size)
    return response


async def _get_blob(request: web.Request) -> tuple[web.StreamResponse, int]:
    digest = digest_param(request)
    proxied = proxied_of(request)
    if proxied is not None:
        info = await proxied.cached_blob(digest)
        m = metrics.active
        if m is not None:
            m.proxy_requests.labels("blob").inc()
            (m.proxy_hits if info is not None else m.proxy_misses).labels("blob").inc()
        if info is None:
            response = await _from_upstream(request, proxied, digest)
            return response, response.content_length or 0
        return await _serve(request, proxied.local, digest, info), info.size
    repo = repository_of(request)
    info = await repo.blobs.stat(digest)
    return await _serve(request, repo, digest, info), info.size


async def _serve(
    request: web.Request, repo: Repository, digest: Digest, info: BlobInfo
) -> web.StreamResponse:
    url = await repo.blobs.redirect_url(digest, request.method)
    if url is not None:
        # Object storage serves the bytes itself, as registry:2 does (storage.redirect).
        return web.Response(
            status=307, headers={"Location": url, "Docker-Content-Digest": str(digest)}
        )
    headers = blob_headers(digest, info.size)
    if _not_modified(request, digest):
        del headers["Content-Length"]
        return web.Response(status=304, headers=headers)
    if request.method == "HEAD":
        return web.Response(status=200, headers=headers)

    status, offset, length = 200, 0, info.size
    byte_range = parse_range(request.headers.get("Range"), info.size)
    if byte_range is not None:
        status, (offset, length) = 206, byte_range
        headers["Content-Range"] = f"bytes {offset}-{offset + length - 1}/{info.size}"
    headers["Content-Length"] = str(length)
    content = await repo.blobs.open(digest, offset, length)
    if isinstance(content, LocalRange):  # zero-copy from a local file
        return SendfileResponse(
            content.file, content.offset, content.length, status=status, headers=headers
        )
    return await _stream(request, content, status, headers)


async def _from_upstream(
    request: web.Request, proxied: ProxiedRepository, digest: Digest
) -> web.StreamResponse:
    """A blob not cached yet. HEAD asks the upstream without fetching; a range waits for the
    whole blob to be cached, then is served from it; a plain GET receives the bytes as they
    arrive while they are cached (registry.proxy.BlobFetch)."""
    if request.method == "HEAD":
        size = await proxied.remote_blob_size(digest)
        if size is None:
            raise RegistryError(ErrorCode.BLOB_UNKNOWN, detail={"digest": str(digest)})
        headers = blob_headers(digest, max(size, 0))
        if size < 0:
            del headers["Content-Length"]  # the upstream did not say either
        return web.Response(status=200, headers=headers)
    fetched = await proxied.fetch(digest)
    if isinstance(fetched, BlobInfo):  # another process cached it meanwhile
        return await _serve(request, proxied.local, digest, fetched)
    if fetched.size is None or "Range" in request.headers or _not_modified(request, digest):
        fetched.detach()
        await fetched.done
        return await _serve(request, proxied.local, digest, await proxied.local.blobs.stat(digest))
    # Prepared with the first bytes: a fetch that fails before any (a small blob is held back
    # whole until verified) is answered with an error status.
    response = web.StreamResponse(status=200, headers=blob_headers(digest, fetched.size))
    try:
        async for chunk in fetched.chunks():
            if not response.prepared:
                await response.prepare(request)
            await response.write(chunk)
    except RegistryError:
        if response.prepared and request.transport is not None:
            # 200 and the length are sent: a connection that ends short of it is the one way
            # left to tell the client (an error response now would be read as the blob's bytes)
            request.transport.abort()
        raise
    finally:
        fetched.detach()  # however this ends, the fetch must not wait for this client
    if not response.prepared:
        await response.prepare(request)
    await response.write_eof()
    return response


async def _stream(
    request: web.Request, content: StreamedRange, status: int, headers: dict[str, str]
) -> web.StreamResponse:
    """Serve through Python from storage with no local file."""
    try:
        response = web.StreamResponse(status=status, headers=headers)
        await response.prepare(request)
        async for chunk in content:
            await response.write(chunk)
        await response.write_eof()
    finally:
        await content.close()
    return response


@requires(Need.DELETE)
async def delete_blob(request: web.Request) -> web.Response:
    repo = writable_repository_of(request)
    require_delete(request)
    digest = digest_param(request)
    await repo.blobs.unlink(digest)
    await delete_event(request, repo.name, digest)
    return web.Response(status=202, headers={"Docker-Content-Digest": str(digest)})


def routes(prefix: str) -> list[web.AbstractRouteDef]:
    path = prefix + "/v2/{name:.+}/blobs/{digest}"
    return [web.get(path, get_blob), web.delete(path, delete_blob)]
