"""end-12a/b: the referrers API."""

from __future__ import annotations

import json

import requests

from harness import OCI_INDEX, OCI_MANIFEST, Server, assert_error, sha256

EMPTY = {"mediaType": "application/vnd.oci.empty.v1+json", "digest": sha256(b"{}"), "size": 2}


def push_referrer(
    server: Server,
    repo: str,
    subject: str,
    size: int,
    artifact_type: str | None,
    annotations: dict[str, str] | None = None,
) -> tuple[str, int]:
    server.push_blob(repo, b"{}")
    manifest: dict = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": EMPTY,
        "layers": [EMPTY],
        "subject": {"mediaType": OCI_MANIFEST, "digest": subject, "size": size},
    }
    if artifact_type:
        manifest["artifactType"] = artifact_type
    if annotations:
        manifest["annotations"] = annotations
    body = json.dumps(manifest).encode()
    r = server.push_manifest(repo, sha256(body), body, OCI_MANIFEST)
    assert r.status_code == 201 and r.headers["OCI-Subject"] == subject
    return sha256(body), len(body)


def test_referrers_list_and_filter(server: Server, repo: str) -> None:
    subject, manifest = server.push_image(repo, "v1")
    size = len(json.dumps(manifest).encode())
    sig, sig_size = push_referrer(
        server, repo, subject, size, "application/vnd.example.sig", {"org.example.signer": "me"}
    )
    sbom, _sbom_size = push_referrer(server, repo, subject, size, "application/spdx+json")
    r = requests.get(server.v2(f"{repo}/referrers/{subject}"))
    assert r.status_code == 200
    assert r.headers["Content-Type"] == OCI_INDEX
    assert "OCI-Filters-Applied" not in r.headers
    index = r.json()
    assert index["schemaVersion"] == 2 and index["mediaType"] == OCI_INDEX
    by_digest = {m["digest"]: m for m in index["manifests"]}
    assert by_digest[sig] == {
        "mediaType": OCI_MANIFEST,
        "digest": sig,
        "size": sig_size,
        "artifactType": "application/vnd.example.sig",
        "annotations": {"org.example.signer": "me"},
    }
    assert by_digest[sbom]["artifactType"] == "application/spdx+json"
    r = requests.get(
        server.v2(f"{repo}/referrers/{subject}"), params={"artifactType": "application/spdx+json"}
    )
    assert r.headers["OCI-Filters-Applied"] == "artifactType"
    assert [m["digest"] for m in r.json()["manifests"]] == [sbom]


def test_referrer_without_artifact_type_uses_config_media_type(server: Server, repo: str) -> None:
    subject, _manifest = server.push_image(repo, "v1")
    _ref, _ = push_referrer(server, repo, subject, 1, None)
    r = requests.get(server.v2(f"{repo}/referrers/{subject}")).json()
    assert r["manifests"][0]["artifactType"] == "application/vnd.oci.empty.v1+json"


def test_referrers_of_subject_pushed_later(server: Server, repo: str) -> None:
    future = sha256(b"not yet")
    ref, _ = push_referrer(server, repo, future, 7, "x/y")
    r = requests.get(server.v2(f"{repo}/referrers/{future}"))
    assert [m["digest"] for m in r.json()["manifests"]] == [ref]


def test_no_referrers_is_an_empty_index(server: Server, repo: str) -> None:
    subject, _ = server.push_image(repo, "v1")
    r = requests.get(server.v2(f"{repo}/referrers/{subject}"))
    assert r.status_code == 200
    assert r.json() == {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
    r = requests.get(server.v2(f"{repo}/referrers/{subject}"), params={"artifactType": "a/b"})
    assert r.status_code == 200 and r.json()["manifests"] == []


def test_deleted_referrer_disappears(server: Server, repo: str) -> None:
    subject, _ = server.push_image(repo, "v1")
    ref, _ = push_referrer(server, repo, subject, 1, "x/y")
    assert requests.delete(server.v2(f"{repo}/manifests/{ref}")).status_code == 202
    assert requests.get(server.v2(f"{repo}/referrers/{subject}")).json()["manifests"] == []


def test_invalid_digest(server: Server, repo: str) -> None:
    assert_error(requests.get(server.v2(f"{repo}/referrers/sha256:nope")), 400, "DIGEST_INVALID")
    assert_error(requests.get(server.v2(f"{repo}/referrers/latest")), 400, "DIGEST_INVALID")
