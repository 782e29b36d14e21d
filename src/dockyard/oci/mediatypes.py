"""Media types the registry knows by name."""

from __future__ import annotations

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"

#: manifests that carry a config and layers
IMAGE_MANIFESTS = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
#: manifests that list other manifests
INDEX_MANIFESTS = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
#: everything a client may PUT
PUSHABLE_MANIFESTS = IMAGE_MANIFESTS | INDEX_MANIFESTS

#: layers that live elsewhere ("foreign layers"); registry:2 does not require them to be pushed
NONDISTRIBUTABLE_LAYERS = frozenset(
    {
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    }
)


def base_media_type(content_type: str | None) -> str:
    """``application/x; charset=utf-8`` -> ``application/x`` (lowercased)."""
    if not content_type:
        return ""
    return content_type.split(";", 1)[0].strip().lower()
