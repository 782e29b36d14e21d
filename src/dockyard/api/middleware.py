"""The application's own middlewares (auth's is in dockyard.auth.middleware): the error
middleware, where every failure of a request is answered (rendered by
dockyard.http.responses), the refusal of encoded separators in paths, and read-only mode."""

from __future__ import annotations

import asyncio
import logging
import re

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from dockyard.api.base import CONTINUE_SENT, EXPECTS_CONTINUE
from dockyard.api.v1.common import ROOT as API_ROOT
from dockyard.auth.access import Need, need_of
from dockyard.errors import ErrorCode, RegistryError
from dockyard.http.responses import Handler, error_response
from dockyard.storage.driver import StorageError

log = logging.getLogger("dockyard.api")

#: An error answered before the request body was read (a 401 before an upload, a 413 part-way
#: through a manifest, a quota refusal) closes the connection; before closing, the unread body
#: is read and discarded for at most this long and this much, so that the client reads the
#: answer rather than a connection reset: closing with bytes unread makes the kernel send a
#: reset, and a client that was still writing loses the answer it had not read yet. The time is
#: the bound that matters (a client reads its answer within it); the byte cap only stops one
#: second of loopback from costing a second of CPU. aiohttp alone would go on reading for 10 s.
UNREAD_BODY_DRAIN_BYTES = 64 * 1024 * 1024
UNREAD_BODY_DRAIN_SECONDS = 1.0


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        response = await handler(request)
    except RegistryError as exc:
        return await _answer_error(request, exc)
    except web.HTTPException as exc:
        return await _answer_error(request, _from_http_exception(exc))
    except HttpProcessingError as exc:
        # A body that broke off midway (client went away, bad chunked encoding).
        log.info("request body failed: %s %s: %s", request.method, request.path, exc.message)
        return await _answer_error(
            request,
            RegistryError(ErrorCode.BLOB_UPLOAD_INVALID, f"request body failed: {exc.message}"),
        )
    except ConnectionResetError:
        raise
    except StorageError:
        log.exception("storage failure on %s %s", request.method, request.path)
        return await _answer_error(request, RegistryError(ErrorCode.UNKNOWN, "storage failure"))
    except Exception:
        log.exception("unexpected failure on %s %s", request.method, request.path)
        return await _answer_error(request, RegistryError(ErrorCode.UNKNOWN))
    if request.can_read_body:
        # Answered without taking the body (an upload start that ignores one): the connection
        # cannot carry another request until the rest arrives, which it need not. aiohttp reads
        # and discards it for at most UNREAD_BODY_DRAIN_SECONDS (its lingering time, set in
        # worker.py), then closes.
        response.force_close()
    return response


async def _answer_error(request: web.Request, error: RegistryError) -> web.StreamResponse:
    response = error_response(error)
    if not request.can_read_body:
        return response
    # The body was not read, or not all of it (401 before an upload, 413 inside a manifest):
    # answer, drain a little, and close, rather than read the rest of what may be gigabytes.
    response.force_close()
    try:
        await response.prepare(request)
        await response.write_eof()
        if not request.get(EXPECTS_CONTINUE) or request.get(CONTINUE_SENT):
            await _drain(request)  # otherwise the client waits for us: nothing is coming
    except ConnectionError:
        pass
    request.protocol.force_close()  # now, not after aiohttp's 10 s of lingering
    return response


async def _drain(request: web.Request) -> None:
    budget = UNREAD_BODY_DRAIN_BYTES
    try:
        async with asyncio.timeout(UNREAD_BODY_DRAIN_SECONDS):
            while budget > 0:
                chunk = await request.content.readany()
                if not chunk:
                    return
                budget -= len(chunk)
    except (TimeoutError, HttpProcessingError, web.RequestPayloadError):
        pass


def _from_http_exception(exc: web.HTTPException) -> RegistryError:
    if exc.status == 405:
        return RegistryError(
            ErrorCode.UNSUPPORTED, f"method not allowed on {exc.reason}", status=405
        )
    if exc.status == 404:
        return RegistryError(ErrorCode.UNSUPPORTED, "no such endpoint", status=404)
    if exc.status == 413:
        return RegistryError(ErrorCode.SIZE_INVALID, "request body too large", status=413)
    return RegistryError(ErrorCode.UNKNOWN, exc.reason, status=exc.status)


_ENCODED_SEPARATOR = re.compile(r"%(?:2f|5c)", re.IGNORECASE)


def encoded_separator_middleware(prefix: str) -> web.Middleware:
    """``%2F`` (or ``%5C``) in a ``/v2`` or JSON API path is refused with NAME_INVALID:
    aiohttp's router decodes it, so ``/v2/a%2Fb/...`` would name the repository ``a/b``, a name
    the path never spelled. Refused before authentication, so no token scope is ever checked
    against one."""
    roots = (prefix + "/v2/", prefix + API_ROOT + "/")

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.raw_path.partition("?")[0]
        if path.startswith(roots) and _ENCODED_SEPARATOR.search(path):
            raise RegistryError(
                ErrorCode.NAME_INVALID,
                "an encoded '/' or '\\' (%2F, %5C) in the path is not a separator",
            )
        return await handler(request)

    return middleware


@web.middleware
async def read_only_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """``storage.maintenance.readonly``: pulls work; pushes and deletes get 405, as registry:2
    answers them (it unregisters those methods), with an UNSUPPORTED body saying why."""
    need = need_of(request.match_info.handler)
    if need in (Need.PUSH, Need.DELETE) and request.method not in ("GET", "HEAD"):
        raise RegistryError(
            ErrorCode.UNSUPPORTED,
            "the registry is in read-only mode (storage.maintenance.readonly.enabled)",
            status=405,
        )
    return await handler(request)
