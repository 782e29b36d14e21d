"""The pull-through cache (issue 14) with real clients, as they are configured to use a mirror.

Two upstreams, each wanting credentials the clients do not have:

- registry:2 with htpasswd (HTTP Basic), mounted at ``docker.io``: the default upstream, which
  also takes containerd's ``ns=docker.io`` and Docker's ``registry-mirrors`` requests
  (``/v2/library/<name>/...``); its credentials are in the proxy's configuration;
- a Dockyard with its built-in token server (the bearer challenge flow), mounted at
  ``registry.example``; its credentials reach the proxy through environment variables
  (``usernameenv``/``passwordenv``).

Clients: skopeo (straight at the proxy), podman (``registries.conf`` mirror), the Docker engine
(``registry-mirrors``) and containerd (``ctr --hosts-dir``, ``hosts.toml``). None of them can
reach an upstream itself (``registry.example`` does not resolve, ``docker.io`` is not reachable
from here), and each pull is also checked in the proxy's access log: clients fall back to the
registry itself when a mirror fails, silently.

Each test pulls images of its own, so the tests do not depend on each other's order (xdist
hands them out one by one); the upstreams, the proxy and the Docker engine are shared by the
module. A test that stops the upstreams starts them again on the same ports and data.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from harness import need_binaries, sha256
from harness.docker import Dockerd, find_dockerd, start_dockerd
from harness.dockyard import DockyardProcess, InProcessDockyard, add_user
from harness.images import BuiltImage, build_busybox_image, goarch
from harness.mirrors import Podman, access_log, containerd_hosts, registries_conf
from harness.net import free_port
from harness.oci import OciLayout, gzip_layer
from harness.registry2 import REGISTRY2, Registry2
from harness.skopeo import MANIFEST_ACCEPT, SKOPEO, skopeo

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

R2_USER, R2_PASS = "mirror", "r2-S3cret pass"
DY_USER, DY_PASS = "mirror", "dy-t0ken:pass"
DY_ADMIN, DY_ADMIN_PASS = "admin", "admin-pa55"
SERVICE = "upstream.test"
PASSWORDS = (R2_PASS, DY_PASS, DY_ADMIN_PASS)
HUB, OTHER = "docker.io", "registry.example"  # the proxy's prefixes for the two upstreams

#: image -> (upstream, its name there); every test pulls images of its own. Those whose key
#: ends in ``-index`` are OCI indexes of two platforms, this machine's and another, as Docker
#: Hub's images are.
IMAGES = {
    "skopeo-hub": (HUB, "library/skopeobox"),
    "skopeo-other": (OTHER, "acme/skopeo"),
    "docker": (HUB, "library/dockerbox"),
    "docker-index": (HUB, "library/dockermulti"),
    "podman": (OTHER, "acme/podman"),
    "ctr-hub": (HUB, "library/ctrbox"),
    "ctr-other": (OTHER, "acme/ctr"),
    "ctr-index": (OTHER, "acme/ctrmulti"),
    "restart-hub": (HUB, "library/restartbox"),
    "restart-other": (OTHER, "acme/restart"),
    "recover-hub": (HUB, "library/recoverbox"),
    "recover-other": (OTHER, "acme/recover"),
    "never-hub": (HUB, "library/neverbox"),
    "never-other": (OTHER, "acme/never"),
}


@dataclass
class World:
    """The upstreams, the images they hold (tag ``1``) and the proxy in front of them."""

    work: Path
    r2: Registry2
    dy: InProcessDockyard
    proxy: DockyardProcess
    images: dict[str, BuiltImage] = field(default_factory=dict)
    digests: dict[str, str] = field(default_factory=dict)  # image -> manifest digest pushed
    #: image -> (the manifest for this machine's platform, its config's digest)
    platform: dict[str, tuple[str, str]] = field(default_factory=dict)

    def upstream(self, key: str) -> tuple[str, str]:
        """(host, credentials) to push to an image's upstream."""
        if IMAGES[key][0] == HUB:
            return self.r2.host, f"{R2_USER}:{R2_PASS}"
        return self.dy.host, f"{DY_ADMIN}:{DY_ADMIN_PASS}"

    def push(self, key: str, image: BuiltImage) -> str:
        """Push ``image`` as ``key``'s tag 1 to its upstream (in an index for ``*-index``
        keys); the digest of the manifest pushed."""
        host, creds = self.upstream(key)
        digestfile = self.work / f"digest-{key}"
        source, flags = f"docker-archive:{image.path}", ["--format", "v2s2"]
        child, config = "", image.image_id
        if key.endswith("-index"):
            layout = OciLayout(self.work / "layouts" / key)
            other = "arm64" if goarch() != "arm64" else "amd64"
            layers = [gzip.compress(layer, compresslevel=1) for layer in image.layers]
            index = layout.index([(goarch(), layers), (other, [gzip_layer(1000)])])
            layout.tag("1", index)
            source, flags = f"oci:{layout.path}:1", ["--all"]
            child = json.loads(index)["manifests"][0]["digest"]
            config = json.loads(layout.blobs[child])["config"]["digest"]
        skopeo("copy", "--quiet", "--dest-tls-verify=false", "--dest-creds", creds, *flags,
               "--digestfile", str(digestfile),
               source, f"docker://{host}/{IMAGES[key][1]}:1")  # fmt: skip
        self.images[key], self.digests[key] = image, digestfile.read_text().strip()
        self.platform[key] = (child or self.digests[key], config)
        return self.digests[key]

    def name(self, key: str) -> str:
        """The image's name behind the proxy prefix (``docker.io/library/x``)."""
        prefix, remote = IMAGES[key]
        return f"{prefix}/{remote}"

    def via_proxy(self, key: str) -> str:
        return f"{self.proxy.host}/{self.name(key)}:1"

    def stop_upstreams(self) -> None:
        self.r2.stop()
        self.dy.stop()

    def start_upstreams(self) -> None:
        """The upstreams again, on their ports and data."""
        r2, dy = self.r2, self.dy
        self.r2 = Registry2.start(r2.config_path.parent, root=r2.root, port=r2.port,
                                  auth=r2_auth(self.work))  # fmt: skip
        self.dy = InProcessDockyard.start(dy.config_path.parent, root=dy.root, port=dy.port,
                                          auth=dy_auth(self.work))  # fmt: skip

    @contextlib.contextmanager
    def upstreams_down(self, down: bool = True) -> Iterator[None]:
        """The upstreams stopped meanwhile (if ``down``), then started again."""
        if not down:
            yield
            return
        self.stop_upstreams()
        try:
            yield
        finally:
            self.start_upstreams()

    def restart_proxy(self) -> None:
        """The proxy stopped and started again, on its port and data, as it was configured."""
        p = self.proxy
        p.stop()
        self.proxy = start_proxy(self, p.config_path.parent, p.root, p.port)

    def requests(self, since: int = 0) -> list[dict[str, str]]:
        """The proxy's access log from entry ``since`` on (its lines are written once each
        response is sent: a request the client just saw may take a moment to appear)."""
        return access_log(self.proxy.log())[since:]

    def wait_for(self, since: int, *paths: str, agent: str = "") -> list[dict[str, str]]:
        """Until every one of ``paths`` was asked of the proxy since entry ``since`` (by a client
        whose User-Agent contains ``agent``) with status 200; those entries."""
        deadline = time.monotonic() + 5
        while True:
            seen = [e for e in self.requests(since) if agent in e.get("user_agent", "")]
            ok = {e["path"] for e in seen if e["status"] == "200"}
            if all(p in ok for p in paths) or time.monotonic() > deadline:
                missing = [p for p in paths if p not in ok]
                assert not missing, f"not asked of the proxy: {missing}\nseen: {seen}"
                return seen
            time.sleep(0.05)


