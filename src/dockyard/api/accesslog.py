"""One structured access-log line per request.

Lines are ``info`` for everything the client caused (a HEAD 404 for a blob about to be uploaded
is routine, not an error) and ``error`` only for 5xx. The upload ``_state`` token is cut from
logged URLs, and no header that may carry credentials is ever logged."""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from dockyard.auth.middleware import IDENTITY
from dockyard.http.request import TRACE_ID, client_address
from dockyard.logs import ACCESS_LOGGER

__all__ = ["ACCESS_LOGGER", "AccessLogger"]


def _loggable_path(request: web.BaseRequest) -> str:
    if "_state" not in request.query:
        return request.path_qs
    query = "&".join(f"{k}={v}" for k, v in request.query.items() if k != "_state")
    return request.path + (f"?{query}" if query else "")


class AccessLogger(AbstractAccessLogger):
    """One line per request, with what an operator needs and nothing secret."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        status = response.status
        fields = {
            "method": request.method,
            "path": _loggable_path(request),
            "status": status,
            "duration_ms": round(time * 1000, 2),
            "bytes_out": response.body_length,
            # what was actually received: chunked bodies have no Content-Length
            "bytes_in": getattr(request.content, "total_bytes", request.content_length or 0),
            # never X-Forwarded-For as sent: only a trusted proxy's word is taken
            "remote": client_address(request),
            "user_agent": request.headers.get("User-Agent", ""),
        }
        trace_id = request.get(TRACE_ID)  # when tracing is on
        if trace_id is not None:
            fields["trace_id"] = trace_id
        identity = request.get(IDENTITY)
        if identity is not None and identity.user:
            fields["user"] = identity.user
        level = logging.ERROR if status >= 500 else logging.INFO
        self.logger.log(level, "request", extra={"fields": fields})

    @property
    def enabled(self) -> bool:
        return not self.logger.disabled
