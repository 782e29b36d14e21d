"""The one test harness: every server, daemon and client the tests (and the benchmark) use.

- ``harness.dockyard``: Dockyard in the test process or in a process of its own
- ``harness.client``: pushing through the API, error bodies, raw HTTP, other client addresses
- ``harness.registry2``, ``harness.s3``, ``harness.redis``, ``harness.nginx``,
  ``harness.docker``: registry:2, S3 (moto, Ceph RGW), Redis, nginx, dockerd and containerd
- ``harness.images``: test images, and a Debian base made once and kept
- ``harness.oci``: OCI image layouts made by hand, for skopeo to push from
- ``harness.skopeo``: skopeo pushes and pulls, compared with what a registry serves
- ``harness.browser``: Chromium through Playwright for the web UI's tests: recorded injected
  script, dialogs, CSP violations and errors; accessibility checked with axe-core
- ``harness.ui_images``: images for the UI's tests: normal, multi-arch, referrers, hostile
  (script payloads in every field, a gzip bomb, a million-entry tar, zstd, not a tar)
- ``harness.mirrors``: clients set up to pull through a mirror (podman's registries.conf,
  containerd's hosts.toml), and Dockyard's access log read back
- ``harness.faulty_upstream``: an upstream registry that fails on demand, for the proxy's tests
- ``harness.store``: registry:2's storage layout as a test sees it, on disk or in a bucket
- ``harness.workloads``: the push/pull/delete load the garbage collection tests run
- ``harness.shared``: daemons shared by every process of a pytest-xdist session
- ``harness.workers``: which worker of a server serves a connection; connections on each one
- ``harness.plugin``: the pytest fixtures and tiers (loaded by tests/conftest.py)

Tests import what they use from here (``from harness import start_moto``) or from the module.
"""

from harness.client import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    RawConnection,
    RawResponse,
    RegistryClient,
    assert_error,
    chunked_push,
    raw_request,
    session_from,
    sha256,
)
from harness.dockyard import DockyardProcess, InProcessDockyard, dockyard_config, write_config
from harness.net import Loopback, free_port, wait_for_port
from harness.oci import OciLayout, gzip_layer, referenced
from harness.plugin import (
    BucketFactory,
    Registry2Factory,
    Server,
    ServerFactory,
    need_binaries,
)
from harness.redis import flush_redis, redis_client, start_redis
from harness.registry2 import Registry2
from harness.s3 import S3Endpoint, new_bucket, start_moto
from harness.skopeo import (
    Push,
    check_catalog_and_tags,
    check_manifest_served,
    content_of,
    expected_tags,
    get_manifest,
    needs_skopeo,
    pull_and_compare,
    push,
    push_all,
    skopeo,
    verify_pushes,
)
from harness.store import LINK_CONTENT, BucketStore, DiskStore
from harness.workloads import gc_summary, oci_manifest

__all__ = [
    "DOCKER_LIST",
    "DOCKER_MANIFEST",
    "LINK_CONTENT",
    "OCI_INDEX",
    "OCI_MANIFEST",
    "BucketFactory",
    "BucketStore",
    "DiskStore",
    "DockyardProcess",
    "InProcessDockyard",
    "Loopback",
    "OciLayout",
    "Push",
    "RawConnection",
    "RawResponse",
    "Registry2",
    "Registry2Factory",
    "RegistryClient",
    "S3Endpoint",
    "Server",
    "ServerFactory",
    "assert_error",
    "check_catalog_and_tags",
    "check_manifest_served",
    "chunked_push",
    "content_of",
    "dockyard_config",
    "expected_tags",
    "flush_redis",
    "free_port",
    "gc_summary",
    "get_manifest",
    "gzip_layer",
    "need_binaries",
    "needs_skopeo",
    "new_bucket",
    "oci_manifest",
    "pull_and_compare",
    "push",
    "push_all",
    "raw_request",
    "redis_client",
    "referenced",
    "session_from",
    "sha256",
    "skopeo",
    "start_moto",
    "start_redis",
    "verify_pushes",
    "wait_for_port",
    "write_config",
]
