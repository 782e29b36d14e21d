"""TLS served by Dockyard itself: registry:2's http.tls keys, mutual TLS, minimum version."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import yaml

from harness import ServerFactory, sha256
from harness.certs import CA, server_certificate


def tls(cert: Path, key: Path, **extra: object) -> dict[str, object]:
    return {"tls": {"certificate": str(cert), "key": str(key), **extra}}


@pytest.mark.slow
def test_tls_serves_the_api_with_https_locations(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    ca, server = server_certificate(tmp_path / "pki")
    s = start_server(workers=2, http=tls(server.cert, server.key))
    r = requests.get(s.v2(""), verify=str(ca.path))
    assert r.status_code == 200
    r = requests.post(s.v2("x/blobs/uploads/"), verify=str(ca.path))
    assert r.headers["Location"].startswith(f"https://{s.host}/v2/x/blobs/uploads/")
    # a large blob round trip: over TLS the response streams instead of using sendfile
    data = os.urandom(6 * 1024 * 1024 + 1)
    r = requests.post(
        s.v2("x/blobs/uploads/"), params={"digest": sha256(data)}, data=data, verify=str(ca.path)
    )
    assert r.status_code == 201
    got = requests.get(s.v2(f"x/blobs/{sha256(data)}"), verify=str(ca.path)).content
    assert hashlib.sha256(got).hexdigest() == sha256(data)[7:]
    assert requests.get(s.url + "/debug/health", verify=str(ca.path)).json() == {}
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(s.v2(""))  # not trusted without the CA
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(f"http://127.0.0.1:{s.port}/v2/")  # plain HTTP is not spoken


@pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo is not installed")
def test_skopeo_verifies_the_certificate(start_server: ServerFactory, tmp_path: Path) -> None:
    ca, server = server_certificate(tmp_path / "pki")
    s = start_server(http=tls(server.cert, server.key))
    certs = tmp_path / "certs.d"
    certs.mkdir()
    shutil.copy(ca.path, certs / "ca.crt")
    layout = tmp_path / "layout"  # an OCI layout with one layer, made by hand
    (layout / "blobs/sha256").mkdir(parents=True)

    def put(data: bytes) -> dict[str, object]:
        (layout / "blobs/sha256" / sha256(data)[7:]).write_bytes(data)
        return {"digest": sha256(data), "size": len(data)}

    layer = put(os.urandom(1000))
    config = put(json.dumps({"architecture": "amd64", "os": "linux"}).encode())
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {**config, "mediaType": "application/vnd.oci.image.config.v1+json"},
            "layers": [{**layer, "mediaType": "application/vnd.oci.image.layer.v1.tar"}],
        }
    ).encode()
    m = put(manifest)
    (layout / "index.json").write_text(
        json.dumps(
            {
                "schemaVersion": 2,
                "manifests": [
                    {
                        **m,
                        "mediaType": "application/vnd.oci.image.manifest.v1+json",
                        "annotations": {"org.opencontainers.image.ref.name": "v1"},
                    }
                ],
            }
        )
    )
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    digestfile = tmp_path / "digest"
    push = subprocess.run(
        [
            "skopeo",
            "copy",
            "--dest-cert-dir",
            str(certs),
            "--digestfile",
            str(digestfile),
            f"oci:{layout}:v1",
            f"docker://{s.host}/tls/img:v1",
        ],
        capture_output=True,
        text=True,
    )
    assert push.returncode == 0, push.stderr
    refused = subprocess.run(
        ["skopeo", "inspect", f"docker://{s.host}/tls/img:v1"], capture_output=True, text=True
    )
    assert refused.returncode != 0 and "certificate" in refused.stderr
    pulled = tmp_path / "pulled"
    pull = subprocess.run(
        [
            "skopeo",
            "copy",
            "--src-cert-dir",
            str(certs),
            f"docker://{s.host}/tls/img:v1",
            f"dir:{pulled}",
        ],
        capture_output=True,
        text=True,
    )
    assert pull.returncode == 0, pull.stderr
    assert sha256((pulled / "manifest.json").read_bytes()) == digestfile.read_text().strip()


def test_mutual_tls(start_server: ServerFactory, tmp_path: Path) -> None:
    ca, server = server_certificate(tmp_path / "pki")
    clients = CA(tmp_path / "clients", "Client CA")
    good = clients.issue("good-client", client=True)
    stranger = CA(tmp_path / "strangers", "Other CA").issue("stranger", client=True)
    s = start_server(http=tls(server.cert, server.key, clientcas=[str(clients.path)]))
    r = requests.get(s.v2(""), verify=str(ca.path), cert=(str(good.cert), str(good.key)))
    assert r.status_code == 200
    for cert in (None, (str(stranger.cert), str(stranger.key))):
        with pytest.raises((requests.exceptions.SSLError, requests.exceptions.ConnectionError)):
            requests.get(s.v2(""), verify=str(ca.path), cert=cert)


def test_minimum_tls_version(start_server: ServerFactory, tmp_path: Path) -> None:
    ca, server = server_certificate(tmp_path / "pki")
    s = start_server(http=tls(server.cert, server.key, minimumtls="tls1.3"))
    ctx = ssl.create_default_context(cafile=str(ca.path))
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with socket.create_connection(("127.0.0.1", s.port)) as raw, pytest.raises(ssl.SSLError):
        ctx.wrap_socket(raw, server_hostname="localhost")
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    with (
        socket.create_connection(("127.0.0.1", s.port)) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls_sock,
    ):
        assert tls_sock.version() == "TLSv1.3"


def serve_fails(tmp_path: Path, http_tls: dict[str, object]) -> str:
    config = tmp_path / "bad.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "version": "0.1",
                "storage": {"filesystem": {"rootdirectory": str(tmp_path / "d")}},
                "http": {"addr": "127.0.0.1:0", "tls": http_tls},
            }
        )
    )
    result = subprocess.run(
        [sys.executable, "-m", "dockyard", "serve", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2, result.stderr
    return result.stderr


@pytest.mark.slow
def test_bad_certificates_fail_at_start_up(tmp_path: Path) -> None:
    _, server = server_certificate(tmp_path / "pki")
    _, other = server_certificate(tmp_path / "other")
    err = serve_fails(tmp_path, {"certificate": str(server.cert), "key": str(other.key)})
    assert "http.tls.key" in err and "does not match" in err
    err = serve_fails(tmp_path, {"certificate": str(tmp_path / "nope.crt"), "key": str(server.key)})
    assert "http.tls.certificate" in err and "cannot read" in err
    garbage = tmp_path / "garbage.crt"
    garbage.write_text("not a certificate")
    err = serve_fails(tmp_path, {"certificate": str(garbage), "key": str(server.key)})
    assert "http.tls.certificate" in err
    err = serve_fails(
        tmp_path,
        {"certificate": str(server.cert), "key": str(server.key), "clientcas": [str(garbage)]},
    )
    assert "http.tls.clientcas" in err


def test_the_ui_session_cookie_is_secure_under_tls(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    ca, server = server_certificate(tmp_path / "pki")
    s = start_server(http=tls(server.cert, server.key))
    r = requests.get(s.url + "/ui/login", verify=str(ca.path))
    cookie = r.headers["Set-Cookie"]
    assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
