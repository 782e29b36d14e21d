"""Quotas (``quotas``): a scope's usage (distinct blobs and uploads in progress) never goes over
its limit; what would take it over is refused with 403 DENIED naming scope, usage and limit,
before anything is written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import pytest
import requests
import yaml

from harness import ServerFactory, sha256
from harness.client import RawConnection, pushers_at_once
from harness.dockyard import run_command

KiB = 1024
QUOTAS = [
    {"scope": "team-a/*", "limit": "300KiB"},
    {"scope": "team-a/small", "limit": "100KiB"},
]


def denied(r: requests.Response, scope: str) -> dict[str, Any]:
    assert r.status_code == 403, (r.status_code, r.text)
    error = r.json()["errors"][0]
    assert error["code"] == "DENIED"
    assert f"quota exceeded for {scope}:" in error["message"]
    assert " used of " in error["message"]
    return error["detail"]


def start_upload(s: Any, repo: str) -> requests.Response:
    return s.session.post(s.v2(f"{repo}/blobs/uploads/"))


def test_pushes_fill_the_quota_and_the_one_that_crosses_it_is_refused(
    start_server: ServerFactory,
) -> None:
    s = start_server(quotas=QUOTAS)
    # Under the limit: fine, in two repositories of the namespace.
    s.push_image("team-a/app", "1", [os.urandom(100 * KiB)])
    s.push_image("team-a/web", "1", [os.urandom(100 * KiB)])
    # A monolithic upload that would cross the namespace's limit is refused, nothing written.
    big = os.urandom(120 * KiB)
    r = s.session.post(s.v2("team-a/app/blobs/uploads/"), params={"digest": sha256(big)}, data=big)
    detail = denied(r, "team-a/*")
    assert detail["limit"] == 300 * KiB and detail["wanted"] == len(big)
    assert detail["used"] > 200 * KiB
    assert s.session.head(s.v2(f"team-a/app/blobs/{sha256(big)}")).status_code == 404
    # Outside the scope nothing is limited.
    s.push_image("team-b/app", "1", [big])
    # The same bytes pushed again into the namespace take no room: each blob counts once.
    shared = s.push_image("team-a/app", "2", [os.urandom(10 * KiB)])[1]["layers"][0]["digest"]
    r = s.session.post(
        s.v2("team-a/web/blobs/uploads/"), params={"mount": shared, "from": "team-a/app"}
    )
    assert r.status_code == 201, r.text


def test_a_chunked_body_is_cut_off_at_the_limit(start_server: ServerFactory) -> None:
    """A PATCH without Content-Length is reserved for as it arrives: it fails at the limit,
    and the upload keeps what it held before."""
    s = start_server(quotas=QUOTAS)
    r = start_upload(s, "team-a/small")
    assert r.status_code == 202
    location = urljoin(s.url, r.headers["Location"])
    first = os.urandom(40 * KiB)
    r = s.session.patch(location, data=first, headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 202, r.text
    location = urljoin(s.url, r.headers["Location"])

    def chunks() -> Iterator[bytes]:
        for _ in range(20):
            yield os.urandom(8 * KiB)

    r = s.session.patch(location, data=chunks())  # chunked transfer: no length announced
    denied(r, "team-a/small")
    status = s.session.get(location)
    assert status.status_code == 204
    assert status.headers["Range"] == f"0-{len(first) - 1}"
    # The repository quota is full once an upload holds it: a new upload is refused at POST.
    r = s.session.patch(location, data=os.urandom(60 * KiB))
    assert r.status_code == 202, r.text
    denied(start_upload(s, "team-a/small"), "team-a/small")
    # Cancelling the upload frees the space.
    assert s.session.delete(urljoin(s.url, r.headers["Location"])).status_code == 204
    assert start_upload(s, "team-a/small").status_code == 202


def test_a_refused_patch_is_answered_not_reset(start_server: ServerFactory) -> None:
    """A client that sends its whole body before it reads (as docker's and skopeo's transports
    may, writing and reading on two goroutines) reads the 403 and its message, not a connection
    reset: the server takes in the rest of a refused body before closing. Closing with bytes
    unread makes the kernel send a reset, which throws away the answer the client had not read
    yet (CI saw skopeo print "connection reset by peer" instead of the quota message)."""
    s = start_server(quotas=QUOTAS)
    location = urlsplit(urljoin(s.url, start_upload(s, "team-a/small").headers["Location"]))
    body = os.urandom(4 * 1024 * KiB)
    with RawConnection(s.port, timeout=30) as conn:
        conn.send(
            f"PATCH {location.path}?{location.query} HTTP/1.1\r\nHost: {s.host}\r\n"
            f"Content-Type: application/octet-stream\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
        )
        conn.send(body)  # all of it before reading anything
        time.sleep(0.3)  # the server has answered and closed by now
        answer = conn.response()
    assert answer.status == 403
    assert "quota exceeded for team-a/*:" in answer.json()["errors"][0]["message"]


def test_uploads_without_manifests_count(start_server: ServerFactory) -> None:
    s = start_server(quotas=QUOTAS)
    pushed = 0
    while True:
        data = os.urandom(30 * KiB)
        r = s.session.post(
            s.v2("team-a/dump/blobs/uploads/"), params={"digest": sha256(data)}, data=data
        )
        if r.status_code != 201:
            denied(r, "team-a/*")
            break
        pushed += len(data)
    assert 270 * KiB <= pushed <= 300 * KiB
    # and a manifest that would take the scope over is refused too (it is a blob of the scope)
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [],
        "annotations": {"pad": "x" * 40 * KiB},
    }
    denied(s.push_manifest("team-a/dump", "t", manifest), "team-a/*")


def test_concurrent_pushes_never_exceed_the_limit(start_server: ServerFactory) -> None:
    """20 pushes at once into one namespace on 4 workers: the scope ends at most at its limit
    (the bound is 0 bytes within one instance), and the pushes that fit succeed."""
    limit = 1024 * KiB
    s = start_server(quotas=[{"scope": "ns/*", "limit": limit}], workers=4)
    outcomes = pushers_at_once([s], "ns")  # 20 pushers, three 40 KiB blobs each
    assert set(outcomes) <= {201, 403}, outcomes
    accepted = outcomes.count(201)
    assert 0 < accepted < 60
    usage = du(s)
    (scope,) = usage["quotas"]
    assert scope["used"] <= limit, scope
    assert scope["indexed"] == scope["used"]  # nothing in progress: the index agrees with the walk
    assert scope["used"] == accepted * 40 * KiB
    # the limit is really reached: what is refused would not have fitted
    assert limit - scope["used"] < 40 * KiB


def du(s: Any) -> dict[str, Any]:
    done = run_command("du", str(s.config_path), "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_usage_matches_du(start_server: ServerFactory) -> None:
    s = start_server(quotas=QUOTAS)
    shared = os.urandom(20 * KiB)
    s.push_image("team-a/app", "1", [shared, os.urandom(5 * KiB)])
    s.push_image("team-a/small", "1", [shared])
    s.push_image("other", "1", [shared])
    usage = du(s)
    scopes = {q["scope"]: q for q in usage["quotas"]}
    assert set(scopes) == {"team-a/*", "team-a/small"}
    for scope in scopes.values():
        assert scope["indexed"] == scope["used"], scope
        assert scope["uploading"] == 0
    repos = {r["name"]: r for r in usage["repositories"]}
    assert scopes["team-a/small"]["used"] == repos["team-a/small"]["total_bytes"]
    # the namespace counts the shared layer once
    assert scopes["team-a/*"]["used"] < (
        repos["team-a/app"]["total_bytes"] + repos["team-a/small"]["total_bytes"]
    )


@pytest.mark.parametrize("bad", ["lots", "-5", "team-a/*x"])
def test_an_invalid_quota_fails_at_start_up(tmp_path: Path, bad: str) -> None:
    quota = (
        {"scope": "team-a/*", "limit": bad} if bad != "team-a/*x" else {"scope": bad, "limit": 1}
    )
    config = tmp_path / "config.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "version": 0.1,
                "storage": {"filesystem": {"rootdirectory": str(tmp_path)}},
                "quotas": [quota],
            }
        )
    )
    done = subprocess.run(
        [sys.executable, "-m", "dockyard", "check-config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "quotas" in done.stderr


def test_a_pull_through_cache_fills_past_a_quota(start_server: ServerFactory) -> None:
    """Quotas limit pushes: a pull through the cache of a full scope is served and cached (and
    counted), never refused."""
    upstream = start_server()
    digest, manifest = upstream.push_image("library/app", "1", [os.urandom(50 * KiB)])
    mirror = start_server(proxy={"remoteurl": upstream.url}, quotas=[{"scope": "*", "limit": 1}])
    accept = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
    r = requests.get(mirror.v2("library/app/manifests/1"), headers=accept)
    assert r.status_code == 200, r.text
    assert r.headers["Docker-Content-Digest"] == digest
    layer = manifest["layers"][0]["digest"]
    r = requests.get(mirror.v2(f"library/app/blobs/{layer}"))
    assert r.status_code == 200 and sha256(r.content) == layer
