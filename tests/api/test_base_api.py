"""end-1, common headers, error shapes, routing, and Location headers behind proxies."""

from __future__ import annotations

import requests

from harness import Server, ServerFactory, assert_error


def test_version_check(server: Server) -> None:
    r = requests.get(server.v2(""))
    assert r.status_code == 200
    assert r.json() == {}
    assert r.headers["Docker-Distribution-API-Version"] == "registry/2.0"


def test_unknown_endpoint_is_json_404(server: Server) -> None:
    r = requests.get(server.url + "/v2/foo/nothing/here")
    assert_error(r, 404, "UNSUPPORTED")
    r = requests.get(server.url + "/")
    assert r.status_code == 404


def test_wrong_method_is_405_unsupported(server: Server) -> None:
    assert_error(requests.post(server.v2("foo/tags/list")), 405, "UNSUPPORTED")
    assert_error(requests.patch(server.v2("foo/manifests/latest")), 405, "UNSUPPORTED")


def test_invalid_names(server: Server) -> None:
    for name in ("UPPER/case", "a..b", "-x", "a/_manifests"):
        assert_error(requests.get(server.v2(f"{name}/tags/list")), 400, "NAME_INVALID")
        assert_error(requests.post(server.v2(f"{name}/blobs/uploads/")), 400, "NAME_INVALID")
    assert_error(requests.get(server.v2(("a" * 256) + "/manifests/x")), 400, "NAME_INVALID")


def test_locations_follow_forwarded_headers(server: Server, repo: str) -> None:
    r = requests.post(
        server.v2(f"{repo}/blobs/uploads/"),
        headers={
            "X-Forwarded-Proto": "https",
            "X-Forwarded-Host": "registry.example.com, proxy.internal",
        },
    )
    assert r.status_code == 202
    assert r.headers["Location"].startswith(
        f"https://registry.example.com/v2/{repo}/blobs/uploads/"
    )
    r = requests.post(
        server.v2(f"{repo}/blobs/uploads/"),
        headers={
            "Host": "reg.example.com",
            "X-Forwarded-Proto": "https",
            "X-Forwarded-Port": "8443",
        },
    )
    assert r.headers["Location"].startswith(f"https://reg.example.com:8443/v2/{repo}/")
    r = requests.post(
        server.v2(f"{repo}/blobs/uploads/"),
        headers={"Forwarded": 'for=1.2.3.4;proto=https;host="fw.example.com"'},
    )
    assert r.headers["Location"].startswith(f"https://fw.example.com/v2/{repo}/")
    r = requests.post(server.v2(f"{repo}/blobs/uploads/"))
    assert r.headers["Location"].startswith(f"http://{server.host}/v2/{repo}/")


def test_http_host_and_relative_urls(start_server: ServerFactory) -> None:
    s = start_server(http={"host": "https://registry.example.com:5443"})
    r = requests.post(s.v2("x/blobs/uploads/"), headers={"X-Forwarded-Host": "ignored"})
    assert r.headers["Location"].startswith("https://registry.example.com:5443/v2/x/blobs/")
    s = start_server(http={"relativeurls": True})
    r = requests.post(s.v2("x/blobs/uploads/"))
    assert r.headers["Location"].startswith("/v2/x/blobs/uploads/")


def test_prefix_and_configured_headers(start_server: ServerFactory) -> None:
    s = start_server(
        http={"prefix": "/registry/", "headers": {"X-Content-Type-Options": ["nosniff"]}}
    )
    r = requests.get(s.url + "/registry/v2/")
    assert r.status_code == 200
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    assert requests.get(s.url + "/v2/").status_code == 404
    r = requests.post(s.url + "/registry/v2/x/blobs/uploads/")
    assert r.headers["Location"].startswith(f"http://{s.host}/registry/v2/x/blobs/uploads/")
