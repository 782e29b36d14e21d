"""Property-based fuzzing of the HTTP API against the running (shared) server.

Whatever a client sends — manifest bodies, references, repository names, digests, ``Range``,
``Content-Range``, query strings, request lines and headers — the answer is never a 5xx, and
every 4xx (but to HEAD, which has no body) is an OCI error body ``{"errors": [{"code",
"message"}]}`` with a registered code and a JSON content type. The shared server's teardown
then checks that its log has no traceback and no error line.

Requests go through http.client (which sends the path as given) or raw sockets (for what even
http.client refuses to send). Examples are derandomised, so CI sees the same ones every run.
Everything happens in repositories under ``fuzz/``; nothing is deleted."""

from __future__ import annotations

import http.client
import json
import string
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, urlencode

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dockyard.errors import ErrorCode
from harness import OCI_INDEX, OCI_MANIFEST, RawConnection, Server, sha256

FUZZ = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)
KNOWN_CODES = {code.name for code in ErrorCode}
REPO = "fuzz/target"
BLOB = b"0123456789abcdef" * 64  # 1 KiB, for Range
CONFIG = b'{"architecture":"amd64","os":"linux"}'


class Client:
    """http.client on one keep-alive connection (reopened when the server closes it)."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)

    def request(
        self,
        method: str,
        target: str,
        body: bytes | None = None,
        headers: dict[str, Any] | None = None,
    ) -> tuple[int, http.client.HTTPMessage, bytes]:
        headers = dict(headers or {})
        if body is not None:
            headers.setdefault("Content-Length", str(len(body)))
        try:
            self.conn.request(method, target, body=body, headers=headers)
            response = self.conn.getresponse()
            data = response.read()
        except (http.client.HTTPException, OSError):
            self.conn.close()  # the server closed a kept-alive connection: once more, anew
            self.conn.request(method, target, body=body, headers=headers)
            response = self.conn.getresponse()
            data = response.read()
        if response.will_close:
            self.conn.close()
        return response.status, response.msg, data

    def check(
        self,
        method: str,
        target: str,
        body: bytes | None = None,
        headers: dict[str, Any] | None = None,
    ) -> tuple[int, http.client.HTTPMessage, bytes]:
        status, msg, data = self.request(method, target, body, headers)
        check_answer(method, status, msg.get("Content-Type"), msg.get("Server"), data)
        return status, msg, data


def check_answer(
    method: str, status: int, content_type: str | None, server_header: str | None, body: bytes
) -> None:
    context = (method, status, body[:300])
    assert status < 500, context
    assert server_header == "Dockyard", context
    if 400 <= status < 500 and method != "HEAD":
        assert content_type is not None and content_type.startswith("application/json"), context
        errors = json.loads(body)["errors"]
        assert errors, context
        for error in errors:
            assert error["code"] in KNOWN_CODES, context
            assert isinstance(error["message"], str) and error["message"], context


@pytest.fixture(scope="module")
def client(shared_server: Server) -> Iterator[Client]:
    """A client, and in ``fuzz/target``: a blob, a config and a tagged manifest."""
    shared_server.push_blob(REPO, BLOB)
    shared_server.push_blob(REPO, CONFIG)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": sha256(CONFIG),
            "size": len(CONFIG),
        },
        "layers": [],
    }
    assert shared_server.push_manifest(REPO, "latest", manifest).status_code == 201
    c = Client(shared_server)
    yield c
    c.conn.close()


def path_segment(text: str) -> str:
    """``text`` as it goes into a path: percent-encoded, except what a path may carry."""
    return quote(text, safe="-._~:@!$&'()*+,;=%")


# -- strategies ---------------------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False)
    | st.text(max_size=16),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=16,
)
digests = st.one_of(
    st.sampled_from(
        [
            sha256(BLOB),
            sha256(CONFIG),
            sha256(b"absent"),
            "sha512:" + "0" * 128,
            "sha256:" + "A" * 64,
            "sha256:short",
            "md5:" + "0" * 32,
            "sha256",
            "",
        ]
    ),
    st.text(max_size=80),
    st.text(alphabet="0123456789abcdef", min_size=60, max_size=70).map(lambda h: f"sha256:{h}"),
)
descriptors = st.fixed_dictionaries(
    {
        "mediaType": st.sampled_from(["application/vnd.oci.image.config.v1+json", OCI_MANIFEST, ""])
        | json_values,
        "digest": digests | json_values,
        "size": st.integers(min_value=-1, max_value=2**70) | json_values,
    },
    optional={"urls": json_values, "annotations": json_values, "artifactType": json_values},
)
manifests = st.fixed_dictionaries(
    {"schemaVersion": st.sampled_from([2, 1, "2", 10**30]) | json_values},
    optional={
        "mediaType": st.sampled_from([OCI_MANIFEST, OCI_INDEX, "x"]) | json_values,
        "config": descriptors | json_values,
        "layers": st.lists(descriptors, max_size=3) | json_values,
        "manifests": st.lists(descriptors, max_size=3) | json_values,
        "subject": descriptors | json_values,
        "annotations": st.dictionaries(st.text(max_size=8), st.text(max_size=8)) | json_values,
    },
)
manifest_bodies = st.one_of(
    manifests.map(lambda d: json.dumps(d).encode()),
    json_values.map(lambda d: json.dumps(d, ensure_ascii=False).encode()),
    st.binary(max_size=300),
    st.builds(
        lambda opener, depth: opener * depth,
        st.sampled_from([b"[", b"{", b'{"a":', b'{"layers":[']),
        st.integers(min_value=500, max_value=150_000),
    ),
    st.integers(min_value=4000, max_value=6000).map(
        lambda n: b'{"schemaVersion":' + b"9" * n + b"}"
    ),
    st.just(b'{"schemaVersion":1,"schemaVersion":2,"mediaType":"%s"}' % OCI_MANIFEST.encode()),
    st.just('{"schemaVersion":2,"annotations":{"\ud800":"é"}}'.encode("utf-8", "surrogatepass")),
)
content_types = st.one_of(
    st.sampled_from(
        [
            OCI_MANIFEST,
            OCI_INDEX,
            "application/vnd.docker.distribution.manifest.v2+json",
            "application/vnd.docker.distribution.manifest.v1+prettyjws",
            "application/json",
            "application/octet-stream",
            "text/plain; charset=utf-8",
            f"{OCI_MANIFEST}; charset=utf-8; x=y",
            ";;",
            "",
        ]
    ),
    st.text(alphabet=string.printable.strip("\r\n\x0b\x0c"), max_size=60),
)


def header_value(value: bytes) -> bytes:
    """What can be sent as a header value at all: no CR, LF or NUL, no surrounding space."""
    return value.replace(b"\r", b"").replace(b"\n", b"").replace(b"\0", b"").strip(b" \t")


header_values = st.binary(max_size=120).map(header_value)
tags = st.from_regex(r"\A[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}\Z")
references = st.one_of(tags, digests, st.text(min_size=1, max_size=140))
name_segments = st.one_of(
    st.from_regex(r"\A[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*\Z"),
    st.text(alphabet=string.ascii_letters + string.digits + "._-", min_size=1, max_size=40),
    st.text(min_size=1, max_size=20),
    st.sampled_from([".", "..", "%2f", "%2F", "%5c", "%00", "%25", "%2e%2e", "a%2fb", "-", "_"]),
)
names = st.one_of(
    st.lists(name_segments, min_size=1, max_size=6).map("/".join),
    st.integers(min_value=200, max_value=600).map(lambda n: "a" * n),
    st.integers(min_value=1, max_value=200).map(lambda n: "/".join(["ab"] * n)),
)
numbers = st.one_of(
    st.integers(min_value=0, max_value=2**70).map(str),
    st.integers(min_value=4000, max_value=6000).map(lambda n: "9" * n),
    st.sampled_from(["", "-1", "1e3", "0x10", " 1", "\u00b2", "\u0663", "\u0661\u0660"]),
    st.text(max_size=12),
)


# -- manifests ----------------------------------------------------------------------------------


@pytest.mark.slow
@FUZZ
@given(body=manifest_bodies, content_type=content_types, tag=tags)
def test_manifest_bodies(client: Client, body: bytes, content_type: str, tag: str) -> None:
    status, _, _ = client.check(
        "PUT", f"/v2/{REPO}/manifests/{tag}", body, {"Content-Type": content_type}
    )
    assert status in (201, 400, 413)


@FUZZ
@given(reference=references, method=st.sampled_from(["GET", "HEAD", "PUT"]))
def test_manifest_references(client: Client, reference: str, method: str) -> None:
    body = b"{}" if method == "PUT" else None
    status, _, _ = client.check(
        method,
        f"/v2/{REPO}/manifests/{path_segment(reference)}",
        body,
        {"Content-Type": OCI_MANIFEST, "Accept": "*/*"},
    )
    if method in ("GET", "HEAD"):
        assert status in (200, 400, 404)  # 400: only a %2F in the path (NAME_INVALID)


# -- repository names ---------------------------------------------------------------------------


@pytest.mark.slow
@FUZZ
@given(name=names, endpoint=st.sampled_from(["tags", "manifest", "blob-head", "upload"]))
def test_repository_names(client: Client, name: str, endpoint: str) -> None:
    path = "/".join(path_segment(part) for part in name.split("/"))
    method, target = {
        "tags": ("GET", f"/v2/{path}/tags/list"),
        "manifest": ("GET", f"/v2/{path}/manifests/latest"),
        "blob-head": ("HEAD", f"/v2/{path}/blobs/{sha256(BLOB)}"),
        "upload": ("POST", f"/v2/fuzz/{path}/blobs/uploads/"),
    }[endpoint]
    client.check(method, target, b"" if method == "POST" else None)


# -- digests ------------------------------------------------------------------------------------


@pytest.mark.slow
@FUZZ
@given(digest=digests, method=st.sampled_from(["GET", "HEAD", "monolithic", "referrers"]))
def test_digests_in_urls_and_queries(client: Client, digest: str, method: str) -> None:
    if method == "monolithic":
        client.check("POST", f"/v2/fuzz/mono/blobs/uploads/?{urlencode({'digest': digest})}", b"x")
    elif method == "referrers":
        client.check("GET", f"/v2/{REPO}/referrers/{path_segment(digest)}")
    else:
        client.check(method, f"/v2/{REPO}/blobs/{path_segment(digest)}")


# -- Range and Content-Range --------------------------------------------------------------------

range_values = st.one_of(
    header_values,
    st.builds(
        lambda unit, a, sep, b: header_value(f"{unit}{a}{sep}{b}".encode()),
        st.sampled_from(["bytes=", "Bytes=", "bytes =", "items=", "", "bytes= "]),
        numbers,
        st.sampled_from(["-", "--", ",", "-0,0-", " - "]),
        numbers,
    ),
)


@FUZZ
@given(value=range_values)
def test_range_on_blob_get(client: Client, value: bytes) -> None:
    status, headers, body = client.check(
        "GET", f"/v2/{REPO}/blobs/{sha256(BLOB)}", None, {"Range": value}
    )
    assert status in (200, 206, 400, 416)  # 400: a header value aiohttp cannot parse
    if status == 206:
        first, last = headers["Content-Range"].split(" ")[1].split("/")[0].split("-")
        assert BLOB[int(first) : int(last) + 1] == body


short_numbers = st.one_of(
    st.integers(min_value=0, max_value=2**70).map(str),
    st.sampled_from(["", "-1", "0x10", "\u00b2", "\u0663", "9" * 5000]),
    st.text(alphabet=string.digits, max_size=40),
)
content_ranges = st.one_of(
    header_values,
    st.builds(
        lambda unit, a, b: header_value(f"{unit}{a}-{b}".encode()),
        st.sampled_from(["", "bytes=", "bytes ", "items "]),
        short_numbers,
        short_numbers,
    ),
)


@FUZZ
@given(value=content_ranges, body=st.binary(max_size=64))
def test_content_range_on_patch(client: Client, value: bytes, body: bytes) -> None:
    status, headers, _ = client.check("POST", f"/v2/{REPO}/blobs/uploads/", b"")
    assert status == 202
    client.check(
        "PATCH",
        headers["Location"],
        body,
        {"Content-Range": value, "Content-Type": "application/octet-stream"},
    )


# -- query strings ------------------------------------------------------------------------------

query_values = st.one_of(numbers, st.text(max_size=60), digests, names)


@FUZZ
@given(
    params=st.dictionaries(st.sampled_from(["n", "last", "N", "n[]"]), query_values, max_size=3),
    endpoint=st.sampled_from([f"/v2/{REPO}/tags/list", "/v2/_catalog"]),
    raw=st.booleans(),
)
@pytest.mark.slow
def test_pagination_queries(
    client: Client, params: dict[str, str], endpoint: str, raw: bool
) -> None:
    if raw:  # as a client might write it, unencoded (what http.client lets through)
        query = "&".join(f"{k}={path_segment(v)}" for k, v in params.items())
    else:
        query = urlencode(params)
    status, _, _ = client.check("GET", f"{endpoint}?{query}")
    assert status in (200, 400)


@FUZZ
@given(
    params=st.dictionaries(
        st.sampled_from(["digest", "mount", "from", "digest-algorithm"]), query_values, max_size=4
    ),
    body=st.sampled_from([b"", b"x", BLOB]),
)
def test_upload_start_queries(client: Client, params: dict[str, str], body: bytes) -> None:
    client.check("POST", f"/v2/fuzz/uploads/blobs/uploads/?{urlencode(params)}", body)


@FUZZ
@given(
    state=st.one_of(st.text(max_size=200), st.binary(max_size=150).map(lambda b: b.hex())),
    upload_id=st.one_of(st.uuids().map(str), st.text(min_size=1, max_size=40)),
    digest=st.none() | digests,
    method=st.sampled_from(["GET", "PATCH", "PUT", "DELETE"]),
)
def test_upload_session_queries(
    client: Client, state: str, upload_id: str, digest: str | None, method: str
) -> None:
    params = {"_state": state, **({"digest": digest} if digest is not None else {})}
    body = None if method in ("GET", "DELETE") else b"data"
    status, _, _ = client.check(
        method, f"/v2/{REPO}/blobs/uploads/{path_segment(upload_id)}?{urlencode(params)}", body
    )
    assert status in (400, 404, 416)


# -- request lines and headers ------------------------------------------------------------------

methods = st.one_of(
    st.sampled_from(["GET", "HEAD", "get", "BREW", "G ET", "", "OPTIONS", "TRACE", "PRI"]),
    st.text(alphabet=string.ascii_uppercase, min_size=1, max_size=8),
)
targets = st.one_of(
    st.sampled_from(
        ["/v2/", "*", "/", "//v2//", "/v2/../v2/", "http://evil/v2/", "/v2/%", "/v2/%zz", "?"]
    ),
    st.text(max_size=60).map(lambda t: "/v2/" + t),
    st.binary(max_size=40).map(lambda b: "/v2/" + b.decode("latin-1")),
)
versions = st.sampled_from(
    ["HTTP/1.1", "HTTP/1.0", "", "HTTP/0.9", "HTTP/2.0", "HTTP/1.", "http/1.1"]
)
extra_headers = st.lists(
    st.tuples(
        st.one_of(
            st.sampled_from(["Host", "Expect", "Accept", "Range", "X-Forwarded-Host", "Forwarded"]),
            st.text(alphabet=string.ascii_letters + "-_ :", min_size=1, max_size=12),
        ),
        header_values,
    ),
    max_size=4,
)


@FUZZ
@given(method=methods, target=targets, version=versions, headers=extra_headers)
def test_request_lines_and_headers(
    client: Client, method: str, target: str, version: str, headers: list[tuple[str, bytes]]
) -> None:
    if method.upper() not in ("GET", "HEAD"):
        method = method.replace("PUT", "PUX").replace("POST", "POSX")  # reads only
    line = " ".join(p for p in (method, target.replace("\r", "").replace("\n", ""), version) if p)
    head = line.encode("utf-8", "surrogateescape") + b"\r\n"
    for name, value in headers:
        head += name.encode() + b": " + value + b"\r\n"
    with RawConnection(client.server.port, timeout=15) as conn:
        conn.send(head + b"Connection: close\r\n\r\n")
        r = conn.response(head=method == "HEAD")  # an answer, always: never just closed
        assert r.status_line.startswith(b"HTTP/1."), r.status_line  # never HTTP/0.9 or 2.0
        check_answer(
            method, r.status, r.headers.get("content-type"), r.headers.get("server"), r.body
        )
