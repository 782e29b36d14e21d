"""Read-your-writes for what clients read most: after a 201 for a tag PUT, or a 202 for a tag
DELETE, on one worker, every worker answers HEAD and GET of the manifest by tag, and the tag
list, with the new state at once — with metrics, events and pull-time recording on (the setting
the benchmark measures), so that no cache added for speed can pass for correct by being short-
lived. (Tag lists cached per worker are tested in test_tags_catalog_api.py, with the tags
directory made to look long unchanged first.)"""

from __future__ import annotations

import json
from typing import Any

from harness import OCI_MANIFEST, ServerFactory
from harness.net import free_port
from harness.workers import spread_over_workers


def observed_setup(notifications_url: str) -> dict[str, Any]:
    return {
        "http": {"debug": {"addr": f"127.0.0.1:{free_port()}", "prometheus": {"enabled": True}}},
        # Nobody listens there: events wait in the outbox, as they are written on every push.
        "notifications": {
            "endpoints": [{"name": "sink", "url": notifications_url, "timeout": "1s"}]
        },
    }


def test_every_worker_serves_a_tag_the_moment_any_worker_moved_or_deleted_it(
    start_server: ServerFactory, storage_backend: str
) -> None:
    s = start_server(workers=2, **observed_setup(f"http://127.0.0.1:{free_port()}/events"))
    repo = "rw/manifests"
    first, manifest_a = s.push_image(repo, "a")
    second, manifest_b = s.push_image(repo, "b")
    bodies = {first: json.dumps(manifest_a).encode(), second: json.dumps(manifest_b).encode()}
    conns = spread_over_workers(s, 2)
    accept = {"Accept": OCI_MANIFEST}

    def everywhere(digest: str | None) -> None:
        for conn in conns:
            for method in ("HEAD", "GET"):
                status, headers, body = conn.request(
                    method, f"/v2/{repo}/manifests/latest", headers=accept
                )
                if digest is None:
                    assert status == 404, (method, status)
                    continue
                assert status == 200, (method, status, body)
                assert headers["Docker-Content-Digest"] == digest
                if method == "GET":
                    assert body == bodies[digest]
            status, body = conn.get(f"/v2/{repo}/tags/list")
            assert status == 200
            assert ("latest" in json.loads(body)["tags"]) == (digest is not None)

    for i in range(20):
        # Each round: both workers have just served the tag (any cache would be warm), then one
        # of them moves it.
        target = (first, second)[i % 2]
        status, _, raw = conns[i % 2].request(
            "PUT",
            f"/v2/{repo}/manifests/latest",
            bodies[target],
            {"Content-Type": OCI_MANIFEST},
        )
        assert status == 201, raw
        everywhere(target)
        if i % 5 == 4:
            status, _, raw = conns[(i + 1) % 2].request("DELETE", f"/v2/{repo}/manifests/latest")
            assert status == 202, raw
            everywhere(None)
