"""end-4a/b/c, end-5, end-6, end-11, end-13, end-14: uploads and mounts."""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Iterator
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
import requests

from harness import BucketStore, Server, ServerFactory, assert_error, sha256
from harness.store import store_of
from harness.workers import spread_over_workers


def start(server: Server, repo: str, **params: str) -> requests.Response:
    r = requests.post(server.v2(f"{repo}/blobs/uploads/"), params=params)
    assert r.status_code == 202, r.text
    return r


def check_session_headers(r: requests.Response, server: Server, repo: str, size: int) -> None:
    loc = r.headers["Location"]
    assert loc.startswith(f"http://{server.host}/v2/{repo}/blobs/uploads/")
    uuid = r.headers["Docker-Upload-UUID"]
    assert urlsplit(loc).path.endswith(uuid)
    assert "_state" in parse_qs(urlsplit(loc).query)
    assert r.headers["Range"] == f"0-{max(size - 1, 0)}"
    assert r.headers.get("Content-Length", "0") == "0"


def test_start_upload(server: Server, repo: str) -> None:
    r = start(server, repo)
    check_session_headers(r, server, repo, 0)


def test_monolithic_post(server: Server, repo: str) -> None:
    data = os.urandom(1000)
    digest = sha256(data)
    r = requests.post(server.v2(f"{repo}/blobs/uploads/"), params={"digest": digest}, data=data)
    assert r.status_code == 201
    assert r.headers["Location"] == f"http://{server.host}/v2/{repo}/blobs/{digest}"
    assert r.headers["Docker-Content-Digest"] == digest
    assert requests.get(server.v2(f"{repo}/blobs/{digest}")).content == data


def test_monolithic_post_with_wrong_digest_leaves_nothing(server: Server, repo: str) -> None:
    """Neither blob is served, and nothing of the upload is left in storage (on the disk or in
    the bucket, whichever the server uses)."""
    wrong = sha256(b"something else")
    r = requests.post(
        server.v2(f"{repo}/blobs/uploads/"), params={"digest": wrong}, data=b"content"
    )
    assert_error(r, 400, "DIGEST_INVALID")
    for digest in (wrong, sha256(b"content")):
        assert requests.head(server.v2(f"{repo}/blobs/{digest}")).status_code == 404
    store = store_of(server.config_path)
    assert store.uploads(repo) == []
    if isinstance(store, BucketStore):
        assert not [k for k in store.multipart_uploads() if f"/repositories/{repo}/" in k]


def test_monolithic_put(server: Server, repo: str) -> None:
    data = os.urandom(5000)
    loc = start(server, repo).headers["Location"]
    r = requests.put(
        loc,
        params={"digest": sha256(data)},
        data=data,
        headers={"Content-Type": "application/octet-stream"},
    )
    assert r.status_code == 201
    assert r.headers["Docker-Content-Digest"] == sha256(data)
    assert requests.get(server.v2(f"{repo}/blobs/{sha256(data)}")).content == data


def test_chunked_upload_with_content_range(server: Server, repo: str) -> None:
    data = os.urandom(3 * 1024 * 1024 + 11)
    cuts = [0, 1_000_000, 2_000_000, len(data)]
    loc = start(server, repo).headers["Location"]
    for a, b in itertools.pairwise(cuts):
        r = requests.patch(
            loc,
            data=data[a:b],
            headers={"Content-Range": f"{a}-{b - 1}", "Content-Type": "application/octet-stream"},
        )
        assert r.status_code == 202, r.text
        check_session_headers(r, server, repo, b)
        loc = r.headers["Location"]
    r = requests.get(loc)
    assert r.status_code == 204
    check_session_headers(r, server, repo, len(data))
    r = requests.put(loc, params={"digest": sha256(data)})
    assert r.status_code == 201
    assert requests.get(server.v2(f"{repo}/blobs/{sha256(data)}")).content == data
    # The session is gone once committed.
    assert_error(requests.get(loc), 404, "BLOB_UPLOAD_UNKNOWN")


def test_final_chunk_in_put(server: Server, repo: str) -> None:
    data = os.urandom(10_000)
    loc = start(server, repo).headers["Location"]
    loc = requests.patch(loc, data=data[:4000], headers={"Content-Range": "0-3999"}).headers[
        "Location"
    ]
    r = requests.put(
        loc,
        params={"digest": sha256(data)},
        data=data[4000:],
        headers={"Content-Range": f"4000-{len(data) - 1}"},
    )
    assert r.status_code == 201
    assert requests.get(server.v2(f"{repo}/blobs/{sha256(data)}")).content == data


def generate(data: bytes, piece: int = 65536) -> Iterator[bytes]:
    for i in range(0, len(data), piece):
        yield data[i : i + piece]


