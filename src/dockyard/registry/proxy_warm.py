"""Pre-fetching images into the cache (``dockyard proxy warm``): an image's manifest, every
child of an index (every platform), and every blob, exactly as pulls would fetch them."""

from __future__ import annotations

from dataclasses import dataclass, field

from dockyard.errors import ErrorCode, RegistryError
from dockyard.oci.digest import Digest, is_digest
from dockyard.oci.manifest import read_stored
from dockyard.oci.names import validate_name, validate_tag
from dockyard.registry.blobs import BlobInfo
from dockyard.registry.proxy import PullThroughCache


@dataclass
class WarmReport:
    image: str
    manifests: int = 0
    blobs: int = 0
    fetched_bytes: int = 0
    errors: list[str] = field(default_factory=list)


def parse_image(image: str) -> tuple[str, str | Digest]:
    """``name[:tag]`` or ``name@digest`` (the tag defaults to ``latest``)."""
    if "@" in image:
        name, _, reference = image.partition("@")
        if not is_digest(reference):
            raise RegistryError(ErrorCode.DIGEST_INVALID, detail={"image": image})
        return validate_name(name), Digest.parse(reference)
    name, colon, tag = image.rpartition(":")
    if not colon or "/" in tag:
        return validate_name(image), "latest"
    return validate_name(name), validate_tag(tag)


async def warm(cache: PullThroughCache, image: str) -> WarmReport:
    """Fetch the image into its cache repository; errors are collected, not raised."""
    report = WarmReport(image)
    try:
        name, reference = parse_image(image)
        route = cache.route(name)
        if route is None:
            raise RegistryError(
                ErrorCode.NAME_UNKNOWN, "not under any upstream (a local repository)"
            )
        repo = cache.repository(route)
        pending: list[str | Digest] = [reference]
        seen: set[Digest] = set()
        while pending:
            answer = await repo.manifest(pending.pop())
            stored = answer.manifest
            if stored.digest in seen:
                continue
            seen.add(stored.digest)
            report.manifests += 1
            manifest = read_stored(stored.body)
            if manifest is None:
                continue
            pending.extend(child.digest for child in manifest.children)
            for blob in manifest.blobs:
                fetched = await repo.fetch(blob.digest)
                if not isinstance(fetched, BlobInfo):
                    fetched.detach()
                    await fetched.done
                    report.fetched_bytes += fetched.size or blob.size
                report.blobs += 1
    except RegistryError as exc:
        report.errors.append(f"{exc.code.name}: {exc.message}")
    return report
