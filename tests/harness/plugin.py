"""The test harness as a pytest plugin: tiers, and a fixture for every daemon the tests use.

Tiers are markers, given by the directory a test lives in (``tests/<tier>/``) and by
``@pytest.mark.slow`` on tests that take seconds (every test of the daemon tiers is slow):

- ``unit``: no server; ``api``: Dockyard in the test process (or a process of its own where a
  test needs workers, signals or its memory); ``e2e``: real clients (docker, containerd, podman,
  skopeo, nginx in front); ``interop``: registry:2 beside Dockyard; ``s3``: Ceph RGW and Redis;
  ``browser``: the web UI in chromium; ``slow``: takes seconds (any tier).

Daemons are started once per session where a test needs them: Ceph RGW once for all workers of
a pytest-xdist run (``harness.shared``); moto, Redis, dockerd and Chromium once per worker (tests
flush Redis and log dockerd in and out, so workers keep their own; each browser test has a
browser context of its own, ``harness.browser``). Slow tests are handed out first, so that
parallel workers finish together.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from harness import shared
from harness.browser import Chromium, browser_log, launch_chromium
from harness.docker import Dockerd, find_dockerd, start_dockerd
from harness.dockyard import DockyardProcess, InProcessDockyard
from harness.net import free_port
from harness.redis import start_redis
from harness.registry2 import REGISTRY2, Registry2
from harness.s3 import S3Endpoint, launch_rgw, new_bucket, start_moto

if TYPE_CHECKING:
    from playwright.sync_api import Page

TIERS = {
    "unit": "no server: the model, config, drivers, pure parts",
    "api": "the HTTP API against Dockyard in the test process (or a process of its own)",
    "e2e": "real clients (docker, containerd, podman, skopeo, oras) as subprocesses",
    "interop": "registry:2 beside Dockyard, on one store",
    "s3": "Ceph RGW and Redis",
    "browser": "the web UI in a real chromium",
}

#: tiers whose every test starts daemons or real clients: slow, whatever the test itself does
DAEMON_TIERS = ("e2e", "interop", "s3", "browser")

Server = DockyardProcess | InProcessDockyard
ServerFactory = Callable[..., Server]
#: ``start_registry2(root=...)`` or ``start_registry2(s3=...)``
Registry2Factory = Callable[..., Registry2]
#: ``s3_bucket_factory(endpoint)``: a new bucket's name
BucketFactory = Callable[[S3Endpoint], str]
#: ``new_page(**context_options)``: a page in a new browser context (``harness.browser``)
PageFactory = Callable[..., "Page"]


# -- session set-up and tiers ------------------------------------------------------------------


def pytest_configure(config: pytest.Config) -> None:
    for name, meaning in TIERS.items():
        config.addinivalue_line("markers", f"{name}: {meaning}")
    config.addinivalue_line("markers", "slow: takes seconds; `-m 'not slow'` is the inner loop")
    config.addinivalue_line(
        "markers", "filesystem: reads the data directory (skipped when the suite runs on S3)"
    )
    if not hasattr(config, "workerinput"):  # the controlling process (or the only one)
        directory = tempfile.mkdtemp(prefix="dockyard-session-")
        os.environ[shared.SHARED_DIR_ENV] = directory  # xdist workers inherit it


def pytest_unconfigure(config: pytest.Config) -> None:
    if hasattr(config, "workerinput"):
        return
    directory = os.environ.pop(shared.SHARED_DIR_ENV, None)
    if directory:
        shared.stop_all(Path(directory))
        shutil.rmtree(directory, ignore_errors=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    tests = Path(__file__).resolve().parents[1]
    for item in items:
        with contextlib.suppress(ValueError):
            tier = Path(item.path).resolve().relative_to(tests).parts[0]
            if tier in TIERS:
                item.add_marker(getattr(pytest.mark, tier))
            if tier in DAEMON_TIERS:
                item.add_marker(pytest.mark.slow)
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("storage_backend") == "s3":
            item.add_marker(pytest.mark.slow)  # the protocol's second run, on moto
    if os.environ.get("DOCKYARD_TEST_S3"):
        skip = pytest.mark.skip(reason="reads the data directory; the servers use S3")
        for item in items:
            if "filesystem" in item.keywords:
                item.add_marker(skip)
    # The longest first (in collection order otherwise): workers that take them early finish
    # with everyone else instead of last.
    items.sort(key=_expected_length)


#: what takes longest, roughly: the image build, then the daemon tiers, then other slow tests
_LONGEST = {"e2e/test_image.py": 0, "s3": 1, "interop": 1, "e2e": 2}


def _expected_length(item: pytest.Item) -> int:
    path = Path(item.path).resolve()
    where = path.relative_to(Path(__file__).resolve().parents[1]).as_posix()
    for prefix, rank in _LONGEST.items():
        if where.startswith(prefix):
            return rank
    return 3 if "slow" in item.keywords else 4


# -- Dockyard ----------------------------------------------------------------------------------


def _start(work: Path, *, process: bool | None = None, **kwargs: Any) -> Server:
    """In the test process unless the test needs a process: several workers, arguments or an
    environment for ``dockyard serve``, or ``process=True`` (signals, memory, kill -9)."""
    if process is None:
        letsencrypt = kwargs.get("http", {}).get("tls", {}).get("letsencrypt")
        process = kwargs.get("workers", 1) > 1 or bool({"args", "env"} & set(kwargs))
        process = process or bool(letsencrypt)  # its certificate manager is a process
    if process:
        return DockyardProcess.launch(work, **kwargs)
    kwargs.pop("workers", None)
    return InProcessDockyard.start(work, **kwargs)


@pytest.fixture
def start_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerFactory]:
    """Start Dockyard with config overrides (``start_server(auth={...}, workers=2)``): in the
    test process, or in a process of its own (see ``_start``); all are stopped at teardown."""
    servers: list[Server] = []

    def start(**kwargs: Any) -> Server:
        server = _start(tmp_path_factory.mktemp("dockyard"), **kwargs)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server (in the test process) for the many API tests that need no configuration of
    their own. Bad input must never have made it answer 500 or log a traceback."""
    server = InProcessDockyard.start(tmp_path_factory.mktemp("shared"))
    yield server
    server.stop()
    log = server.log()
    assert "Traceback" not in log, log[-5000:]
    assert "level=error" not in log, [x for x in log.splitlines() if "level=error" in x]


