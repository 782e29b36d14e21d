"""end-2 (GET/HEAD blobs, ranges) and end-10 (DELETE blobs)."""

from __future__ import annotations

import hashlib
import os

import pytest
import requests

from harness import Server, ServerFactory, assert_error, sha256

UNKNOWN = "sha256:" + "0" * 64


def test_get_and_head(server: Server, repo: str) -> None:
    data = os.urandom(300_000)
    digest = server.push_blob(repo, data)
    r = requests.head(server.v2(f"{repo}/blobs/{digest}"))
    assert r.status_code == 200
    assert r.headers["Content-Length"] == str(len(data))
    assert r.headers["Docker-Content-Digest"] == digest
    assert r.headers["Accept-Ranges"] == "bytes"
    assert r.content == b""
    r = requests.get(server.v2(f"{repo}/blobs/{digest}"))
    assert r.status_code == 200
    assert r.content == data
    assert r.headers["Docker-Content-Digest"] == digest
    assert r.headers["ETag"] == f'"{digest}"'
    assert r.headers["Content-Type"] == "application/octet-stream"


def test_empty_blob(server: Server, repo: str) -> None:
    digest = server.push_blob(repo, b"")
    r = requests.get(server.v2(f"{repo}/blobs/{digest}"))
    assert r.status_code == 200 and r.content == b""
    assert r.headers["Content-Length"] == "0"


def test_conditional_get(server: Server, repo: str) -> None:
    digest = server.push_blob(repo, b"cached")
    r = requests.get(server.v2(f"{repo}/blobs/{digest}"), headers={"If-None-Match": f'"{digest}"'})
    assert r.status_code == 304


@pytest.mark.parametrize(
    ("header", "start", "end"),
    [
        ("bytes=0-99", 0, 99),
        ("bytes=100-", 100, 999),
        ("bytes=-10", 990, 999),
        ("bytes=990-5000", 990, 999),
        ("bytes=0-0", 0, 0),
    ],
)
def test_ranges(server: Server, repo: str, header: str, start: int, end: int) -> None:
    data = os.urandom(1000)
    digest = server.push_blob(repo, data)
    r = requests.get(server.v2(f"{repo}/blobs/{digest}"), headers={"Range": header})
    assert r.status_code == 206
    assert r.content == data[start : end + 1]
    assert r.headers["Content-Range"] == f"bytes {start}-{end}/1000"
    assert r.headers["Content-Length"] == str(end - start + 1)


@pytest.mark.parametrize(
    "header", ["bytes=1000-", "bytes=1000-2000", "bytes=5-2", "bytes=x-y", "bytes=-", "bytes=-0"]
)
def test_unsatisfiable_ranges(server: Server, repo: str, header: str) -> None:
    digest = server.push_blob(repo, os.urandom(1000))
    r = requests.get(server.v2(f"{repo}/blobs/{digest}"), headers={"Range": header})
    assert r.status_code == 416
    assert r.headers["Content-Range"] == "bytes */1000"
    assert r.json()["errors"][0]["code"] == "RANGE_INVALID"


def test_multi_range_and_other_units_get_whole_blob(server: Server, repo: str) -> None:
    data = os.urandom(100)
    digest = server.push_blob(repo, data)
    for header in ("bytes=0-1,5-6", "items=0-1"):
        r = requests.get(server.v2(f"{repo}/blobs/{digest}"), headers={"Range": header})
        assert r.status_code == 200 and r.content == data


def test_unknown_blob(server: Server, repo: str) -> None:
    assert_error(requests.get(server.v2(f"{repo}/blobs/{UNKNOWN}")), 404, "BLOB_UNKNOWN")
    r = requests.head(server.v2(f"{repo}/blobs/{UNKNOWN}"))
    assert r.status_code == 404 and r.content == b""


def test_blob_is_scoped_to_repositories_that_link_it(server: Server, repo: str) -> None:
    digest = server.push_blob(repo, b"private")
    r = requests.get(server.v2(f"{repo}-other/blobs/{digest}"))
    assert_error(r, 404, "BLOB_UNKNOWN")


@pytest.mark.parametrize(
    "digest", ["sha256:totallywrong", "sha256:" + "A" * 64, "md5:abc", "nodigest"]
)
def test_invalid_digest_is_400(server: Server, repo: str, digest: str) -> None:
    assert_error(requests.get(server.v2(f"{repo}/blobs/{digest}")), 400, "DIGEST_INVALID")
    assert requests.head(server.v2(f"{repo}/blobs/{digest}")).status_code == 400
    assert_error(requests.delete(server.v2(f"{repo}/blobs/{digest}")), 400, "DIGEST_INVALID")


def test_sha512_blob(server: Server, repo: str) -> None:
    data = os.urandom(5000)
    digest = "sha512:" + hashlib.sha512(data).hexdigest()
    r = requests.post(server.v2(f"{repo}/blobs/uploads/"), params={"digest": digest}, data=data)
    assert r.status_code == 201, r.text
    assert r.headers["Docker-Content-Digest"] == digest
    r = requests.get(server.v2(f"{repo}/blobs/{digest}"))
    assert r.content == data and r.headers["Docker-Content-Digest"] == digest


def test_delete_blob(server: Server, repo: str) -> None:
    digest = server.push_blob(repo, b"to delete")
    other = server.push_blob(repo + "-keep", b"to delete")
    r = requests.delete(server.v2(f"{repo}/blobs/{digest}"))
    assert r.status_code == 202
    assert requests.head(server.v2(f"{repo}/blobs/{digest}")).status_code == 404
    assert_error(requests.delete(server.v2(f"{repo}/blobs/{digest}")), 404, "BLOB_UNKNOWN")
    # Deleting from one repository unlinks it there only.
    assert requests.head(server.v2(f"{repo}-keep/blobs/{other}")).status_code == 200


def test_delete_disabled_is_405_unsupported(start_server: ServerFactory) -> None:
    s = start_server(storage={"delete": {"enabled": False}})
    digest = s.push_blob("x", b"keep me")
    assert_error(requests.delete(s.v2(f"x/blobs/{digest}")), 405, "UNSUPPORTED")
    assert requests.head(s.v2(f"x/blobs/{digest}")).status_code == 200


def test_large_blob_roundtrip_and_tail_range(server: Server, repo: str) -> None:
    """24 MiB in one POST, read back whole and by a suffix range (that blob GETs use sendfile
    on a filesystem is test_sendfile.py's to check; this runs on S3 too)."""
    data = os.urandom(24 * 1024 * 1024 + 3)
    digest = sha256(data)
    r = requests.post(server.v2(f"{repo}/blobs/uploads/"), params={"digest": digest}, data=data)
    assert r.status_code == 201
    r = requests.get(server.v2(f"{repo}/blobs/{digest}"), stream=True)
    h = hashlib.sha256()
    for chunk in r.iter_content(1 << 20):
        h.update(chunk)
    assert "sha256:" + h.hexdigest() == digest
    r = requests.get(
        server.v2(f"{repo}/blobs/{digest}"), headers={"Range": f"bytes={len(data) - 5}-"}
    )
    assert r.status_code == 206 and r.content == data[-5:]
