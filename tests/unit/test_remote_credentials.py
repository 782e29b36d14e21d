"""The CLI's remote mode without a server: docker's credentials (``config.json``, ``credsStore``,
``credHelpers`` with a fake ``docker-credential-fake`` on PATH), challenges, URLs."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import click
import pytest

from dockyard.api.v1.common import ROOT
from dockyard.cli.credentials import (
    CredentialsError,
    config_dir,
    lookup,
    registry_host,
)
from dockyard.cli.remote import API_ROOT, RemoteClient, normalize_url, parse_challenge

HOST = "reg.example.com:5000"


def auth(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture
def docker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty DOCKER_CONFIG, and a directory on PATH for helpers."""
    directory = tmp_path / "docker"
    directory.mkdir()
    monkeypatch.setenv("DOCKER_CONFIG", str(directory))
    helpers = tmp_path / "bin"
    helpers.mkdir()
    monkeypatch.setenv("PATH", f"{helpers}{os.pathsep}{os.environ['PATH']}")
    return directory


def write_config(directory: Path, config: object) -> None:
    (directory / "config.json").write_text(json.dumps(config))


def fake_helper(docker: Path, name: str, script: str) -> Path:
    """``docker-credential-<name>``: ``script`` runs with the server read into $server; it logs
    what it was asked to ``asked`` beside itself."""
    path = docker.parent / "bin" / f"docker-credential-{name}"
    log = path.with_suffix(".asked")
    path.write_text(f'#!/bin/sh\nread server\necho "$1 $server" >> {log}\n{script}\n')
    path.chmod(0o755)
    return log


def answer(user: str, secret: str) -> str:
    body = json.dumps({"ServerURL": "x", "Username": user, "Secret": secret})
    return f"echo '{body}'"


def test_auths_entry_base64(docker: Path) -> None:
    write_config(docker, {"auths": {HOST: {"auth": auth("alice", "pw:with:colons")}}})
    found = lookup(f"https://{HOST}")
    assert found is not None and not found.identity_token
    assert (found.username, found.secret) == ("alice", "pw:with:colons")
    assert "auths" in found.source and "pw" not in repr(found)  # never printed
    # the key may be written as a URL, in any case, with a path
    write_config(docker, {"auths": {"https://REG.example.com:5000/v2/": {"auth": auth("a", "b")}}})
    assert lookup(HOST) is not None
    assert lookup("reg.example.com") is None  # another port is another registry
    assert lookup("other.example.com:5000") is None


def test_identity_token_and_older_fields(docker: Path) -> None:
    write_config(
        docker, {"auths": {HOST: {"auth": auth("alice", ""), "identitytoken": "refresh-me"}}}
    )
    found = lookup(HOST)
    assert found is not None and found.identity_token and found.secret == "refresh-me"
    write_config(docker, {"auths": {HOST: {"username": "bob", "password": "pw"}}})
    found = lookup(HOST)
    assert found is not None and (found.username, found.secret) == ("bob", "pw")
    write_config(docker, {"auths": {HOST: {}}})  # what credsStore leaves in the file
    assert lookup(HOST) is None


def test_creds_store_helper(docker: Path) -> None:
    asked = fake_helper(docker, "fake", answer("carol", "from-store"))
    write_config(docker, {"credsStore": "fake", "auths": {HOST: {}}})
    found = lookup(f"https://{HOST}/some/path")
    assert found is not None and (found.username, found.secret) == ("carol", "from-store")
    assert "docker-credential-fake" in found.source
    assert asked.read_text() == f"get {HOST}\n"  # the host on stdin, as docker asks


def test_cred_helpers_come_before_the_store_and_the_file(docker: Path) -> None:
    fake_helper(docker, "store", answer("from", "store"))
    fake_helper(docker, "fake", answer("<token>", "identity"))
    write_config(
        docker,
        {
            "credsStore": "store",
            "credHelpers": {HOST: "fake"},
            "auths": {HOST: {"auth": auth("file", "pw")}},
        },
    )
    found = lookup(HOST)
    assert found is not None and found.identity_token and found.secret == "identity"
    assert found.username == ""
    elsewhere = lookup("elsewhere.example.com")  # the store, for other hosts
    assert elsewhere is not None and elsewhere.username == "from"


