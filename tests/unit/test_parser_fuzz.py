"""Property-based fuzzing of the parsers that read client bytes: manifests, digests, names and
tags, ``Range`` and ``Content-Range``, and the hosts that go into ``Location``.

The property is always the same: bad input is refused with the error the spec names (a
:class:`RegistryError` of the right code), never with another exception (which the server
would answer with 500). Examples are derandomised so CI sees the same ones every run."""

from __future__ import annotations

import json
import string
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dockyard.api.blobs import parse_range
from dockyard.api.uploads import parse_content_range
from dockyard.errors import ErrorCode, RegistryError
from dockyard.oci import mediatypes as mt
from dockyard.oci.digest import Digest
from dockyard.oci.manifest import (
    MAX_MANIFEST_BYTES,
    Manifest,
    parse_manifest,
    read_stored,
    referenced_digests,
    sniff_media_type,
)
from dockyard.oci.names import MAX_NAME_LENGTH, validate_name, validate_tag
from harness.fuzz import fuzz

FUZZ = fuzz()

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64

DEEP = [
    b"[" * 100_000,
    b'{"a":' * 100_000,
    b'{"schemaVersion":2,"layers":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b'{"schemaVersion":2,"annotations":{"x":' * 50_000,
]


# -- manifests --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body", DEEP, ids=["brackets", "objects", "deep-layers", "deep-annotations"]
)
def test_deeply_nested_manifest_is_manifest_invalid(body: bytes) -> None:
    with pytest.raises(RegistryError) as err:
        parse_manifest(body, mt.OCI_MANIFEST)
    assert err.value.code is ErrorCode.MANIFEST_INVALID
    assert err.value.status == 400


@pytest.mark.parametrize(
    "body", DEEP, ids=["brackets", "objects", "deep-layers", "deep-annotations"]
)
def test_deeply_nested_stored_manifest_never_raises(body: bytes) -> None:
    # What GC, the referrers API and manifest GETs read back from storage, which registry:2
    # (whose JSON parser allows 10,000 levels) may have written.
    assert sniff_media_type(body) == mt.OCI_MANIFEST
    assert read_stored(body) is None
    assert referenced_digests(body) == set()


def test_deeply_nested_stored_manifest_still_marks_its_digests() -> None:
    # GC marks what a manifest references; one it cannot parse must not lose its blobs.
    body = json.dumps({"schemaVersion": 2, "config": {"digest": D1}, "layers": []}).encode()
    body = body[:-1] + b',"x":' + b"[" * 5000 + f'"{D2}"'.encode() + b"]" * 5000 + b"}"
    assert referenced_digests(body) == {Digest.parse(D1), Digest.parse(D2)}


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)
descriptor = st.fixed_dictionaries(
    {},
    optional={
        "mediaType": st.sampled_from([mt.OCI_MANIFEST, "application/x", ""]) | json_values,
        "digest": st.sampled_from([D1, D2, "sha256:bad", ""]) | json_values,
        "size": st.integers(min_value=-(2**70), max_value=2**70) | json_values,
        "urls": st.lists(st.text(max_size=20), max_size=2) | json_values,
        "annotations": st.dictionaries(st.text(max_size=5), st.text(max_size=5)) | json_values,
        "artifactType": st.text(max_size=20) | json_values,
    },
)
manifest_like = st.fixed_dictionaries(
    {},
    optional={
        "schemaVersion": st.sampled_from([2, 1, "2", True, 2.0, 10**400]) | json_values,
        "mediaType": st.sampled_from(sorted(mt.PUSHABLE_MANIFESTS)) | json_values,
        "config": descriptor | json_values,
        "layers": st.lists(descriptor, max_size=3) | json_values,
        "manifests": st.lists(descriptor, max_size=3) | json_values,
        "subject": descriptor | json_values,
        "artifactType": st.text(max_size=20) | json_values,
        "annotations": json_values,
    },
)
content_types = (
    st.none()
    | st.sampled_from(
        [
            "",
            "application/json",
            "application/octet-stream",
            mt.OCI_MANIFEST,
            mt.OCI_INDEX,
            mt.DOCKER_MANIFEST,
            mt.DOCKER_MANIFEST_LIST,
            f"{mt.OCI_MANIFEST}; charset=utf-8",
            "text/plain",
            "application/vnd.docker.distribution.manifest.v1+prettyjws",
            ";;;",
            "\x00",
        ]
    )
    | st.text(max_size=40)
)


