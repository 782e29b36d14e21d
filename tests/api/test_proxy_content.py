"""What goes through the cache besides plain images: multi-platform indexes (children fetched
when asked for), referrers, tags cached for ``tagttl``."""

from __future__ import annotations

import json
import os

import requests

from harness import OCI_INDEX, OCI_MANIFEST, ServerFactory, sha256


def _index(*children: str) -> dict:
    return {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {
                "mediaType": OCI_MANIFEST,
                "digest": d,
                "size": 1,
                "platform": {"os": "linux", "architecture": a},
            }
            for d, a in zip(children, ("amd64", "arm64"), strict=False)
        ],
    }


def test_an_index_is_cached_before_its_children_and_each_platform_on_demand(
    start_server: ServerFactory,
) -> None:
    hub = start_server()
    amd, amd_manifest = hub.push_image("library/multi", None)
    arm, _ = hub.push_image("library/multi", None)
    body = json.dumps(_index(amd, arm)).encode()
    assert hub.push_manifest("library/multi", "1", body, OCI_INDEX).status_code == 201
    mirror = start_server(proxy={"remoteurl": hub.url})
    r = requests.get(mirror.v2("library/multi/manifests/1"), headers={"Accept": OCI_INDEX})
    assert r.status_code == 200 and r.content == body
    r = requests.get(mirror.v2(f"library/multi/manifests/{amd}"), headers={"Accept": OCI_MANIFEST})
    assert r.status_code == 200
    for blob in [amd_manifest["config"], *amd_manifest["layers"]]:
        assert requests.get(mirror.v2(f"library/multi/blobs/{blob['digest']}")).status_code == 200
    hub.stop()
    # the index and the pulled platform are whole; the other platform was never fetched
    assert requests.get(mirror.v2("library/multi/manifests/1")).status_code == 200
    assert requests.get(mirror.v2(f"library/multi/manifests/{amd}")).status_code == 200
    r = requests.get(mirror.v2(f"library/multi/manifests/{arm}"))
    assert r.status_code == 503


def test_referrers_come_from_the_upstream_and_from_the_cache_when_it_is_down(
    start_server: ServerFactory,
) -> None:
    hub = start_server()
    subject, _ = hub.push_image("library/signed", "1")
    config = hub.push_blob("library/signed", b"{}")
    signature = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": "application/vnd.example.signature",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": config, "size": 2},
        "layers": [],
        "subject": {"mediaType": OCI_MANIFEST, "digest": subject, "size": 1},
    }
    body = json.dumps(signature).encode()
    assert hub.push_manifest("library/signed", sha256(body), body).status_code == 201
    mirror = start_server(proxy={"remoteurl": hub.url})
    r = requests.get(mirror.v2(f"library/signed/referrers/{subject}"))
    assert r.status_code == 200
    assert [m["digest"] for m in r.json()["manifests"]] == [sha256(body)]
    r = requests.get(
        mirror.v2(f"library/signed/referrers/{subject}"), params={"artifactType": "other/type"}
    )
    assert r.json()["manifests"] == [] and r.headers["OCI-Filters-Applied"] == "artifactType"
    # pulling the signature caches it, and the cached index lists it with the upstream gone
    assert requests.get(mirror.v2(f"library/signed/manifests/{sha256(body)}")).status_code == 200
    hub.stop()
    r = requests.get(mirror.v2(f"library/signed/referrers/{subject}"))
    assert r.status_code == 200
    assert [m["digest"] for m in r.json()["manifests"]] == [sha256(body)]


def test_tagttl_answers_tags_from_the_cache_without_asking(start_server: ServerFactory) -> None:
    hub = start_server()
    first, _ = hub.push_image("library/app", "1")
    mirror = start_server(
        proxy={"upstreams": [{"prefix": "hub", "remoteurl": hub.url, "tagttl": "1h"}]}
    )
    plain = start_server(proxy={"upstreams": [{"prefix": "hub", "remoteurl": hub.url}]})
    for server in (mirror, plain):
        r = requests.head(server.v2("hub/library/app/manifests/1"))
        assert r.headers["Docker-Content-Digest"] == first
    second, _ = hub.push_image("library/app", "1", [os.urandom(10)])
    # tagttl: the tag confirmed a moment ago is still answered from the cache
    r = requests.head(mirror.v2("hub/library/app/manifests/1"))
    assert r.headers["Docker-Content-Digest"] == first and "Cache-Status" not in r.headers
    # by default (registry:2's behaviour) every request asks the upstream
    r = requests.head(plain.v2("hub/library/app/manifests/1"))
    assert r.headers["Docker-Content-Digest"] == second


def test_a_client_that_leaves_mid_blob_does_not_stall_the_fetch(
    start_server: ServerFactory,
) -> None:
    hub = start_server()
    big = os.urandom(24 * 1024 * 1024)
    digest = hub.push_blob("library/big", big)
    mirror = start_server(proxy={"remoteurl": hub.url})
    with requests.get(mirror.v2(f"library/big/blobs/{digest}"), stream=True, timeout=30) as r:
        assert r.status_code == 200
        r.raw.read(1000)  # then hang up, with most of the blob still to come
    r = requests.get(mirror.v2(f"library/big/blobs/{digest}"), timeout=30)
    assert r.status_code == 200 and sha256(r.content) == digest
    hub.stop()
    r = requests.get(mirror.v2(f"library/big/blobs/{digest}"), timeout=30)
    assert r.status_code == 200 and sha256(r.content) == digest  # cached whole
