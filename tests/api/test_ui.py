"""The web UI over HTTP, without a browser (tests/browser drives it in chromium): sessions and
sign-in with the registry's accounts, CSRF, permissions, escaping of pushed text, the security
headers, deletes through the UI seen through the registry API, and path prefixes."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
import requests

from dockyard.registry.layer_listing import PARENT_MARK
from harness import Server, ServerFactory
from harness.client import OCI_INDEX, OCI_MANIFEST
from harness.dockyard import add_user, run_command

HOSTILE = '<script>__pwned("x")</script>"><img src=x onerror=__pwned("y")>'


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, html[:2000]
    return found.group(1)


def sign_in(s: Server, user: str, password: str) -> requests.Session:
    browser = requests.Session()
    page = browser.get(s.url + "/ui/login")
    r = browser.post(
        s.url + "/ui/login",
        data={"username": user, "password": password, "csrf": csrf_of(page.text), "next": "/ui/"},
        allow_redirects=False,
    )
    assert r.status_code == 303, r.text
    return browser


def htpasswd_server(start_server: ServerFactory, tmp_path: Path, **extra: Any) -> Server:
    path = tmp_path / "htpasswd"
    add_user(path, "alice", "alice-pw")
    add_user(path, "bob", "bob-pw")
    s = start_server(auth={"htpasswd": {"realm": "r", "path": str(path)}}, **extra)
    s.session.auth = ("alice", "alice-pw")
    return s


def hostile_image(s: Server, repo: str, tag: str) -> str:
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {
                "Env": [f"PAYLOAD={HOSTILE}"],
                "Labels": {HOSTILE: HOSTILE},
                "Cmd": [HOSTILE],
                "ExposedPorts": {HOSTILE: {}},
            },
            "history": [{"created_by": f"/bin/sh -c {HOSTILE}"}],
        }
    ).encode()
    layer = os.urandom(64)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": s.push_blob(repo, config),
            "size": len(config),
        },
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": s.push_blob(repo, layer),
                "size": len(layer),
            }
        ],
        "annotations": {"org.opencontainers.image.url": 'javascript:__pwned("z")', "k": HOSTILE},
    }
    r = s.push_manifest(repo, tag, manifest)
    assert r.status_code == 201, r.text
    return r.headers["Docker-Content-Digest"]


def test_pages_escape_pushed_text_and_carry_the_security_headers(
    start_server: ServerFactory,
) -> None:
    s = start_server()
    digest = hostile_image(s, "evil/app", "1")
    browser = requests.Session()
    for path in (
        "/ui/",
        "/ui/r/evil/app",
        "/ui/r/evil/app/-/tag/1",
        f"/ui/r/evil/app/-/manifest/{digest}",
        "/ui/r/evil/app/-/compare?a=1&b=1",
        "/ui/usage",
    ):
        r = browser.get(s.url + path)
        assert r.status_code == 200, (path, r.text[:500])
        assert r.headers["Content-Type"] == "text/html; charset=utf-8"
        csp = r.headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp
        assert "frame-ancestors 'none'" in csp
        assert r.headers["X-Content-Type-Options"] == "nosniff"
        assert "<script>__pwned" not in r.text and "<img src=x" not in r.text, path
        assert 'href="javascript:' not in r.text.lower(), path
        # every <script> is the UI's own file
        assert re.findall(r"<script[^>]*>", r.text) == ['<script src="/ui/static/ui.js" defer>']
    page = browser.get(s.url + "/ui/r/evil/app/-/tag/1").text
    assert "&lt;script&gt;__pwned(&#34;x&#34;)&lt;/script&gt;" in page  # shown, inert


def test_htpasswd_sign_in_sessions_and_sign_out(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    s = htpasswd_server(start_server, tmp_path)
    s.push_image("team/app", "1")
    anonymous = requests.Session()
    r = anonymous.get(s.url + "/ui/r/team/app", allow_redirects=False)
    assert r.status_code == 303
    assert r.headers["Location"] == "/ui/login?next=%2Fui%2Fr%2Fteam%2Fapp"
    # the sign-in form needs its CSRF token
    r = anonymous.post(s.url + "/ui/login", data={"username": "alice", "password": "alice-pw"})
    assert r.status_code == 403
    page = anonymous.get(s.url + "/ui/login")
    r = anonymous.post(
        s.url + "/ui/login",
        data={"username": "alice", "password": "wrong", "csrf": csrf_of(page.text)},
    )
    assert r.status_code == 401 and "Incorrect user name or password" in r.text
    browser = sign_in(s, "alice", "alice-pw")
    cookie = next(c for c in browser.cookies if c.name == "dockyard_session")
    assert cookie.has_nonstandard_attr("HttpOnly")
    assert cookie.get_nonstandard_attr("SameSite") == "Strict"
    assert cookie.path == "/ui/"
    assert not cookie.secure  # plain http here; under TLS it is Secure (test_tls.py)
    r = browser.get(s.url + "/ui/r/team/app")
    assert r.status_code == 200 and "Signed in as <strong>alice</strong>" in r.text
    # a forged cookie is a visitor who has not signed in
    forged = requests.Session()
    forged.cookies.set("dockyard_session", cookie.value[:-4] + "AAAA", path="/ui/")
    assert forged.get(s.url + "/ui/", allow_redirects=False).status_code == 303
    # sign out: the old cookie's session is gone from the browser
    r = browser.post(s.url + "/ui/logout", data={"csrf": csrf_of(r.text)}, allow_redirects=False)
    assert r.status_code == 303
    assert browser.get(s.url + "/ui/", allow_redirects=False).status_code == 303


def test_a_user_removed_from_htpasswd_loses_access_at_the_next_request(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    s = htpasswd_server(start_server, tmp_path)
    s.push_image("team/app", "1")
    browser = sign_in(s, "bob", "bob-pw")
    assert browser.get(s.url + "/ui/r/team/app").status_code == 200
    path = tmp_path / "htpasswd"
    path.write_text("".join(x for x in path.read_text().splitlines(True) if x.startswith("alice")))
    os.utime(path, (1, 1))  # a different stamp whatever the clock's resolution
    # the htpasswd file is re-read at most once a second
    deadline = 0
    while deadline < 30:
        r = browser.get(s.url + "/ui/r/team/app", allow_redirects=False)
        if r.status_code == 303:
            break
        deadline += 1
        import time

        time.sleep(0.2)
    assert r.status_code == 303 and "/ui/login" in r.headers["Location"]


def test_delete_through_the_ui_with_confirmation_and_csrf(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    s = htpasswd_server(start_server, tmp_path)
    digest, _ = s.push_image("team/app", "1")
    assert (
        s.push_manifest(
            "team/app",
            "also-1",
            s.session.get(
                s.v2(f"team/app/manifests/{digest}"), headers={"Accept": OCI_MANIFEST}
            ).content,
            OCI_MANIFEST,
        ).status_code
        == 201
    )
    s.push_image("team/app", "2")
    browser = sign_in(s, "alice", "alice-pw")
    # the confirmation lists every tag the manifest delete takes with it
    confirm = browser.get(s.url + "/ui/r/team/app/-/delete", params={"digest": digest})
    assert confirm.status_code == 200
    assert "<strong>1, also-1</strong>" in confirm.text
    token = csrf_of(confirm.text)
    # without the token, or with another session's, or from another site: refused
    other = sign_in(s, "bob", "bob-pw")
    other_token = csrf_of(other.get(s.url + "/ui/").text)
    forgeries: list[tuple[dict[str, str], dict[str, str]]] = [
        ({"digest": digest}, {}),
        ({"digest": digest, "csrf": other_token}, {}),
        ({"digest": digest, "csrf": token}, {"Sec-Fetch-Site": "cross-site"}),
        ({"digest": digest, "csrf": token}, {"Origin": "https://evil.example"}),
    ]
    for data, headers in forgeries:
        r = browser.post(s.url + "/ui/r/team/app/-/delete", data=data, headers=headers)
        assert r.status_code == 403, (data, headers)
    tags = s.session.get(s.v2("team/app/tags/list")).json()["tags"]
    assert sorted(tags) == ["1", "2", "also-1"]
    r = browser.post(
        s.url + "/ui/r/team/app/-/delete",
        data={"digest": digest, "tag": "2", "csrf": token},
        # what a browser sends behind a TLS proxy that does not say X-Forwarded-Proto
        headers={"Origin": f"https://{s.host}", "Sec-Fetch-Site": "same-origin"},
        allow_redirects=False,
    )
    assert r.status_code == 303, r.text
    assert s.session.get(s.v2(f"team/app/manifests/{digest}")).status_code == 404
    assert not s.session.get(s.v2("team/app/tags/list")).json()["tags"]  # 2's manifest stays


def test_immutable_tags_are_refused_with_the_rule(start_server: ServerFactory) -> None:
    s = start_server(policies=[{"repositories": ["rel/*"], "immutabletags": ["v.*"]}])
    s.push_image("rel/app", "v1")
    s.push_image("rel/app", "dev")
    browser = requests.Session()
    confirm = browser.get(s.url + "/ui/r/rel/app/-/delete", params={"tag": ["v1", "dev"]})
    assert "Cannot be deleted" in confirm.text and "immutable" in confirm.text
    token = csrf_of(confirm.text)
    r = browser.post(s.url + "/ui/r/rel/app/-/delete", data={"tag": ["v1", "dev"], "csrf": token})
    assert r.status_code == 409 and "refused" in r.text
    assert s.session.get(s.v2("rel/app/tags/list")).json()["tags"] == ["v1"]


TOKEN_ACCESS = [
    {"repository": "team/*", "users": ["alice"], "actions": ["*"]},
    {"repository": "public/*", "users": ["alice"], "actions": ["*"]},
    {"repository": "team/*", "users": ["bob"], "actions": ["pull"]},
    {"repository": "public/*", "anonymous": True, "actions": ["pull"]},
]


def token_server(start_server: ServerFactory, tmp_path: Path) -> Server:
    path = tmp_path / "users"
    add_user(path, "alice", "alice-pw")
    add_user(path, "bob", "bob-pw")
    s = start_server(
        auth={
            "token": {
                "realm": "http://127.0.0.1/auth/token",
                "service": "dockyard",
                "issuer": "dockyard",
                "server": {"htpasswd": str(path), "access": TOKEN_ACCESS},
            }
        }
    )
    return s


def test_token_server_permissions(start_server: ServerFactory, tmp_path: Path) -> None:
    s = token_server(start_server, tmp_path)
    pusher = requests.Session()
    for repo in ("team/app", "public/base", "secret/x"):
        token = pusher.get(
            s.url + "/auth/token",
            params={"service": "dockyard", "scope": f"repository:{repo}:pull,push"},
            auth=("alice", "alice-pw"),
        ).json()["token"]
        s.session.headers["Authorization"] = f"Bearer {token}"
        if repo == "secret/x":
            continue  # alice may not push there
        s.push_image(repo, "1")
    s.session.headers.pop("Authorization")
    # anonymous: only what the anonymous rule lets pull
    anonymous = requests.Session()
    home = anonymous.get(s.url + "/ui/").text
    assert "public/base" in home and "team/app" not in home
    assert anonymous.get(s.url + "/ui/r/team/app").status_code == 404
    # bob may pull team/*, not delete: no delete button, and a forged delete is refused
    bob = sign_in(s, "bob", "bob-pw")
    page = bob.get(s.url + "/ui/r/team/app")
    assert page.status_code == 200 and "Delete selected" not in page.text
    assert "Delete" not in bob.get(s.url + "/ui/r/team/app/-/tag/1").text
    r = bob.post(s.url + "/ui/r/team/app/-/delete", data={"tag": "1", "csrf": csrf_of(page.text)})
    assert r.status_code == 403
    # alice may
    alice = sign_in(s, "alice", "alice-pw")
    page = alice.get(s.url + "/ui/r/team/app")
    assert "Delete selected" in page.text
    r = alice.post(
        s.url + "/ui/r/team/app/-/delete",
        data={"tag": "1", "csrf": csrf_of(page.text)},
        allow_redirects=False,
    )
    assert r.status_code == 303


def test_links_follow_the_prefix_and_a_trusted_proxys_forwarded_prefix(
    start_server: ServerFactory,
) -> None:
    s = start_server(http={"prefix": "/reg", "trustedproxies": ["127.0.0.1/32"]})
    r = requests.get(s.url + "/reg/v2/")
    assert r.status_code == 200
    page = requests.get(s.url + "/reg/ui/").text
    assert 'href="/reg/ui/static/ui.css"' in page
    page = requests.get(s.url + "/reg/ui/", headers={"X-Forwarded-Prefix": "/registry"}).text
    assert 'href="/registry/reg/ui/static/ui.css"' in page
    # nothing but a plain path is taken
    page = requests.get(s.url + "/reg/ui/", headers={"X-Forwarded-Prefix": "//evil.example"}).text
    assert 'href="/reg/ui/static/ui.css"' in page


def test_a_forwarded_prefix_from_an_untrusted_peer_is_ignored(
    start_server: ServerFactory,
) -> None:
    s = start_server()
    page = requests.get(s.url + "/ui/", headers={"X-Forwarded-Prefix": "/registry"}).text
    assert 'href="/ui/static/ui.css"' in page


def test_the_ui_can_be_turned_off(start_server: ServerFactory) -> None:
    s = start_server(ui={"enabled": False})
    assert requests.get(s.url + "/ui/").status_code == 404


def test_multi_arch_index_lists_its_platforms(start_server: ServerFactory) -> None:
    s = start_server()
    children = []
    for arch in ("amd64", "arm64"):
        digest, manifest = s.push_image("multi/app", None)
        children.append(
            {
                "mediaType": OCI_MANIFEST,
                "digest": digest,
                "size": len(json.dumps(manifest)),
                "platform": {"os": "linux", "architecture": arch},
            }
        )
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": children}
    assert s.push_manifest("multi/app", "latest", index).status_code == 201
    tags = requests.get(s.url + "/ui/r/multi/app").text
    assert "linux/amd64, linux/arm64" in tags
    page = requests.get(s.url + "/ui/r/multi/app/-/tag/latest").text
    for child in children:
        assert f'href="/ui/r/multi/app/-/manifest/{child["digest"]}"' in page


@pytest.mark.parametrize(
    "path", ["/ui/r/..%2F..%2Fetc/-/tag/x", "/ui/r/UPPER", "/ui/r/a/-/tag/%00"]
)
def test_bad_names_are_refused_without_a_500(start_server: ServerFactory, path: str) -> None:
    s = start_server()
    r = requests.get(s.url + path)
    assert 400 <= r.status_code < 500, r.status_code


def tar_gz(entries: list[tuple[str, bytes]]) -> bytes:
    import io
    import tarfile

    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return raw.getvalue()


def gzip_bomb(zeros: int) -> bytes:
    """A tar entry of ``zeros`` zero bytes, gzip-compressed a piece at a time."""
    import tarfile
    import zlib

    header = tarfile.TarInfo("bomb")
    header.size = zeros
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    out = [compressor.compress(header.tobuf(format=tarfile.USTAR_FORMAT))]
    piece = bytes(1 << 20)
    for _ in range(zeros >> 20):
        out.append(compressor.compress(piece))
    out.append(compressor.flush())
    return b"".join(out)


def push_layers(s: Server, repo: str, tag: str, layers: list[bytes]) -> list[str]:
    _, manifest = s.push_image(repo, tag, layers)
    return [layer["digest"] for layer in manifest["layers"]]


def test_layer_file_lists_are_escaped_bounded_and_rate_limited(
    start_server: ServerFactory,
) -> None:
    s = start_server(ui={"layers": {"maxbytes": "8MiB", "perminute": 3}})
    hostile = tar_gz(
        [
            ("usr/bin/tool", b"x" * 1000),
            ("../../etc/passwd", b"root"),
            ("\x1b[31mred<script>__pwned(1)</script>", b""),
        ]
    )
    plain, garbage, bomb = push_layers(
        s, "layers/app", "1", [hostile, b"not a tar at all" * 10, gzip_bomb(64 << 20)]
    )
    browser = requests.Session()
    page = browser.get(s.url + f"/ui/r/layers/app/-/layer/{plain}")
    assert page.status_code == 200, page.text
    assert "tar+gzip" in page.text and "usr/bin/tool" in page.text
    marked = f"{PARENT_MARK}/{PARENT_MARK}/etc/passwd"
    assert f'{marked}</span> <span class="error">(outside the layer)' in page.text
    assert "\\x1b[31mred&lt;script&gt;" in page.text and "<script>__pwned" not in page.text
    page = browser.get(s.url + f"/ui/r/layers/app/-/layer/{garbage}")
    assert "This layer cannot be listed" in page.text
    # cut at the bound, with a clear message; a second view is the kept listing (no token)
    for _ in range(2):
        page = browser.get(s.url + f"/ui/r/layers/app/-/layer/{bomb}")
        assert page.status_code == 200
        assert "Listing incomplete: stopped after 8.0 MiB decompressed" in page.text
    # the fourth listing made for this visitor within the minute is refused (burst of 3)
    other = push_layers(s, "layers/app", "2", [tar_gz([("a", b"a")])])[0]
    page = browser.get(s.url + f"/ui/r/layers/app/-/layer/{other}")
    assert page.status_code == 429 and int(page.headers["Retry-After"]) >= 1
    # a blob that is not this repository's is not listed
    assert browser.get(s.url + f"/ui/r/team/none/-/layer/{plain}").status_code == 404
    s.push_image("elsewhere/app", "1")
    assert browser.get(s.url + f"/ui/r/elsewhere/app/-/layer/{plain}").status_code == 404
    # and the server goes on serving
    assert browser.get(s.url + "/ui/").status_code == 200


def test_usage_shows_quotas_and_what_the_last_collection_found(
    start_server: ServerFactory,
) -> None:
    s = start_server(quotas=[{"scope": "team/*", "limit": "1MiB"}])
    base = os.urandom(200 * 1024)
    s.push_image("team/app", "1", [base, os.urandom(100 * 1024)])
    s.push_image("team/web", "1", [base])
    page = requests.get(s.url + "/ui/usage").text
    assert "<code>team/*</code>" in page and "1.0 MiB" in page
    # what each repository alone uses, and what it shares (everyone is an administrator here)
    app = re.search(r">team/app</a></td>(.*?)</tr>", page, re.S)
    assert app is not None
    cells = re.findall(r'<td class="num">([^<]*)</td>', app.group(1))
    # tags, blobs, size, unique (its own layer, config and manifest), shared (the base layer)
    assert cells[3].startswith("100.") and cells[4] == "200.0 KiB", cells
    assert "No collection has run on this store yet" in page
    done = run_command("gc", str(s.config_path), "--dry-run")
    assert done.returncode == 0, done.stderr
    page = requests.get(s.url + "/ui/usage").text
    assert "The last dry run" in page and "found <strong>0 B</strong>" in page


def test_deletes_are_refused_on_a_read_only_server(start_server: ServerFactory) -> None:
    s = start_server()
    s.push_image("ro/app", "1")
    s.stop()
    ro = start_server(
        storage={
            "filesystem": {"rootdirectory": str(s.root)},
            "maintenance": {"readonly": {"enabled": True}},
        }
    )
    browser = requests.Session()
    r = browser.get(ro.url + "/ui/r/ro/app/-/delete", params={"tag": "1"})
    assert r.status_code == 405 and "read-only" in r.text


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("multipart/form-data", b"garbage"),
        ("multipart/form-data; boundary=x", b"--x\r\nbroken"),
        ("application/x-www-form-urlencoded", b"csrf=%ZZ&\xff\xfe"),
        ("application/x-www-form-urlencoded", b"a=" + b"x" * (2 * 1024 * 1024)),
    ],
)
def test_malformed_forms_are_refused_without_a_500(
    start_server: ServerFactory, content_type: str, body: bytes
) -> None:
    s = start_server()
    browser = requests.Session()
    browser.get(s.url + "/ui/login")
    for path in ("/ui/login", "/ui/logout", "/ui/r/any/app/-/delete"):
        r = browser.post(s.url + path, data=body, headers={"Content-Type": content_type})
        assert 400 <= r.status_code < 500, (path, r.status_code, r.text[:300])
