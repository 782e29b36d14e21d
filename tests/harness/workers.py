"""Which worker of a ``dockyard serve --workers N`` serves a connection, read from /proc, and
connections placed on chosen workers: what tests need to show that something holds on every
worker rather than on whichever one the kernel happened to pick."""

from __future__ import annotations

import http.client
import os
import socket
import time
from typing import Any


def workers_of(server: Any) -> list[int]:
    """The pids of the server's workers (the supervisor's children)."""
    pid = server.proc.pid
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def _sockets(pid: int) -> set[str]:
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            found.add(link[8:-1])
    return found


def _server_side_inode(server_port: int, client_port: int) -> str | None:
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            local, remote = fields[1], fields[2]
            if int(local.rsplit(":", 1)[1], 16) == server_port and (
                int(remote.rsplit(":", 1)[1], 16) == client_port
            ):
                return fields[9]
    return None


def worker_of(server: Any, sock: socket.socket) -> int:
    """The pid of the worker that accepted the connection ``sock`` is the client end of."""
    client_port = sock.getsockname()[1]
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        inode = _server_side_inode(server.port, client_port)
        for pid in workers_of(server):
            if inode is not None and inode in _sockets(pid):
                return pid
        time.sleep(0.02)
    raise AssertionError("no worker holds the connection")


class Connection:
    """One keep-alive HTTP connection to ``server``, from ``source``."""

    def __init__(self, server: Any, source: str = "127.0.0.1") -> None:
        self.http = http.client.HTTPConnection(
            "127.0.0.1", server.port, timeout=10, source_address=(source, 0)
        )
        self.http.connect()
        assert self.http.sock is not None
        self.sock: socket.socket = self.http.sock

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        """Send one request on this connection: (status, headers, body)."""
        self.http.request(method, path, body=body, headers=headers or {})
        response = self.http.getresponse()
        return response.status, dict(response.getheaders()), response.read()

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        status, _, body = self.request("GET", path, headers=headers)
        return status, body

    def served(self) -> bool:
        return self.get("/v2/")[0] == 200

    def close(self) -> None:
        self.http.close()


def spread_over_workers(server: Any, count: int) -> list[Connection]:
    """``count`` served connections, each on another worker (the kernel picks: keep trying,
    closing each spare before the next, so at most ``count`` + 1 are open at once)."""
    chosen: dict[int, Connection] = {}
    for _ in range(200):
        conn = Connection(server)
        pid = worker_of(server, conn.sock)
        if pid in chosen:
            conn.close()
            time.sleep(0.02)
            continue
        assert conn.get("/debug/health")[0] == 200
        chosen[pid] = conn
        if len(chosen) == count:
            return list(chosen.values())
    raise AssertionError("the kernel never handed connections to enough workers")