def _parse_or_refuse(body: bytes, content_type: str | None) -> Manifest | None:
    try:
        return parse_manifest(body, content_type)
    except RegistryError as exc:
        assert exc.code is ErrorCode.MANIFEST_INVALID, exc
        assert exc.status in (400, 413)
        return None


@pytest.mark.slow
@FUZZ
@given(manifest_like, content_types)
def test_manifest_shaped_json(doc: dict[str, Any], content_type: str | None) -> None:
    body = json.dumps(doc).encode()
    manifest = _parse_or_refuse(body, content_type)
    if manifest is not None:
        assert manifest.media_type in mt.PUSHABLE_MANIFESTS
    sniff_media_type(body)
    read_stored(body)
    assert isinstance(referenced_digests(body), set)


@FUZZ
@given(json_values, content_types)
def test_any_json(doc: Any, content_type: str | None) -> None:
    body = json.dumps(doc).encode()
    _parse_or_refuse(body, content_type)
    sniff_media_type(body)
    referenced_digests(body)


@FUZZ
@given(st.binary(max_size=512), content_types)
def test_any_bytes(body: bytes, content_type: str | None) -> None:
    _parse_or_refuse(body, content_type)
    sniff_media_type(body)
    read_stored(body)
    referenced_digests(body)


@FUZZ
@given(st.integers(min_value=1, max_value=200_000), st.sampled_from(["[", "{", '{"a":', "[{}"]))
def test_any_depth(depth: int, opener: str) -> None:
    body = (opener * depth).encode()
    _parse_or_refuse(body, mt.OCI_MANIFEST)
    sniff_media_type(body)
    referenced_digests(body)


@FUZZ
@given(st.integers(min_value=4000, max_value=9000))
def test_huge_numbers(digits: int) -> None:
    # Python refuses int() of more than 4300 digits with ValueError; json.loads does too.
    body = b'{"schemaVersion":2,"config":{"size":' + b"9" * digits + b"}}"
    _parse_or_refuse(body, mt.OCI_MANIFEST)
    referenced_digests(body)


def test_duplicate_keys_and_oversized_body() -> None:
    # A key given twice counts with its last value, as Go's encoding/json (registry:2) reads it.
    index = mt.OCI_INDEX.encode()
    body = b'{"schemaVersion":1,"schemaVersion":2,"mediaType":"x","mediaType":"%s"' % index
    manifest = _parse_or_refuse(body + b',"manifests":[]}', None)
    assert manifest is not None and manifest.media_type == mt.OCI_INDEX
    body = b'{"schemaVersion":2,"schemaVersion":1,"mediaType":"%s","manifests":[]}' % index
    assert _parse_or_refuse(body, None) is None
    with pytest.raises(RegistryError) as err:
        parse_manifest(b" " * (MAX_MANIFEST_BYTES + 1), mt.OCI_MANIFEST)
    assert err.value.status == 413


# -- digests, names, tags ---------------------------------------------------------------------

digest_like = st.one_of(
    st.text(max_size=140),
    st.builds(
        lambda alg, enc: f"{alg}:{enc}",
        st.sampled_from(["sha256", "sha512", "SHA256", "md5", "sha256+b64", ""]),
        st.text(alphabet="0123456789abcdefABCDEF=_-+.", max_size=140),
    ),
)


@FUZZ
@given(digest_like)
def test_digest_parse(text: str) -> None:
    try:
        digest = Digest.parse(text)
    except RegistryError as exc:
        assert exc.code is ErrorCode.DIGEST_INVALID and exc.status == 400
    else:
        assert str(digest) == text


name_like = st.one_of(
    st.text(max_size=300),
    st.lists(
        st.text(alphabet=string.ascii_lowercase + string.digits + "._-%/\\", max_size=20),
        min_size=1,
        max_size=8,
    ).map("/".join),
)


@FUZZ
@given(name_like)
def test_validate_name(text: str) -> None:
    try:
        validate_name(text)
    except RegistryError as exc:
        assert exc.code is ErrorCode.NAME_INVALID and exc.status == 400
    else:
        assert len(text) <= MAX_NAME_LENGTH
        assert text.isascii() and "%" not in text and "\\" not in text
        assert all(part and part[0].isalnum() for part in text.split("/"))


@FUZZ
@given(st.text(max_size=200))
def test_validate_tag(text: str) -> None:
    try:
        validate_tag(text)
    except RegistryError as exc:
        assert exc.code is ErrorCode.TAG_INVALID and exc.status == 400
    else:
        assert text.isascii() and 1 <= len(text) <= 128 and ":" not in text


# -- Range (blob GET) and Content-Range (PATCH) ------------------------------------------------

