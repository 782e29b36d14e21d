"""Authentication and access control against a running server: htpasswd as registry:2 does it,
bearer tokens from an external issuer, and the built-in token server with access rules."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import ec

from dockyard.auth.htpasswd import hash_password
from harness import DockyardProcess, Server, ServerFactory, assert_error, session_from, sha256
from harness.certs import sign_token, token_auth, token_signer
from harness.workers import spread_over_workers


def add_user(path: Path, user: str, password: str) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "dockyard",
            "user",
            "add",
            user,
            "--file",
            str(path),
            "--password-stdin",
        ],
        input=password + "\n",
        text=True,
        check=True,
        capture_output=True,
    )


def write_users(path: Path, **users: str) -> None:
    """A quick htpasswd file (low bcrypt cost) for fixtures; the CLI is tested on its own."""
    path.write_text("".join(f"{u}:{hash_password(p, rounds=4)}\n" for u, p in users.items()))


@pytest.fixture
def htpasswd(tmp_path: Path) -> Path:
    path = tmp_path / "htpasswd"
    write_users(path, alice="secret")
    return path


@pytest.fixture
def basic(start_server: ServerFactory, htpasswd: Path) -> Server:
    return start_server(auth={"htpasswd": {"realm": "Registry", "path": str(htpasswd)}})


ALICE = ("alice", "secret")


# -- htpasswd --------------------------------------------------------------------------------


def test_every_request_needs_credentials(basic: Server) -> None:
    for method, path in [
        ("GET", ""),
        ("GET", "_catalog"),
        ("GET", "x/tags/list"),
        ("HEAD", f"x/blobs/{sha256(b'x')}"),
        ("POST", "x/blobs/uploads/"),
        ("GET", "no/such/endpoint/at/all"),
        ("PUT", "x/manifests/v1"),
    ]:
        r = requests.request(method, basic.v2(path))
        assert r.status_code == 401, (method, path)
        assert r.headers["WWW-Authenticate"] == 'Basic realm="Registry"'
        if method != "HEAD":
            assert r.json()["errors"][0]["code"] == "UNAUTHORIZED"


@pytest.mark.parametrize(
    "header",
    [
        "Basic !!!notbase64",
        "Basic " + base64.b64encode(b"no-colon").decode(),
        "Basic",
        "Bearer abc",
        "Digest x",
        "Basic " + base64.b64encode(b"\xff\xfe:x").decode(),
    ],
)
def test_malformed_authorization_is_401(basic: Server, header: str) -> None:
    r = requests.get(basic.v2(""), headers={"Authorization": header})
    assert_error(r, 401, "UNAUTHORIZED")


def test_wrong_and_right_password(basic: Server) -> None:
    assert_error(requests.get(basic.v2(""), auth=("alice", "wrong")), 401, "UNAUTHORIZED")
    assert_error(requests.get(basic.v2(""), auth=("mallory", "secret")), 401, "UNAUTHORIZED")
    r = requests.get(basic.v2(""), auth=ALICE)
    assert r.status_code == 200 and r.json() == {}


def test_push_and_pull_with_credentials(basic: Server) -> None:
    basic.session.auth = ALICE
    digest, _ = basic.push_image("team/app", "v1")
    r = requests.get(basic.v2("team/app/manifests/v1"), auth=ALICE)
    assert r.headers["Docker-Content-Digest"] == digest
    assert requests.get(basic.v2("_catalog"), auth=ALICE).json() == {"repositories": ["team/app"]}
    assert requests.delete(basic.v2(f"team/app/manifests/{digest}"), auth=ALICE).status_code == 202


def test_repeated_failures_are_throttled(basic: Server) -> None:
    for i in range(10):
        assert requests.get(basic.v2(""), auth=("alice", f"guess{i}")).status_code == 401
    r = requests.get(basic.v2(""), auth=("alice", "guess-again"))
    err = assert_error(r, 429, "TOOMANYREQUESTS")
    assert int(r.headers["Retry-After"]) > 0 and err["detail"]["retryAfter"] > 0
    # alice is locked out from this address: an X-Forwarded-For from a peer that is not a
    # trusted proxy changes nothing; other users from it are not locked (test_throttle.py
    # has the rest: other addresses, spraying, proxies, workers)
    fwd = {"X-Forwarded-For": "203.0.113.9"}
    assert requests.get(basic.v2(""), auth=("alice", "x"), headers=fwd).status_code == 429
    assert requests.get(basic.v2(""), auth=("bob", "x"), headers=fwd).status_code == 401
    # and only from this address: the guesses did not lock alice out of her own logins
    assert session_from("127.0.0.2").get(basic.v2(""), auth=ALICE).status_code == 200


@pytest.mark.slow
def test_users_can_be_added_and_removed_without_restart(basic: Server, htpasswd: Path) -> None:
    assert requests.get(basic.v2(""), auth=("bob", "pw")).status_code == 401
    add_user(htpasswd, "bob", "pw")
    time.sleep(1.2)  # the file is checked for changes once a second
    assert requests.get(basic.v2(""), auth=("bob", "pw")).status_code == 200
    subprocess.run(
        [sys.executable, "-m", "dockyard", "user", "remove", "bob", "--file", str(htpasswd)],
        check=True,
        capture_output=True,
    )
    time.sleep(1.2)
    assert requests.get(basic.v2(""), auth=("bob", "pw")).status_code == 401


def test_secrets_never_reach_the_log(basic: Server) -> None:
    requests.get(basic.v2(""), auth=("alice", "wrong-password-xyz"))
    requests.get(basic.v2(""), auth=ALICE)
    time.sleep(0.2)
    log = basic.log()
    for secret in ("wrong-password-xyz", "secret", "Authorization", "Basic "):
        assert secret not in log
    assert "user=alice" in log


@pytest.mark.slow
def test_apache_htpasswd_file_and_refusal_of_other_hashes(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    path = tmp_path / "apache"
    subprocess.run(["htpasswd", "-Bbc", str(path), "carol", "pw"], check=True, capture_output=True)
    s = start_server(auth={"htpasswd": {"realm": "R", "path": str(path)}})
    assert requests.get(s.v2(""), auth=("carol", "pw")).status_code == 200
    s.stop()
    for flag, kind in (("-m", "MD5"), ("-s", "SHA-1")):
        bad = tmp_path / f"bad{flag}"
        subprocess.run(
            ["htpasswd", "-Bbc", str(bad), "carol", "pw"], check=True, capture_output=True
        )
        subprocess.run(
            ["htpasswd", "-b", flag, str(bad), "dave", "pw"], check=True, capture_output=True
        )
        config = tmp_path / "c.yml"
        config.write_text(s.config_path.read_text().replace(str(path), str(bad)))
        result = subprocess.run(
            [sys.executable, "-m", "dockyard", "serve", str(config)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 2
        assert "auth.htpasswd.path" in result.stderr
        assert f"{bad}:2:" in result.stderr and kind in result.stderr and "dave" in result.stderr


# -- bearer tokens from an external token server (registry:2's auth.token) ----------------------


@pytest.fixture
def external(start_server: ServerFactory, tmp_path: Path) -> tuple[Server, Any]:
    key, bundle = token_signer(tmp_path)
    return start_server(auth=token_auth(bundle)), key


def token(key: Any, access: list[dict[str, Any]], **claims: Any) -> str:
    return sign_token(key, access, **claims)


def bearer(t: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {t}"}


def test_bearer_challenges_name_the_scope(external: tuple[Server, Any]) -> None:
    s, _ = external
    r = requests.get(s.v2(""))
    assert r.status_code == 401
    assert r.headers["WWW-Authenticate"] == (
        'Bearer realm="https://auth.example/token",service="registry.example"'
    )
    r = requests.post(s.v2("team/app/blobs/uploads/"))
    assert r.headers["WWW-Authenticate"].endswith('scope="repository:team/app:pull,push"')
    r = requests.get(s.v2("_catalog"))
    assert r.headers["WWW-Authenticate"].endswith('scope="registry:catalog:*"')
    r = requests.delete(s.v2("team/app/manifests/v1"))
    assert r.headers["WWW-Authenticate"].endswith('scope="repository:team/app:delete"')


def test_token_access_claims_are_enforced(external: tuple[Server, Any]) -> None:
    s, key = external
    pull_push = token(
        key, [{"type": "repository", "name": "team/app", "actions": ["pull", "push"]}]
    )
    s.session.headers.update(bearer(pull_push))
    digest, _ = s.push_image("team/app", "v1")
    assert requests.get(s.v2("team/app/tags/list"), headers=bearer(pull_push)).status_code == 200
    # right token, missing right: 403 DENIED (not 401)
    r = requests.delete(s.v2(f"team/app/manifests/{digest}"), headers=bearer(pull_push))
    assert_error(r, 403, "DENIED")
    assert_error(requests.get(s.v2("other/tags/list"), headers=bearer(pull_push)), 403, "DENIED")
    pull_only = token(key, [{"type": "repository", "name": "team/app", "actions": ["pull"]}])
    assert_error(
        requests.post(s.v2("team/app/blobs/uploads/"), headers=bearer(pull_only)), 403, "DENIED"
    )
    delete = token(key, [{"type": "repository", "name": "team/app", "actions": ["delete"]}])
    assert (
        requests.delete(s.v2(f"team/app/manifests/{digest}"), headers=bearer(delete)).status_code
        == 202
    )
    catalog = token(key, [{"type": "registry", "name": "catalog", "actions": ["*"]}])
    assert requests.get(s.v2("_catalog"), headers=bearer(catalog)).status_code == 200


def test_bad_tokens_are_401(external: tuple[Server, Any]) -> None:
    s, key = external
    access = [{"type": "repository", "name": "x", "actions": ["pull"]}]
    stranger = ec.generate_private_key(ec.SECP256R1())
    for bad in (
        token(key, access, exp=int(time.time()) - 3600),
        token(key, access, aud="someone-else"),
        token(key, access, iss="evil"),
        token(stranger, access),
        "garbage",
        token(key, access)[:-3] + "abc",
    ):
        r = requests.get(s.v2("x/tags/list"), headers=bearer(bad))
        assert_error(r, 401, "UNAUTHORIZED")
        assert 'error="invalid_token"' in r.headers["WWW-Authenticate"]


def test_mount_needs_pull_on_the_source(external: tuple[Server, Any]) -> None:
    s, key = external
    both = token(
        key,
        [
            {"type": "repository", "name": "src", "actions": ["pull", "push"]},
            {"type": "repository", "name": "dst", "actions": ["pull", "push"]},
        ],
    )
    digest = sha256(b"layer")
    r = requests.post(
        s.v2("src/blobs/uploads/"), params={"digest": digest}, data=b"layer", headers=bearer(both)
    )
    assert r.status_code == 201
    dst_only = token(key, [{"type": "repository", "name": "dst", "actions": ["pull", "push"]}])
    r = requests.post(
        s.v2("dst/blobs/uploads/"),
        params={"mount": digest, "from": "src"},
        headers=bearer(dst_only),
    )
    assert r.status_code == 202  # falls back to an upload, reveals nothing about src
    r = requests.post(
        s.v2("dst/blobs/uploads/"), params={"mount": digest, "from": "src"}, headers=bearer(both)
    )
    assert r.status_code == 201


# -- the built-in token server ----------------------------------------------------------------


ON_S3 = "DOCKYARD_TEST_S3"


@pytest.fixture
def token_server(start_server: ServerFactory, tmp_path: Path) -> Server:
    users = tmp_path / "users"
    write_users(users, admin="adminpw", bob="bobpw", carol="carolpw")
    return start_server(
        workers=2,
        auth={
            "token": {
                "service": "registry.test",
                "issuer": "dockyard-test",
                "server": {
                    "htpasswd": str(users),
                    # On S3 there is no data directory to keep a generated key in.
                    **(
                        {"key": str(tmp_path / "key.pem")}
                        if os.environ.get("DOCKYARD_TEST_S3")
                        else {}
                    ),
                    "admins": ["admin"],
                    "groups": {"team-a": ["bob"]},
                    "access": [
                        {
                            "repository": "team-a/*",
                            "groups": ["team-a"],
                            "actions": ["pull", "push"],
                        },
                        {"repository": "public/*", "anonymous": True, "actions": ["pull"]},
                        {"repository": "shared/*", "users": ["carol"], "actions": ["*"]},
                    ],
                },
            }
        },
    )


def get_token(
    s: Server, auth: tuple[str, str] | None, *scopes: str, **params: str
) -> requests.Response:
    return requests.get(
        f"{s.url}/auth/token",
        auth=auth,
        params=[("service", "registry.test"), *[("scope", x) for x in scopes], *params.items()],
    )


def token_for(s: Server, auth: tuple[str, str] | None, *scopes: str) -> dict[str, str]:
    r = get_token(s, auth, *scopes)
    assert r.status_code == 200, r.text
    return bearer(r.json()["token"])


@pytest.mark.slow
@pytest.mark.filesystem
def test_token_endpoint_protocol(token_server: Server) -> None:
    s = token_server
    r = requests.get(s.v2(""))
    assert r.headers["WWW-Authenticate"] == (
        f'Bearer realm="http://{s.host}/auth/token",service="registry.test"'
    )
    r = get_token(
        s, ("bob", "bobpw"), "repository:team-a/app:pull,push,delete", "repository:team-b/app:pull"
    )
    assert r.status_code == 200
    body = r.json()
    assert body["token"] == body["access_token"]
    assert body["expires_in"] == 300
    assert body["issued_at"].endswith("Z")
    assert body["scope"] == "repository:team-a/app:pull,push"
    assert r.headers["Cache-Control"] == "no-store"
    claims = jwt.decode(body["token"], options={"verify_signature": False})
    assert claims["sub"] == "bob" and claims["aud"] == "registry.test"
    assert claims["access"] == [
        {"type": "repository", "name": "team-a/app", "actions": ["pull", "push"]}
    ]
    assert_error(get_token(s, ("bob", "wrong")), 401, "UNAUTHORIZED")
    assert requests.get(f"{s.url}/auth/token", params={"service": "other"}).status_code == 400
    key = s.root / "dockyard/token-signing-key.pem"
    assert key.stat().st_mode & 0o777 == 0o600


@pytest.mark.slow
def test_per_repository_access(token_server: Server) -> None:
    s = token_server
    bob = token_for(
        s, ("bob", "bobpw"), "repository:team-a/app:pull,push", "repository:team-b/app:pull,push"
    )
    s.session.headers.update(bob)
    digest, _ = s.push_image("team-a/app", "v1")
    assert requests.get(s.v2("team-a/app/manifests/v1"), headers=bob).status_code == 200
    r = requests.post(s.v2("team-b/app/blobs/uploads/"), headers=bob)
    assert_error(r, 403, "DENIED")
    assert r.headers["WWW-Authenticate"] == (
        f'Bearer realm="http://{s.host}/auth/token",service="registry.test",'
        'scope="repository:team-b/app:pull,push",error="insufficient_scope"'
    )
    # delete needs the delete action, which bob does not have on team-a
    bob_delete = token_for(s, ("bob", "bobpw"), "repository:team-a/app:delete")
    assert_error(
        requests.delete(s.v2(f"team-a/app/manifests/{digest}"), headers=bob_delete), 403, "DENIED"
    )
    admin = token_for(s, ("admin", "adminpw"), "repository:team-a/app:delete")
    assert requests.delete(s.v2(f"team-a/app/manifests/{digest}"), headers=admin).status_code == 202


@pytest.mark.slow
def test_anonymous_pull_only_where_a_rule_allows(token_server: Server) -> None:
    s = token_server
    admin = token_for(
        s,
        ("admin", "adminpw"),
        "repository:public/x:pull,push",
        "repository:team-a/secret:pull,push",
    )
    s.session.headers.update(admin)
    s.push_image("public/x", "v1")
    s.push_image("team-a/secret", "v1")
    anon = token_for(s, None, "repository:public/x:pull,push", "repository:team-a/secret:pull")
    assert requests.get(s.v2("public/x/manifests/v1"), headers=anon).status_code == 200
    r = requests.post(s.v2("public/x/blobs/uploads/"), headers=anon)
    assert r.status_code == 401 and 'error="insufficient_scope"' in r.headers["WWW-Authenticate"]
    r = requests.get(s.v2("team-a/secret/manifests/v1"), headers=anon)
    assert r.status_code == 401
    assert requests.get(s.v2("public/x/manifests/v1")).status_code == 401  # no token at all


@pytest.mark.slow
def test_catalog_lists_only_what_the_caller_may_pull(token_server: Server) -> None:
    s = token_server
    admin = token_for(
        s,
        ("admin", "adminpw"),
        *(f"repository:{r}:pull,push" for r in ("team-a/app", "team-b/app", "public/x")),
    )
    s.session.headers.update(admin)
    for repo in ("team-a/app", "team-b/app", "public/x"):
        s.push_image(repo, "v1")
    listed = {}
    for user in (("admin", "adminpw"), ("bob", "bobpw"), ("carol", "carolpw")):
        t = token_for(s, user, "registry:catalog:*")
        listed[user[0]] = requests.get(s.v2("_catalog"), headers=t).json()["repositories"]
    assert listed == {
        "admin": ["public/x", "team-a/app", "team-b/app"],
        "bob": ["public/x", "team-a/app"],
        "carol": ["public/x"],
    }
    anon = get_token(s, None, "registry:catalog:*").json()
    assert anon["scope"] == ""


@pytest.mark.slow
def test_refresh_tokens_and_oauth2_post(token_server: Server, tmp_path: Path) -> None:
    s = token_server
    r = get_token(s, ("bob", "bobpw"), offline_token="true", client_id="docker")
    refresh = r.json()["refresh_token"]
    r = requests.post(
        f"{s.url}/auth/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": refresh,
            "service": "registry.test",
            "client_id": "docker",
            "scope": "repository:team-a/app:pull repository:team-b/x:pull",
        },
    )
    assert r.status_code == 200, r.text
    assert r.json()["scope"] == "repository:team-a/app:pull"
    assert (
        requests.get(
            s.v2("team-a/app/tags/list"), headers=bearer(r.json()["access_token"])
        ).status_code
        == 404
    )  # allowed, just empty
    r = requests.post(
        f"{s.url}/auth/token",
        data={
            "grant_type": "password",
            "username": "bob",
            "password": "bobpw",
            "access_type": "offline",
            "service": "registry.test",
            "scope": "repository:team-a/app:push",
        },
    )
    assert r.status_code == 200 and r.json()["refresh_token"]
    r = requests.post(
        f"{s.url}/auth/token",
        data={"grant_type": "password", "username": "bob", "password": "nope"},
    )
    assert r.status_code == 401
    r = requests.post(f"{s.url}/auth/token", data={"grant_type": "magic"})
    assert r.status_code == 400
    r = requests.post(
        f"{s.url}/auth/token", data={"grant_type": "refresh_token", "refresh_token": "forged"}
    )
    assert r.status_code == 401
    # changing the password revokes the refresh tokens issued before
    users = tmp_path / "users"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "dockyard",
            "user",
            "passwd",
            "bob",
            "--file",
            str(users),
            "--password-stdin",
        ],
        input="newpw\n",
        text=True,
        check=True,
        capture_output=True,
    )
    time.sleep(1.2)
    r = requests.post(
        f"{s.url}/auth/token", data={"grant_type": "refresh_token", "refresh_token": refresh}
    )
    assert r.status_code == 401


@pytest.mark.slow
def test_tokens_work_on_every_worker_and_after_restart(token_server: Server) -> None:
    """The built-in token server's signing key is made once, before the workers fork, and kept
    (in the data directory, or at auth.token.server.key): a token issued before a restart is
    accepted by every worker, before the restart and after it."""
    s = token_server
    assert isinstance(s, DockyardProcess)  # two workers: a process of its own
    bob = token_for(s, ("bob", "bobpw"), "repository:team-a/app:pull,push")
    s.session.headers.update(bob)
    s.push_image("team-a/app", "v1")

    def accepted_by_every_worker() -> None:
        for conn in spread_over_workers(s, 2):
            status, body = conn.get("/v2/team-a/app/tags/list", bob)
            conn.close()
            assert status == 200, body
            assert json.loads(body) == {"name": "team-a/app", "tags": ["v1"]}

    accepted_by_every_worker()
    s.restart()
    accepted_by_every_worker()
