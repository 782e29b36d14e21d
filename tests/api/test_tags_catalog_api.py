"""end-8a/b (tag lists) and the catalog."""

from __future__ import annotations

import json
import os
import re
import time

import requests

from harness import OCI_MANIFEST, Server, ServerFactory, assert_error
from harness.workers import spread_over_workers


def push_tags(server: Server, repo: str, tags: list[str]) -> None:
    _digest, manifest = server.push_image(repo, None)
    body = json.dumps(manifest).encode()
    for tag in tags:
        r = server.push_manifest(repo, tag, body, OCI_MANIFEST)
        assert r.status_code == 201


def test_tags_sorted(server: Server, repo: str) -> None:
    push_tags(server, repo, ["b", "a", "C", "1.0", "latest", "_x"])
    r = requests.get(server.v2(f"{repo}/tags/list"))
    assert r.status_code == 200
    assert r.json() == {"name": repo, "tags": ["1.0", "C", "_x", "a", "b", "latest"]}
    assert "Link" not in r.headers


def test_tags_pagination(server: Server, repo: str) -> None:
    tags = [f"v{i:02d}" for i in range(7)]
    push_tags(server, repo, tags)
    seen: list[str] = []
    url = server.v2(f"{repo}/tags/list?n=3")
    pages = 0
    while url:
        r = requests.get(url)
        assert r.status_code == 200
        seen += r.json()["tags"]
        pages += 1
        link = r.headers.get("Link")
        if link:
            m = re.match(r'^<(/v2/[^>]+)>; rel="next"$', link)
            assert m, link
            url = server.url + m.group(1)
        else:
            url = ""
    assert seen == tags and pages == 3
    r = requests.get(server.v2(f"{repo}/tags/list"), params={"n": 2, "last": "v03"})
    assert r.json()["tags"] == ["v04", "v05"]
    r = requests.get(server.v2(f"{repo}/tags/list"), params={"last": "v05"})
    assert r.json()["tags"] == ["v06"]
    r = requests.get(server.v2(f"{repo}/tags/list"), params={"n": 0})
    assert r.json()["tags"] == [] and "Link" not in r.headers


def test_invalid_n(server: Server, repo: str) -> None:
    push_tags(server, repo, ["a"])
    for n in ("-1", "x", "1.5"):
        r = requests.get(server.v2(f"{repo}/tags/list"), params={"n": n})
        assert_error(r, 400, "PAGINATION_NUMBER_INVALID")


def test_unknown_repository(server: Server) -> None:
    assert_error(requests.get(server.v2("never/pushed/tags/list")), 404, "NAME_UNKNOWN")


def test_repository_without_tags(server: Server, repo: str) -> None:
    server.push_image(repo, "only")
    requests.delete(server.v2(f"{repo}/manifests/only"))
    r = requests.get(server.v2(f"{repo}/tags/list"))
    assert r.status_code == 200 and r.json()["tags"] == []


def test_catalog_paging(start_server: ServerFactory) -> None:
    s = start_server()
    names = sorted(["alpha", "beta/one", "beta/two", "gamma", "gamma/nested/deep"])
    for name in names:
        s.push_image(name, "t")
    r = requests.get(s.v2("_catalog"))
    assert r.json() == {"repositories": names}
    r = requests.get(s.v2("_catalog"), params={"n": 2})
    assert r.json()["repositories"] == names[:2]
    assert r.headers["Link"] == '</v2/_catalog?n=2&last=beta%2Fone>; rel="next"'
    r = requests.get(s.v2("_catalog"), params={"n": 2, "last": "beta/one"})
    assert r.json()["repositories"] == names[2:4]
    r = requests.get(s.v2("_catalog"), params={"n": 10, "last": "gamma"})
    assert r.json()["repositories"] == ["gamma/nested/deep"] and "Link" not in r.headers
    assert_error(
        requests.get(s.v2("_catalog"), params={"n": "many"}), 400, "PAGINATION_NUMBER_INVALID"
    )


def test_catalog_maxentries(start_server: ServerFactory) -> None:
    s = start_server(catalog={"maxentries": 2})
    for name in ("a", "b", "c"):
        s.push_image(name, "t")
    r = requests.get(s.v2("_catalog"))
    assert r.json()["repositories"] == ["a", "b"]
    assert "Link" in r.headers


def test_every_worker_lists_what_any_worker_just_tagged(
    start_server: ServerFactory, storage_backend: str
) -> None:
    """Read-your-writes across workers, with tag lists cached per worker (registry.listing):
    after a 201 for a tag PUT or a 202 for a tag DELETE on one worker, both workers list the
    new set at once, page by page. On the filesystem the tags directory is first made to look
    long unchanged, so that each worker has the list cached when the change comes; a round in
    between does not, so the change lands while the directory is still racy."""
    s = start_server(workers=2)
    repo = "rw/tags"
    _digest, manifest = s.push_image(repo, "base")
    body = json.dumps(manifest).encode()
    tags_dir = s.root / "docker/registry/v2/repositories" / repo / "_manifests/tags"
    conns = spread_over_workers(s, 2)
    expected = {"base"}

    def lists_everywhere() -> None:
        want = sorted(expected)
        for conn in conns:
            status, raw = conn.get(f"/v2/{repo}/tags/list")
            assert status == 200 and json.loads(raw)["tags"] == want
            status, raw = conn.get(f"/v2/{repo}/tags/list?n=2&last={want[0]}")
            assert status == 200 and json.loads(raw)["tags"] == want[1:3]

    try:
        for i in range(30):
            if storage_backend == "filesystem" and i % 2 == 0:
                old = time.time() - 60
                os.utime(tags_dir, (old, old))
                lists_everywhere()  # now cached on both workers
            writer = conns[i % 2]
            tag = f"t{i:02d}"
            status, _, raw = writer.request(
                "PUT", f"/v2/{repo}/manifests/{tag}", body, {"Content-Type": OCI_MANIFEST}
            )
            assert status == 201, raw
            expected.add(tag)
            lists_everywhere()
            if i % 3 == 2:
                gone = f"t{i - 1:02d}"
                status, _, raw = conns[(i + 1) % 2].request(
                    "DELETE", f"/v2/{repo}/manifests/{gone}"
                )
                assert status == 202, raw
                expected.discard(gone)
                lists_everywhere()
    finally:
        for conn in conns:
            conn.close()
