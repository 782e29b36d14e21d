"""What the server refuses, and how: deeply nested manifests, large and oversized headers,
unauthenticated bodies, the health endpoint's text, hosts in ``Location``, HTTP/0.9 request
lines, encoded slashes, the ``Server`` header, and references that are no tag or digest.

Requests go over raw sockets where a client library would normalise them (or hide a
``100 Continue``)."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from dockyard.auth.htpasswd import hash_password
from harness import (
    OCI_MANIFEST,
    InProcessDockyard,
    RawConnection,
    RawResponse,
    Server,
    ServerFactory,
    assert_error,
    raw_request,
    sha256,
)
from harness.certs import sign_token, token_auth, token_signer

KiB = 1024
GiB = 1024**3
USER, PASSWORD = "alice", "secret"
CREDENTIALS = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()


def assert_oci(r: RawResponse, status: int, code: str) -> dict[str, Any]:
    """An OCI error body with the right status and headers, on a raw response."""
    assert r.status == status, (r.status_line, r.body[:300])
    assert r.headers["content-type"].startswith("application/json"), r.headers
    assert r.headers["docker-distribution-api-version"] == "registry/2.0"
    assert r.headers["server"] == "Dockyard"
    error = r.json()["errors"][0]
    assert error["code"] == code and error["message"], r.body
    return error


@pytest.fixture(scope="module")
def basic(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """htpasswd auth, one worker (so timings are not another worker's)."""
    work = tmp_path_factory.mktemp("basic")
    (work / "htpasswd").write_text(f"{USER}:{hash_password(PASSWORD, rounds=4)}\n")
    server = InProcessDockyard.start(
        work, auth={"htpasswd": {"realm": "R", "path": str(work / "htpasswd")}}
    )
    yield server
    server.stop()
    log = server.log()
    assert "Traceback" not in log, log[-3000:]
    assert "level=error" not in log


# -- 4: deeply nested JSON ---------------------------------------------------------------------


@pytest.mark.parametrize("body", [b"[" * 100_000, b'{"a":' * 100_000], ids=["arrays", "objects"])
def test_deeply_nested_manifest_is_400_manifest_invalid(
    server: Server, repo: str, body: bytes
) -> None:
    r = requests.put(
        server.v2(f"{repo}/manifests/latest"), data=body, headers={"Content-Type": OCI_MANIFEST}
    )
    assert_error(r, 400, "MANIFEST_INVALID")
    assert "Traceback" not in server.log()


@pytest.mark.slow
def test_oversized_manifest_closes_instead_of_reading_on(server: Server, repo: str) -> None:
    head = (
        f"PUT /v2/{repo}/manifests/latest HTTP/1.1\r\nHost: x\r\nContent-Type: {OCI_MANIFEST}\r\n"
    )
    # Declared too large: refused before a byte of it is read.
    with RawConnection(server.port) as conn:
        conn.send(f"{head}Content-Length: {GiB}\r\n\r\n".encode() + b" " * (64 * KiB))
        r = conn.response()
        assert_oci(r, 413, "MANIFEST_INVALID")
        assert r.headers["connection"] == "close"
        assert conn.closed_within(2.5)
    # Chunked: read up to the limit, then refused; the rest is not read.
    chunk = b"%x\r\n%s\r\n" % (64 * KiB, b" " * (64 * KiB))
    with RawConnection(server.port) as conn:
        conn.send(f"{head}Transfer-Encoding: chunked\r\n\r\n".encode() + chunk * 66)
        r = conn.response()
        assert_oci(r, 413, "MANIFEST_INVALID")
        assert r.headers["connection"] == "close"
        assert conn.closed_within(2.5)


# -- 5: header size ----------------------------------------------------------------------------


def test_100_kib_headers_are_accepted(server: Server) -> None:
    big = "x" * (100 * KiB)
    r = raw_request(
        server.port,
        f"GET /v2/ HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {big}\r\nX-Big: {big}\r\n"
        "Connection: close\r\n\r\n".encode(),
    )
    assert r.status == 200, r.body


def test_a_large_bearer_token_is_accepted(start_server: ServerFactory, tmp_path: Path) -> None:
    """An external token server's JWT with thousands of access entries (~300 KiB)."""
    key, bundle = token_signer(tmp_path)
    s = start_server(auth=token_auth(bundle))
    access = [
        {"type": "repository", "name": f"team-{i}/app-{i}", "actions": ["pull", "push"]}
        for i in range(5000)
    ]
    token = sign_token(key, access)
    assert len(token) > 256 * KiB
    r = requests.get(s.v2("team-7/app-7/tags/list"), headers={"Authorization": f"Bearer {token}"})
    assert_error(r, 404, "NAME_UNKNOWN")  # authorised: the repository just does not exist


def test_headers_above_the_configured_limit_are_refused(start_server: ServerFactory) -> None:
    s = start_server(http={"limits": {"maxheaderbytes": 16 * KiB}})
    ok = raw_request(
        s.port, f"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Big: {'x' * 15 * KiB}\r\n\r\n".encode()
    )
    assert ok.status == 200
    for line in (f"X-Big: {'x' * 20 * KiB}", f"Authorization: Basic {'x' * 20 * KiB}"):
        with RawConnection(s.port) as conn:
            conn.send(f"GET /v2/ HTTP/1.1\r\nHost: x\r\n{line}\r\n\r\n".encode())
            r = conn.response()
            error = assert_oci(r, 431, "UNSUPPORTED")
            assert "16384" in error["message"]
            assert r.headers["connection"] == "close"
            assert conn.closed_within(2)
    r = raw_request(s.port, f"GET /v2/{'a' * 20 * KiB} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert_oci(r, 431, "UNSUPPORTED")
    log = s.log()
    assert "Traceback" not in log and "level=error" not in log
    assert "xxxxxxxx" not in log  # the offending header (perhaps credentials) is never logged


# -- 6: unauthenticated bodies -----------------------------------------------------------------

UPLOAD_TARGETS = [
    ("PUT", "/v2/x/manifests/latest"),
    ("PATCH", "/v2/x/blobs/uploads/0d6b0c6c-7d3e-4f7c-9b0a-3d2f3c1b2a10"),
    ("POST", f"/v2/x/blobs/uploads/?digest={sha256(b'x')}"),
    ("PUT", f"/v2/x/blobs/uploads/0d6b0c6c-7d3e-4f7c-9b0a-3d2f3c1b2a10?digest={sha256(b'x')}"),
]


@pytest.mark.parametrize(("method", "target"), UPLOAD_TARGETS)
def test_unauthenticated_expect_continue_gets_401_and_no_invitation(
    basic: Server, method: str, target: str
) -> None:
    with RawConnection(basic.port) as conn:
        started = time.monotonic()
        conn.send(
            f"{method} {target} HTTP/1.1\r\nHost: x\r\nContent-Length: {GiB}\r\n"
            "Content-Type: application/octet-stream\r\nExpect: 100-continue\r\n\r\n".encode()
        )
        r = conn.response()
        assert time.monotonic() - started < 2  # at once (slack for a loaded CI machine)
        assert r.interim == []  # never invited to send the gigabyte
        assert_oci(r, 401, "UNAUTHORIZED")
        assert r.headers["connection"] == "close"
        assert r.headers["www-authenticate"] == 'Basic realm="R"'
        assert conn.closed_within(2)


@pytest.mark.slow
@pytest.mark.parametrize(("method", "target"), UPLOAD_TARGETS)
def test_unauthenticated_body_is_not_read(basic: Server, method: str, target: str) -> None:
    """A client that does not wait: a few KiB of a declared GiB, then nothing. The 401 comes at
    once, and the connection is closed after a short drain, not after aiohttp's 10 s."""
    with RawConnection(basic.port) as conn:
        started = time.monotonic()
        conn.send(
            f"{method} {target} HTTP/1.1\r\nHost: x\r\nContent-Length: {GiB}\r\n\r\n".encode()
            + b"\0" * (4 * KiB)
        )
        r = conn.response()
        assert time.monotonic() - started < 2
        assert_oci(r, 401, "UNAUTHORIZED")
        assert r.headers["connection"] == "close"
        assert conn.closed_within(3)  # a drain of at most 1 s (aiohttp lingered for 10 s)


def test_authenticated_expect_continue_is_invited_when_the_body_is_read(
    basic: Server, repo: str
) -> None:
    config = b'{"os":"linux"}'
    with RawConnection(basic.port) as conn:
        conn.send(
            f"POST /v2/{repo}/blobs/uploads/?digest={sha256(config)} HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: {CREDENTIALS}\r\nContent-Length: {len(config)}\r\n"
            "Expect: 100-continue\r\n\r\n".encode()
        )
        conn.sock.settimeout(5)
        while b"\r\n\r\n" not in conn.buffer:
            conn._fill()
        assert conn.buffer.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"), conn.buffer
        conn.send(config)
        r = conn.response()
        assert r.status == 201 and r.interim == [100], r.body
        assert "connection" not in r.headers  # kept alive: the body was read


def test_authenticated_upload_through_curl(basic: Server, repo: str, tmp_path: Path) -> None:
    """curl sends ``Expect: 100-continue`` for large bodies and waits for the invitation."""
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    blob = tmp_path / "blob"
    blob.write_bytes(b"\1" * (3 * 1024 * KiB))
    digest = sha256(blob.read_bytes())
    result = subprocess.run(
        [curl, "-sS", "-v", "-u", f"{USER}:{PASSWORD}", "-X", "POST", "--data-binary",
         f"@{blob}", "-H", "Content-Type: application/octet-stream", "-o", "/dev/null",
         "-w", "%{http_code}", basic.v2(f"{repo}/blobs/uploads/?digest={digest}")],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.stdout == "201", result.stderr
    assert "> Expect: 100-continue" in result.stderr
    assert "< HTTP/1.1 100 Continue" in result.stderr
    r = requests.head(basic.v2(f"{repo}/blobs/{digest}"), auth=(USER, PASSWORD))
    assert r.status_code == 200


# -- 7: health ---------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.filesystem
def test_health_names_the_failing_check_only(start_server: ServerFactory) -> None:
    s = start_server()
    probe = s.root / "dockyard" / "health"
    assert requests.get(s.url + "/debug/health").status_code == 200
    shutil.rmtree(probe)
    probe.write_text("in the way")
    time.sleep(1.1)  # results are reused for a second
    for _ in range(3):
        r = requests.get(s.url + "/debug/health")
        assert r.status_code == 503
        assert r.json() == {"storagedriver_filesystem": "failed"}
        assert str(s.root) not in r.text and "Errno" not in r.text
        time.sleep(0.6)
    failures = [line for line in s.log().splitlines() if "health check failed" in line]
    assert len(failures) == 1, failures  # once per change of state, with the detail
    assert str(probe) in failures[0] or "directory" in failures[0].lower()
    probe.unlink()
    time.sleep(1.1)
    assert requests.get(s.url + "/debug/health").status_code == 200
    assert "health check passes again" in s.log()


# -- 8: hosts, request lines, encoded slashes, the Server header ---------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        "Host: a b",
        "Host: a b:5000",
        "Host: evil.example/x?",
        "Host: x\r\nX-Forwarded-Host: evil.example/path y",
        "Host: x\r\nX-Forwarded-Host: a b, c",
        'Host: x\r\nForwarded: for=1.2.3.4;host="a b"',
        "Host: x\r\nForwarded: host=<script>",
    ],
)
def test_an_invalid_host_never_reaches_location(server: Server, repo: str, headers: str) -> None:
    r = raw_request(
        server.port,
        f"POST /v2/{repo}/blobs/uploads/ HTTP/1.1\r\n{headers}\r\n\r\n".encode(),
    )
    assert r.status == 202, r.body
    location = r.headers["location"]
    assert location.startswith(f"/v2/{repo}/blobs/uploads/"), location  # relative: nothing echoed


def test_forwarded_scheme_and_port_are_validated(server: Server, repo: str) -> None:
    r = raw_request(
        server.port,
        f"POST /v2/{repo}/blobs/uploads/ HTTP/1.1\r\nHost: reg.example\r\n"
        "X-Forwarded-Proto: javascript\r\nX-Forwarded-Port: 1x\r\n\r\n".encode(),
    )
    assert r.headers["location"].startswith(f"http://reg.example/v2/{repo}/")


@pytest.mark.parametrize(
    ("request_line", "status"),
    [
        (b"GET /v2/", 400),  # HTTP/0.9: aiohttp answered "HTTP/0.9 200"
        (b"GET /v2/ HTTP/0.9", 400),
        (b"GET /v2/ HTTP/2.0", 400),
        (b"GET /v2/ HTTP/1.2", 400),
        (b"GET /v2/ nonsense", 400),
        (b"\x16\x03\x01\x02\x00", 400),  # TLS on the plain port
    ],
)
def test_request_lines_without_http1_version(
    server: Server, request_line: bytes, status: int
) -> None:
    for trailer in (b"\r\n\r\n", b"\r\nHost: x\r\n\r\n"):
        with RawConnection(server.port) as conn:
            conn.send(request_line + trailer)
            r = conn.response()
            assert r.status_line.startswith(b"HTTP/1.1 "), r.status_line
            assert_oci(r, status, "UNSUPPORTED")
            assert r.headers["connection"] == "close"
            assert conn.closed_within(2)
    assert "Traceback" not in server.log()


@pytest.mark.parametrize("encoded", ["%2f", "%2F", "%5c", "%5C"])
def test_encoded_separators_in_names_are_name_invalid(
    server: Server, repo: str, encoded: str
) -> None:
    server.push_image(repo, "latest")
    name = repo.replace("/", encoded)
    for method, path in [
        ("GET", f"{name}/tags/list"),
        ("GET", f"{name}/manifests/latest"),
        ("HEAD", f"{name}/manifests/latest"),
        ("GET", f"{name}/blobs/{sha256(b'x')}"),
        ("POST", f"{name}/blobs/uploads/"),
        ("GET", f"{repo}/manifests/a{encoded}b"),
    ]:
        r = raw_request(
            server.port,
            f"{method} /v2/{path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode(),
            head=method == "HEAD",
        )
        if method == "HEAD":
            assert r.status == 400
        else:
            assert_oci(r, 400, "NAME_INVALID")


def test_no_version_in_the_server_header(server: Server, repo: str) -> None:
    answers = [
        raw_request(server.port, b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n"),
        raw_request(server.port, b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n"),
        raw_request(server.port, f"GET /v2/{repo}/tags/list HTTP/1.1\r\nHost: x\r\n\r\n".encode()),
        raw_request(server.port, b"GET /debug/health HTTP/1.1\r\nHost: x\r\n\r\n"),
        raw_request(server.port, b"GET /v2/ HTTP/1.1\r\nHost: x\r\nBad Header: x\r\n\r\n"),
        raw_request(server.port, b"BREW /v2/ HTTP/1.1\r\n\r\n"),
        raw_request(server.port, b"GET /v2/\r\n\r\n"),
    ]
    assert [a.status for a in answers] == [200, 404, 404, 200, 400, 400, 400]
    for answer in answers:
        assert answer.headers["server"] == "Dockyard", answer.headers
        assert not re.search(r"[0-9]|aiohttp|python", answer.headers["server"], re.I)


# -- 9: references that are neither tag nor digest -------------------------------------------


@pytest.mark.parametrize("reference", [".INVALID_MANIFEST_NAME", "sha256:nothex", "-dash"])
def test_invalid_reference_is_manifest_unknown_on_read(
    server: Server, repo: str, reference: str
) -> None:
    server.push_image(repo, "latest")
    assert_error(requests.get(server.v2(f"{repo}/manifests/{reference}")), 404, "MANIFEST_UNKNOWN")
    head = requests.head(server.v2(f"{repo}/manifests/{reference}"))
    assert head.status_code == 404 and head.content == b""


def test_put_to_an_invalid_tag_is_tag_invalid(server: Server, repo: str) -> None:
    r = server.push_manifest(repo, ".INVALID_MANIFEST_NAME", {"schemaVersion": 2})
    assert_error(r, 400, "TAG_INVALID")


# -- numbers from clients ----------------------------------------------------------------------


@pytest.mark.parametrize("n", ["²", "٣", "9" * 5000, "-1", "1e3"])
def test_page_sizes_are_ascii_integers(server: Server, repo: str, n: str) -> None:
    server.push_image(repo, "latest")
    for path in (f"{repo}/tags/list", "_catalog"):
        assert_error(
            requests.get(server.v2(path), params={"n": n}), 400, "PAGINATION_NUMBER_INVALID"
        )


def test_range_with_huge_numbers(server: Server, repo: str) -> None:
    digest = server.push_blob(repo, b"0123456789")
    r = requests.get(
        server.v2(f"{repo}/blobs/{digest}"), headers={"Range": "bytes=0-" + "9" * 5000}
    )
    assert r.status_code == 206 and r.content == b"0123456789"
    r = requests.get(server.v2(f"{repo}/blobs/{digest}"), headers={"Range": f"bytes={'9' * 5000}-"})
    assert_error(r, 416, "RANGE_INVALID")
