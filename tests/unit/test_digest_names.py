import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dockyard.errors import ErrorCode, RegistryError
from dockyard.oci.digest import Digest, is_digest
from dockyard.oci.names import validate_name, validate_tag


def test_parse_sha256_and_sha512() -> None:
    d = Digest.parse("sha256:" + "a" * 64)
    assert (d.algorithm, d.hex) == ("sha256", "a" * 64)
    assert str(Digest.parse("sha512:" + "0" * 128)) == "sha512:" + "0" * 128


@pytest.mark.parametrize(
    "text",
    [
        "sha256:totallywrong",
        "sha256:" + "A" * 64,  # uppercase hex
        "sha256:" + "a" * 63,
        "sha512:" + "a" * 64,
        "md5:" + "a" * 32,
        "sha256",
        ":" + "a" * 64,
        "",
        "sha256:" + "a" * 64 + "\n",
    ],
)
def test_invalid_digests_are_digest_invalid(text: str) -> None:
    with pytest.raises(RegistryError) as err:
        Digest.parse(text)
    assert err.value.code is ErrorCode.DIGEST_INVALID
    assert err.value.status == 400


@given(st.binary(max_size=256))
def test_from_bytes_roundtrips(data: bytes) -> None:
    d = Digest.from_bytes(data)
    assert Digest.parse(str(d)) == d
    assert d.hex == hashlib.sha256(data).hexdigest()
    assert Digest.from_bytes(data, "sha512").hex == hashlib.sha512(data).hexdigest()


def test_is_digest() -> None:
    assert is_digest("sha256:abc")
    assert not is_digest("latest")


@pytest.mark.parametrize(
    "name",
    ["a", "library/busybox", "a.b_c__d-e---f/g", "team-a/app/sub", "x" * 255],
)
def test_valid_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "A",
        "a/",
        "/a",
        "a//b",
        "a..b",
        "-a",
        "a-",
        "a_",
        "a___b",
        "a/_b",
        "x" * 256,
        "a/../b",
        "a b",
        "_manifests",
        "a/b\n",  # $ in a Python regex also matches before a final newline
    ],
)
def test_invalid_names(name: str) -> None:
    with pytest.raises(RegistryError) as err:
        validate_name(name)
    assert err.value.code is ErrorCode.NAME_INVALID


COMPONENT = st.from_regex(r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*", fullmatch=True)


@pytest.mark.slow
@given(st.lists(COMPONENT, min_size=1, max_size=4).map("/".join), st.integers(0, 300))
def test_generated_names_are_valid_up_to_the_length_limit(name: str, padding: int) -> None:
    """Any name the grammar allows is accepted (and returned) up to 255 characters, and refused
    as NAME_INVALID beyond: ``padding`` letters lengthen the last component, which stays valid."""
    name += "a" * padding
    if len(name) <= 255:  # registry:2's limit
        assert validate_name(name) == name
    else:
        with pytest.raises(RegistryError) as err:
            validate_name(name)
        assert err.value.code is ErrorCode.NAME_INVALID


@pytest.mark.parametrize("tag", ["latest", "v1.0", "_x", "A" * 128, "1-2_3.4"])
def test_valid_tags(tag: str) -> None:
    assert validate_tag(tag) == tag


@pytest.mark.parametrize("tag", ["", ".x", "-x", "A" * 129, "a/b", "a:b", "a b", "v2\n"])
def test_invalid_tags(tag: str) -> None:
    with pytest.raises(RegistryError) as err:
        validate_tag(tag)
    assert err.value.status == 400
