"""Registry error codes, registered once.

Every failure a client can see is a :class:`RegistryError` carrying one of these codes. The
model, the auth middleware and the handlers raise it; ``api.middleware.error_middleware`` answers
it, and the OCI error body ``{"errors": [{"code", "message", "detail"}]}`` is rendered in exactly
one place, ``dockyard.http.responses`` (also for the answers written below the application, in
``api.protocol`` and ``api.admission``). Nothing else builds error bodies by hand.
"""

from __future__ import annotations

from enum import Enum
from typing import Any


class ErrorCode(Enum):
    """OCI distribution error codes (plus the few registry:2 adds), with their HTTP status."""

    BLOB_UNKNOWN = ("blob unknown to registry", 404)
    BLOB_UPLOAD_INVALID = ("blob upload invalid", 400)
    BLOB_UPLOAD_UNKNOWN = ("blob upload unknown to registry", 404)
    DIGEST_INVALID = ("provided digest did not match uploaded content", 400)
    MANIFEST_BLOB_UNKNOWN = ("manifest references a manifest or blob unknown to registry", 400)
    MANIFEST_INVALID = ("manifest invalid", 400)
    MANIFEST_UNKNOWN = ("manifest unknown to registry", 404)
    NAME_INVALID = ("invalid repository name", 400)
    NAME_UNKNOWN = ("repository name not known to registry", 404)
    SIZE_INVALID = ("provided length did not match content length", 400)
    TAG_INVALID = ("invalid tag", 400)
    UNAUTHORIZED = ("authentication required", 401)
    DENIED = ("requested access to the resource is denied", 403)
    UNSUPPORTED = ("the operation is unsupported", 405)
    TOOMANYREQUESTS = ("too many requests", 429)
    RANGE_INVALID = ("requested range not satisfiable", 416)
    PAGINATION_NUMBER_INVALID = ("invalid number of results requested", 400)
    UNKNOWN = ("unknown error", 500)
    UNAVAILABLE = ("service unavailable", 503)

    def __init__(self, message: str, status: int) -> None:
        self.message = message
        self.status = status


class RegistryError(Exception):
    """A failure with an OCI error code. ``status`` overrides the code's default HTTP status
    where the spec asks for a different one (e.g. 413 for an oversized manifest, 416 for an
    out-of-order chunk); ``headers`` are added to the error response."""

    def __init__(
        self,
        code: ErrorCode,
        message: str | None = None,
        detail: Any = None,
        *,
        status: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.code = code
        self.message = message or code.message
        self.detail = detail
        self.status = status or code.status
        self.headers = headers or {}
        super().__init__(f"{code.name}: {self.message}")

    def to_json(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"code": self.code.name, "message": self.message}
        if self.detail is not None:
            entry["detail"] = self.detail
        return {"errors": [entry]}


class ConfigError(Exception):
    """Invalid configuration: raised at start-up, before any port is bound."""

    def __init__(self, key: str, reason: str) -> None:
        self.key = key
        self.reason = reason
        super().__init__(f"configuration error: {key}: {reason}")
