"""Authentication end to end with real clients.

- htpasswd (Basic) with the Docker engine: no credentials, a wrong password, ``docker login``,
  push, pull, ``docker logout``.
- The built-in token server (Bearer tokens, access rules per repository) with the Docker engine
  (whose ``docker login`` stores a refresh token), podman, skopeo (``--creds``, anonymous
  inspect, ``skopeo delete`` with and without the delete right) and oras-py.

Users live in one htpasswd file per module, written both by ``dockyard user add`` and (when
installed) Apache's ``htpasswd -B``. Every test starts its own Dockyard.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import requests

from harness import DOCKER_MANIFEST, OCI_MANIFEST, Server, ServerFactory, sha256
from harness.dockyard import add_user
from harness.images import BuiltImage, build_busybox_image

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

SERVICE = "registry.test"
PASSWORDS = {
    "alice": "alice-S3cret!",
    "bob": "bob-pa55 word",  # a space: credentials must survive Basic encoding as they are
    "carol": "carol-p@ss:colon",  # a colon after the first one belongs to the password
    "admin": "admin-0f-all",
}
ACCEPT = ", ".join(
    [
        DOCKER_MANIFEST,
        "application/vnd.docker.distribution.manifest.list.v2+json",
        OCI_MANIFEST,
        "application/vnd.oci.image.index.v1+json",
    ]
)
_PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


def _need(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.skip(f"{binary} is not installed")
    return path


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.lower() not in _PROXY_VARS}
    return {**env, **extra}


def _output(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


# -- module-wide fixtures: users and one image ----------------------------------------------------


@dataclass(frozen=True)
class Users:
    path: Path
    passwords: dict[str, str]


@pytest.fixture(scope="module")
def users(tmp_path_factory: pytest.TempPathFactory) -> Users:
    """alice and admin added with ``dockyard user add``; bob and carol with Apache's
    ``htpasswd -B`` when it is installed (else with dockyard as well)."""
    path = tmp_path_factory.mktemp("users") / "htpasswd"
    apache = shutil.which("htpasswd")
    for name, password in PASSWORDS.items():
        if apache is not None and name in ("bob", "carol"):
            line = subprocess.run(
                [apache, "-Bbn", name, password], capture_output=True, text=True, check=True
            ).stdout.strip()
            with path.open("a") as f:
                f.write(line + "\n")
            continue
        add_user(path, name, password)
    listed = subprocess.run(
        [sys.executable, "-m", "dockyard", "user", "list", "--file", str(path)],
        capture_output=True,
        text=True,
    )
    assert listed.returncode == 0, _output(listed)
    assert sorted(listed.stdout.split()) == sorted(PASSWORDS)
    return Users(path, dict(PASSWORDS))


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    return build_busybox_image(tmp_path_factory.mktemp("image") / "busybox.tar")


def htpasswd_auth(users: Users) -> dict[str, Any]:
    return {"htpasswd": {"realm": "Registry", "path": str(users.path)}}


def token_auth(users: Users) -> dict[str, Any]:
    return {
        "token": {
            "service": SERVICE,
            "issuer": "dockyard-test",
            "server": {
                "htpasswd": str(users.path),
                "admins": ["admin"],
                "groups": {"team-a": ["bob"]},
                "access": [
                    {"repository": "team-a/*", "groups": ["team-a"], "actions": ["pull", "push"]},
                    {"repository": "public/*", "anonymous": True, "actions": ["pull"]},
                    {
                        "repository": "shared/*",
                        "users": ["carol"],
                        "actions": ["pull", "push", "delete"],
                    },
                ],
            },
        }
    }


def token(server: Server, user: str | None, password: str | None, scope: str) -> str:
    """A token from the built-in token server, for checks made over plain HTTP."""
    r = requests.get(
        server.url + "/auth/token",
        params={"service": SERVICE, "scope": scope},
        auth=(user, password) if user is not None and password is not None else None,
        timeout=10,
    )
    assert r.status_code == 200, r.text
    return r.json()["token"]


def registry_get(server: Server, path: str, bearer: str) -> requests.Response:
    return requests.get(
        server.v2(path),
        headers={"Authorization": f"Bearer {bearer}", "Accept": ACCEPT},
        timeout=10,
    )


def assert_clean_log(server: Server) -> None:
    log = server.log()
    assert "Traceback" not in log, log[-6000:]
    for password in PASSWORDS.values():
        assert password not in log, "a password was written to the server log"


# -- Docker engine helpers ------------------------------------------------------------------------


def _pushed_digest(output: str, tag: str) -> str:
    match = re.search(rf"^{re.escape(tag)}: digest: (sha256:[0-9a-f]{{64}}) size: \d+$", output,
                      re.MULTILINE)  # fmt: skip
    assert match, f"no digest line in docker push output:\n{output}"
    return match[1]


def _docker_config(dockerd: Any) -> dict[str, Any]:
    path = Path(dockerd.env["DOCKER_CONFIG"]) / "config.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _docker_login(dockerd: Any, host: str, user: str, password: str, check: bool = True) -> Any:
    return dockerd.docker(
        "login", "-u", user, "--password-stdin", host, input=password.encode(), check=check
    )


def _docker_load(dockerd: Any, image: BuiltImage) -> None:
    loaded = dockerd.docker("load", "-i", str(image.path))
    assert image.repo_tag in loaded.stdout, loaded.stdout


def _docker_repo_digests(dockerd: Any, ref: str) -> list[str]:
    (info,) = json.loads(dockerd.docker("image", "inspect", ref).stdout)
    return info["RepoDigests"]


def _docker_remove(dockerd: Any, image: BuiltImage, *refs: str) -> None:
    """Remove ``refs`` and the loaded tag; the image must then be gone from the engine."""
    dockerd.docker("rmi", *refs)
    dockerd.docker("rmi", image.repo_tag, check=False)  # absent after a pull
    gone = dockerd.docker("image", "inspect", image.image_id, check=False)
    assert gone.returncode != 0, f"image still present after rmi:\n{gone.stdout}"


def _docker_failure(result: subprocess.CompletedProcess[str], server: Server) -> str:
    assert result.returncode != 0, _output(result) + f"\n--- dockyard log ---\n{server.log()}"
    return result.stdout + result.stderr


# -- 1. htpasswd with the Docker engine ------------------------------------------------------------


def test_docker_htpasswd_login_push_pull(
    dockerd: Any, registry_port: int, start_server: ServerFactory, users: Users, image: BuiltImage
) -> None:
    server = start_server(port=registry_port, workers=2, auth=htpasswd_auth(users))
    host = server.host
    ref = f"{host}/e2e/private:v1"
    _docker_load(dockerd, image)
    dockerd.docker("tag", image.repo_tag, ref)

    # No credentials: the registry's Basic challenge reaches the user.
    r = requests.get(server.v2(""), timeout=10)
    assert r.status_code == 401
    assert r.headers["WWW-Authenticate"] == 'Basic realm="Registry"'
    out = _docker_failure(dockerd.docker("push", ref, check=False), server)
    assert "no basic auth credentials" in out, out

    # A wrong password is refused, and nothing is stored.
    out = _docker_failure(
        _docker_login(dockerd, host, "alice", "not-" + users.passwords["alice"], check=False),
        server,
    )
    assert "unauthorized" in out.lower(), out
    assert host not in _docker_config(dockerd).get("auths", {})

    login = _docker_login(dockerd, host, "alice", users.passwords["alice"])
    assert "Login Succeeded" in login.stdout, _output(login)
    assert host in _docker_config(dockerd)["auths"]

    push = dockerd.docker("push", ref)
    digest = _pushed_digest(push.stdout, "v1")
    _docker_remove(dockerd, image, ref)  # gone locally: the pull must fetch every blob
    pull = dockerd.docker("pull", ref)
    assert f"Digest: {digest}" in pull.stdout, pull.stdout
    assert _docker_repo_digests(dockerd, ref) == [f"{host}/e2e/private@{digest}"]
    r = requests.get(
        server.v2(f"e2e/private/manifests/{digest}"),
        auth=("alice", users.passwords["alice"]),
        headers={"Accept": ACCEPT},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    assert sha256(r.content) == digest

    logout = dockerd.docker("logout", host)
    assert "Removing login credentials" in logout.stdout, _output(logout)
    assert host not in _docker_config(dockerd).get("auths", {})
    _docker_remove(dockerd, image, ref)
    out = _docker_failure(dockerd.docker("pull", ref, check=False), server)
    assert "no basic auth credentials" in out, out
    assert_clean_log(server)


# -- 2. the token server with the Docker engine ----------------------------------------------------


def test_docker_token_server(
    dockerd: Any, registry_port: int, start_server: ServerFactory, users: Users, image: BuiltImage
) -> None:
    server = start_server(port=registry_port, workers=2, auth=token_auth(users))
    host = server.host
    public, team_a, team_b = (
        f"{host}/{name}:v1" for name in ("public/x", "team-a/app", "team-b/app")
    )
    _docker_load(dockerd, image)
    for ref in (public, team_a, team_b):
        dockerd.docker("tag", image.repo_tag, ref)

    r = requests.get(server.v2("team-a/app/tags/list"), timeout=10)
    assert r.status_code == 401
    assert r.headers["WWW-Authenticate"] == (
        f'Bearer realm="{server.url}/auth/token",service="{SERVICE}",'
        'scope="repository:team-a/app:pull"'
    )

    # Anonymous push is refused.
    out = _docker_failure(dockerd.docker("push", team_a, check=False), server)
    assert "denied" in out or "unauthorized" in out, out

    # A wrong password is refused.
    out = _docker_failure(_docker_login(dockerd, host, "bob", "wrong", check=False), server)
    assert "unauthorized" in out.lower(), out
    assert host not in _docker_config(dockerd).get("auths", {})

    # An admin publishes public/x.
    _docker_login(dockerd, host, "admin", users.passwords["admin"])
    public_digest = _pushed_digest(dockerd.docker("push", public).stdout, "v1")
    dockerd.docker("logout", host)

    # bob: login (the engine keeps the token server's refresh token, not the password).
    login = _docker_login(dockerd, host, "bob", users.passwords["bob"])
    assert "Login Succeeded" in login.stdout, _output(login)
    stored = _docker_config(dockerd)["auths"][host]
    assert stored.get("identitytoken"), stored

    digest = _pushed_digest(dockerd.docker("push", team_a).stdout, "v1")
    out = _docker_failure(dockerd.docker("push", team_b, check=False), server)
    assert "denied" in out, out
    admin = token(server, "admin", users.passwords["admin"], "repository:team-b/app:pull")
    assert registry_get(server, "team-b/app/manifests/v1", admin).status_code == 404

    _docker_remove(dockerd, image, public, team_a, team_b)
    pull = dockerd.docker("pull", team_a)
    assert f"Digest: {digest}" in pull.stdout, pull.stdout
    assert _docker_repo_digests(dockerd, team_a) == [f"{host}/team-a/app@{digest}"]

    dockerd.docker("logout", host)
    assert host not in _docker_config(dockerd).get("auths", {})

    # Anonymous: public/x may be pulled, team-a/app may not.
    _docker_remove(dockerd, image, team_a)
    pull = dockerd.docker("pull", public)
    assert f"Digest: {public_digest}" in pull.stdout, pull.stdout
    assert _docker_repo_digests(dockerd, public) == [f"{host}/public/x@{public_digest}"]
    _docker_remove(dockerd, image, public)
    out = _docker_failure(dockerd.docker("pull", team_a, check=False), server)
    assert "denied" in out or "unauthorized" in out, out
    assert_clean_log(server)


# -- 3. the token server with podman ---------------------------------------------------------------


@pytest.fixture
def podman(tmp_path: Path) -> Iterator[Any]:
    binary = _need("podman")
    base = tmp_path / "podman"
    (base / "root").mkdir(parents=True)
    (base / "run").mkdir()
    storage = base / "storage.conf"
    storage.write_text(
        f'[storage]\ndriver = "vfs"\ngraphroot = "{base / "root"}"\nrunroot = "{base / "run"}"\n'
    )
    conf = base / "containers.conf"
    conf.write_text('[engine]\nevents_logger = "none"\n')
    env = _clean_env(
        CONTAINERS_STORAGE_CONF=str(storage),
        CONTAINERS_CONF=str(conf),
        REGISTRY_AUTH_FILE=str(base / "auth.json"),
        TMPDIR=str(base),
    )

    def run(*args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [binary, *args], env=env, input=input, capture_output=True, text=True, timeout=120
        )

    run.auth_file = base / "auth.json"  # type: ignore[attr-defined]
    yield run
    run("rmi", "--all", "--force")


def test_podman_token_server(
    podman: Any, start_server: ServerFactory, users: Users, image: BuiltImage
) -> None:
    server = start_server(workers=2, auth=token_auth(users))
    host = server.host

    def ok(*args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        result = podman(*args, input=input)
        assert result.returncode == 0, f"podman {' '.join(args)}\n{_output(result)}\n" + (
            f"--- dockyard log ---\n{server.log()[-6000:]}"
        )
        return result

    loaded = ok("load", "-i", str(image.path))
    assert image.repo_tag in loaded.stdout + loaded.stderr, _output(loaded)

    wrong = podman("login", "--tls-verify=false", "-u", "bob", "--password-stdin", host,
                   input="wrong\n")  # fmt: skip
    assert wrong.returncode != 0, _output(wrong)
    ok("login", "--tls-verify=false", "-u", "bob", "--password-stdin", host,
       input=users.passwords["bob"] + "\n")  # fmt: skip
    assert host in json.loads(podman.auth_file.read_text())["auths"]

    team_a = f"{host}/team-a/app:podman"
    ok("tag", image.repo_tag, team_a)
    ok("push", "--tls-verify=false", team_a)
    ok("rmi", team_a)
    ok("pull", "--tls-verify=false", team_a)
    (info,) = json.loads(ok("image", "inspect", team_a).stdout)
    assert info["Id"] == image.image_id.removeprefix("sha256:")

    team_b = f"{host}/team-b/app:podman"
    ok("tag", image.repo_tag, team_b)
    denied = podman("push", "--tls-verify=false", team_b)
    assert denied.returncode != 0, _output(denied)
    # The first refused request is a HEAD (no body to carry DENIED): 403 is what podman reports.
    assert "denied" in denied.stderr or "403 (Forbidden)" in denied.stderr, _output(denied)

    ok("logout", host)
    assert host not in json.loads(podman.auth_file.read_text()).get("auths", {})
    assert_clean_log(server)


# -- 4. the token server with skopeo ---------------------------------------------------------------


def test_skopeo_token_server(
    start_server: ServerFactory, users: Users, image: BuiltImage, tmp_path: Path
) -> None:
    binary = _need("skopeo")
    server = start_server(workers=2, auth=token_auth(users))
    host = server.host
    # An empty auth file: no credentials but the ones given on the command line.
    auth_file = tmp_path / "auth.json"
    auth_file.write_text('{"auths": {}}')
    env = _clean_env(REGISTRY_AUTH_FILE=str(auth_file), TMPDIR=str(tmp_path))

    def skopeo(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([binary, *args], env=env, capture_output=True, text=True, timeout=120)

    def ok(*args: str) -> subprocess.CompletedProcess[str]:
        result = skopeo(*args)
        assert result.returncode == 0, f"skopeo {' '.join(args)}\n{_output(result)}\n" + (
            f"--- dockyard log ---\n{server.log()[-6000:]}"
        )
        return result

    def creds(user: str) -> str:
        return f"{user}:{users.passwords[user]}"

    def copy(user: str, dest: str) -> subprocess.CompletedProcess[str]:
        return skopeo("copy", "--dest-tls-verify=false", "--dest-creds", creds(user),
                      f"docker-archive:{image.path}", f"docker://{host}/{dest}")  # fmt: skip

    def inspect(ref: str, user: str | None = None) -> subprocess.CompletedProcess[str]:
        auth = ["--creds", creds(user)] if user else ["--no-creds"]
        return skopeo("inspect", "--tls-verify=false", *auth, f"docker://{host}/{ref}")

    # bob pushes to team-a and may read it back; team-b is denied.
    pushed = copy("bob", "team-a/app:v1")
    assert pushed.returncode == 0, _output(pushed)
    info = json.loads(ok("inspect", "--tls-verify=false", "--creds", creds("bob"),
                         f"docker://{host}/team-a/app:v1").stdout)  # fmt: skip
    digest = info["Digest"]
    denied = copy("bob", "team-b/app:v1")
    assert denied.returncode != 0, _output(denied)
    # The first refused request is a HEAD (no body to carry DENIED): skopeo reports the 403.
    assert "denied" in denied.stderr or "403 (Forbidden)" in denied.stderr, _output(denied)

    # Anonymous reads of public/*, after an admin pushed there.
    pushed = copy("admin", "public/x")  # :latest
    assert pushed.returncode == 0, _output(pushed)
    public = json.loads(ok("inspect", "--tls-verify=false", f"docker://{host}/public/x").stdout)
    assert public["Digest"] == digest  # the same image, pushed the same way
    anonymous = inspect("team-a/app:v1")
    assert anonymous.returncode != 0, _output(anonymous)

    # bob has no delete right on team-a: refused, the image stays.
    refused = skopeo("delete", "--tls-verify=false", "--creds", creds("bob"),
                     f"docker://{host}/team-a/app:v1")  # fmt: skip
    assert refused.returncode != 0, _output(refused)
    assert "denied" in refused.stderr.lower() or "unauthorized" in refused.stderr.lower(), _output(
        refused
    )
    assert inspect("team-a/app:v1", "bob").returncode == 0

    # carol may delete on shared/*.
    pushed = copy("carol", "shared/x:v1")
    assert pushed.returncode == 0, _output(pushed)
    assert json.loads(inspect("shared/x:v1", "carol").stdout)["Digest"] == digest
    ok("delete", "--tls-verify=false", "--creds", creds("carol"), f"docker://{host}/shared/x:v1")
    gone = inspect("shared/x:v1", "carol")
    assert gone.returncode != 0, _output(gone)
    assert "manifest unknown" in gone.stderr, _output(gone)
    carol = token(server, "carol", users.passwords["carol"], "repository:shared/x:pull")
    assert registry_get(server, f"shared/x/manifests/{digest}", carol).status_code == 404
    assert_clean_log(server)


# -- 5. the token server with oras-py --------------------------------------------------------------


def test_oras_token_server(
    start_server: ServerFactory, users: Users, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    oras_client = pytest.importorskip("oras.client", reason="oras-py is not installed")
    import oras.decorator

    # oras-py retries a failed request five times, sleeping 3 to 83 s in between; the expected
    # denial (and any failure) should not take two minutes.
    monkeypatch.setattr(oras.decorator, "time", SimpleNamespace(sleep=lambda seconds: None))
    server = start_server(workers=2, auth=token_auth(users))
    host = server.host
    artifact = tmp_path / "artifact.txt"
    artifact.write_text("an artifact for team-a\n")

    def client(user: str) -> Any:
        c = oras_client.OrasClient(hostname=host, insecure=True)  # auth_backend="token"
        c.session.trust_env = False
        c.auth.set_basic_auth(user, users.passwords[user])
        return c

    def push(user: str, target: str) -> requests.Response:
        return client(user).push(
            target=target, files=[str(artifact)], disable_path_validation=True, quiet=True
        )

    # oras-py asks for the scope of each challenge: first pull (HEAD blob), then, when the
    # upload is refused, a token with pull,push.
    try:
        pushed = push("bob", f"{host}/team-a/art:v1")
    except ValueError as exc:
        pytest.fail(f"oras-py push to team-a as bob failed: {exc}\n--- dockyard log ---\n"
                    f"{server.log()[-6000:]}")  # fmt: skip
    assert pushed.status_code == 201, pushed.text
    out = tmp_path / "out"
    files = client("bob").pull(target=f"{host}/team-a/art:v1", outdir=str(out))
    assert [Path(f).name for f in files] == ["artifact.txt"]
    assert (out / "artifact.txt").read_text() == artifact.read_text()

    with pytest.raises(ValueError):
        push("bob", f"{host}/team-b/art:v1")
    admin = token(server, "admin", users.passwords["admin"], "repository:team-b/art:pull")
    assert registry_get(server, "team-b/art/manifests/v1", admin).status_code == 404
    assert_clean_log(server)