@pytest.fixture(scope="session")
def shared_s3_server(
    tmp_path_factory: pytest.TempPathFactory, api_s3_storage: str
) -> Iterator[Server]:
    """The shared server's twin with its storage in S3 (moto), for the protocol's tests' second
    run (see ``storage_backend``)."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("DOCKYARD_TEST_S3", api_s3_storage)
        server = InProcessDockyard.start(tmp_path_factory.mktemp("shared-s3"))
    yield server
    server.stop()
    log = server.log()
    assert "Traceback" not in log, log[-5000:]
    assert "level=error" not in log, [x for x in log.splitlines() if "level=error" in x]


@pytest.fixture
def server(storage_backend: str, request: pytest.FixtureRequest) -> Server:
    """The shared server (on S3 in the protocol tests' S3 run)."""
    name = "shared_s3_server" if storage_backend == "s3" else "shared_server"
    return request.getfixturevalue(name)


#: the protocol's API tests, which run twice: every server on the filesystem, then on S3 (moto),
#: so the registry's behaviour is checked on object storage too, not only the driver
PROTOCOL_MODULES = frozenset(
    {
        "test_base_api.py",
        "test_blobs_api.py",
        "test_uploads_api.py",
        "test_manifests_api.py",
        "test_tags_catalog_api.py",
        "test_referrers_api.py",
        "test_read_your_writes.py",
    }
)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    path = Path(metafunc.definition.path)
    if path.parent.name == "api" and path.name in PROTOCOL_MODULES:
        metafunc.parametrize("storage_backend", ["filesystem", "s3"], indirect=True)


@pytest.fixture(autouse=True)
def storage_backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """Where the servers a test starts keep their data: ``filesystem``, or ``s3`` (a moto
    bucket, a prefix per server) in the protocol tests' second run. Tests that read the data
    directory (marked ``filesystem``) do not run on S3."""
    backend: str = getattr(request, "param", "filesystem")
    if backend != "s3":
        yield backend
        return
    if "filesystem" in request.keywords:
        pytest.skip("reads the data directory")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("DOCKYARD_TEST_S3", request.getfixturevalue("api_s3_storage"))
        yield backend


@pytest.fixture(scope="session")
def api_s3_storage(moto_s3: S3Endpoint) -> str:
    """``storage.s3`` (as JSON) of a bucket for the protocol tests' S3 run."""
    bucket = new_bucket(moto_s3, "api")
    return json.dumps(moto_s3.storage_config(bucket))


_counter = itertools.count()


@pytest.fixture
def repo(request: pytest.FixtureRequest) -> str:
    """A repository name unique to the test (so tests can share one server)."""
    base = "".join(c if c.isalnum() else "-" for c in request.node.name.lower()).strip("-")
    base = "-".join(p for p in base.split("-") if p)[:60].strip("-")
    return f"t{next(_counter)}-{os.getpid()}/{base}"


# -- S3 and Redis ------------------------------------------------------------------------------


@pytest.fixture(scope="session", autouse=True)
def api_suite_on_s3() -> Iterator[None]:
    """``DOCKYARD_TEST_S3=moto``: every server the tests start keeps its data in S3 (a moto
    server in this process) instead of a directory, so the API suite checks the registry on the
    S3 driver; tests marked ``filesystem`` (they read the data directory) are skipped."""
    if os.environ.get("DOCKYARD_TEST_S3") != "moto":
        yield
        return
    with start_moto() as endpoint:
        bucket = new_bucket(endpoint, "api")
        os.environ["DOCKYARD_TEST_S3"] = json.dumps(endpoint.storage_config(bucket))
        try:
            yield
        finally:
            os.environ["DOCKYARD_TEST_S3"] = "moto"


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[S3Endpoint]:
    """moto's S3 emulator in this process (fast; checks no signatures: see harness/s3.py)."""
    with start_moto() as endpoint:
        yield endpoint


@pytest.fixture(scope="session")
def rgw_s3() -> S3Endpoint:
    """Ceph RGW, a real S3 server, started once for the whole session (every worker uses the
    same one; each test makes its own bucket); skipped if Ceph is not installed."""
    state = shared.shared_daemon("rgw", launch_rgw)
    return S3Endpoint(
        url=state["url"],
        access_key=state["access_key"],
        secret_key=state["secret_key"],
        kind="rgw",
        started_in=state["started_in"],
    )


@pytest.fixture(scope="session")
def redis_addr() -> Iterator[str]:
    """``"127.0.0.1:PORT"`` of this worker's redis-server (tests empty it with
    ``flush_redis``); skipped if redis-server is not installed."""
    with start_redis() as addr:
        yield addr


@pytest.fixture
def s3_bucket_factory(request: pytest.FixtureRequest) -> Iterator[BucketFactory]:
    """``make(endpoint)`` creates a bucket named after the test and returns its name; the
    buckets are emptied and deleted at teardown (best effort)."""
    made: list[tuple[S3Endpoint, str]] = []

    def make(endpoint: S3Endpoint) -> str:
        name = new_bucket(endpoint, request.node.name)
        made.append((endpoint, name))
        return name

    yield make
    for endpoint, name in made:
        with contextlib.suppress(Exception):
            endpoint.delete_bucket(name)


# -- registry:2 --------------------------------------------------------------------------------


@pytest.fixture
def start_registry2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry2Factory]:
    """Start registry:2 on a directory (``start_registry2(root=path)``) or an S3 bucket
    (``start_registry2(s3=endpoint.storage_config(bucket))``); skipped if it is not
    installed."""
    if REGISTRY2 is None:
        pytest.skip("docker-registry (registry:2) is not installed")
    started: list[Registry2] = []

    def start(**kwargs: Any) -> Registry2:
        registry = Registry2.start(tmp_path_factory.mktemp("registry2"), **kwargs)
        started.append(registry)
        return registry

    yield start
    for registry in started:
        registry.stop()


