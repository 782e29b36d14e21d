"""registry:2's storage layout (``docker/registry/v2/...``) as a test sees it: on disk under a
data directory (``DiskStore``) or as keys in an S3 bucket (``BucketStore``).

Both servers keep blobs at ``blobs/sha256/<2 hex>/<hex>/data`` and a repository's references
as ``link`` files holding ``sha256:<hex>``: ``_manifests/tags/<tag>/current`` and
``.../index/sha256/<hex>``, ``_manifests/revisions/sha256/<hex>`` for every manifest, and
``_layers/sha256/<hex>`` for every config and layer. ``expected_links`` derives that set from
the pushes and the manifests in the store.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from harness.oci import referenced
from harness.s3 import S3Endpoint
from harness.skopeo import Push

V2 = "docker/registry/v2"
#: what a link file holds, and nothing else (no newline)
LINK_CONTENT = re.compile(rb"sha256:[0-9a-f]{64}")


def blob_data(digest: str) -> str:
    """Where a blob's bytes are, relative to the v2 root."""
    hexa = digest.removeprefix("sha256:")
    return f"blobs/sha256/{hexa[:2]}/{hexa}/data"


class Store:
    """What both kinds of store offer; ``links`` and ``read_blob`` are each kind's own."""

    def links(self) -> dict[str, bytes]:
        """Every ``link`` under ``repositories/`` (uploads aside): path (relative to
        ``repositories/``) -> content."""
        raise NotImplementedError

    def read_blob(self, digest: str) -> bytes:
        raise NotImplementedError

    def expected_links(self, pushes: Mapping[Push, str]) -> dict[str, bytes]:
        """The link files registry:2 keeps for these pushes (push -> manifest digest), derived
        from the stored manifests: each tag's ``current`` and ``index`` entry, a revision for
        every manifest (an index and its children), and a ``_layers`` link for every config
        and layer."""
        links: dict[str, bytes] = {}

        def link(path: str, digest: str) -> None:
            links[path] = digest.encode()

        for p, digest in pushes.items():
            hexa = digest.removeprefix("sha256:")
            link(f"{p.repo}/_manifests/tags/{p.tag}/current/link", digest)
            link(f"{p.repo}/_manifests/tags/{p.tag}/index/sha256/{hexa}/link", digest)
            manifests = [digest]
            while manifests:
                m = manifests.pop()
                link(f"{p.repo}/_manifests/revisions/sha256/{m.removeprefix('sha256:')}/link", m)
                children, blobs = referenced(self.read_blob(m))
                manifests += children
                for blob in blobs:
                    link(f"{p.repo}/_layers/sha256/{blob.removeprefix('sha256:')}/link", blob)
        return links


@dataclass
class DiskStore(Store):
    """The store under the data directory ``root`` (registry:2's ``rootdirectory``)."""

    root: Path

    @property
    def v2(self) -> Path:
        return self.root / V2

    def links(self) -> dict[str, bytes]:
        base = self.v2 / "repositories"
        return {
            str(p.relative_to(base)): p.read_bytes()
            for p in base.rglob("link")
            if "_uploads" not in p.relative_to(base).parts
        }

    def blob_files(self) -> set[str]:
        """Every file under ``blobs/``, relative to it."""
        base = self.v2 / "blobs"
        return {str(p.relative_to(base)) for p in base.rglob("*") if p.is_file()}

    def stored_blobs(self) -> dict[str, int]:
        """digest -> size of every blob's ``data``."""
        return {
            f"sha256:{p.parent.name}": p.stat().st_size for p in (self.v2 / "blobs").rglob("data")
        }

    def blob_path(self, digest: str) -> Path:
        return self.v2 / blob_data(digest)

    def read_blob(self, digest: str) -> bytes:
        return self.blob_path(digest).read_bytes()

    def layer_link(self, repo: str, digest: str) -> Path:
        hexa = digest.removeprefix("sha256:")
        return self.v2 / "repositories" / repo / "_layers" / "sha256" / hexa / "link"

    def uploads(self, repo: str | None = None) -> list[Path]:
        """Files of uploads (``_uploads/``) in ``repo``, or in any repository."""
        base = self.v2 / "repositories" / (f"{repo}/_uploads" if repo else "")
        return [p for p in base.rglob("*") if "_uploads" in p.parts and p.is_file()]

    def leftovers(self) -> list[Path]:
        """Anything under the v2 root named like a collection's or a write's temporary file
        (``.gc-``, ``.tmp-``)."""
        return [p for p in self.v2.rglob("*") if ".gc-" in p.name or ".tmp-" in p.name]

    def snapshot(self) -> dict[str, tuple[str, int, int, str]]:
        """Every file and directory under ``root``: kind, size, mtime (ns) and a content
        hash."""
        state = {}
        for path in sorted(self.root.rglob("*")):
            st = path.lstat()
            if path.is_dir():
                state[str(path.relative_to(self.root))] = ("dir", 0, st.st_mtime_ns, "")
            else:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                state[str(path.relative_to(self.root))] = (
                    "file",
                    st.st_size,
                    st.st_mtime_ns,
                    digest,
                )
        return state


