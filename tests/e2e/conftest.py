"""Fixtures for end-to-end tests with real clients (the engines themselves: engines.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from engines import Dockerd, find_dockerd, start_dockerd

from support import free_port


@pytest.fixture(scope="module")
def registry_port() -> int:
    """The port the module's registry will listen on, known before dockerd starts (it is given
    to dockerd as ``--insecure-registry``); start it with ``start_server(port=registry_port)``."""
    return free_port()


@pytest.fixture(scope="module")
def dockerd(registry_port: int) -> Iterator[Dockerd]:
    """A private Docker engine for the module; skipped only if dockerd is not installed."""
    if find_dockerd() is None:
        pytest.skip("dockerd is not installed (Debian package docker.io)")
    engine = start_dockerd(insecure_registries=[f"127.0.0.1:{registry_port}"])
    try:
        yield engine
    finally:
        engine.stop()
