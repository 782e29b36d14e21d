"""Logging: registry:2's ``log`` section (level, formatter text|json|logstash, fields). The
access log itself is ``api.accesslog``."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from dockyard.config import LogConfig

#: the logger the access log (api.accesslog) writes to
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