def test_docker_style_streamed_patch(server: Server, repo: str) -> None:
    """Docker sends one PATCH with Transfer-Encoding: chunked, no Content-Range/Length."""
    data = os.urandom(5 * 1024 * 1024 + 7)
    loc = start(server, repo).headers["Location"]
    r = requests.patch(loc, data=generate(data))
    assert r.status_code == 202, r.text
    assert r.headers["Range"] == f"0-{len(data) - 1}"
    r = requests.put(r.headers["Location"], params={"digest": sha256(data)})
    assert r.status_code == 201
    r = requests.head(server.v2(f"{repo}/blobs/{sha256(data)}"))
    assert r.status_code == 200 and r.headers["Content-Length"] == str(len(data))


@pytest.mark.parametrize("bad", ["0-3", "2-5", "10-13", "5-8"])
def test_out_of_order_or_repeated_chunk_is_416(server: Server, repo: str, bad: str) -> None:
    loc = start(server, repo).headers["Location"]
    loc = requests.patch(loc, data=b"abcd", headers={"Content-Range": "0-3"}).headers["Location"]
    r = requests.patch(loc, data=b"efgh", headers={"Content-Range": bad})
    assert r.status_code == 416
    assert r.headers["Range"] == "0-3"
    assert "/blobs/uploads/" in r.headers["Location"]
    assert r.json()["errors"][0]["code"] == "BLOB_UPLOAD_INVALID"
    # The session is intact and continues from where it was.
    r = requests.patch(r.headers["Location"], data=b"efgh", headers={"Content-Range": "4-7"})
    assert r.status_code == 202
    r = requests.put(r.headers["Location"], params={"digest": sha256(b"abcdefgh")})
    assert r.status_code == 201


@pytest.mark.parametrize("bad", ["nonsense", "0-", "-3", "3-1", "bytes 0-3/4"])
def test_malformed_content_range_is_416(server: Server, repo: str, bad: str) -> None:
    loc = start(server, repo).headers["Location"]
    r = requests.patch(loc, data=b"abcd", headers={"Content-Range": bad})
    assert r.status_code == 416
    assert r.headers["Range"] == "0-0"


def test_content_length_must_match_range(server: Server, repo: str) -> None:
    loc = start(server, repo).headers["Location"]
    r = requests.patch(loc, data=b"abcd", headers={"Content-Range": "0-9"})
    assert r.status_code == 416
    assert requests.get(loc).headers["Range"] == "0-0"


def test_put_requires_digest(server: Server, repo: str) -> None:
    loc = start(server, repo).headers["Location"]
    assert_error(requests.put(loc, data=b"x"), 400, "DIGEST_INVALID")
    assert_error(requests.put(loc, params={"digest": "sha256:nope"}), 400, "DIGEST_INVALID")


def test_wrong_digest_discards_the_upload(server: Server, repo: str) -> None:
    loc = start(server, repo).headers["Location"]
    loc = requests.patch(loc, data=b"data").headers["Location"]
    r = requests.put(loc, params={"digest": sha256(b"other")})
    err = assert_error(r, 400, "DIGEST_INVALID")
    assert err["detail"]["computed"] == sha256(b"data")
    assert_error(requests.get(loc), 404, "BLOB_UPLOAD_UNKNOWN")
    for d in (sha256(b"other"), sha256(b"data")):
        assert requests.head(server.v2(f"{repo}/blobs/{d}")).status_code == 404


def test_cancel_upload(server: Server, repo: str) -> None:
    loc = start(server, repo).headers["Location"]
    requests.patch(loc, data=b"partial")
    r = requests.delete(loc)
    assert r.status_code == 204
    assert_error(requests.get(loc), 404, "BLOB_UPLOAD_UNKNOWN")
    assert_error(requests.delete(loc), 404, "BLOB_UPLOAD_UNKNOWN")
    assert_error(requests.patch(loc, data=b"x"), 404, "BLOB_UPLOAD_UNKNOWN")


def test_unknown_upload(server: Server, repo: str) -> None:
    base = server.v2(f"{repo}/blobs/uploads/")
    for uid in ("00000000-0000-4000-8000-000000000000", "not-a-uuid", "..", "%2e%2e"):
        for method in ("GET", "PATCH", "DELETE"):
            r = requests.request(method, base + uid)
            assert r.status_code == 404, (method, uid, r.text)
            if r.headers.get("Content-Type", "").startswith("application/json"):
                assert r.json()["errors"][0]["code"] in ("BLOB_UPLOAD_UNKNOWN", "UNSUPPORTED")


def test_tampered_state_is_refused_with_reason(server: Server, repo: str) -> None:
    loc = start(server, repo).headers["Location"]
    parts = urlsplit(loc)
    state = parse_qs(parts.query)["_state"][0]
    forged = state[:-4] + ("AAAA" if not state.endswith("AAAA") else "BBBB")
    r = requests.patch(f"{parts.scheme}://{parts.netloc}{parts.path}?_state={forged}", data=b"x")
    err = assert_error(r, 404, "BLOB_UPLOAD_INVALID")
    assert "http.secret" in err["message"]
    # A state for one repository cannot drive an upload in another.
    other = loc.replace(f"/v2/{repo}/", f"/v2/{repo}-other/")
    assert requests.patch(other, data=b"x").status_code == 404


