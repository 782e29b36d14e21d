"""Shared fixtures (helpers live in support.py, importable as ``support``)."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
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
    sha256,
    wait_for_port,
    write_config,
)


@pytest.fixture
def start_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerFactory]:
    """Start servers with config overrides; all are stopped at teardown."""
    servers: list[Server] = []

    def start(
        *,
        root: Path | None = None,
        workers: int = 1,
        env: dict[str, str] | None = None,
        port: int | None = None,
        args: list[str] | None = None,
        **overrides: Any,
    ) -> Server:
        work = tmp_path_factory.mktemp("dockyard")
        root = root or work / "data"
        port = port or free_port()
        config_path = work / "config.yml"
        write_config(config_path, root, port, **overrides)
        log_path = work / "server.log"
        proc_env = {**os.environ, **(env or {})}
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "dockyard",
                    "serve",
                    str(config_path),
                    "--workers",
                    str(workers),
                    *(args or []),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=proc_env,
            )
        server = Server(port=port, root=root, config_path=config_path, log_path=log_path, proc=proc)
        servers.append(server)
        try:
            wait_for_port(port, proc)
        except Exception:
            server.stop()
            raise RuntimeError(f"server did not start:\n{server.log()}") from None
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server (two workers) for the many API tests that need no special configuration."""
    work = tmp_path_factory.mktemp("shared")
    port = free_port()
    config_path = work / "config.yml"
    write_config(config_path, work / "data", port)
    log_path = work / "server.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dockyard", "serve", str(config_path), "--workers", "2"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = Server(
        port=port, root=work / "data", config_path=config_path, log_path=log_path, proc=proc
    )
    wait_for_port(port, proc)
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
