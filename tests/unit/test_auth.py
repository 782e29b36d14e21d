"""Auth building blocks: htpasswd, throttling, scopes and policy, token verification."""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import bcrypt
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from dockyard.auth import htpasswd as htpasswd_module
from dockyard.auth.access import (
    Grants,
    Identity,
    Need,
    Policy,
    Rule,
    Scope,
    TokenGrants,
    parse_scopes,
)
from dockyard.auth.htpasswd import Htpasswd, hash_password, parse
from dockyard.auth.tokens import TokenInvalid, TokenIssuer, TokenVerifier, libtrust_kid
from dockyard.errors import ConfigError
from harness.certs import sign_token


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


# -- htpasswd ---------------------------------------------------------------------------------


def test_parse_accepts_bcrypt_variants() -> None:
    h = bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode()
    text = f"# comment\n\na:$2y${h[4:]}\nb:$2a${h[4:]}\nc:{h}\n"
    assert sorted(parse(text, "f")) == ["a", "b", "c"]


@pytest.mark.parametrize(
    ("entry", "kind"),
    [
        ("u:$apr1$abc$def", "Apache MD5"),
        ("u:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=", "SHA-1"),
        ("u:$6$salt$hash", "SHA-crypt"),
        ("u:plaintext", "crypt or plain text"),
        ("u:$2y$10$short", "malformed bcrypt"),
    ],
)
def test_parse_refuses_other_hashes_with_line(entry: str, kind: str) -> None:
    good = hash_password("x", rounds=4)
    with pytest.raises(htpasswd_module.HtpasswdError) as err:
        parse(f"ok:{good}\n{entry}\n", "/etc/htpasswd")
    assert err.value.line == 2
    assert kind in err.value.reason and "'u'" in err.value.reason
    assert str(err.value).startswith("/etc/htpasswd:2:")


def test_parse_refuses_garbage_and_duplicates() -> None:
    good = hash_password("x", rounds=4)
    with pytest.raises(htpasswd_module.HtpasswdError):
        parse("nocolon\n", "f")
    with pytest.raises(htpasswd_module.HtpasswdError) as err:
        parse(f"a:{good}\na:{good}\n", "f")
    assert "twice" in err.value.reason


def test_apache_htpasswd_files_are_read(tmp_path: Path) -> None:
    path = tmp_path / "htpasswd"
    subprocess.run(
        ["htpasswd", "-Bbc", str(path), "alice", "secret"], check=True, capture_output=True
    )
    users = Htpasswd(str(path), config_key="k")
    assert run(users.verify("alice", "secret"))
    assert not run(users.verify("alice", "wrong"))
    assert not run(users.verify("nobody", "secret"))
    path.write_text(
        path.read_text()
        + "bob:"
        + subprocess.run(
            ["htpasswd", "-nbm", "bob", "x"], check=True, capture_output=True, text=True
        ).stdout.split(":", 1)[1]
    )
    with pytest.raises(ConfigError) as err:
        Htpasswd(str(path), config_key="auth.htpasswd.path")
    assert err.value.key == "auth.htpasswd.path"
    assert f"{path}:2:" in err.value.reason and "MD5" in err.value.reason


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        Htpasswd(str(tmp_path / "nope"), config_key="auth.htpasswd.path")
    assert "cannot read" in err.value.reason


def write_users(path: Path, **users: str) -> None:
    path.write_text("".join(f"{u}:{hash_password(p, rounds=4)}\n" for u, p in users.items()))


def test_cache_avoids_bcrypt_and_never_holds_the_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "h"
    write_users(path, alice="secret")
    users = Htpasswd(str(path), cache_ttl=60, config_key="k")
    calls = []
    real = bcrypt.checkpw
    monkeypatch.setattr(
        htpasswd_module.bcrypt, "checkpw", lambda p, h: calls.append(1) or real(p, h)
    )
    for _ in range(5):
        assert run(users.verify("alice", "secret"))
    assert len(calls) == 1
    assert not run(users.verify("alice", "wrong"))  # failures are never cached
    assert len(calls) == 2
    assert b"secret" not in b"".join(users._cache)  # keys are HMACs


def test_cache_expires_and_can_be_disabled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "h"
    write_users(path, alice="secret")
    users = Htpasswd(str(path), cache_ttl=0.2, config_key="k")
    run(users.verify("alice", "secret"))
    assert users.cached("alice", "secret")
    time.sleep(0.3)
    assert not users.cached("alice", "secret")
    off = Htpasswd(str(path), cache_ttl=0, config_key="k")
    run(off.verify("alice", "secret"))
    assert not off.cached("alice", "secret")


