"""The pull-through cache against a real upstream: another Dockyard (in the test process)."""

from __future__ import annotations

import os

import pytest
import requests

from harness.client import OCI_MANIFEST, assert_error, sha256
from harness.dockyard import InProcessDockyard
from harness.plugin import ServerFactory


@pytest.fixture
def upstream(start_server: ServerFactory) -> InProcessDockyard:
    return start_server()


def test_registry2_style_mirror_serves_and_caches_an_image(
    start_server: ServerFactory, upstream: InProcessDockyard
) -> None:
    digest, manifest = upstream.push_image("library/alpine", "3", [os.urandom(300_000)])
    mirror = start_server(proxy={"remoteurl": upstream.url})
    r = requests.get(mirror.v2("library/alpine/manifests/3"), headers={"Accept": OCI_MANIFEST})
    assert r.status_code == 200, r.text
    assert r.headers["Docker-Content-Digest"] == digest
    for blob in [manifest["config"], *manifest["layers"]]:
        r = requests.get(mirror.v2(f"library/alpine/blobs/{blob['digest']}"))
        assert r.status_code == 200, r.text
        assert sha256(r.content) == blob["digest"]
    # Cached: served with the upstream gone.
    upstream.stop()
    for blob in [manifest["config"], *manifest["layers"]]:
        r = requests.get(mirror.v2(f"library/alpine/blobs/{blob['digest']}"))
        assert r.status_code == 200
        assert sha256(r.content) == blob["digest"]
    r = requests.get(mirror.v2("library/alpine/manifests/3"), headers={"Accept": OCI_MANIFEST})
    assert r.status_code == 200
    assert r.headers["Docker-Content-Digest"] == digest
    assert "stale" in r.headers["Cache-Status"]
    r = requests.get(mirror.v2("library/alpine/tags/list"))
    assert r.status_code == 200 and r.json()["tags"] == ["3"]
    assert "Warning" in r.headers
    r = requests.get(mirror.v2("library/busybox/manifests/1"))
    assert_error(r, 503, "UNAVAILABLE")


def test_pushes_to_a_mirror_are_refused_as_registry2_does(
    start_server: ServerFactory, upstream: InProcessDockyard
) -> None:
    mirror = start_server(proxy={"remoteurl": upstream.url})
    r = requests.post(mirror.v2("team/app/blobs/uploads/"))
    assert_error(r, 405, "UNSUPPORTED")
    r = requests.put(
        mirror.v2("team/app/manifests/1"), data=b"{}", headers={"Content-Type": OCI_MANIFEST}
    )
    assert_error(r, 405, "UNSUPPORTED")
    r = requests.delete(mirror.v2(f"team/app/manifests/{sha256(b'x')}"))
    assert_error(r, 405, "UNSUPPORTED")


def test_several_upstreams_beside_local_repositories(start_server: ServerFactory) -> None:
    hub = start_server()
    other = start_server()
    hub_digest, _ = hub.push_image("library/alpine", "3")
    other_digest, other_manifest = other.push_image("acme/tool", "1")
    mirror = start_server(
        proxy={
            "upstreams": [
                {"prefix": "docker.io", "remoteurl": hub.url, "library": True},
                {"prefix": "other.example", "remoteurl": other.url, "remoteprefix": "acme"},
            ]
        }
    )
    r = requests.get(mirror.v2("docker.io/alpine/manifests/3"), headers={"Accept": OCI_MANIFEST})
    assert r.status_code == 200 and r.headers["Docker-Content-Digest"] == hub_digest
    # containerd's mirror convention: the upstream's own name, with ns=
    r = requests.get(
        mirror.v2("library/alpine/manifests/3"),
        params={"ns": "docker.io"},
        headers={"Accept": OCI_MANIFEST},
    )
    assert r.status_code == 200 and r.headers["Docker-Content-Digest"] == hub_digest
    r = requests.get(mirror.v2("other.example/tool/manifests/1"), headers={"Accept": OCI_MANIFEST})
    assert r.status_code == 200 and r.headers["Docker-Content-Digest"] == other_digest
    layer = other_manifest["layers"][0]["digest"]
    r = requests.get(mirror.v2(f"other.example/tool/blobs/{layer}"))
    assert r.status_code == 200 and sha256(r.content) == layer
    # one cache per image, however it was asked for
    catalog = requests.get(mirror.v2("_catalog")).json()["repositories"]
    assert catalog == ["docker.io/library/alpine", "other.example/tool"]
    # local repositories still take pushes
    local_digest, _ = mirror.push_image("team/app", "1")
    r = requests.head(mirror.v2("team/app/manifests/1"))
    assert r.headers["Docker-Content-Digest"] == local_digest
    r = requests.post(mirror.v2("docker.io/alpine/blobs/uploads/"))
    assert_error(r, 405, "UNSUPPORTED")


def test_a_local_blob_cannot_be_read_under_a_proxy_prefix(start_server: ServerFactory) -> None:
    hub = start_server()
    mirror = start_server(proxy={"upstreams": [{"prefix": "docker.io", "remoteurl": hub.url}]})
    secret = os.urandom(1000)
    digest = mirror.push_blob("team/private", secret)
    r = requests.get(mirror.v2(f"docker.io/library/alpine/blobs/{digest}"))
    assert_error(r, 404, "BLOB_UNKNOWN")
    r = requests.head(mirror.v2(f"docker.io/library/alpine/blobs/{digest}"))
    assert r.status_code == 404


def test_the_log_says_a_cached_tag_was_served_only_when_one_was(
    start_server: ServerFactory, upstream: InProcessDockyard
) -> None:
    upstream.push_image("library/alpine", "3")
    mirror = start_server(proxy={"remoteurl": upstream.url})
    r = requests.get(mirror.v2("library/alpine/manifests/3"), headers={"Accept": OCI_MANIFEST})
    assert r.status_code == 200
    upstream.stop()
    assert requests.get(mirror.v2("library/alpine/manifests/3")).status_code == 200
    assert requests.get(mirror.v2("library/alpine/tags/list")).status_code == 200
    assert_error(requests.get(mirror.v2("library/busybox/manifests/1")), 503, "UNAVAILABLE")
    assert_error(requests.get(mirror.v2("library/busybox/tags/list")), 503, "UNAVAILABLE")
    log = mirror.log()
    assert "serving the cached tag library/alpine:3" in log
    assert "serving the cached tags of library/alpine" in log
    assert "serving the cached tag library/busybox:1" not in log, log
    assert "serving the cached tags of library/busybox" not in log, log
    assert "library/busybox:1 is not cached" in log, log
