"""registry:2's event (notifications/event.go at v2.8.3): field names, order and presence."""

from __future__ import annotations

import json
import random
import socket
import time
from collections.abc import Sequence
from json.encoder import encode_basestring_ascii  # type: ignore[attr-defined]
from typing import Any

MEDIA_TYPE = "application/vnd.docker.distribution.events.v1+json"
#: registry:2 stores no media type for blobs
BLOB_MEDIA_TYPE = "application/octet-stream"


#: the last second formatted, and its text: a pull event per request makes many in a second
_last_second: tuple[int, str] = (-1, "")


def rfc3339(ns: int) -> str:
    """Go's RFC3339Nano: UTC, nanoseconds with trailing zeros trimmed."""
    global _last_second
    seconds, fraction = divmod(ns, 1_000_000_000)
    if _last_second[0] == seconds:
        text = _last_second[1]
    else:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        _last_second = (seconds, text)
    digits = f"{fraction:09d}".rstrip("0")
    return f"{text}.{digits}Z" if digits else f"{text}Z"


def new_id() -> str:
    """A random (version 4) UUID in its text form, as ``str(uuid.uuid4())`` but without a
    system call per id: event and request ids must be unique, not secret, and ``random`` is
    seeded from the OS and reseeded in each forked worker."""
    bits = (random.getrandbits(128) & ~(0xF000 << 64) & ~(0xC000 << 48)) | (0x4000 << 64)
    bits |= 0x8000 << 48  # the variant (RFC 4122)
    h = f"{bits:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def source_addr(http_addr: str) -> str:
    """``os.Hostname()`` and the port of ``http.addr``."""
    port = http_addr.rsplit(":", 1)[1] if ":" in http_addr else ""
    return f"{socket.gethostname()}:{port}" if port else socket.gethostname()


def event(
    action: str, target: dict[str, Any], request: dict[str, Any], actor: str | None, source: dict
) -> dict[str, Any]:
    return {
        "id": new_id(),
        "timestamp": rfc3339(time.time_ns()),
        "action": action,
        "target": target,
        "request": request,
        "actor": {"name": actor} if actor else {},
        "source": source,
    }


#: a JSON string literal, as json.dumps makes it (ASCII, escaped)
quote = encode_basestring_ascii


def compact(value: Any) -> str:
    """The outbox's JSON: one line, no spaces."""
    return json.dumps(value, separators=(",", ":"))


def event_line(
    action: str, target_json: str, request_json: str, actor: str | None, source_json: str
) -> str:
    """An outbox line of :func:`event` from the parts' JSON, already serialised: what a pull
    event per request costs matters, and a target's JSON is the same for every pull of it."""
    actor_json = f'{{"name":{quote(actor)}}}' if actor else "{}"
    return (
        f'{{"id":"{new_id()}","timestamp":"{rfc3339(time.time_ns())}","action":"{action}",'
        f'"target":{target_json},"request":{request_json},"actor":{actor_json},'
        f'"source":{source_json}}}\n'
    )


def request_json(fields: dict[str, str]) -> str:
    """``compact(fields)`` for a dict of strings, at half its cost (once per pull request)."""
    return "{" + ",".join(f'"{k}":{quote(v)}' for k, v in fields.items()) + "}"


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


def delete_targets(
    repository: str, digests: Sequence[object] = (), tags: Sequence[str] = ()
) -> list[dict[str, Any]]:
    """The targets of registry:2's delete events: one per manifest (or blob) digest, then one
    per tag, as a DELETE by digest reports a manifest and the tags that pointed at it."""
    targets = [target(digest=str(d), repository=repository) for d in digests]
    targets.extend(target(repository=repository, tag=t) for t in tags)
    return targets


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
