"""Operating the pull-through cache: start-up with the upstream down, ``dockyard proxy
list|warm|expire``, expiry that only unlinks, credentials kept out of the logs."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import requests

from harness import OCI_INDEX, OCI_MANIFEST, ServerFactory, assert_error, sha256
from harness.dockyard import run_command as dockyard
from harness.net import free_port


def test_starts_and_serves_its_cache_with_the_upstream_unreachable(
    start_server: ServerFactory,
) -> None:
    """registry:2 panics at start-up when its upstream is unreachable; Dockyard starts, serves
    what it cached, and says clearly what it cannot fetch."""
    upstream = start_server()
    digest, _ = upstream.push_image("library/app", "1")
    mirror = start_server(proxy={"remoteurl": upstream.url})
    r = requests.get(mirror.v2("library/app/manifests/1"), headers={"Accept": OCI_MANIFEST})
    assert r.status_code == 200
    mirror.stop()
    upstream.stop()
    again = start_server(root=mirror.root, proxy={"remoteurl": upstream.url})
    assert requests.get(again.v2("")).status_code == 200
    r = requests.get(again.v2("library/app/manifests/1"), headers={"Accept": OCI_MANIFEST})
    assert r.status_code == 200 and r.headers["Docker-Content-Digest"] == digest
    r = requests.get(again.v2(f"library/app/manifests/{digest}"), headers={"Accept": OCI_MANIFEST})
    assert r.status_code == 200 and "Cache-Status" not in r.headers  # by digest: never stale
    r = requests.get(again.v2("library/other/manifests/1"))
    body = assert_error(r, 503, "UNAVAILABLE")
    assert "not cached" in body["message"]


def test_warm_list_and_expire_from_the_command_line(start_server: ServerFactory) -> None:
    hub = start_server()
    amd, amd_manifest = hub.push_image("library/tool", None, [os.urandom(5000)])
    arm, arm_manifest = hub.push_image("library/tool", None, [os.urandom(7000)])
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {
                "mediaType": OCI_MANIFEST,
                "digest": amd,
                "size": 1,
                "platform": {"os": "linux", "architecture": "amd64"},
            },
            {
                "mediaType": OCI_MANIFEST,
                "digest": arm,
                "size": 1,
                "platform": {"os": "linux", "architecture": "arm64"},
            },
        ],
    }
    assert hub.push_manifest("library/tool", "2", index, OCI_INDEX).status_code == 201
    mirror = start_server(
        proxy={
            "upstreams": [
                {"prefix": "hub.local", "remoteurl": hub.url, "library": True, "ttl": "1h"},
                {"prefix": "down.local", "remoteurl": f"http://127.0.0.1:{free_port()}"},
            ]
        }
    )
    config = str(mirror.config_path)
    result = dockyard("proxy", "warm", "--config", config, "hub.local/tool:2")
    assert result.returncode == 0, result.stderr
    assert "3 manifests, 4 blobs" in result.stdout
    hub.stop()
    # every platform's blobs are served with the upstream gone
    for manifest in (amd_manifest, arm_manifest):
        for blob in [manifest["config"], *manifest["layers"]]:
            r = requests.get(mirror.v2(f"hub.local/library/tool/blobs/{blob['digest']}"))
            assert r.status_code == 200 and sha256(r.content) == blob["digest"]
    result = dockyard("proxy", "warm", "--config", config, "down.local/x:1")
    assert result.returncode == 1 and "UNAVAILABLE" in result.stdout

    listed = json.loads(dockyard("proxy", "list", config, "--json").stdout)
    by_name = {u["name"]: u for u in listed}
    assert by_name["hub.local"]["repositories"] == 1 and by_name["hub.local"]["bytes"] > 12_000
    assert by_name["hub.local"]["status"] != "ok"  # stopped above
    assert by_name["down.local"]["status"] != "ok" and by_name["down.local"]["repositories"] == 0

    # Expiry: nothing is old enough yet; age one platform's content past the ttl.
    dry = json.loads(dockyard("proxy", "expire", config, "--dry-run", "--json").stdout)
    assert dry["manifests"] == dry["blobs"] == 0
    links = Path(mirror.root, "docker/registry/v2/repositories/hub.local/library/tool/_layers")
    old = time.time() - 7200
    arm_digests = [arm, arm_manifest["config"]["digest"], arm_manifest["layers"][0]["digest"]]
    for digest in arm_digests:
        os.utime(links / "sha256" / digest.split(":")[1] / "link", (old, old))
    report = json.loads(dockyard("proxy", "expire", config, "--json").stdout)
    assert (report["manifests"], report["blobs"]) == (1, 2), report
    # unlinked only: the data is still in blobs/ for garbage collection to judge
    for digest in arm_digests:
        assert Path(
            mirror.root, "docker/registry/v2/blobs/sha256", digest[7:9], digest[7:], "data"
        ).exists()
        r = requests.get(mirror.v2(f"hub.local/library/tool/blobs/{digest}"))
        assert r.status_code in (404, 503)  # not served from the cache any more
    r = requests.get(
        mirror.v2(f"hub.local/library/tool/blobs/{amd_manifest['layers'][0]['digest']}")
    )
    assert r.status_code == 200


def test_credentials_are_used_but_never_logged(start_server: ServerFactory, tmp_path: Path) -> None:
    from harness.dockyard import add_user

    htpasswd = tmp_path / "htpasswd"
    add_user(htpasswd, "mirror", "s3cret-Upstream-pw")
    upstream = start_server(auth={"htpasswd": {"realm": "up", "path": str(htpasswd)}})
    upstream.session.auth = ("mirror", "s3cret-Upstream-pw")
    digest, _ = upstream.push_image("library/app", "1")
    mirror = start_server(
        proxy={"remoteurl": upstream.url, "username": "mirror", "password": "s3cret-Upstream-pw"},
        log={"level": "debug"},
    )
    r = requests.get(mirror.v2("library/app/manifests/1"), headers={"Accept": OCI_MANIFEST})
    assert r.status_code == 200 and r.headers["Docker-Content-Digest"] == digest
    wrong = start_server(
        proxy={"remoteurl": upstream.url, "username": "mirror", "password": "nope"}
    )
    r = requests.get(wrong.v2("library/app/manifests/1"))
    assert_error(r, 403, "DENIED")
    for server in (mirror, wrong):
        assert "s3cret-Upstream-pw" not in server.log()
        assert "bWlycm9y" not in server.log()  # base64 of the user, i.e. no Authorization header


def test_bearer_token_upstream_and_a_mirror_behind_its_own_auth(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    """The upstream is a Dockyard with its token server (the bearer challenge flow, a token per
    repository, cached); the mirror has htpasswd auth of its own: its clients log in to it, and
    the upstream credentials stay the mirror's."""
    from harness.dockyard import add_user

    upstream_users = tmp_path / "upstream-users"
    add_user(upstream_users, "mirror-bot", "bot-pw")
    upstream = start_server(
        auth={
            "token": {
                "service": "upstream.test",
                "issuer": "upstream",
                "server": {
                    "htpasswd": str(upstream_users),
                    "admins": ["mirror-bot"],
                },
            }
        }
    )
    token = requests.get(
        f"{upstream.url}/auth/token",
        params={"service": "upstream.test", "scope": "repository:team/app:pull,push"},
        auth=("mirror-bot", "bot-pw"),
    ).json()["token"]
    upstream.session.headers["Authorization"] = f"Bearer {token}"
    digest, manifest = upstream.push_image("team/app", "1")

    mirror_users = tmp_path / "mirror-users"
    add_user(mirror_users, "dev", "dev-pw")
    mirror = start_server(
        auth={"htpasswd": {"realm": "mirror", "path": str(mirror_users)}},
        proxy={
            "upstreams": [
                {
                    "prefix": "up",
                    "remoteurl": upstream.url,
                    "username": "mirror-bot",
                    "password": "bot-pw",
                }
            ]
        },
    )
    r = requests.get(mirror.v2("up/team/app/manifests/1"))
    assert r.status_code == 401  # the mirror's own auth comes first
    dev = requests.Session()
    dev.auth = ("dev", "dev-pw")
    r = dev.get(mirror.v2("up/team/app/manifests/1"), headers={"Accept": OCI_MANIFEST})
    assert r.status_code == 200 and r.headers["Docker-Content-Digest"] == digest
    layer = manifest["layers"][0]["digest"]
    r = dev.get(mirror.v2(f"up/team/app/blobs/{layer}"))
    assert r.status_code == 200 and sha256(r.content) == layer
    # one token for the repository, reused for the manifest and the blob requests
    token_requests = [
        line
        for line in upstream.log().splitlines()
        if "/auth/token" in line and "user_agent=dockyard-proxy" in line
    ]
    assert len(token_requests) == 1, token_requests
    assert "account=mirror-bot" in token_requests[0]


