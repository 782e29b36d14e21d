"""Shared fixtures (helpers live in support.py, importable as ``support``)."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from s3support import S3Endpoint, new_bucket, start_moto, start_redis, start_rgw
from support import (  # noqa: F401 - re-exported for tests
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    Server,
    ServerFactory,
    free_port,
    launch,
    sha256,
    wait_for_port,
    write_config,
)


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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("DOCKYARD_TEST_S3"):
        skip = pytest.mark.skip(reason="reads the data directory; the servers use S3")
        for item in items:
            if "filesystem" in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def start_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerFactory]:
    """Start servers with config overrides (see ``support.launch``); all are stopped at
    teardown."""
    servers: list[Server] = []

    def start(**kwargs: Any) -> Server:
        server = launch(tmp_path_factory.mktemp("dockyard"), **kwargs)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server (two workers) for the many API tests that need no special configuration."""
    server = launch(tmp_path_factory.mktemp("shared"), workers=2)
    yield server
    server.stop()
    # Bad input must never have produced a 500 or a traceback.
    log = server.log()
    assert "Traceback" not in log, log[-5000:]
    assert "level=error" not in log, [x for x in log.splitlines() if "level=error" in x]


@pytest.fixture
def server(shared_server: Server) -> Server:
    return shared_server


_counter = itertools.count()


@pytest.fixture
def repo(request: pytest.FixtureRequest) -> str:
    """A repository name unique to the test (so tests can share one server)."""
    base = "".join(c if c.isalnum() else "-" for c in request.node.name.lower()).strip("-")
    base = "-".join(p for p in base.split("-") if p)[:60].rstrip("-")
    return f"t{next(_counter)}/{base}"


# -- S3 and Redis servers (s3support.py), one of each per session, started on first use --------


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[S3Endpoint]:
    """moto's S3 emulator (fast; checks no signatures: see s3support.py)."""
    with start_moto() as endpoint:
        yield endpoint


@pytest.fixture(scope="session")
def rgw_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Endpoint]:
    """Ceph RGW, a real S3 server (about 12 s to start); skipped if Ceph is not installed."""
    with start_rgw(tmp_path_factory.mktemp("rgw")) as endpoint:
        yield endpoint


@pytest.fixture(scope="session")
def redis_addr() -> Iterator[str]:
    """``"127.0.0.1:PORT"`` of a redis-server shared by the session (``flush_redis`` empties
    it); skipped if redis-server is not installed."""
    with start_redis() as addr:
        yield addr


@pytest.fixture
def s3_bucket_factory(request: pytest.FixtureRequest) -> Iterator[Callable[[S3Endpoint], str]]:
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
