"""redis-server for tests, on a loopback port of its own, persisting nothing."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.net import free_port, wait_for_port


@contextlib.contextmanager
def start_redis() -> Iterator[str]:
    """redis-server on a free loopback port, persisting nothing; yields ``"127.0.0.1:PORT"``.
    Skips the test if redis-server is not installed."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (Debian package redis-server)")
    with tempfile.TemporaryDirectory(prefix="redis-") as work:
        port = free_port()
        log_path = Path(work) / "redis.log"
        with open(log_path, "wb") as log:
            command = [binary, "--bind", "127.0.0.1", "--port", str(port), "--dir", work]
            command += ["--save", "", "--appendonly", "no", "--daemonize", "no"]
            proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            try:
                wait_for_port(port, proc)
            except (RuntimeError, TimeoutError) as e:
                raise RuntimeError(f"redis-server: {e}\n{log_path.read_text()}") from None
            addr = f"127.0.0.1:{port}"
            with contextlib.closing(redis_client(addr)) as r:
                r.ping()
            yield addr
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def redis_client(addr: str) -> Any:
    """A synchronous ``redis.Redis`` for ``"HOST:PORT"`` (close it after use)."""
    import redis

    host, _, port = addr.rpartition(":")
    return redis.Redis(host=host, port=int(port), socket_timeout=10)


def flush_redis(addr: str) -> None:
    """Remove every key from the Redis at ``addr`` (tests share one per session)."""
    with contextlib.closing(redis_client(addr)) as r:
        r.flushall()
