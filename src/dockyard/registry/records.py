"""What the metadata index knows about a repository (``registry.index``): its tags and manifests
with sizes and push and pull times. Plain values, so that policies (retention, quotas) and the
JSON API decide on them without knowing where they were read from."""

from __future__ import annotations

import base64
import binascii
import json
import math
from dataclasses import dataclass, field
from typing import Any

from dockyard.oci.digest import Digest
from dockyard.oci.manifest import Manifest, sniff_media_type


@dataclass(frozen=True, slots=True)
class ManifestRecord:
    digest: Digest
    media_type: str
    #: the manifest's own bytes plus the blobs it references directly (config and layers of an
    #: image; nothing of an index's children, which are manifests with records of their own)
    size: int
    #: when its revision link was written (epoch seconds)
    pushed: float
    #: the last pull of it (by digest or through a tag), None if never pulled since indexed
    pulled: float | None = None
    #: ``subject`` of a referrer (signature, SBOM, attestation)
    subject: Digest | None = None
    artifact_type: str | None = None
    #: the manifests an index references
    children: tuple[Digest, ...] = ()


@dataclass(frozen=True, slots=True)
class TagRecord:
    tag: str
    digest: Digest
    #: when the tag was last pointed at ``digest`` (epoch seconds)
    pushed: float
    #: the last pull of the manifest it points to, None if never pulled since indexed
    pulled: float | None = None


@dataclass(slots=True)
class RepositorySnapshot:
    """One repository as the index holds it: every tag (sorted by name) and every manifest."""

    name: str
    tags: list[TagRecord] = field(default_factory=list)
    manifests: dict[Digest, ManifestRecord] = field(default_factory=dict)


#: what a listing of repositories may be sorted by (``Index.repositories_sorted``): the name, the
#: number of tags, the size (bytes of the distinct blobs used), the latest tag push
REPOSITORY_SORTS = ("name", "tags", "size", "pushed")


@dataclass(frozen=True, slots=True)
class RepositoryKey:
    """Where a page of a sorted listing of repositories continues (``after`` of
    ``Index.repositories_sorted``): the sort value and the name of the previous page's last row
    (:meth:`of` it). ``value`` is the number of tags or the size (int) when sorted by ``tags``
    or ``size``, the latest tag push (float; None: a repository without tags) when sorted by
    ``pushed``, and None when sorted by ``name``.

    :meth:`encode` makes it an opaque, URL-safe string (for a query parameter); :meth:`decode`
    reads it back exactly (a push time keeps every bit)."""

    value: int | float | None
    name: str

    @classmethod
    def of(cls, summary: Any, sort: str) -> RepositoryKey:
        """The key of ``summary`` (a ``RepositorySummary``) in a listing sorted by ``sort``."""
        if sort not in REPOSITORY_SORTS:
            raise ValueError(f"unknown sort {sort!r}")
        return cls(None if sort == "name" else getattr(summary, sort), summary.name)

    def encode(self) -> str:
        text = json.dumps([self.value, self.name], separators=(",", ":"))
        return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str, sort: str) -> RepositoryKey:
        """The key :meth:`encode` wrote, for a listing sorted by ``sort``; ValueError if
        ``text`` is not one (garbled, or a key of another sort)."""
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
            value, name = json.loads(raw)
        except (binascii.Error, UnicodeDecodeError, ValueError, TypeError) as exc:
            raise ValueError("not a repository listing key") from exc
        return cls(value, name).checked(sort)

    def checked(self, sort: str) -> RepositoryKey:
        """This key if it can be one of a listing sorted by ``sort`` (a push time that is an
        integer made a float), else ValueError."""
        value = self.value
        if sort not in REPOSITORY_SORTS:
            raise ValueError(f"unknown sort {sort!r}")
        if not isinstance(self.name, str):
            raise ValueError("a repository listing key names a repository")
        if sort == "name":
            fits = value is None
        elif sort == "pushed":
            fits = value is None or (
                isinstance(value, int | float)
                and not isinstance(value, bool)
                and math.isfinite(value)
            )
            if fits and isinstance(value, int):
                return RepositoryKey(float(value), self.name)
        else:
            fits = isinstance(value, int) and not isinstance(value, bool)
        if not fits:
            raise ValueError(f"not a key of a listing sorted by {sort}")
        return self


def record_of(
    digest: Digest, body: bytes, manifest: Manifest | None, pushed: float, pulled: float | None
) -> ManifestRecord:
    if manifest is None:
        return ManifestRecord(digest, sniff_media_type(body), len(body), pushed, pulled)
    return ManifestRecord(
        digest=digest,
        media_type=manifest.media_type,
        size=len(body) + sum(d.size for d in manifest.blobs),
        pushed=pushed,
        pulled=pulled,
        subject=manifest.subject.digest if manifest.subject else None,
        artifact_type=manifest.artifact_type,
        children=tuple(d.digest for d in manifest.children),
    )


def manifest_record(
    digest: Digest, body: bytes, manifest: Manifest, pushed: float
) -> ManifestRecord:
    return record_of(digest, body, manifest, pushed, None)
