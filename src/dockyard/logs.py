"""Logging: registry:2's ``log`` section (level, formatter text|json|logstash, fields) and one
structured access-log line per request.

Access lines are ``info`` for everything the client caused (a HEAD 404 for a blob about to be
uploaded is routine, not an error) and ``error`` only for 5xx. The upload ``_state`` token is cut
from logged URLs, and no header that may carry credentials is ever logged.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from dockyard.auth.access import IDENTITY
from dockyard.config import LogConfig

ACCESS_LOGGER = "dockyard.access"

_LEVELS = {
    "error": logging.ERROR,
    "warn": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
}


class StructuredFormatter(logging.Formatter):
    """``text``: logfmt (``time=... level=... msg=... key=value``); ``json``/``logstash``: one
    JSON object per line. Extra fields come from ``log.fields`` and the record's ``fields``."""

    def __init__(self, style: str, fields: dict[str, Any]) -> None:
        super().__init__()
        self.json = style in ("json", "logstash")
        self.logstash = style == "logstash"
        self.fields = fields

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower().replace("warning", "warn"),
            "msg": record.getMessage(),
            "logger": record.name,
        }
        entry.update(self.fields)
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        if self.logstash:
            entry["@timestamp"] = entry.pop("time")
            entry["message"] = entry.pop("msg")
        if self.json:
            return json.dumps(entry, default=str)
        return " ".join(f"{k}={_logfmt(v)}" for k, v in entry.items())


def _logfmt(value: Any) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' ="\n\t'):
        return json.dumps(text)
    return text


def configure(config: LogConfig) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(StructuredFormatter(config.formatter, dict(config.fields)))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_LEVELS[config.level])
    logging.getLogger(ACCESS_LOGGER).disabled = config.accesslog.disabled
    # aiohttp's own access logger is replaced by ours.
    logging.getLogger("aiohttp.access").disabled = True


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
            "remote": request.headers.get("X-Forwarded-For", request.remote or ""),
            "user_agent": request.headers.get("User-Agent", ""),
        }
        identity = request.get(IDENTITY)
        if identity is not None and identity.user:
            fields["user"] = identity.user
        level = logging.ERROR if status >= 500 else logging.INFO
        self.logger.log(level, "request", extra={"fields": fields})

    @property
    def enabled(self) -> bool:
        return not self.logger.disabled
