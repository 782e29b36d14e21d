"""Loopback ports: free ones, and waiting for a server to listen on one."""

from __future__ import annotations

import contextlib
import http.client
import socket
import subprocess
import time


def free_port() -> int:
    """A port nothing listens on now (the kernel's pick, so parallel test workers do not
    collide on a guess)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(
    port: int,
    proc: subprocess.Popen[bytes] | None = None,
    timeout: float = 20.0,
    path: str | None = None,
) -> None:
    """Until something accepts connections on ``port`` or, with ``path``, until an HTTP
    ``GET path`` there is answered with a status below 500 (a server that listens before its
    workers are ready); fails early if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening")
        if _answers(port, path):
            return
        time.sleep(0.02)
    what = f"GET {path} answered" if path else "listening"
    raise TimeoutError(f"nothing {what} on {port} after {timeout}s")


def _answers(port: int, path: str | None) -> bool:
    with contextlib.suppress(OSError, http.client.HTTPException):
        if path is None:
            with socket.create_connection(("127.0.0.1", port), 0.2):
                return True
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            conn.request("GET", path)
            return conn.getresponse().status < 500
        finally:
            conn.close()
    return False


class Loopback:
    """A plain-HTTP service on ``port`` (a field or property of the subclass) of 127.0.0.1."""

    port: int

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def v2(self, path: str) -> str:
        return f"{self.url}/v2/{path}"
