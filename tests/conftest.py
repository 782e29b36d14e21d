"""Shared fixtures (helpers live in support.py, importable as ``support``)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pytest

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
    base = "-".join(p for p in base.split("-") if p)[:60]
    return f"t{next(_counter)}/{base}"
