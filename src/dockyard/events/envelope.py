"""registry:2's event (notifications/event.go at v2.8.3): field names, order and presence."""

from __future__ import annotations

import json
import socket
import time
import uuid
from typing import Any

MEDIA_TYPE = "application/vnd.docker.distribution.events.v1+json"
#: registry:2 stores no media type for blobs
BLOB_MEDIA_TYPE = "application/octet-stream"


def rfc3339(ns: int) -> str:
    """Go's RFC3339Nano: UTC, nanoseconds with trailing zeros trimmed."""
    seconds, fraction = divmod(ns, 1_000_000_000)
    text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    digits = f"{fraction:09d}".rstrip("0")
    return f"{text}.{digits}Z" if digits else f"{text}Z"


def source_addr(http_addr: str) -> str:
    """``os.Hostname()`` and the port of ``http.addr``."""
    port = http_addr.rsplit(":", 1)[1] if ":" in http_addr else ""
    return f"{socket.gethostname()}:{port}" if port else socket.gethostname()


def event(
    action: str, target: dict[str, Any], request: dict[str, Any], actor: str | None, source: dict
) -> dict[str, Any]:
    return {
        "id": str(uuid.uuid4()),
        "timestamp": rfc3339(time.time_ns()),
        "action": action,
        "target": target,
        "request": request,
        "actor": {"name": actor} if actor else {},
        "source": source,
    }


def target(
    *,
    media_type: str | None = None,
    size: int | None = None,
    digest: str | None = None,
    repository: str,
    from_repository: str | None = None,
    url: str | None = None,
    tag: str | None = None,
    references: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The fields registry:2 sets, in its order; ``omitempty`` ones left out when empty."""
    out: dict[str, Any] = {}
    if media_type:
        out["mediaType"] = media_type
    if size:
        out["size"] = size
    if digest:
        out["digest"] = digest
    if size:
        out["length"] = size
    out["repository"] = repository
    if from_repository:
        out["fromRepository"] = from_repository
    if url:
        out["url"] = url
    if tag:
        out["tag"] = tag
    if references:
        out["references"] = references
    return out


_DESCRIPTOR_FIELDS = ("mediaType", "size", "digest", "urls", "annotations", "platform")


def references_of(body: bytes) -> list[dict[str, Any]]:
    """What a manifest references, as registry:2's ``References()``: an image's config then
    its layers, an index's manifests; descriptors cut to distribution's ``Descriptor``."""
    try:
        doc = json.loads(body)
    except ValueError:
        return []
    if not isinstance(doc, dict):
        return []
    found: list[Any] = []
    if isinstance(doc.get("manifests"), list):
        found = doc["manifests"]
    else:
        if isinstance(doc.get("config"), dict):
            found.append(doc["config"])
        if isinstance(doc.get("layers"), list):
            found.extend(doc["layers"])
    return [{k: d[k] for k in _DESCRIPTOR_FIELDS if d.get(k)} for d in found if isinstance(d, dict)]