def test_gc_du_and_fsck_treat_cached_content_as_repository_content(
    start_server: ServerFactory,
) -> None:
    hub = start_server()
    digest, manifest = hub.push_image("library/app", "1", [os.urandom(20_000)])
    mirror = start_server(proxy={"remoteurl": hub.url})
    assert requests.get(mirror.v2("library/app/manifests/1")).status_code == 200
    for blob in [manifest["config"], *manifest["layers"]]:
        assert requests.get(mirror.v2(f"library/app/blobs/{blob['digest']}")).status_code == 200
    stray = hub.push_blob("library/app", os.urandom(3000))  # fetched alone, by no manifest
    assert requests.get(mirror.v2(f"library/app/blobs/{stray}")).status_code == 200
    mirror.stop()
    hub.stop()
    config = str(mirror.config_path)
    usage = json.loads(dockyard("du", config, "--json").stdout)
    assert [r["name"] for r in usage["repositories"]] == ["library/app"]
    result = dockyard("gc", config, "--grace", "0s", "--delete-untagged", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["blobs_removed"] == 1  # the stray one only
    fsck = dockyard("fsck", config)
    assert fsck.returncode == 0, fsck.stdout
    again = start_server(root=mirror.root, proxy={"remoteurl": hub.url})
    r = requests.get(again.v2("library/app/manifests/1"))
    assert r.status_code == 200 and r.headers["Docker-Content-Digest"] == digest
    for blob in [manifest["config"], *manifest["layers"]]:
        r = requests.get(again.v2(f"library/app/blobs/{blob['digest']}"))
        assert r.status_code == 200 and sha256(r.content) == blob["digest"]
    assert requests.get(again.v2(f"library/app/blobs/{stray}")).status_code in (404, 503)