def r2_auth(work: Path) -> dict[str, object]:
    return {"htpasswd": {"realm": "upstream-registry2", "path": str(work / "r2.htpasswd")}}


def dy_auth(work: Path) -> dict[str, object]:
    """The built-in token server: only the proxy's user may pull, only the admin push."""
    return {
        "token": {
            "service": SERVICE,
            "issuer": "upstream-dockyard",
            "server": {
                "htpasswd": str(work / "dy.htpasswd"),
                "admins": [DY_ADMIN],
                "access": [{"repository": "acme/*", "users": [DY_USER], "actions": ["pull"]}],
            },
        }
    }


def start_proxy(world: World, work: Path, root: Path, port: int) -> DockyardProcess:
    return DockyardProcess.launch(
        work,
        root=root,
        port=port,
        workers=2,
        env={"UPSTREAM_USER": DY_USER, "UPSTREAM_PASSWORD": DY_PASS},
        proxy={
            "upstreams": [
                {
                    "prefix": HUB,
                    "remoteurl": world.r2.url,
                    "username": R2_USER,
                    "password": R2_PASS,
                    "default": True,
                    "namespaces": ["docker.io"],
                    "library": True,
                    "timeout": "5s",
                },
                {
                    "prefix": OTHER,
                    "remoteurl": world.dy.url,
                    "usernameenv": "UPSTREAM_USER",
                    "passwordenv": "UPSTREAM_PASSWORD",
                    "timeout": "5s",
                },
            ],
            "local": ["local/*"],
        },
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    if REGISTRY2 is None or SKOPEO is None:
        pytest.skip("needs registry:2 (docker-registry) and skopeo")
    need_binaries("htpasswd")
    work = tmp_path_factory.mktemp("proxy-clients")
    line = subprocess.run(["htpasswd", "-Bbn", R2_USER, R2_PASS], capture_output=True,
                          text=True, check=True).stdout  # fmt: skip
    (work / "r2.htpasswd").write_text(line)
    add_user(work / "dy.htpasswd", DY_USER, DY_PASS)
    add_user(work / "dy.htpasswd", DY_ADMIN, DY_ADMIN_PASS)
    for d in ("r2", "dy", "proxy"):
        (work / d).mkdir()
    r2 = Registry2.start(work / "r2", root=work / "r2" / "data", auth=r2_auth(work))
    dy = InProcessDockyard.start(work / "dy", auth=dy_auth(work))
    world = World(work, r2, dy, proxy=None)  # type: ignore[arg-type]
    try:
        for key in IMAGES:
            world.push(key, build_busybox_image(work / "images" / f"{key}.tar"))
        world.proxy = start_proxy(world, work / "proxy", work / "proxy" / "data", free_port())
        yield world
    finally:
        if world.proxy is not None:
            world.proxy.stop()
        world.stop_upstreams()
    log = world.proxy.log()
    assert "Traceback" not in log, log[-6000:]
    for password in PASSWORDS:
        assert password not in log, "an upstream password was written to the proxy's log"


@pytest.fixture(scope="module")
def engine(world: World) -> Iterator[Dockerd]:
    """A Docker engine (and its containerd) whose registry mirror is the proxy."""
    if find_dockerd() is None:
        pytest.skip("dockerd is not installed (Debian package docker.io)")
    mirror = [world.proxy.url]
    try:
        engine = start_dockerd(["127.0.0.0/8"], storage_driver="overlay2", registry_mirrors=mirror)
    except (RuntimeError, TimeoutError):
        engine = start_dockerd(["127.0.0.0/8"], registry_mirrors=mirror)
    yield engine
    engine.stop()


def pull_paths(world: World, key: str, repo: str, query: str = "") -> list[str]:
    """What a client pulling the image by tag as ``repo`` asks for: the tag, then (for an
    index) the manifest of this machine's platform, its config and layers."""
    child, config = world.platform[key]
    manifest = requests.get(world.proxy.v2(f"{world.name(key)}/manifests/{child}"),
                            headers={"Accept": MANIFEST_ACCEPT}, timeout=30).json()  # fmt: skip
    assert manifest["config"]["digest"] == config
    paths = [f"/v2/{repo}/manifests/1{query}"]
    if child != world.digests[key]:
        paths.append(f"/v2/{repo}/manifests/{child}{query}")
    blobs = [config, *(layer["digest"] for layer in manifest["layers"])]
    return paths + [f"/v2/{repo}/blobs/{d}{query}" for d in blobs]


def skopeo_pull(world: World, key: str, dest: Path) -> Path:
    """skopeo copies the image from the proxy into ``dir:dest``; checks it is the upstream's."""
    skopeo("copy", "--quiet", "--src-tls-verify=false",
           f"docker://{world.via_proxy(key)}", f"dir:{dest}")  # fmt: skip
    manifest = (dest / "manifest.json").read_bytes()
    assert sha256(manifest) == world.digests[key]
    assert json.loads(manifest)["config"]["digest"] == world.images[key].image_id
    return dest


def failed(args: list[str]) -> str:
    result = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0, f"{args} succeeded:\n{result.stdout}"
    return result.stdout + result.stderr


# -- skopeo, straight at the proxy ---------------------------------------------------------------


def test_skopeo_pulls_from_both_upstreams_and_from_the_cache_once_they_are_down(
    world: World, tmp_path: Path
) -> None:
    start = len(world.requests())
    for key in ("skopeo-hub", "skopeo-other"):
        skopeo_pull(world, key, tmp_path / key)
        world.wait_for(start, *pull_paths(world, key, world.name(key)))
    catalog = requests.get(world.proxy.v2("_catalog"), timeout=10).json()["repositories"]
    assert {world.name("skopeo-hub"), world.name("skopeo-other")} <= set(catalog)
    # The upstreams were asked with the proxy's credentials: Basic from the configuration,
    # a bearer token for the user named in the environment.
    assert f"auth.user.name={R2_USER}" in world.r2.log()
    dy = access_log(world.dy.log())
    assert any(e["path"].startswith("/auth/token") and e["status"] == "200" for e in dy)
    assert any(e["path"] == "/v2/acme/skopeo/manifests/1" and e.get("user") == DY_USER
               and e["status"] == "200" for e in dy), dy  # fmt: skip
    # Tags are asked of the upstream: one moved there is followed.
    world.push("skopeo-hub", build_busybox_image(tmp_path / "moved.tar"))
    skopeo_pull(world, "skopeo-hub", tmp_path / "moved")

    with world.upstreams_down():
        for key in ("skopeo-hub", "skopeo-other"):
            skopeo_pull(world, key, tmp_path / f"{key}-stale")
            tags = json.loads(skopeo("list-tags", "--tls-verify=false",
                                     f"docker://{world.proxy.host}/{world.name(key)}"))  # fmt: skip
            assert tags["Tags"] == ["1"]
        # Never pulled: 503, which clients report without the body (containers/image and
        # Docker read error bodies of 4xx answers only); the body says why.
        for key in ("never-hub", "never-other"):
            out = failed(
                [SKOPEO, "inspect", "--tls-verify=false", f"docker://{world.via_proxy(key)}"]
            )
            assert "503 Service Unavailable" in out, out
            r = requests.get(world.proxy.v2(f"{world.name(key)}/manifests/1"), timeout=10)
            assert r.status_code == 503, r.text
            (error,) = r.json()["errors"]
            assert error["code"] == "UNAVAILABLE" and "not cached" in error["message"], error


# -- the Docker engine: registry-mirrors --------------------------------------------------------


def docker_pull(world: World, engine: Dockerd, key: str, by_digest: bool) -> None:
    """``docker pull`` of a Docker Hub name (``dockerbox:1``), which the engine asks of its
    mirror as ``library/dockerbox``; then the image is removed again."""
    start = len(world.requests())
    name = IMAGES[key][1].removeprefix("library/")
    digest, (_, config) = world.digests[key], world.platform[key]
    pull = engine.docker("pull", f"{name}:1")
    assert f"Digest: {digest}" in pull.stdout, pull.stdout
    (info,) = json.loads(engine.docker("image", "inspect", f"{name}:1").stdout)
    assert info["Id"] == config
    assert info["RepoDigests"] == [f"{name}@{digest}"]
    # The engine asked the mirror, not Docker Hub (which it falls back to silently): the tag,
    # the config and the layers. (A platform manifest it has seen before, it may take from its
    # own manifest cache in containerd's content store instead of asking again.)
    child = world.platform[key][0]
    paths = [p for p in pull_paths(world, key, f"library/{name}") if not p.endswith(child)]
    world.wait_for(start, *paths, agent="docker/")
    if key == "docker":
        run = engine.docker("run", "--rm", "--network", "none", f"{name}:1")
        assert run.stdout == world.images[key].content
    engine.docker("rmi", f"{name}:1")
    if by_digest:
        engine.docker("pull", f"{name}@{digest}")
        engine.docker("rmi", f"{name}@{digest}")
    gone = engine.docker("image", "inspect", config, check=False)
    assert gone.returncode != 0, "still in the engine: the next pull would not fetch it"


def test_docker_pulls_hub_images_through_its_registry_mirror(world: World, engine: Dockerd) -> None:
    for down in (False, True):  # the second time from the cache alone (stale-if-error)
        with world.upstreams_down(down):
            for key in ("docker", "docker-index"):
                docker_pull(world, engine, key, by_digest=down)


# -- podman: a registries.conf mirror ------------------------------------------------------------


def test_podman_pulls_through_a_registries_conf_mirror(world: World, tmp_path: Path) -> None:
    conf = registries_conf(tmp_path / "registries.conf", {OTHER: f"{world.proxy.host}/{OTHER}"})
    podman = Podman.create(tmp_path / "podman", conf)
    key, image = "podman", world.images["podman"]
    ref = world.name(key) + ":1"  # registry.example/acme/podman:1, which does not resolve
    try:
        for down in (False, True):  # the second time from the cache alone
            with world.upstreams_down(down):
                start = len(world.requests())
                podman.run("pull", ref)
                (info,) = json.loads(podman.run("image", "inspect", ref).stdout)
                assert info["Id"] == image.image_id.removeprefix("sha256:")
                assert info["Digest"] == world.digests[key]
                paths = pull_paths(world, key, world.name(key))
                world.wait_for(start, *paths, agent="containers/")
                podman.run("rmi", ref)
        with world.upstreams_down():
            out = podman.run("pull", world.name("never-other") + ":1", check=False)
            assert out.returncode != 0
            assert "Mirrors also failed" in out.stderr, out.stderr
            assert "503 Service Unavailable" in out.stderr, out.stderr
    finally:
        podman.cleanup()


# -- containerd: hosts.toml, as Kubernetes nodes pull -------------------------------------------


def ctr_pull(world: World, engine: Dockerd, hosts: Path, key: str, name: str) -> None:
    """``ctr images pull --hosts-dir`` of ``name:1``; then the image is removed again."""
    start = len(world.requests())
    engine.ctr("images", "pull", "--hosts-dir", str(hosts), f"{name}:1")
    listed = engine.ctr("images", "list").stdout.splitlines()
    (line,) = [x.split() for x in listed if x.startswith(f"{name}:1 ")]
    assert line[2] == world.digests[key], line
    config = world.platform[key][1]
    assert json.loads(engine.ctr("content", "get", config).stdout)["os"] == "linux"
    # containerd asks for the upstream's own name and says which registry in ns=
    host, remote = name.split("/", 1)
    world.wait_for(start, *pull_paths(world, key, remote, f"?ns={host}"), agent="containerd")
    engine.ctr("images", "remove", "--sync", f"{name}:1")
    gone = engine.ctr("content", "get", config, check=False)
    assert gone.returncode != 0, "still in containerd: the next pull would not fetch it"


def test_containerd_pulls_through_hosts_toml_mirrors(
    world: World, engine: Dockerd, tmp_path: Path
) -> None:
    need_binaries("ctr")
    hosts = containerd_hosts(tmp_path / "hosts", {"docker.io": world.proxy.url,
                                                  OTHER: world.proxy.url})  # fmt: skip
    pulls = {
        "ctr-hub": "docker.io/library/ctrbox",
        "ctr-other": f"{OTHER}/acme/ctr",
        "ctr-index": f"{OTHER}/acme/ctrmulti",
    }
    for down in (False, True):  # the second time from the cache alone
        with world.upstreams_down(down):
            for key, name in pulls.items():
                ctr_pull(world, engine, hosts, key, name)


# -- a restart with the upstreams down -----------------------------------------------------------


def test_a_restarted_proxy_serves_its_cache_while_the_upstreams_are_down(
    world: World, tmp_path: Path
) -> None:
    keys = ("restart-hub", "restart-other")
    for key in keys:
        skopeo_pull(world, key, tmp_path / key)
    with world.upstreams_down():
        world.restart_proxy()  # registry:2 would not start: it pings its upstream first
        start = len(world.requests())
        for key in keys:
            skopeo_pull(world, key, tmp_path / f"{key}-restarted")
            r = requests.get(world.proxy.v2(f"{world.name(key)}/manifests/1"),
                             headers={"Accept": MANIFEST_ACCEPT}, timeout=10)  # fmt: skip
            assert r.status_code == 200 and "stale" in r.headers["Cache-Status"]
        world.wait_for(start, *(f"/v2/{world.name(k)}/manifests/1" for k in keys))
        r = requests.get(world.proxy.v2(f"{world.name('never-hub')}/manifests/1"), timeout=10)
        assert r.status_code == 503 and r.json()["errors"][0]["code"] == "UNAVAILABLE", r.text
    # Back up: the proxy, started while they were down, now reaches both (authenticating).
    for key in ("recover-hub", "recover-other"):
        skopeo_pull(world, key, tmp_path / key)


# -- pushes --------------------------------------------------------------------------------------


def test_pushes_to_proxied_names_are_refused_and_local_ones_accepted(
    world: World, tmp_path: Path
) -> None:
    image = build_busybox_image(tmp_path / "pushed.tar")
    source = f"docker-archive:{image.path}"
    # a prefix of each upstream, and a name the default upstream takes
    for name in (f"{HUB}/library/pushed", f"{OTHER}/acme/pushed", "team/pushed"):
        out = failed([SKOPEO, "copy", "--dest-tls-verify=false", source,
                      f"docker://{world.proxy.host}/{name}:1"])  # fmt: skip
        assert "pull-through cache of an upstream registry" in out, out
    refused = [e for e in world.requests() if e["path"].endswith("pushed/blobs/uploads/")]
    assert refused and all(e["status"] == "405" for e in refused), refused
    # local repositories on the same instance take pushes: skopeo, and podman
    skopeo("copy", "--quiet", "--dest-tls-verify=false", source,
           f"docker://{world.proxy.host}/local/skopeo:1")  # fmt: skip
    podman = Podman.create(tmp_path / "podman")
    try:
        podman.run("load", "-i", str(image.path))
        ref = f"{world.proxy.host}/local/podman:1"
        podman.run("tag", image.repo_tag, ref)
        podman.run("push", "--tls-verify=false", ref)
    finally:
        podman.cleanup()
    for repo in ("local/skopeo", "local/podman"):
        r = requests.get(world.proxy.v2(f"{repo}/manifests/1"),
                         headers={"Accept": MANIFEST_ACCEPT}, timeout=10)  # fmt: skip
        assert r.status_code == 200, r.text
        assert r.json()["config"]["digest"] == image.image_id