def test_digest_algorithm_sha512(server: Server, repo: str) -> None:
    data = os.urandom(70_000)
    loc = start(server, repo, **{"digest-algorithm": "sha512"}).headers["Location"]
    loc = requests.patch(loc, data=data).headers["Location"]
    digest = "sha512:" + hashlib.sha512(data).hexdigest()
    r = requests.put(loc, params={"digest": digest})
    assert r.status_code == 201 and r.headers["Docker-Content-Digest"] == digest
    r = requests.post(server.v2(f"{repo}/blobs/uploads/"), params={"digest-algorithm": "md5"})
    assert_error(r, 400, "DIGEST_INVALID")


def test_cross_repository_mount(server: Server, repo: str) -> None:
    digest = server.push_blob(repo + "-src", b"shared layer")
    r = requests.post(
        server.v2(f"{repo}/blobs/uploads/"), params={"mount": digest, "from": repo + "-src"}
    )
    assert r.status_code == 201
    assert r.headers["Location"] == f"http://{server.host}/v2/{repo}/blobs/{digest}"
    assert r.headers["Docker-Content-Digest"] == digest
    assert requests.get(server.v2(f"{repo}/blobs/{digest}")).content == b"shared layer"


@pytest.mark.parametrize(
    "params",
    [
        {"mount": sha256(b"never pushed"), "from": "somewhere"},
        {"mount": "sha256:bad", "from": "somewhere"},
        {"mount": sha256(b"x"), "from": "INVALID NAME"},
        {"mount": sha256(b"x")},
    ],
)
def test_mount_falls_back_to_upload(server: Server, repo: str, params: dict[str, str]) -> None:
    r = requests.post(server.v2(f"{repo}/blobs/uploads/"), params=params)
    assert r.status_code == 202
    check_session_headers(r, server, repo, 0)


def test_mount_needs_the_blob_linked_in_the_source(server: Server, repo: str) -> None:
    digest = server.push_blob(repo + "-a", b"only in a")
    r = requests.post(
        server.v2(f"{repo}/blobs/uploads/"), params={"mount": digest, "from": repo + "-b"}
    )
    assert r.status_code == 202


def test_upload_continues_on_another_instance_after_restart(
    start_server: ServerFactory, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Sessions survive a restart, and any instance sharing storage and http.secret continues
    them; an instance with another secret refuses with a reason."""
    data = os.urandom(2_000_000)
    root = tmp_path_factory.mktemp("shared-root")
    a = start_server(root=root)
    loc = requests.post(a.v2("x/blobs/uploads/")).headers["Location"]
    loc = requests.patch(loc, data=data[:1_000_000], headers={"Content-Range": "0-999999"}).headers[
        "Location"
    ]
    a.stop()
    b = start_server(root=root)
    loc_b = loc.replace(a.host, b.host)
    r = requests.patch(
        loc_b, data=data[1_000_000:], headers={"Content-Range": f"1000000-{len(data) - 1}"}
    )
    assert r.status_code == 202, r.text
    c = start_server(root=root, http={"secret": "another secret"})
    err = assert_error(
        requests.get(r.headers["Location"].replace(b.host, c.host)), 404, "BLOB_UPLOAD_INVALID"
    )
    assert "http.secret" in err["message"]
    r = requests.put(r.headers["Location"], params={"digest": sha256(data)})
    assert r.status_code == 201
    assert requests.get(c.v2(f"x/blobs/{sha256(data)}")).content == data


@pytest.mark.slow
def test_workers_share_a_generated_secret(start_server: ServerFactory) -> None:
    """Without http.secret, every worker of one server accepts the others' upload URLs: the
    upload is started on one worker and each chunk goes to the other one than the last."""
    s = start_server(workers=2, http={"secret": ""})
    assert "No HTTP secret provided" in s.log()
    data = os.urandom(64 * 1024)
    workers = spread_over_workers(s, 2)

    def target(location: str) -> str:
        parts = urlsplit(location)
        return f"{parts.path}?{parts.query}"

    status, headers, body = workers[0].request("POST", "/v2/x/blobs/uploads/", b"")
    assert status == 202, body
    for n, i in enumerate(range(0, len(data), 4096)):
        chunk = {"Content-Range": f"{i}-{i + 4095}", "Content-Type": "application/octet-stream"}
        status, headers, body = workers[(n + 1) % 2].request(
            "PATCH", target(headers["Location"]), data[i : i + 4096], chunk
        )
        assert status == 202, body
    put = target(headers["Location"]) + "&" + urlencode({"digest": sha256(data)})
    status, _, body = workers[0].request("PUT", put, b"")
    assert status == 201, body
    for conn in workers:
        conn.close()