#: What str.isdigit() or \d accept but int() or RFC 9110's DIGIT do not (Arabic-Indic 0-2, ²³).
ASCII_AND_OTHER_DIGITS = "0123456789\u0660\u0661\u0662\u00b2\u00b3"
numbers = st.one_of(
    st.just(""),
    st.integers(min_value=0, max_value=2**70).map(str),
    st.integers(min_value=5000, max_value=20_000).map(lambda n: "1" * n),  # past int()'s limit
    st.text(alphabet=ASCII_AND_OTHER_DIGITS, max_size=8),
)
range_like = st.one_of(
    st.text(max_size=60),
    st.builds(
        lambda unit, a, sep, b: f"{unit}{a}{sep}{b}",
        st.sampled_from(["bytes=", "Bytes=", "bytes =", "items=", "", "bytes= "]),
        numbers,
        st.sampled_from(["-", "--", ",", "-0,0-", " - "]),
        numbers,
    ),
)


@FUZZ
@given(st.none() | range_like, st.integers(min_value=0, max_value=10**6))
def test_parse_range(header: str | None, size: int) -> None:
    try:
        parsed = parse_range(header, size)
    except RegistryError as exc:
        assert exc.code is ErrorCode.RANGE_INVALID and exc.status == 416
        assert exc.headers == {"Content-Range": f"bytes */{size}"}
    else:
        if parsed is not None:
            offset, length = parsed
            assert 0 <= offset < size and length >= 1 and offset + length <= size


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("bytes=" + "1" * 5000 + "-", None),  # int() of it raised ValueError: a 500
        ("bytes=0-" + "9" * 5000, (0, 10)),
        ("bytes=-" + "9" * 5000, (0, 10)),
        ("bytes=" + "0" * 5000 + "2-3", (2, 2)),
        ("Bytes=2-3", (2, 2)),  # the unit is case-insensitive
        ("bytes=\u0662-\u0663", None),  # Arabic-Indic digits are not DIGIT (RFC 9110)
    ],
)
def test_parse_range_numbers(header: str, expected: tuple[int, int] | None) -> None:
    if expected is None:
        with pytest.raises(RegistryError) as err:
            parse_range(header, 10)
        assert err.value.status == 416
    else:
        assert parse_range(header, 10) == expected


short_numbers = st.one_of(
    st.just(""),
    st.integers(min_value=0, max_value=2**70).map(str),
    st.text(alphabet=ASCII_AND_OTHER_DIGITS, max_size=8),
)


@FUZZ
@given(
    st.one_of(
        st.none(),
        st.text(max_size=60),
        st.builds(
            lambda unit, a, b: f"{unit}{a}-{b}",
            st.sampled_from(["", "bytes=", "bytes ", "bytes  ", "items="]),
            short_numbers,
            short_numbers,
        ),
    )
)
def test_parse_content_range(header: str | None) -> None:
    try:
        parse_content_range(header, "id")
    except RegistryError as exc:
        assert exc.code is ErrorCode.BLOB_UPLOAD_INVALID and exc.status == 416


def test_parse_content_range_with_huge_numbers() -> None:
    with pytest.raises(RegistryError):
        parse_content_range("0-" + "9" * 5000, "id")


# -- hosts in Location -------------------------------------------------------------------------


def is_valid_host(host: str) -> bool:
    # Imported here so that on code without it, each host test fails on its own.
    from dockyard.http.request import is_valid_host

    return is_valid_host(host)


@pytest.mark.parametrize(
    "host",
    [
        "registry.example.com",
        "registry.example.com:5000",
        "localhost",
        "127.0.0.1:5000",
        "[::1]:5000",
        "[2001:db8::1]",
        "my_registry:5000",
        "example.com.",
    ],
)
def test_valid_hosts(host: str) -> None:
    assert is_valid_host(host)


@pytest.mark.parametrize(
    "host",
    [
        "",
        "a b",
        "a b:5000",
        "evil.com/path",
        "evil.com?x",
        "evil.com#x",
        "user@evil.com",
        "a\tb",
        "[::1",
        "[nope]:1",
        "[::1]x",
        "host:port",
        "host:",
        "host:123456",
        "-leading.example",
        "a..b",
        "ü.example",
        "x" * 300,
    ],
)
def test_invalid_hosts(host: str) -> None:
    assert not is_valid_host(host)


@FUZZ
@given(st.text(max_size=80))
def test_a_valid_host_is_only_host_and_port(host: str) -> None:
    if is_valid_host(host):
        assert host.isascii() and host.isprintable()
        assert not any(c in host for c in " /?#@\\\"'<>")
