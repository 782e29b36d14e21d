"""The classic deployment end to end: Debian's nginx running the shipped
``deploy/nginx/registry.conf`` (TLS termination) in front of Dockyard with htpasswd auth.

The shipped site config is used as it is, except for what cannot work in a test (and nothing
else): ``server_name`` becomes localhost, the Let's Encrypt certificate becomes a test CA's
certificate for localhost/127.0.0.1, the listen ports become free ports on 127.0.0.1 (the IPv6
listens are dropped) and the upstream ``127.0.0.1:5000`` becomes Dockyard's port. Proxy headers,
timeouts, ``client_max_body_size``, buffering and the API version header map stay as shipped.

1. ``nginx -t`` accepts the site; ``docker-compose config`` accepts deploy/docker-compose.yml with
   ``REGISTRY_HTTP_SECRET`` set and names the variable when it is missing.
2. Docker engine #1 logs in through nginx and pushes; a second engine with its own data root logs
   in, pulls the image by tag (same digest) and runs it. Upload ``Location`` URLs, the Basic
   challenge, the API version header, health and the plain-HTTP redirect, checked with requests.
3. skopeo and podman verify nginx's certificate against a ``--cert-dir`` holding the CA, and fail
   without it.
4. A 1 GiB blob pushed through nginx as docker does it (one chunked PATCH): Dockyard's peak RSS
   stays flat, and nginx writes no temp file for it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from harness import Server, ServerFactory, free_port
from harness.certs import CA, Issued, server_certificate
from harness.docker import start_dockerd
from harness.dockyard import add_user, memory_kib
from harness.images import BuiltImage, build_busybox_image
from harness.nginx import NginxProcess, nginx_test, run_nginx, sub_exactly, write_nginx_conf

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(150)]

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY = REPO_ROOT / "deploy"
SITE = DEPLOY / "nginx" / "registry.conf"
COMPOSE = DEPLOY / "docker-compose.yml"

USER, PASSWORD = "alice", "alice-S3cret! classic"
MiB = 1024 * 1024
GiB = 1024 * MiB
BIG = GiB  # far beyond any buffer, in a fraction of CI's time (bench/memory.py goes to 16 GiB)
RSS_LIMIT = 48 * MiB
API_VERSION = "Docker-Distribution-Api-Version"

_SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")
_PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


def _which(binary: str) -> str | None:
    return shutil.which(binary, path=os.pathsep.join([os.environ.get("PATH", ""), *_SBIN]))


def _need(binary: str, package: str) -> str:
    path = _which(binary)
    if path is None:
        pytest.skip(f"{binary} is not installed (Debian package {package})")
    return path


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.lower() not in _PROXY_VARS}
    env = {k: v for k, v in env.items() if not k.startswith(("DOCKER_", "COMPOSE_"))}
    env["PATH"] = os.pathsep.join([env.get("PATH", ""), *_SBIN])
    return {**env, **extra}


def _output(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


# -- the shipped nginx site, templated -------------------------------------------------------------


def _sub(text: str, pattern: str, replacement: str, count: int) -> str:
    return sub_exactly(text, pattern, replacement, count, SITE)


def render_site(*, upstream: int, http_port: int, tls_port: int, cert: Issued) -> str:
    site = SITE.read_text()
    site = _sub(site, r"^(\s*)server 127\.0\.0\.1:5000;", rf"\g<1>server 127.0.0.1:{upstream};", 1)
    site = _sub(site, r"^(\s*)listen 80;", rf"\g<1>listen 127.0.0.1:{http_port};", 1)
    site = _sub(site, r"^(\s*)listen 443 ssl;", rf"\g<1>listen 127.0.0.1:{tls_port} ssl;", 1)
    site = _sub(site, r"^\s*listen \[::\]:(80|443)( ssl)?;\n", "", 2)
    site = _sub(
        site, r"^(\s*)server_name registry\.example\.com;", r"\g<1>server_name localhost;", 2
    )
    site = _sub(site, r"^(\s*ssl_certificate\s+)/etc/letsencrypt/\S+;", rf"\g<1>{cert.cert};", 1)
    site = _sub(site, r"^(\s*ssl_certificate_key\s+)/etc/letsencrypt/\S+;", rf"\g<1>{cert.key};", 1)
    return site


@dataclass
class Nginx(NginxProcess):
    conf: Path
    http_port: int
    tls_port: int

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.tls_port}"

    @property
    def url(self) -> str:
        return f"https://{self.host}"

    def access_log(self) -> str:
        path = self.prefix / "access.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def temp_files(self) -> list[Path]:
        return [p for p in (self.prefix / "temp").rglob("*") if p.is_file()]


def start_nginx(binary: str, prefix: Path, site: str, http_port: int, tls_port: int) -> Nginx:
    conf = write_nginx_conf(prefix, site)
    proc = run_nginx(binary, prefix, conf, [tls_port, http_port])
    return Nginx(prefix, proc, conf, http_port, tls_port)


# -- module fixtures: a user, a CA and certificate, an image --------------------------------------


@pytest.fixture(scope="module")
def htpasswd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("users") / "registry.password"
    add_user(path, USER, PASSWORD)
    return path


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[CA, Issued]:
    return server_certificate(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    return build_busybox_image(tmp_path_factory.mktemp("image") / "busybox.tar")


@dataclass
class Deployment:
    server: Server
    nginx: Nginx
    ca: CA

    def session(self, auth: bool = True) -> requests.Session:
        s = requests.Session()
        s.trust_env = False
        s.verify = str(self.ca.path)
        if auth:
            s.auth = (USER, PASSWORD)
        return s

    def v2(self, path: str) -> str:
        return f"{self.nginx.url}/v2/{path}"

    def context(self) -> str:
        return (
            f"\n--- dockyard log (tail) ---\n{self.server.log()[-4000:]}"
            f"\n--- nginx error log (tail) ---\n{self.nginx.error_log()[-4000:]}"
        )

    def assert_clean_logs(self) -> None:
        log = self.server.log()
        assert "Traceback" not in log, log[-6000:]
        assert PASSWORD not in log, "the password was written to Dockyard's log"
        self.nginx.assert_clean_error_log()


@pytest.fixture
def classic(
    start_server: ServerFactory,
    htpasswd: Path,
    tls: tuple[CA, Issued],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., Deployment]]:
    """Start Dockyard (htpasswd auth, ``workers`` processes) behind the shipped nginx site."""
    binary = _need("nginx", "nginx")
    started: list[Nginx] = []

    def deploy(workers: int = 2) -> Deployment:
        server = start_server(  # a process, as deployed (its memory is measured below)
            process=True,
            workers=workers,
            auth={"htpasswd": {"realm": "Registry", "path": str(htpasswd)}},
        )
        ca, cert = tls
        http_port, tls_port = free_port(), free_port()
        site = render_site(upstream=server.port, http_port=http_port, tls_port=tls_port, cert=cert)
        nginx = start_nginx(binary, tmp_path_factory.mktemp("nginx"), site, http_port, tls_port)
        started.append(nginx)
        return Deployment(server, nginx, ca)

    yield deploy
    for nginx in started:
        nginx.stop()


# -- a second Docker engine (as tests/e2e/conftest.py starts the module's) -------------------------


def _pushed_digest(output: str, tag: str) -> str:
    match = re.search(rf"^{re.escape(tag)}: digest: (sha256:[0-9a-f]{{64}}) size: \d+$", output,
                      re.MULTILINE)  # fmt: skip
    assert match, f"no digest line in docker push output:\n{output}"
    return match[1]


def _inspect(engine: Any, ref: str) -> dict[str, Any]:
    (info,) = json.loads(engine.docker("image", "inspect", ref).stdout)
    return info


def _api_versions(r: requests.Response) -> list[str]:
    return r.raw.headers.getlist(API_VERSION)


# -- 1. the configuration files are valid ---------------------------------------------------------


def test_nginx_config_is_valid(tls: tuple[CA, Issued], tmp_path: Path) -> None:
    binary = _need("nginx", "nginx")
    _, cert = tls
    site = render_site(upstream=free_port(), http_port=free_port(), tls_port=free_port(), cert=cert)
    conf = write_nginx_conf(tmp_path, site)
    checked = nginx_test(binary, tmp_path, conf)
    assert checked.returncode == 0, _output(checked)
    assert "syntax is ok" in checked.stderr, _output(checked)
    assert "test is successful" in checked.stderr, _output(checked)

    # docker-compose: valid with the secret; without it, an error that names the variable.
    compose = _need("docker-compose", "docker-compose")
    secret = os.urandom(16).hex()
    env = {k: v for k, v in _clean_env().items() if k != "REGISTRY_HTTP_SECRET"}
    ok = subprocess.run(
        [compose, "-f", str(COMPOSE), "config"], cwd=REPO_ROOT, capture_output=True, text=True,
        env={**env, "REGISTRY_HTTP_SECRET": secret}, timeout=60,
    )  # fmt: skip
    assert ok.returncode == 0, _output(ok)
    config = yaml.safe_load(ok.stdout)
    registry, nginx = config["services"]["registry"], config["services"]["nginx"]
    assert registry["environment"]["REGISTRY_HTTP_SECRET"] == secret
    assert registry["environment"]["REGISTRY_AUTH"] == "htpasswd"
    # The compose file and the nginx site agree: nginx (host network) reaches the registry on
    # 127.0.0.1:5000, and the site mounted is the one tested here.
    assert any(str(p).startswith("127.0.0.1:5000:5000") for p in registry["ports"]), registry
    assert nginx["network_mode"] == "host"
    assert f"{SITE}:/etc/nginx/conf.d/default.conf:ro" in nginx["volumes"], nginx["volumes"]
    assert "server 127.0.0.1:5000;" in SITE.read_text()

    missing = subprocess.run(
        [compose, "-f", str(COMPOSE), "config"], cwd=REPO_ROOT, capture_output=True, text=True,
        env=env, timeout=60,
    )  # fmt: skip
    assert missing.returncode != 0, _output(missing)
    assert "REGISTRY_HTTP_SECRET" in missing.stderr, _output(missing)


# -- 2. docker, twice, through nginx --------------------------------------------------------------


def test_classic_flow_through_nginx(
    dockerd: Any,
    classic: Callable[..., Deployment],
    image: BuiltImage,
) -> None:
    dep = classic(workers=2)
    host = dep.nginx.host
    ref = f"{host}/classic/busybox:v1"

    # -- requests: what nginx passes through and what it adds --------------------------------------
    anon, http = dep.session(auth=False), dep.session()
    r = anon.get(dep.v2(""), timeout=10)
    assert r.status_code == 401, r.text + dep.context()
    assert r.headers["WWW-Authenticate"] == 'Basic realm="Registry"'
    assert _api_versions(r) == ["registry/2.0"], r.headers
    r = http.get(dep.v2(""), timeout=10)
    assert r.status_code == 200, r.text + dep.context()
    assert _api_versions(r) == ["registry/2.0"], r.headers

    # Upload Locations are absolute and built from Host and X-Forwarded-Proto.
    r = http.post(dep.v2("classic/busybox/blobs/uploads/"), timeout=10)
    assert r.status_code == 202, r.text + dep.context()
    location = r.headers["Location"]
    assert location.startswith(f"https://{host}/v2/classic/busybox/blobs/uploads/"), location
    assert http.delete(location, timeout=10).status_code == 204

    # A response nginx makes itself (the old-client block) still carries the API version.
    r = anon.get(dep.v2(""), headers={"User-Agent": "Go 1.1 package http"}, timeout=10)
    assert r.status_code == 404, r.text
    assert _api_versions(r) == ["registry/2.0"], r.headers

    # The health endpoint needs no credentials, directly (the image's HEALTHCHECK, on which the
    # compose file's nginx depends) and through nginx.
    assert requests.get(dep.server.url + "/debug/health", timeout=10).status_code == 200
    assert anon.get(dep.nginx.url + "/debug/health", timeout=10).status_code == 200

    # Plain HTTP redirects to https (to the default port: the site is written for 80/443);
    # ACME challenges are served from the webroot, not redirected.
    plain = f"http://127.0.0.1:{dep.nginx.http_port}"
    r = requests.get(plain + "/v2/classic/busybox/tags/list?n=1", allow_redirects=False, timeout=10)
    assert r.status_code == 301, r.text
    assert r.headers["Location"] == "https://127.0.0.1/v2/classic/busybox/tags/list?n=1"
    r = requests.get(plain + "/.well-known/acme-challenge/abc", allow_redirects=False, timeout=10)
    assert r.status_code == 404, (r.status_code, r.headers)

    # -- docker engine #1: login, push ----------------------------------------------------------
    loaded = dockerd.docker("load", "-i", str(image.path))
    assert image.repo_tag in loaded.stdout, loaded.stdout
    login = dockerd.docker("login", "-u", USER, "--password-stdin", host, input=PASSWORD.encode())
    assert "Login Succeeded" in login.stdout, _output(login)
    dockerd.docker("tag", image.repo_tag, ref)
    push = dockerd.docker("push", ref)
    digest = _pushed_digest(push.stdout, "v1")
    assert f"{host}/classic/busybox@{digest}" in _inspect(dockerd, ref)["RepoDigests"]

    # -- docker engine #2 (its own data root): login, pull by tag, run ----------------------------
    engine = start_dockerd()
    try:
        assert engine.docker("images", "-q").stdout.strip() == ""
        # Without a login the pull fails (docker reports whatever its last attempt got: it also
        # tries plain HTTP for 127.0.0.0/8, which nginx's TLS port answers with a 400 page).
        out = engine.docker("pull", ref, check=False)
        assert out.returncode != 0, _output(out)
        login = engine.docker(
            "login", "-u", USER, "--password-stdin", host, input=PASSWORD.encode()
        )
        assert "Login Succeeded" in login.stdout, _output(login)
        pull = engine.docker("pull", ref)
        assert f"Digest: {digest}" in pull.stdout, pull.stdout + dep.context()
        pulled = _inspect(engine, ref)
        assert pulled["RepoDigests"] == [f"{host}/classic/busybox@{digest}"]
        assert pulled["Id"] == image.image_id
        assert pulled["RootFS"]["Layers"] == image.diff_ids
        run = engine.docker("run", "--rm", "--network", "none", ref)
        assert run.stdout == image.content
    finally:
        engine.stop()

    # Every request went through nginx with the client's address forwarded.
    r = http.get(dep.v2("classic/busybox/tags/list"), timeout=10)
    assert r.status_code == 200 and r.json()["tags"] == ["v1"], r.text
    assert "PUT /v2/classic/busybox/manifests/v1" in dep.nginx.access_log()
    dep.assert_clean_logs()

    # With Dockyard down, nginx's own 502 still carries the API version header.
    dep.server.stop()
    r = anon.get(dep.v2(""), timeout=10)
    assert r.status_code == 502, r.text
    assert _api_versions(r) == ["registry/2.0"], r.headers


# -- 3. podman and skopeo verify the certificate ---------------------------------------------------


def test_podman_and_skopeo_verify_the_certificate(
    classic: Callable[..., Deployment], image: BuiltImage, tmp_path: Path
) -> None:
    skopeo_bin = _need("skopeo", "skopeo")
    podman_bin = _need("podman", "podman")
    dep = classic(workers=2)
    host = dep.nginx.host
    certs = tmp_path / "certs"
    certs.mkdir()
    shutil.copy(dep.ca.path, certs / "ca.crt")

    base = tmp_path / "c"
    (base / "root").mkdir(parents=True)
    (base / "run").mkdir()
    (base / "tmp").mkdir()
    storage = base / "storage.conf"
    storage.write_text(
        f'[storage]\ndriver = "vfs"\ngraphroot = "{base / "root"}"\nrunroot = "{base / "run"}"\n'
    )
    (base / "containers.conf").write_text('[engine]\nevents_logger = "none"\n')
    # No registry is configured insecure, no system certs.d entry applies: trust comes only
    # from --cert-dir.
    (base / "registries.conf").write_text("unqualified-search-registries = []\n")
    auth_file = base / "auth.json"
    auth_file.write_text('{"auths": {}}')
    env = _clean_env(
        CONTAINERS_STORAGE_CONF=str(storage),
        CONTAINERS_CONF=str(base / "containers.conf"),
        CONTAINERS_REGISTRIES_CONF=str(base / "registries.conf"),
        REGISTRY_AUTH_FILE=str(auth_file),
        TMPDIR=str(base / "tmp"),
    )

    def run(binary: str, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [binary, *args], env=env, input=input, capture_output=True, text=True, timeout=120
        )

    def ok(binary: str, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        result = run(binary, *args, input=input)
        assert result.returncode == 0, f"{binary} {' '.join(args)}\n{_output(result)}" + (
            dep.context()
        )
        return result

    def certificate_error(result: subprocess.CompletedProcess[str]) -> None:
        assert result.returncode != 0, _output(result)
        assert "certificate signed by unknown authority" in result.stderr, _output(result)

    creds = f"{USER}:{PASSWORD}"
    # -- skopeo ------------------------------------------------------------------------------------
    ok(skopeo_bin, "copy", "--dest-cert-dir", str(certs), "--dest-creds", creds,
       f"docker-archive:{image.path}", f"docker://{host}/classic/skopeo:v1")  # fmt: skip
    certificate_error(
        run(skopeo_bin, "inspect", "--creds", creds, f"docker://{host}/classic/skopeo:v1")
    )
    inspected = ok(skopeo_bin, "inspect", "--cert-dir", str(certs), "--creds", creds,
                   f"docker://{host}/classic/skopeo:v1")  # fmt: skip
    info = json.loads(inspected.stdout)
    skopeo_digest = info["Digest"]
    r = dep.session().head(dep.v2(f"classic/skopeo/manifests/{skopeo_digest}"), timeout=10)
    assert r.status_code == 200, dep.context()
    assert r.headers["Docker-Content-Digest"] == skopeo_digest

    # -- podman ------------------------------------------------------------------------------------
    try:
        loaded = ok(podman_bin, "load", "-i", str(image.path))
        assert image.repo_tag in loaded.stdout + loaded.stderr, _output(loaded)
        certificate_error(
            run(podman_bin, "login", "-u", USER, "--password-stdin", host, input=PASSWORD + "\n")
        )
        ok(podman_bin, "login", "--cert-dir", str(certs), "-u", USER, "--password-stdin", host,
           input=PASSWORD + "\n")  # fmt: skip
        assert host in json.loads(auth_file.read_text())["auths"]
        ref = f"{host}/classic/podman:v1"
        ok(podman_bin, "tag", image.repo_tag, ref)
        ok(podman_bin, "push", "--cert-dir", str(certs), ref)
        ok(podman_bin, "rmi", ref, image.repo_tag)
        ok(podman_bin, "pull", "--cert-dir", str(certs), ref)
        (pulled,) = json.loads(ok(podman_bin, "image", "inspect", ref).stdout)
        assert pulled["Id"] == image.image_id.removeprefix("sha256:")
        # The pull without the CA fails on the certificate as well.
        ok(podman_bin, "rmi", ref)
        certificate_error(run(podman_bin, "pull", ref))
    finally:
        run(podman_bin, "rmi", "--all", "--force")
    dep.assert_clean_logs()


# -- large headers: bearer tokens from external token servers ------------------------------------


def test_large_headers_pass_through_nginx(classic: Callable[..., Deployment]) -> None:
    """The shipped site's header buffers pass what Dockyard accepts (a JWT listing many
    repositories easily exceeds nginx's default 8k), and nginx names no version."""
    dep = classic(workers=1)
    http = dep.session()
    big = "x" * (900 * 1024)
    r = http.get(dep.v2(""), headers={"X-Large-Token": big}, timeout=30)
    assert r.status_code == 200, r.text[:300] + dep.context()
    assert r.headers["Server"] == "nginx", r.headers
    r = http.get(dep.v2(""), headers={"X-Large-Token": big + "x" * (200 * 1024)}, timeout=30)
    assert r.status_code == 400  # more than 1 MiB: nginx refuses it before Dockyard sees it
    dep.assert_clean_logs()


