"""What the JSON API's resources share: where it lives, keyset pages (``?n=&last=``), times, flags,
request bodies, and the metadata index it answers from."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from dockyard.api.base import body_stream, int_query, registry_of, require_delete
from dockyard.errors import ErrorCode, RegistryError
from dockyard.http.request import CONFIG_KEY
from dockyard.http.responses import json_response
from dockyard.registry.index import Index

#: the JSON API's root under ``http.prefix``; bump the version for an incompatible change
ROOT = "/dockyard/api/v1"
#: a page when ``n`` is not given (at most ``catalog.maxentries`` may be asked for)
DEFAULT_PAGE = 100
#: the largest JSON request body (the retention request is a few flags)
MAX_BODY = 64 * 1024

#: A repository name in a path: segments that do not start with ``-`` (no repository name
#: segment can), so ``/-/`` separates the name from what follows it unambiguously even though
#: names hold ``/`` (``team/tags`` is a repository; ``team/-/tags`` its tags).
NAME_PATTERN = r"[^/-][^/]*(?:/[^/-][^/]*)*"

#: Whether this server accepts writes now (``heartbeat.Heartbeat.accepting_writes``), set by
#: app.py on a writable server. The write gate middleware sees only a handler's declared need;
#: the retention route writes only when its body says so, so it asks here itself.
WRITES_KEY: web.AppKey[Callable[[], bool]] = web.AppKey("writes_accepted")


def index_of(request: web.Request) -> Index:
    index = registry_of(request).index
    if index is None:  # open_store always builds one; only a bare test registry lacks it
        raise RegistryError(ErrorCode.UNAVAILABLE, "the metadata index is not available")
    return index


def page_size(request: web.Request) -> int:
    """``n``: DEFAULT_PAGE when absent, never more than ``catalog.maxentries`` (as the catalog
    caps it), PAGINATION_NUMBER_INVALID when it is not a number."""
    n = int_query(request, "n")
    limit = request.app[CONFIG_KEY].catalog.maxentries
    return min(DEFAULT_PAGE if n is None else n, limit)


def last_of(request: web.Request) -> str | None:
    """``last``: the key the previous page ended at; any text (it is only compared)."""
    return request.query.get("last") or None


def next_page(request: web.Request, n: int, last: str) -> tuple[str, dict[str, str]]:
    """The next page's relative URL (for the body's ``next``) and the RFC 5988 ``Link`` header
    registry:2's lists send, keeping the request's other parameters (``q``)."""
    params = [(k, v) for k, v in request.query.items() if k not in ("n", "last")]
    params += [("n", str(n)), ("last", last)]
    url = f"{request.raw_path.partition('?')[0]}?{urlencode(params)}"
    return url, {"Link": f'<{url}>; rel="next"'}


def page_response(
    request: web.Request, body: dict[str, Any], n: int, more: bool, last: str | None
) -> web.Response:
    """``body`` with ``next`` (null on the last page) and, when there is one, ``Link``."""
    headers: dict[str, str] = {}
    body["next"] = None
    if more and last is not None:
        body["next"], headers = next_page(request, n, last)
    return json_response(body, headers=headers)


def timestamp(seconds: float | None) -> str | None:
    """RFC 3339 in UTC (``2024-05-01T12:00:00Z``): what browsers and ``jq`` read."""
    if seconds is None:
        return None
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def bad_request(message: str, detail: Any = None) -> RegistryError:
    # The distribution spec has no code for a malformed parameter of a Dockyard route; the token
    # endpoint answers its own bad requests the same way (UNSUPPORTED, 400).
    return RegistryError(ErrorCode.UNSUPPORTED, message, detail, status=400)


_TRUE = ("true", "1")
_FALSE = ("false", "0", "")


def flag_query(request: web.Request, key: str) -> bool:
    text = request.query.get(key)
    if text is None or text.lower() in _FALSE:
        return False
    if text.lower() in _TRUE:
        return True
    raise bad_request(f"{key} must be true or false", {key: text})


async def json_object(request: web.Request, fields: dict[str, type]) -> dict[str, Any]:
    """The request body: empty, or a JSON object whose keys are among ``fields``, each of its
    type. A key not known is refused rather than ignored: a misspelt ``dry_run`` must not
    become a run that deletes."""
    declared = request.content_length
    if declared is not None and declared > MAX_BODY:
        raise RegistryError(
            ErrorCode.SIZE_INVALID, f"the body is larger than {MAX_BODY} bytes", status=413
        )
    chunks: list[bytes] = []
    size = 0
    async for chunk in body_stream(request):
        size += len(chunk)
        if size > MAX_BODY:
            raise RegistryError(
                ErrorCode.SIZE_INVALID, f"the body is larger than {MAX_BODY} bytes", status=413
            )
        chunks.append(chunk)
    data = b"".join(chunks)
    if not data.strip():
        return {}
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):
        raise bad_request("the body is not JSON") from None
    if not isinstance(value, dict):
        raise bad_request("the body must be a JSON object")
    for key, item in value.items():
        wanted = fields.get(key)
        if wanted is None:
            raise bad_request(f"unknown field {key!r}", {"fields": sorted(fields)})
        if not isinstance(item, wanted):
            raise bad_request(f"{key} must be a {wanted.__name__}", {key: item})
    return value


#: how long a client is asked to wait while this server accepts no deletes
WRITES_RETRY_AFTER = 30


def check_writable(request: web.Request) -> None:
    """What read_only_middleware and the write gate do for routes that declare a delete need:
    for the routes that delete without declaring one (the retention run deletes only when its
    body says so; the web UI's delete form is not a registry API route), and then
    ``storage.delete.enabled``."""
    if request.app[CONFIG_KEY].storage.maintenance.readonly.enabled:
        raise RegistryError(
            ErrorCode.UNSUPPORTED,
            "the registry is in read-only mode (storage.maintenance.readonly.enabled)",
            status=405,
        )
    accepting = request.app.get(WRITES_KEY)
    if accepting is not None and not accepting():
        raise RegistryError(
            ErrorCode.UNAVAILABLE,
            "this server does not accept deletes now (an immediate garbage collection is "
            "running, or it cannot record its presence); try again later",
            status=503,
            headers={"Retry-After": str(WRITES_RETRY_AFTER)},
        )
    require_delete(request)