# -- docker and containerd ---------------------------------------------------------------------


@pytest.fixture(scope="session")
def dockerd_engine() -> Iterator[Dockerd]:
    """This worker's Docker engine, trusting every registry on loopback over plain HTTP;
    skipped if dockerd is not installed."""
    if find_dockerd() is None:
        pytest.skip("dockerd is not installed (Debian package docker.io)")
    # overlay2 builds images several times faster than vfs; not every filesystem carries it
    try:
        engine = start_dockerd(insecure_registries=["127.0.0.0/8"], storage_driver="overlay2")
    except (RuntimeError, TimeoutError):
        engine = start_dockerd(insecure_registries=["127.0.0.0/8"])
    yield engine
    engine.stop()


@pytest.fixture
def dockerd(dockerd_engine: Dockerd, tmp_path: Path) -> Dockerd:
    """The engine, with a docker CLI configuration (logins) of the test's own."""
    return dockerd_engine.client(tmp_path / "docker-config")


@pytest.fixture(scope="module")
def registry_port() -> int:
    """A free port for a registry the test starts (``start_server(port=registry_port)``)."""
    return free_port()


def need_binaries(*names: str) -> None:
    """Skip the test unless every program in ``names`` is installed."""
    missing = [name for name in names if shutil.which(name) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")


# -- the browser (the web UI's tests) ----------------------------------------------------------


@pytest.fixture(scope="session")
def chromium() -> Iterator[Chromium]:
    """This worker's Chromium, driven by Playwright (``harness.browser``), launched at its first
    browser test and closed at the end of the session; skipped if chromium or playwright is not
    installed. Tests take ``page`` or ``new_page`` rather than this."""
    browser = launch_chromium()
    yield browser
    browser.close()


@pytest.fixture
def new_page(chromium: Chromium) -> Iterator[PageFactory]:
    """``new_page(**context_options)``: a page in a new browser context of its own
    (``bypass_csp=True``, ``base_url=...``, ``extra_http_headers=...``), recording ``__pwned``
    calls, dialogs, CSP violations, console and page errors (``harness.browser``). At teardown
    the contexts are closed, and the test fails if script ran in any of them (a ``__pwned`` call
    or a dialog still in the log: ``browser_log(page).clear()`` after provoking one)."""
    pages: list[Page] = []
    ran: list[str] = []
    with chromium.active():

        def make(**context_options: Any) -> Page:
            page = chromium.new_page(**context_options)
            pages.append(page)
            return page

        yield make
        for page in pages:
            ran += [f"{page.url}: {sign}" for sign in browser_log(page).script_ran()]
            with contextlib.suppress(Exception):
                page.context.close()
    if ran:
        pytest.fail("script ran in the browser:\n  " + "\n  ".join(ran), pytrace=False)


@pytest.fixture
def page(new_page: PageFactory) -> Page:
    """A fresh page in a browser context of its own (see ``new_page``)."""
    return new_page()