def test_file_changes_are_picked_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(htpasswd_module, "RELOAD_CHECK_INTERVAL", 0.0)
    path = tmp_path / "h"
    write_users(path, alice="one")
    users = Htpasswd(str(path), config_key="k")
    assert run(users.verify("alice", "one"))
    write_users(path, alice="two", bob="b")
    assert not run(users.verify("alice", "one"))  # cache dropped with the old file
    assert run(users.verify("alice", "two")) and run(users.verify("bob", "b"))
    path.write_text("alice:$apr1$broken\n")  # a bad edit keeps the previous users
    assert run(users.verify("bob", "b"))


# -- scopes and policy ------------------------------------------------------------------------


def test_scope_parsing() -> None:
    assert Scope.parse("repository:team/app:pull,push") == Scope(
        "repository", "team/app", ("pull", "push")
    )
    assert Scope.parse("repository(plugin):x:pull") == Scope("repository", "x", ("pull",))
    assert Scope.parse("registry:catalog:*") == Scope("registry", "catalog", ("*",))
    assert Scope.parse("nonsense") is None
    assert parse_scopes(["repository:a:pull repository:b:push", "bad"]) == [
        Scope("repository", "a", ("pull",)),
        Scope("repository", "b", ("push",)),
    ]


POLICY = Policy(
    rules=(
        Rule("team-a/*", frozenset({"pull", "push"}), groups=frozenset({"team-a"})),
        Rule("public/*", frozenset({"pull"}), anonymous=True),
        Rule("shared", frozenset({"*"}), users=frozenset({"carol"})),
        Rule("docs/*", frozenset({"pull"}), users=frozenset({"*"})),
    ),
    groups={"team-a": frozenset({"bob"})},
    admins=frozenset({"root"}),
)


@pytest.mark.parametrize(
    ("user", "repo", "actions"),
    [
        ("bob", "team-a/app", {"pull", "push"}),
        ("bob", "team-a/deep/app", {"pull", "push"}),
        ("bob", "team-b/app", set()),
        ("bob", "public/x", {"pull"}),
        (None, "public/x", {"pull"}),
        (None, "team-a/app", set()),
        ("carol", "shared", {"pull", "push", "delete"}),
        ("carol", "docs/x", {"pull"}),
        (None, "docs/x", set()),
        ("root", "anything/at/all", {"pull", "push", "delete"}),
    ],
)
def test_policy(user: str | None, repo: str, actions: set[str]) -> None:
    assert POLICY.allowed(user, repo) == actions


def test_policy_grants_part_of_a_scope() -> None:
    assert POLICY.grant(
        "bob", Scope("repository", "team-a/x", ("pull", "push", "delete"))
    ) == Scope("repository", "team-a/x", ("pull", "push"))
    assert POLICY.grant("bob", Scope("repository", "team-b/x", ("pull",))) is None
    assert POLICY.grant("bob", Scope("registry", "catalog", ("*",))) is not None
    assert POLICY.grant(None, Scope("registry", "catalog", ("*",))) is None


def test_identities() -> None:
    token = TokenGrants((Scope("repository", "a", ("pull",)),), "bob", POLICY)
    who = Identity("bob", token)
    assert who.allows(Need.PULL, "a") and not who.allows(Need.PUSH, "a")
    assert who.allows(Need.AUTHENTICATED, None)
    assert who.lists("team-a/x") and not who.lists("team-b/x")
    everyone = Identity(None, Grants())
    assert everyone.allows(Need.DELETE, "x") and everyone.lists("x")


# -- tokens ----------------------------------------------------------------------------------------


def self_signed(
    key: Any, name: str = "token-root", issuer: tuple[Any, Any] | None = None, days: int = 30
) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, signing_key = (issuer[0].subject, issuer[1]) if issuer else (subject, key)
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
        .sign(signing_key, hashes.SHA256())
    )


def make_token(key: Any, alg: str, headers: dict[str, Any], **claims: Any) -> str:
    access = [{"type": "repository", "name": "a/b", "actions": ["pull", "push"]}]
    return sign_token(key, access, algorithm=alg, headers=headers, **claims)


def bundle(tmp_path: Path, *certs: x509.Certificate) -> str:
    path = tmp_path / "bundle.pem"
    path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs))
    return str(path)


def test_libtrust_kid_format() -> None:
    kid = libtrust_kid(ec.generate_private_key(ec.SECP256R1()).public_key())
    groups = kid.split(":")
    assert len(groups) == 12 and all(len(g) == 4 for g in groups)


