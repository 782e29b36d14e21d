import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dockyard.errors import ErrorCode, RegistryError
from dockyard.oci import mediatypes as mt
from dockyard.oci.manifest import MAX_MANIFEST_BYTES, parse_manifest, sniff_media_type

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
D3 = "sha256:" + "3" * 64


def image(media_type: str | None = mt.OCI_MANIFEST, **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": D1,
            "size": 2,
        },
        "layers": [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": D2, "size": 10}
        ],
        **extra,
    }
    if media_type:
        doc["mediaType"] = media_type
    return doc


def index(media_type: str | None = mt.OCI_INDEX, **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "manifests": [{"mediaType": mt.OCI_MANIFEST, "digest": D3, "size": 100}],
        **extra,
    }
    if media_type:
        doc["mediaType"] = media_type
    return doc


def parse(doc: Any, content_type: str | None) -> Any:
    return parse_manifest(json.dumps(doc).encode(), content_type)


def invalid(doc: Any, content_type: str | None = mt.OCI_MANIFEST) -> RegistryError:
    body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    with pytest.raises(RegistryError) as err:
        parse_manifest(body, content_type)
    return err.value


def test_image_manifest_references() -> None:
    m = parse(image(), mt.OCI_MANIFEST)
    assert m.media_type == mt.OCI_MANIFEST
    assert [str(d.digest) for d in m.blobs] == [D1, D2]
    assert m.children == ()
    assert m.artifact_type == "application/vnd.oci.image.config.v1+json"


def test_docker_manifest_and_list() -> None:
    assert parse(image(mt.DOCKER_MANIFEST), mt.DOCKER_MANIFEST).media_type == mt.DOCKER_MANIFEST
    m = parse(index(mt.DOCKER_MANIFEST_LIST), mt.DOCKER_MANIFEST_LIST)
    assert m.is_index and [str(c.digest) for c in m.children] == [D3]


def test_oci_media_type_field_is_optional() -> None:
    assert parse(image(None), mt.OCI_MANIFEST).media_type == mt.OCI_MANIFEST
    assert parse(index(None), mt.OCI_INDEX).media_type == mt.OCI_INDEX


def test_docker_types_require_the_field() -> None:
    assert invalid(image(None), mt.DOCKER_MANIFEST).code is ErrorCode.MANIFEST_INVALID


def test_media_type_must_match_content_type() -> None:
    err = invalid(image(mt.OCI_MANIFEST), mt.DOCKER_MANIFEST)
    assert err.code is ErrorCode.MANIFEST_INVALID and "Content-Type" in err.message
    invalid(index(), mt.OCI_MANIFEST)


def test_generic_content_type_falls_back_to_field() -> None:
    assert parse(image(mt.DOCKER_MANIFEST), "application/json").media_type == mt.DOCKER_MANIFEST
    assert parse(index(None), None).media_type == mt.OCI_INDEX


def test_artifact_manifest_with_subject_and_artifact_type() -> None:
    doc = image(
        artifactType="application/vnd.example.sbom",
        subject={"mediaType": mt.OCI_MANIFEST, "digest": D3, "size": 5},
        annotations={"a": "b"},
    )
    m = parse(doc, mt.OCI_MANIFEST)
    assert m.artifact_type == "application/vnd.example.sbom"
    assert m.subject is not None and str(m.subject.digest) == D3
    assert m.annotations == {"a": "b"}


def test_foreign_layers_need_urls_but_not_blobs() -> None:
    foreign = {
        "mediaType": "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
        "digest": D3,
        "size": 1,
        "urls": ["https://example.com/layer"],
    }
    doc = image(mt.DOCKER_MANIFEST)
    doc["layers"].append(foreign)
    m = parse(doc, mt.DOCKER_MANIFEST)
    assert [str(d.digest) for d in m.blobs] == [D1, D2]
    del foreign["urls"]
    invalid(doc, mt.DOCKER_MANIFEST)
    foreign["urls"] = ["ftp://x"]
    invalid(doc, mt.DOCKER_MANIFEST)


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"\xff\xfe",
        b"[]",
        json.dumps({"schemaVersion": 1}).encode(),
        json.dumps({**image(), "schemaVersion": "2"}).encode(),
        json.dumps({**image(), "schemaVersion": True}).encode(),
        json.dumps({**image(), "config": "x"}).encode(),
        json.dumps({**image(), "layers": {}}).encode(),
        json.dumps(
            {**image(), "config": {"mediaType": "x", "digest": "sha256:bad", "size": 1}}
        ).encode(),
        json.dumps({**image(), "config": {"mediaType": "x", "digest": D1, "size": -1}}).encode(),
        json.dumps({**image(), "config": {"mediaType": "x", "digest": D1, "size": True}}).encode(),
        json.dumps({**image(), "config": {"digest": D1, "size": 1}}).encode(),
        json.dumps({**image(), "annotations": {"a": 1}}).encode(),
        json.dumps({**image(), "manifests": []}).encode(),
        json.dumps({**image(), "subject": "x"}).encode(),
    ],
)
def test_malformed_manifests(body: bytes) -> None:
    err = invalid(body)
    assert err.code is ErrorCode.MANIFEST_INVALID
    assert err.status == 400


def test_unknown_content_type_is_refused() -> None:
    err = invalid(image(None), "application/vnd.oci.artifact.manifest.v1+json")
    assert err.code is ErrorCode.MANIFEST_INVALID


def test_size_cap_is_413() -> None:
    body = json.dumps({**image(), "annotations": {"pad": "x" * MAX_MANIFEST_BYTES}}).encode()
    err = invalid(body)
    assert err.status == 413


def test_sniff_media_type() -> None:
    assert sniff_media_type(json.dumps(image(mt.DOCKER_MANIFEST)).encode()) == mt.DOCKER_MANIFEST
    assert sniff_media_type(json.dumps(index(None)).encode()) == mt.OCI_INDEX
    assert sniff_media_type(json.dumps(image(None)).encode()) == mt.OCI_MANIFEST
    assert sniff_media_type(b"garbage") == mt.OCI_MANIFEST


@given(st.binary(max_size=512))
def test_arbitrary_bytes_never_crash(body: bytes) -> None:
    try:
        parse_manifest(body, mt.OCI_MANIFEST)
    except RegistryError as err:
        assert err.status in (400, 413)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(
            st.sampled_from(
                [
                    "mediaType",
                    "digest",
                    "size",
                    "config",
                    "layers",
                    "manifests",
                    "subject",
                    "schemaVersion",
                    "urls",
                ]
            ),
            children,
            max_size=5,
        )
    ),
    max_leaves=20,
)


@given(json_values)
def test_arbitrary_json_never_crashes(doc: Any) -> None:
    try:
        parse(doc, mt.OCI_MANIFEST)
    except RegistryError as err:
        assert err.code is ErrorCode.MANIFEST_INVALID