_clients: dict[str, Any] = {}


@dataclass
class BucketStore(Store):
    """The store in ``bucket`` on ``endpoint``, under registry:2's ``rootdirectory`` (every
    registry key starts with ``<rootdirectory>/docker/registry/v2/``)."""

    endpoint: S3Endpoint
    bucket: str
    rootdirectory: str = "/"

    @property
    def v2(self) -> str:
        """The v2 root's key prefix (no slash at either end)."""
        return "/".join(p for p in (self.rootdirectory.strip("/"), V2) if p)

    @property
    def client(self) -> Any:
        """A boto3 client, one per endpoint for the session (making one takes about 0.5 s)."""
        if self.endpoint.url not in _clients:
            _clients[self.endpoint.url] = self.endpoint.client()
        return _clients[self.endpoint.url]

    def objects(self) -> dict[str, dict[str, Any]]:
        """Every object in the bucket: key -> size, ETag, LastModified."""
        found = {}
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket):
            for o in page.get("Contents", []):
                found[o["Key"]] = {"size": o["Size"], "etag": o["ETag"], "time": o["LastModified"]}
        return found

    def registry_keys(self) -> set[str]:
        """Keys of blobs and repositories (uploads in progress aside), relative to the v2
        root."""
        return {
            key.removeprefix(self.v2 + "/")
            for key in self.objects()
            if key.startswith(self.v2 + "/") and "/_uploads/" not in key
        }

    def get(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def links(self) -> dict[str, bytes]:
        base = f"{self.v2}/repositories/"
        return {
            key.removeprefix(base): self.get(key)
            for key in self.objects()
            if key.startswith(base) and key.endswith("/link") and "/_uploads/" not in key
        }

    def blob_key(self, digest: str) -> str:
        return f"{self.v2}/{blob_data(digest)}"

    def stored_blobs(self) -> dict[str, int]:
        """digest -> size of every blob object."""
        pattern = re.compile(
            rf"{re.escape(self.v2)}/blobs/sha256/[0-9a-f]{{2}}/([0-9a-f]{{64}})/data"
        )
        found = {}
        for key, o in self.objects().items():
            match = pattern.fullmatch(key)
            if match:
                found[f"sha256:{match.group(1)}"] = o["size"]
        return found

    def read_blob(self, digest: str) -> bytes:
        return self.get(self.blob_key(digest))

    def uploads(self, repo: str | None = None) -> list[str]:
        """Keys of uploads (``_uploads/``) in ``repo``, or in any repository."""
        prefix = f"{self.v2}/repositories/" + (f"{repo}/_uploads/" if repo else "")
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix
        )
        keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
        return [key for key in keys if "/_uploads/" in key]

    def multipart_uploads(self) -> list[str]:
        """Keys of S3 multipart uploads in progress."""
        return [
            u["Key"]
            for page in self.client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket
            )
            for u in page.get("Uploads", [])
        ]

    def leftovers(self) -> list[str]:
        """Any key in the bucket named like a collection's or a write's temporary object
        (``.gc-``, ``.tmp-``)."""
        return [k for k in self.objects() if ".gc-" in k or ".tmp-" in k]


def store_of(config_path: Path) -> DiskStore | BucketStore:
    """The store a server keeps its data in, read from the configuration it was started with:
    its data directory, or its S3 bucket (under its ``rootdirectory``)."""
    storage = yaml.safe_load(config_path.read_text())["storage"]
    if "s3" in storage:
        s3 = storage["s3"]
        endpoint = S3Endpoint(
            url=s3["regionendpoint"],
            access_key=s3["accesskey"],
            secret_key=s3["secretkey"],
            region=s3.get("region", "us-east-1"),
        )
        return BucketStore(endpoint, s3["bucket"], s3.get("rootdirectory", "/"))
    return DiskStore(Path(storage["filesystem"]["rootdirectory"]))