@pytest.mark.parametrize("kind", ["rsa", "ec"])
def test_tokens_signed_by_a_root_key(tmp_path: Path, kind: str) -> None:
    key = (
        rsa.generate_private_key(65537, 2048)
        if kind == "rsa"
        else ec.generate_private_key(ec.SECP256R1())
    )
    alg = "RS256" if kind == "rsa" else "ES256"
    verifier = TokenVerifier.from_files(
        issuer="auth.example",
        service="registry.example",
        rootcertbundle=bundle(tmp_path, self_signed(key)),
        jwks="",
    )
    good = make_token(key, alg, {"kid": libtrust_kid(key.public_key())})
    verified = verifier.verify(good)
    assert verified.subject == "bob"
    assert verified.access == (Scope("repository", "a/b", ("pull", "push")),)
    kid = {"kid": libtrust_kid(key.public_key())}
    for bad, reason in [
        (make_token(key, alg, kid, aud="other"), "audience"),
        (make_token(key, alg, kid, iss="other"), "issuer"),
        (make_token(key, alg, kid, exp=int(time.time()) - 600), "expired"),
        (make_token(key, alg, kid, nbf=int(time.time()) + 600), "not yet valid"),
        (make_token(key, alg, {"kid": "UNKN:OWN0"}), "unknown key"),
        (make_token(key, alg, {}), "no key"),
        (good[:-4] + ("AAAA" if not good.endswith("AAAA") else "BBBB"), "ignature"),
        ("not.a.token", "malformed"),
    ]:
        with pytest.raises(TokenInvalid) as err:
            verifier.verify(bad)
        assert reason.lower() in str(err.value).lower(), (reason, err.value)
    other = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(TokenInvalid):  # a different key claiming the trusted kid
        verifier.verify(make_token(other, "ES256", kid))
    unsigned = jwt.encode(
        {"iss": "auth.example", "aud": "registry.example", "exp": 2**31}, key=None, algorithm="none"
    )
    with pytest.raises(TokenInvalid):
        verifier.verify(unsigned)


def test_tokens_with_x5c_chain(tmp_path: Path) -> None:
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = self_signed(root_key)
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = self_signed(leaf_key, "leaf", issuer=(root, root_key))
    verifier = TokenVerifier.from_files(
        issuer="auth.example",
        service="registry.example",
        rootcertbundle=bundle(tmp_path, root),
        jwks="",
    )
    x5c = [base64.b64encode(leaf.public_bytes(serialization.Encoding.DER)).decode()]
    assert verifier.verify(make_token(leaf_key, "ES256", {"x5c": x5c})).subject == "bob"
    stranger_key = ec.generate_private_key(ec.SECP256R1())
    stranger = self_signed(stranger_key, "stranger")
    x5c_bad = [base64.b64encode(stranger.public_bytes(serialization.Encoding.DER)).decode()]
    with pytest.raises(TokenInvalid):
        verifier.verify(make_token(stranger_key, "ES256", {"x5c": x5c_bad}))


def test_tokens_from_jwks(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    jwk["kid"] = "key-1"
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
    verifier = TokenVerifier.from_files(
        issuer="auth.example",
        service="registry.example",
        rootcertbundle="",
        jwks=str(tmp_path / "jwks.json"),
    )
    assert verifier.verify(make_token(key, "ES256", {"kid": "key-1"})).subject == "bob"


def test_bad_key_files_are_config_errors(tmp_path: Path) -> None:
    (tmp_path / "bad.pem").write_text("nope")
    with pytest.raises(ConfigError) as err:
        TokenVerifier.from_files(
            issuer="i", service="s", rootcertbundle=str(tmp_path / "bad.pem"), jwks=""
        )
    assert err.value.key == "auth.token.rootcertbundle"
    with pytest.raises(ConfigError):
        TokenVerifier.from_files(issuer="i", service="s", rootcertbundle="", jwks="")


def test_issued_tokens_verify() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    issuer = TokenIssuer(key, issuer="dockyard", service="svc", expiration=60)
    token, expires_in, _ = issuer.issue("bob", [Scope("repository", "x", ("pull",))])
    verifier = TokenVerifier(
        issuer="dockyard", service="svc", roots=[], keys={issuer.kid: key.public_key()}
    )
    verified = verifier.verify(token)
    assert verified.subject == "bob" and expires_in == 60
    anonymous, _, _ = issuer.issue(None, [])
    assert verifier.verify(anonymous).subject is None