# -- 4. a 1 GiB blob through nginx ---------------------------------------------------------------


def test_large_upload_through_nginx_keeps_memory_flat(
    classic: Callable[..., Deployment],
) -> None:
    dep = classic(workers=1)  # one worker: the server process itself serves
    pid = dep.server.proc.pid
    http = dep.session()
    assert http.get(dep.v2(""), timeout=10).status_code == 200
    before = memory_kib(pid, "VmHWM") * 1024

    block = os.urandom(MiB)
    hasher = hashlib.sha256()
    temp_files: list[Path] = []

    def stream() -> Iterator[bytes]:
        for i in range(BIG // MiB):
            chunk = i.to_bytes(8, "big") + block[8:]
            hasher.update(chunk)
            yield chunk
            if i == BIG // MiB // 2:  # halfway: nginx passes the body on, it does not spool it
                temp_files.extend(dep.nginx.temp_files())

    started = time.monotonic()
    r = http.post(dep.v2("classic/big/blobs/uploads/"), timeout=10)
    assert r.status_code == 202, r.text + dep.context()
    r = http.patch(
        r.headers["Location"],
        data=stream(),  # a generator: Transfer-Encoding: chunked, no Content-Length
        headers={"Content-Type": "application/octet-stream"},
        timeout=300,
    )
    assert r.status_code == 202, r.text + dep.context()
    assert r.request.headers.get("Transfer-Encoding") == "chunked"
    assert "Content-Length" not in r.request.headers
    assert r.headers["Range"] == f"0-{BIG - 1}"
    location = r.headers["Location"]
    assert location.startswith(f"https://{dep.nginx.host}/v2/classic/big/blobs/uploads/")
    digest = "sha256:" + hasher.hexdigest()
    r = http.put(location, params={"digest": digest}, timeout=300)
    assert r.status_code == 201, r.text + dep.context()
    elapsed = time.monotonic() - started
    after = memory_kib(pid, "VmHWM") * 1024

    r = http.head(dep.v2(f"classic/big/blobs/{digest}"), timeout=30)
    assert r.status_code == 200, dep.context()
    assert int(r.headers["Content-Length"]) == BIG
    assert r.headers["Docker-Content-Digest"] == digest

    print(
        f"\nDockyard peak RSS (VmHWM, pid {pid}): before {before / MiB:.1f} MiB, "
        f"after a {BIG // GiB} GiB chunked upload through nginx {after / MiB:.1f} MiB, "
        f"growth {(after - before) / MiB:.1f} MiB (limit {RSS_LIMIT // MiB} MiB); "
        f"upload took {elapsed:.1f} s ({BIG / MiB / elapsed:.0f} MiB/s)"
    )
    assert not temp_files, f"nginx spooled the upload to disk: {temp_files}"
    assert after - before < RSS_LIMIT
    dep.assert_clean_logs()