def test_a_helper_without_credentials_falls_back_to_the_file(docker: Path) -> None:
    asked = fake_helper(docker, "fake", 'echo "credentials not found in native keychain"\nexit 1')
    write_config(docker, {"credHelpers": {HOST: "fake"}})
    assert lookup(HOST) is None
    assert asked.read_text().splitlines() == [f"get {HOST}", f"get https://{HOST}"]
    write_config(docker, {"credHelpers": {HOST: "fake"}, "auths": {HOST: {"auth": auth("a", "b")}}})
    found = lookup(HOST)
    assert found is not None and found.username == "a"


@pytest.mark.parametrize(
    ("config", "helper", "message"),
    [
        ({"credsStore": "missing"}, None, "docker-credential-missing (named by credsStore"),
        ({"credsStore": "fake"}, 'echo "keychain locked" >&2\nexit 1', "keychain locked"),
        ({"credsStore": "fake"}, "echo not-json", "not credentials"),
        ({"auths": {HOST: {"auth": "!!!"}}}, None, "not base64"),
        ({"auths": {HOST: {"auth": base64.b64encode(b"nocolon").decode()}}}, None, "not base64"),
    ],
)
def test_broken_configuration_is_said(
    docker: Path, config: dict, helper: str | None, message: str
) -> None:
    if helper is not None:
        fake_helper(docker, "fake", helper)
    write_config(docker, config)
    with pytest.raises(CredentialsError, match=message.replace("(", r"\(")):
        lookup(HOST)


def test_config_file_itself(docker: Path) -> None:
    assert lookup(HOST) is None  # no config.json: anonymous
    (docker / "config.json").write_text("{not json")
    with pytest.raises(CredentialsError, match="not JSON"):
        lookup(HOST)
    (docker / "config.json").write_text("[]")
    with pytest.raises(CredentialsError, match="not a JSON object"):
        lookup(HOST)
    (docker / "config.json").write_text("")
    assert lookup(HOST) is None


def test_docker_config_directory() -> None:
    assert config_dir({"DOCKER_CONFIG": "/etc/d"}) == Path("/etc/d")
    assert config_dir({"HOME": "/home/x"}) == Path("/home/x/.docker")
    assert registry_host("HTTPS://Reg.Example.com:443/v2/") == "reg.example.com:443"
    assert registry_host("reg.example.com") == "reg.example.com"


def test_challenges_and_urls() -> None:
    assert parse_challenge(
        'Bearer realm="https://a/auth/token",service="registry.test",'
        'scope="repository:team/app:pull,delete",error="insufficient_scope"'
    ) == (
        "bearer",
        {
            "realm": "https://a/auth/token",
            "service": "registry.test",
            "scope": "repository:team/app:pull,delete",
            "error": "insufficient_scope",
        },
    )
    assert parse_challenge('Basic realm="R"') == ("basic", {"realm": "R"})
    assert parse_challenge("") is None
    assert normalize_url("reg.example.com/") == "https://reg.example.com"
    assert normalize_url("http://127.0.0.1:5000/prefix/") == "http://127.0.0.1:5000/prefix"
    with pytest.raises(click.BadParameter):
        normalize_url("ftp://x")
    client = RemoteClient("https://reg.example.com/prefix", None)
    assert client.api_url("/repositories", {"n": 5, "q": None}) == (
        "https://reg.example.com/prefix/dockyard/api/v1/repositories?n=5"
    )
    assert (
        client.api_url(f"{API_ROOT}/usage")
        == "https://reg.example.com/prefix/dockyard/api/v1/usage"
    )
    assert API_ROOT == ROOT  # the client's copy of the server's root
