"""end-3, end-7a/b, end-9: manifests of the four media types and artifacts."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
import requests

from harness import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    Server,
    ServerFactory,
    assert_error,
    sha256,
)

EMPTY = b"{}"
EMPTY_DESCRIPTOR = {
    "mediaType": "application/vnd.oci.empty.v1+json",
    "digest": sha256(EMPTY),
    "size": 2,
}


def get(server: Server, repo: str, ref: str, **kw: Any) -> requests.Response:
    return requests.get(server.v2(f"{repo}/manifests/{ref}"), **kw)


@pytest.mark.parametrize("media_type", [OCI_MANIFEST, DOCKER_MANIFEST])
def test_image_manifest_roundtrip(server: Server, repo: str, media_type: str) -> None:
    digest, manifest = server.push_image(
        repo, "v1", [os.urandom(100), os.urandom(200)], media_type=media_type
    )
    body = json.dumps(manifest).encode()
    for ref in ("v1", digest):
        r = get(server, repo, ref)
        assert r.status_code == 200
        assert r.content == body  # byte for byte
        assert r.headers["Content-Type"] == media_type
        assert r.headers["Docker-Content-Digest"] == digest
        assert r.headers["Content-Length"] == str(len(body))
        h = requests.head(server.v2(f"{repo}/manifests/{ref}"))
        assert h.status_code == 200 and h.content == b""
        assert h.headers["Content-Length"] == str(len(body))
        assert h.headers["Docker-Content-Digest"] == digest
        assert h.headers["Content-Type"] == media_type


def test_put_response_headers(server: Server, repo: str) -> None:
    config = server.push_blob(repo, b'{"os":"linux"}')
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config,
            "size": 14,
        },
        "layers": [],
    }
    body = json.dumps(manifest, indent=3).encode()  # unusual formatting is preserved
    r = server.push_manifest(repo, "latest", body, OCI_MANIFEST)
    assert r.status_code == 201
    assert r.headers["Docker-Content-Digest"] == sha256(body)
    assert r.headers["Location"] == f"http://{server.host}/v2/{repo}/manifests/{sha256(body)}"
    assert "OCI-Subject" not in r.headers
    assert get(server, repo, "latest").content == body


@pytest.mark.parametrize(
    ("index_type", "child_type"), [(OCI_INDEX, OCI_MANIFEST), (DOCKER_LIST, DOCKER_MANIFEST)]
)
def test_index_roundtrip(server: Server, repo: str, index_type: str, child_type: str) -> None:
    children = [server.push_image(repo, None, media_type=child_type) for _ in range(2)]
    index = {
        "schemaVersion": 2,
        "mediaType": index_type,
        "manifests": [
            {
                "mediaType": child_type,
                "digest": d,
                "size": len(json.dumps(m).encode()),
                "platform": {"architecture": arch, "os": "linux"},
            }
            for (d, m), arch in zip(children, ["amd64", "arm64"], strict=True)
        ],
    }
    r = server.push_manifest(repo, "multi", index)
    assert r.status_code == 201, r.text
    r = get(server, repo, "multi")
    assert r.headers["Content-Type"] == index_type
    assert r.json() == index


def test_index_with_missing_child(server: Server, repo: str) -> None:
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": sha256(b"missing"), "size": 7}],
    }
    err = assert_error(server.push_manifest(repo, "multi", index), 400, "MANIFEST_BLOB_UNKNOWN")
    assert sha256(b"missing") in json.dumps(err)


def test_missing_layer_or_config(server: Server, repo: str) -> None:
    config = server.push_blob(repo, b"{}")
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config,
            "size": 2,
        },
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": sha256(b"not pushed"),
                "size": 10,
            }
        ],
    }
    err = assert_error(server.push_manifest(repo, "v1", manifest), 400, "MANIFEST_BLOB_UNKNOWN")
    assert err["detail"]["digests"] == [sha256(b"not pushed")]
    manifest["layers"] = []
    manifest["config"]["digest"] = sha256(b"no config")
    assert_error(server.push_manifest(repo, "v1", manifest), 400, "MANIFEST_BLOB_UNKNOWN")
    assert_error(get(server, repo, "v1"), 404, "MANIFEST_UNKNOWN")


def test_artifact_with_empty_config(server: Server, repo: str) -> None:
    server.push_blob(repo, EMPTY)
    layer = server.push_blob(repo, b"sbom contents")
    artifact = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": "application/spdx+json",
        "config": EMPTY_DESCRIPTOR,
        "layers": [{"mediaType": "application/spdx+json", "digest": layer, "size": 13}],
    }
    r = server.push_manifest(repo, "sbom", artifact)
    assert r.status_code == 201
    assert get(server, repo, "sbom").json() == artifact


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"{not json", OCI_MANIFEST),
        (b"", OCI_MANIFEST),
        (json.dumps({"schemaVersion": 1, "name": "x", "tag": "y"}).encode(), OCI_MANIFEST),
        (
            json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}).encode(),
            OCI_MANIFEST,
        ),
        (
            json.dumps(
                {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": {}, "layers": []}
            ).encode(),
            OCI_MANIFEST,
        ),
        (json.dumps({"schemaVersion": 2, "manifests": []}).encode(), "text/plain"),
    ],
)
def test_invalid_manifests(server: Server, repo: str, body: bytes, content_type: str) -> None:
    r = server.push_manifest(repo, "bad", body, content_type)
    assert_error(r, 400, "MANIFEST_INVALID")
    assert_error(get(server, repo, "bad"), 404, "MANIFEST_UNKNOWN")


def test_content_type_mismatch(server: Server, repo: str) -> None:
    _, manifest = server.push_image(repo, None, media_type=DOCKER_MANIFEST)
    r = server.push_manifest(repo, "x", manifest, OCI_MANIFEST)
    assert_error(r, 400, "MANIFEST_INVALID")


def test_push_by_digest_must_match(server: Server, repo: str) -> None:
    _, manifest = server.push_image(repo, None)
    body = json.dumps(manifest).encode()
    r = server.push_manifest(repo, sha256(body + b" "), body, OCI_MANIFEST)
    assert_error(r, 400, "DIGEST_INVALID")
    r = server.push_manifest(repo, sha256(body), body, OCI_MANIFEST)
    assert r.status_code == 201
    assert "OCI-Tag" not in r.headers


def test_push_by_digest_with_tags(server: Server, repo: str) -> None:
    _, manifest = server.push_image(repo, None)
    body = json.dumps(manifest).encode()
    r = requests.put(
        server.v2(f"{repo}/manifests/{sha256(body)}"),
        params=[("tag", "a"), ("tag", "b"), ("tag", "c")],
        data=body,
        headers={"Content-Type": OCI_MANIFEST},
    )
    assert r.status_code == 201
    assert r.headers["OCI-Tag"].replace(" ", "").split(",") == ["a", "b", "c"]
    for tag in "abc":
        assert get(server, repo, tag).headers["Docker-Content-Digest"] == sha256(body)
    r = requests.put(
        server.v2(f"{repo}/manifests/{sha256(body)}"),
        params={"tag": "bad tag"},
        data=body,
        headers={"Content-Type": OCI_MANIFEST},
    )
    assert r.status_code == 400


def test_oversized_manifest_is_413(server: Server, repo: str) -> None:
    body = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "annotations": {"pad": "x" * (4 * 1024 * 1024)},
        }
    ).encode()
    r = server.push_manifest(repo, "huge", body, OCI_MANIFEST)
    assert r.status_code == 413
    assert r.json()["errors"][0]["code"] == "MANIFEST_INVALID"


def test_subject_header_even_when_subject_is_missing(server: Server, repo: str) -> None:
    server.push_blob(repo, EMPTY)
    missing = sha256(b"subject pushed later")
    artifact = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": "x/sig",
        "config": EMPTY_DESCRIPTOR,
        "layers": [EMPTY_DESCRIPTOR],
        "subject": {"mediaType": OCI_MANIFEST, "digest": missing, "size": 20},
    }
    body = json.dumps(artifact).encode()
    r = server.push_manifest(repo, sha256(body), body, OCI_MANIFEST)
    assert r.status_code == 201
    assert r.headers["OCI-Subject"] == missing


def test_unknown_and_invalid_references(server: Server, repo: str) -> None:
    server.push_image(repo, "exists")
    assert_error(get(server, repo, "nope"), 404, "MANIFEST_UNKNOWN")
    assert_error(get(server, repo, sha256(b"nope")), 404, "MANIFEST_UNKNOWN")
    assert requests.head(server.v2(f"{repo}/manifests/nope")).status_code == 404
    # Neither a tag nor a digest: names no manifest (as the OCI conformance suite expects).
    assert_error(get(server, repo, "sha256:totallywrong"), 404, "MANIFEST_UNKNOWN")
    assert_error(get(server, repo, ".badtag"), 404, "MANIFEST_UNKNOWN")
    assert requests.head(server.v2(f"{repo}/manifests/.badtag")).status_code == 404
    assert_error(server.push_manifest(repo, ".badtag", b"{}"), 400, "TAG_INVALID")
    assert_error(get(server, "no/such/repo", "latest"), 404, "MANIFEST_UNKNOWN")


def test_conditional_get(server: Server, repo: str) -> None:
    digest, _ = server.push_image(repo, "v1")
    r = get(server, repo, "v1", headers={"If-None-Match": f'"{digest}"'})
    assert r.status_code == 304


@pytest.mark.filesystem
def test_retag_moves_the_tag(server: Server, repo: str) -> None:
    d1, _ = server.push_image(repo, "latest")
    d2, _ = server.push_image(repo, "latest")
    assert get(server, repo, "latest").headers["Docker-Content-Digest"] == d2
    assert get(server, repo, d1).status_code == 200  # the old manifest stays by digest
    index = server.root / "docker/registry/v2/repositories" / repo / "_manifests/tags/latest/index"
    assert sorted(p.name for p in (index / "sha256").iterdir()) == sorted(
        [d1.split(":")[1], d2.split(":")[1]]
    )


def test_delete_by_digest_removes_its_tags(server: Server, repo: str) -> None:
    digest, _ = server.push_image(repo, "a")
    _other, _ = server.push_image(repo, "keep")
    r = requests.put(
        server.v2(f"{repo}/manifests/b"),
        data=get(server, repo, "a").content,
        headers={"Content-Type": OCI_MANIFEST},
    )
    assert r.status_code == 201, r.text
    assert get(server, repo, "b").headers["Docker-Content-Digest"] == digest  # two tags on it
    r = requests.delete(server.v2(f"{repo}/manifests/{digest}"))
    assert r.status_code == 202
    assert_error(get(server, repo, digest), 404, "MANIFEST_UNKNOWN")
    assert_error(get(server, repo, "a"), 404, "MANIFEST_UNKNOWN")
    assert_error(get(server, repo, "b"), 404, "MANIFEST_UNKNOWN")
    assert requests.get(server.v2(f"{repo}/tags/list")).json()["tags"] == ["keep"]
    assert_error(requests.delete(server.v2(f"{repo}/manifests/{digest}")), 404, "MANIFEST_UNKNOWN")


def test_delete_by_tag_keeps_the_manifest(server: Server, repo: str) -> None:
    digest, _ = server.push_image(repo, "v1")
    r = requests.delete(server.v2(f"{repo}/manifests/v1"))
    assert r.status_code == 202
    assert_error(get(server, repo, "v1"), 404, "MANIFEST_UNKNOWN")
    assert get(server, repo, digest).status_code == 200
    assert_error(requests.delete(server.v2(f"{repo}/manifests/v1")), 404, "MANIFEST_UNKNOWN")
    assert_error(requests.delete(server.v2(f"{repo}/manifests/sha256:xyz")), 400, "DIGEST_INVALID")


def test_delete_disabled(start_server: ServerFactory) -> None:
    s = start_server(storage={"delete": {"enabled": False}})
    digest, _ = s.push_image("x", "v1")
    for ref in ("v1", digest):
        assert_error(requests.delete(s.v2(f"x/manifests/{ref}")), 405, "UNSUPPORTED")
    assert requests.get(s.v2("x/manifests/v1")).status_code == 200


def test_a_tag_with_a_trailing_newline_is_refused(server: Server, repo: str) -> None:
    """``$`` in a Python regex also matches before a final newline: ``v2%0A`` once became a tag
    ``"v2\\n"`` in the tag list."""
    _, manifest = server.push_image(repo, None)
    body = json.dumps(manifest).encode()
    r = server.session.put(
        server.v2(f"{repo}/manifests/v2%0A"), data=body, headers={"Content-Type": OCI_MANIFEST}
    )
    assert_error(r, 400, "TAG_INVALID")
    assert server.session.get(server.v2(f"{repo}/tags/list")).json().get("tags") in (None, [])
