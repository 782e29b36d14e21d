"""Immutable tags (``policies[].immutabletags``): once such a tag exists, a client can neither
point it at another manifest nor delete it; everything else about the repository works."""

from __future__ import annotations

import json
import threading
from typing import Any

import requests

from harness import ServerFactory, sha256

INDEX = "application/vnd.oci.image.index.v1+json"
POLICIES = [
    {"repositories": ["releases/*"], "immutabletags": [r"v?\d+\.\d+\.\d+", "stable"]},
    # first match wins: releases/* above decides for releases/x even though this matches too
    {"repositories": ["*"], "immutabletags": ["frozen-.*"]},
]


def index(n: int | str) -> bytes:
    return json.dumps(
        {"schemaVersion": 2, "mediaType": INDEX, "manifests": [], "annotations": {"n": str(n)}}
    ).encode()


def refused(r: requests.Response, tag: str, rule: str) -> None:
    assert r.status_code == 403, r.text
    error = r.json()["errors"][0]
    assert error["code"] == "DENIED"
    assert f"tag {tag} of" in error["message"] and rule in error["message"]


def test_an_immutable_tag_cannot_be_moved_or_deleted(start_server: ServerFactory) -> None:
    s = start_server(policies=POLICIES)
    first, second = index(1), index(2)
    assert s.push_manifest("releases/app", "1.2.3", first, INDEX).status_code == 201
    # the same manifest again is no change (clients push again after a retry)
    assert s.push_manifest("releases/app", "1.2.3", first, INDEX).status_code == 201
    refused(s.push_manifest("releases/app", "1.2.3", second, INDEX), "1.2.3", r"v?\d+\.\d+\.\d+")
    # nor by digest with ?tag= (OCI 1.1)
    r = s.session.put(
        s.v2(f"releases/app/manifests/{sha256(second)}"),
        params={"tag": "1.2.3"},
        data=second,
        headers={"Content-Type": INDEX},
    )
    refused(r, "1.2.3", r"v?\d+\.\d+\.\d+")
    # the tag still names the first manifest
    got = s.session.get(s.v2("releases/app/manifests/1.2.3"), headers={"Accept": INDEX})
    assert got.content == first
    # neither the tag nor the manifest it names can be deleted
    refused(s.session.delete(s.v2("releases/app/manifests/1.2.3")), "1.2.3", "v?")
    refused(s.session.delete(s.v2(f"releases/app/manifests/{sha256(first)}")), "1.2.3", "v?")
    assert s.session.get(s.v2("releases/app/manifests/1.2.3"), headers={"Accept": INDEX}).ok
    # ``fullmatch``: 1.2.3-rc1 is not a release tag, and mutable tags stay mutable
    for tag in ("1.2.3-rc1", "latest"):
        assert s.push_manifest("releases/app", tag, first, INDEX).status_code == 201
        assert s.push_manifest("releases/app", tag, second, INDEX).status_code == 201
        assert s.session.delete(s.v2(f"releases/app/manifests/{tag}")).status_code == 202
    # the second policy does not apply to releases/*: first match wins
    assert s.push_manifest("releases/app", "frozen-1", first, INDEX).status_code == 201
    assert s.push_manifest("releases/app", "frozen-1", second, INDEX).status_code == 201
    # ... and applies elsewhere
    assert s.push_manifest("team/app", "frozen-1", first, INDEX).status_code == 201
    refused(s.push_manifest("team/app", "frozen-1", second, INDEX), "frozen-1", "frozen-.*")
    # a repository no immutable pattern covers: 1.2.3 moves
    assert s.push_manifest("team/app", "1.2.3", first, INDEX).status_code == 201
    assert s.push_manifest("team/app", "1.2.3", second, INDEX).status_code == 201


def test_referrers_of_an_immutable_manifest_can_still_be_added(start_server: ServerFactory) -> None:
    s = start_server(policies=POLICIES)
    digest, manifest = s.push_image("releases/tool", "2.0.0")
    signature: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": "application/vnd.example.signature",
        "config": {
            "mediaType": "application/vnd.oci.empty.v1+json",
            "digest": s.push_blob("releases/tool", b"{}"),
            "size": 2,
        },
        "layers": [],
        "subject": {
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest,
            "size": len(json.dumps(manifest)),
        },
    }
    body = json.dumps(signature).encode()
    r = s.push_manifest("releases/tool", sha256(body), body)
    assert r.status_code == 201, r.text
    referrers = s.session.get(s.v2(f"releases/tool/referrers/{digest}")).json()
    assert [m["digest"] for m in referrers["manifests"]] == [sha256(body)]


def test_racing_pushes_to_a_new_immutable_tag_one_wins(start_server: ServerFactory) -> None:
    """Eight pushes of eight manifests to one new immutable tag, at once, on four workers:
    exactly one is told 201 and the tag names that one's manifest."""
    s = start_server(policies=POLICIES, workers=4)
    bodies = [index(f"race-{i}") for i in range(8)]
    statuses: list[int] = [0] * len(bodies)
    start = threading.Barrier(len(bodies))

    def push(i: int) -> None:
        session = requests.Session()
        start.wait()
        r = session.put(
            s.v2("releases/race/manifests/3.0.0"),
            data=bodies[i],
            headers={"Content-Type": INDEX},
        )
        statuses[i] = r.status_code

    threads = [threading.Thread(target=push, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(statuses) == [201] + [403] * 7, statuses
    winner = bodies[statuses.index(201)]
    got = s.session.get(s.v2("releases/race/manifests/3.0.0"), headers={"Accept": INDEX})
    assert got.content == winner


def test_a_pull_through_cache_follows_its_upstream_whatever_the_policies(
    start_server: ServerFactory,
) -> None:
    """The cache's tags mirror the upstream's: an immutable pattern is for clients' pushes."""
    import os

    hub = start_server()
    first, _ = hub.push_image("library/app", "1.0.0")
    mirror = start_server(
        proxy={"upstreams": [{"prefix": "hub", "remoteurl": hub.url}]},
        policies=[{"repositories": ["*"], "immutabletags": [r"\d+\.\d+\.\d+"]}],
    )
    accept = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
    r = requests.get(mirror.v2("hub/library/app/manifests/1.0.0"), headers=accept)
    assert r.headers["Docker-Content-Digest"] == first
    second, _ = hub.push_image("library/app", "1.0.0", [os.urandom(10)])
    r = requests.get(mirror.v2("hub/library/app/manifests/1.0.0"), headers=accept)
    assert r.status_code == 200 and r.headers["Docker-Content-Digest"] == second
    hub.stop()  # and it is the cached tag that moved
    r = requests.get(mirror.v2("hub/library/app/manifests/1.0.0"), headers=accept)
    assert r.status_code == 200 and r.headers["Docker-Content-Digest"] == second
