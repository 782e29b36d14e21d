"""Parse and validate manifests (pure: bytes in, a typed :class:`Manifest` out).

The registry stores and serves the pushed bytes unchanged; this module only decides whether they
are acceptable and extracts what the registry must know about them: the media type, the blobs and
manifests they reference, the subject (for the referrers API) and the artifact type.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from dockyard.errors import ErrorCode, RegistryError
from dockyard.oci import mediatypes as mt
from dockyard.oci.digest import Digest

#: The spec asks registries to accept manifests of at least 4 MiB; larger ones get 413.
MAX_MANIFEST_BYTES = 4 * 1024 * 1024

#: Content types that say nothing about the manifest: fall back to its ``mediaType`` field.
_GENERIC_CONTENT_TYPES = frozenset({"", "application/json", "application/octet-stream"})


@dataclass(frozen=True, slots=True)
class Descriptor:
    media_type: str
    digest: Digest
    size: int
    urls: tuple[str, ...] = ()
    artifact_type: str | None = None
    annotations: dict[str, str] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": str(self.digest),
            "size": self.size,
        }
        if self.artifact_type:
            out["artifactType"] = self.artifact_type
        if self.annotations:
            out["annotations"] = self.annotations
        return out


@dataclass(frozen=True, slots=True)
class Manifest:
    media_type: str
    #: blobs that must already be in the repository (config and distributable layers)
    blobs: tuple[Descriptor, ...] = ()
    #: manifests that must already be in the repository (the entries of an index)
    children: tuple[Descriptor, ...] = ()
    subject: Descriptor | None = None
    #: ``artifactType``, or for an image manifest without one, its config media type
    artifact_type: str | None = None
    annotations: dict[str, str] | None = field(default=None)

    @property
    def is_index(self) -> bool:
        return self.media_type in mt.INDEX_MANIFESTS


class JSONTooDeep(ValueError):
    """JSON nested deeper than the parser can follow."""


def load_json(body: bytes | str) -> Any:
    """``json.loads`` for bytes from outside, with nesting too deep for the parser reported as
    :class:`JSONTooDeep` (a ``ValueError``) rather than ``RecursionError``: json's C decoder
    recurses once per ``[`` or ``{``, so 100,000 ``[`` (well within a 4 MiB manifest, a token
    or a form) would otherwise escape every ``except ValueError``."""
    try:
        return json.loads(body)
    except RecursionError:
        raise JSONTooDeep("JSON is nested too deeply") from None


def _invalid(reason: str, **detail: Any) -> RegistryError:
    return RegistryError(ErrorCode.MANIFEST_INVALID, f"manifest invalid: {reason}", detail or None)


def _descriptor(value: Any, where: str) -> Descriptor:
    if not isinstance(value, dict):
        raise _invalid(f"{where} must be a descriptor object")
    media_type = value.get("mediaType")
    if not isinstance(media_type, str) or not media_type:
        raise _invalid(f"{where}.mediaType must be a non-empty string")
    digest_text = value.get("digest")
    if not isinstance(digest_text, str):
        raise _invalid(f"{where}.digest must be a string")
    try:
        digest = Digest.parse(digest_text)
    except RegistryError as exc:
        raise _invalid(f"{where}.digest: {exc.message}", digest=digest_text) from None
    size = value.get("size")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise _invalid(f"{where}.size must be a non-negative integer")
    urls = value.get("urls") or []
    if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
        raise _invalid(f"{where}.urls must be a list of strings")
    artifact_type = value.get("artifactType")
    if artifact_type is not None and not isinstance(artifact_type, str):
        raise _invalid(f"{where}.artifactType must be a string")
    return Descriptor(
        media_type=media_type,
        digest=digest,
        size=size,
        urls=tuple(urls),
        artifact_type=artifact_type,
        annotations=_annotations(value.get("annotations"), f"{where}.annotations"),
    )


def _annotations(value: Any, where: str) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise _invalid(f"{where} must be a map of strings to strings")
    return value


def _descriptor_list(value: Any, where: str) -> tuple[Descriptor, ...]:
    if not isinstance(value, list):
        raise _invalid(f"{where} must be a list of descriptors")
    return tuple(_descriptor(item, f"{where}[{i}]") for i, item in enumerate(value))


def _check_foreign_layer(layer: Descriptor, where: str) -> None:
    if not layer.urls:
        raise _invalid(f"{where} is non-distributable but has no urls")
    for url in layer.urls:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or parts.fragment:
            raise _invalid(f"{where} has an invalid url", url=url)


def _decode(body: bytes) -> dict[str, Any]:
    try:
        doc = load_json(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise _invalid(f"not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise _invalid("a manifest is a JSON object")
    return doc


def _resolve_media_type(doc: dict[str, Any], content_type: str | None) -> str:
    declared = doc.get("mediaType")
    if declared is not None and not isinstance(declared, str):
        raise _invalid("mediaType must be a string")
    sent = mt.base_media_type(content_type)
    if sent in mt.PUSHABLE_MANIFESTS:
        if declared and declared != sent:
            raise _invalid(
                "mediaType does not match Content-Type", mediaType=declared, contentType=sent
            )
        media_type = sent
    elif sent in _GENERIC_CONTENT_TYPES:
        media_type = declared or sniff_media_type_of(doc)
    else:
        raise _invalid("unsupported manifest media type", contentType=sent)
    if media_type not in mt.PUSHABLE_MANIFESTS:
        raise _invalid("unsupported manifest media type", mediaType=media_type)
    # Docker's formats require the field; OCI's make it optional.
    if media_type in (mt.DOCKER_MANIFEST, mt.DOCKER_MANIFEST_LIST) and declared != media_type:
        raise _invalid(f"a {media_type} must declare its mediaType")
    return media_type


def parse_manifest(body: bytes, content_type: str | None) -> Manifest:
    """Validate a manifest a client is pushing. Raises MANIFEST_INVALID (or 413) on bad input."""
    if len(body) > MAX_MANIFEST_BYTES:
        raise RegistryError(
            ErrorCode.MANIFEST_INVALID,
            f"manifest is larger than {MAX_MANIFEST_BYTES} bytes",
            {"size": len(body), "limit": MAX_MANIFEST_BYTES},
            status=413,
        )
    doc = _decode(body)
    version = doc.get("schemaVersion")
    if version != 2 or isinstance(version, bool):
        raise _invalid("schemaVersion must be 2 (schema 1 manifests are not accepted)")
    media_type = _resolve_media_type(doc, content_type)

    subject = None
    if doc.get("subject") is not None:
        subject = _descriptor(doc["subject"], "subject")
    artifact_type = doc.get("artifactType")
    if artifact_type is not None and not isinstance(artifact_type, str):
        raise _invalid("artifactType must be a string")
    annotations = _annotations(doc.get("annotations"), "annotations")

    if media_type in mt.INDEX_MANIFESTS:
        if "config" in doc or "layers" in doc:
            raise _invalid("an index has no config or layers")
        children = _descriptor_list(doc.get("manifests"), "manifests")
        return Manifest(
            media_type=media_type,
            children=children,
            subject=subject,
            artifact_type=artifact_type,
            annotations=annotations,
        )

    if "manifests" in doc:
        raise _invalid("an image manifest has no manifests list")
    config = _descriptor(doc.get("config"), "config")
    layers = _descriptor_list(doc.get("layers"), "layers")
    required = [config]
    for i, layer in enumerate(layers):
        if layer.media_type in mt.NONDISTRIBUTABLE_LAYERS:
            _check_foreign_layer(layer, f"layers[{i}]")
        else:
            required.append(layer)
    return Manifest(
        media_type=media_type,
        blobs=tuple(required),
        subject=subject,
        artifact_type=artifact_type or config.media_type,
        annotations=annotations,
    )


def sniff_media_type_of(doc: dict[str, Any]) -> str:
    declared = doc.get("mediaType")
    if isinstance(declared, str) and declared:
        return declared
    if doc.get("schemaVersion") == 1:
        return mt.DOCKER_SCHEMA1_SIGNED if "signatures" in doc else mt.DOCKER_SCHEMA1
    return mt.OCI_INDEX if "manifests" in doc else mt.OCI_MANIFEST


def sniff_media_type(body: bytes) -> str:
    """The media type to serve stored manifest bytes with, as registry:2 determines it: the
    ``mediaType`` field, else OCI index or manifest by shape. Never raises."""
    try:
        doc = load_json(body)
    except (UnicodeDecodeError, ValueError):
        return mt.OCI_MANIFEST
    if not isinstance(doc, dict):
        return mt.OCI_MANIFEST
    return sniff_media_type_of(doc)


def read_stored(body: bytes) -> Manifest | None:
    """Best-effort parse of a manifest already in storage (e.g. to list it as a referrer):
    ``None`` when it is not one this registry can describe."""
    try:
        return parse_manifest(body, sniff_media_type(body))
    except RegistryError:
        return None


def referenced_digests(body: bytes) -> set[Digest]:
    """Every digest a stored manifest may reference, whatever its schema: the values of all
    ``digest`` and ``blobSum`` (schema 1) fields. An over-approximation on purpose: garbage
    collection marks these, so content a manifest needs is never swept for lack of a parser."""
    found: set[Digest] = set()
    for text in referenced_digest_texts(body):
        with contextlib.suppress(RegistryError):
            found.add(Digest.parse(text))
    return found


def referenced_digest_texts(body: bytes) -> set[str]:
    """The text of every ``digest`` and ``blobSum`` field of ``body``, at any depth, valid as a
    digest or not (:func:`referenced_digests` parses them; the garbage collector's mark reads
    them without making a Digest of each). A document nested deeper than the JSON reader goes
    gives every digest written anywhere in it instead."""
    try:
        doc = load_json(body)
    except JSONTooDeep:
        # Pushed elsewhere (registry:2 accepts 10,000 levels): still never under-mark.
        return {m.decode() for m in _DIGEST_TEXT.findall(body)}
    except (UnicodeDecodeError, ValueError):
        return set()
    found: set[str] = set()
    stack: list[Any] = [doc]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, value in item.items():
                if key in ("digest", "blobSum") and isinstance(value, str):
                    found.add(value)
                else:
                    stack.append(value)
        elif isinstance(item, list):
            stack.extend(item)
    return found


#: a digest written anywhere in a text: a superset of what a JSON parse would find (barring
#: digests spelt with JSON escapes, which no client writes)
_DIGEST_TEXT = re.compile(rb"\b(?:sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})\b")
