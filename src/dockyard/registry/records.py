"""What the metadata index knows about a repository (``registry.index``): its tags and manifests
with sizes and push and pull times. Plain values, so that policies (retention, quotas) and the
JSON API decide on them without knowing where they were read from."""

from __future__ import annotations

from dataclasses import dataclass, field

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
