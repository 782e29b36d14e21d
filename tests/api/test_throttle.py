"""Failed logins and connections per client address, against running servers.

Clients come from several addresses by binding their sockets to 127.0.0.2, 127.0.0.3, ... (all
of 127.0.0.0/8 is local on Linux); the servers listen on 127.0.0.1. Which worker serves a
connection is read from /proc (harness/workers.py), so tests that need several workers check
that they got them."""

from __future__ import annotations

import base64
import http.client
import json
import os
import signal
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import requests

from dockyard.auth.htpasswd import hash_password
from harness import Server, ServerFactory, assert_error, session_from
from harness.workers import Connection, spread_over_workers, worker_of, workers_of

ALICE = ("alice", "secret")
LOGIN = {"attempts": 3, "addressattempts": 100, "window": "10s", "lockout": "30s"}


def limits(connections: int = 0, **login: Any) -> dict[str, Any]:
    return {"limits": {"connectionsperaddress": connections, "login": {**LOGIN, **login}}}


def write_users(path: Path, **users: str) -> Path:
    path.write_text("".join(f"{u}:{hash_password(p, rounds=4)}\n" for u, p in users.items()))
    return path


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture
def users(tmp_path: Path) -> Path:
    return write_users(tmp_path / "htpasswd", alice="secret", bob="bobpw")


def htpasswd_server(start: ServerFactory, users: Path, **options: Any) -> Server:
    http = options.pop("http", limits())
    return start(http=http, auth={"htpasswd": {"realm": "R", "path": str(users)}}, **options)


# -- failed logins ---------------------------------------------------------------------------


def test_guesses_from_one_address_leave_the_right_password_working_elsewhere(
    start_server: ServerFactory, users: Path
) -> None:
    s = htpasswd_server(start_server, users)
    attacker, owner = session_from("127.0.0.2"), session_from("127.0.0.3")
    for i in range(3):
        assert_error(attacker.get(s.v2(""), auth=("alice", f"guess{i}")), 401, "UNAUTHORIZED")
    r = attacker.get(s.v2(""), auth=ALICE)  # locked before bcrypt: even the right password
    err = assert_error(r, 429, "TOOMANYREQUESTS")
    assert 0 < int(r.headers["Retry-After"]) <= 30 and err["detail"]["retryAfter"] > 0
    assert owner.get(s.v2(""), auth=ALICE).status_code == 200
    assert_error(owner.get(s.v2(""), auth=("alice", "typo")), 401, "UNAUTHORIZED")
    assert attacker.get(s.v2(""), auth=("bob", "bobpw")).status_code == 200


@pytest.fixture
def token_server(start_server: ServerFactory, tmp_path: Path, users: Path) -> Server:
    return start_server(
        http=limits(),
        auth={
            "token": {
                "service": "registry.test",
                "server": {
                    "htpasswd": str(users),
                    "key": str(tmp_path / "key.pem"),
                    "access": [{"repository": "*", "users": ["*"], "actions": ["pull"]}],
                },
            }
        },
    )


def test_token_server_logins_are_throttled_the_same_way(token_server: Server) -> None:
    s = token_server
    url = f"{s.url}/auth/token"
    attacker, owner = session_from("127.0.0.2"), session_from("127.0.0.3")
    for i in range(2):
        r = attacker.get(url, auth=("alice", f"guess{i}"), params={"service": "registry.test"})
        assert_error(r, 401, "UNAUTHORIZED")
    form = {"grant_type": "password", "username": "alice", "password": "guess"}
    assert_error(attacker.post(url, data=form), 401, "UNAUTHORIZED")  # the third, by POST
    r = attacker.get(url, auth=ALICE, params={"service": "registry.test"})
    assert_error(r, 429, "TOOMANYREQUESTS")
    assert int(r.headers["Retry-After"]) > 0
    assert_error(attacker.post(url, data={**form, "password": "secret"}), 429, "TOOMANYREQUESTS")
    assert owner.get(url, auth=ALICE, params={"service": "registry.test"}).status_code == 200
    assert owner.post(url, data={**form, "password": "secret"}).status_code == 200


@pytest.mark.slow
def test_failures_are_counted_across_workers(start_server: ServerFactory, users: Path) -> None:
    # registry:2's-era default of 10 (what the throttle allowed per worker before)
    s = htpasswd_server(start_server, users, workers=3, http=limits(attempts=10))
    connections = spread_over_workers(s, 3)
    wrong = {"Authorization": basic("alice", "wrong")}
    for i in range(10):  # round-robin over the workers: ten failures in all
        assert connections[i % 3].get("/v2/", wrong)[0] == 401
    for conn in connections:  # not ten per worker
        status, body = conn.get("/v2/", {"Authorization": basic("alice", "secret")})
        assert status == 429, body
    assert session_from("127.0.0.2").get(s.v2(""), auth=ALICE).status_code == 200


def test_failures_are_counted_across_instances_through_redis(
    start_server: ServerFactory, tmp_path: Path, redis_addr: str
) -> None:
    user = f"u{uuid.uuid4().hex[:8]}"  # the Redis is shared by the session
    path = write_users(tmp_path / "users", **{user: "pw"})
    first, second = (
        htpasswd_server(start_server, path, http=limits(attempts=10), redis={"addr": redis_addr})
        for _ in range(2)
    )
    for i in range(10):
        s = (first, second)[i % 2]
        assert_error(requests.get(s.v2(""), auth=(user, "wrong")), 401, "UNAUTHORIZED")
    for s in (second, first):
        assert_error(requests.get(s.v2(""), auth=(user, "pw")), 429, "TOOMANYREQUESTS")
    assert session_from("127.0.0.2").get(second.v2(""), auth=(user, "pw")).status_code == 200


@pytest.mark.slow
def test_unreachable_redis_falls_back_to_the_workers_table(
    start_server: ServerFactory, users: Path
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{sock.getsockname()[1]}"  # nothing listens there
    s = htpasswd_server(start_server, users, workers=2, redis={"addr": dead})
    for _ in range(3):
        assert requests.get(s.v2(""), auth=("alice", "wrong")).status_code == 401
    assert_error(requests.get(s.v2(""), auth=ALICE), 429, "TOOMANYREQUESTS")
    assert "redis is unavailable" in s.log()


def test_spoofed_forwarded_for_is_ignored(start_server: ServerFactory, users: Path) -> None:
    s = htpasswd_server(start_server, users, http=limits(addressattempts=4))
    attacker = session_from("127.0.0.2")
    # every attempt claims another client: all are counted against the real peer ...
    for i in range(3):
        r = attacker.get(
            s.v2(""), auth=("alice", "wrong"), headers={"X-Forwarded-For": f"203.0.113.{i}"}
        )
        assert r.status_code == 401
    r = attacker.get(s.v2(""), auth=ALICE, headers={"X-Forwarded-For": "203.0.113.99"})
    assert_error(r, 429, "TOOMANYREQUESTS")  # ... so a spoofed header does not escape
    # and the address as a whole: one more failure, for another user, locks it for everyone
    r = attacker.get(s.v2(""), auth=("carol", "x"), headers={"X-Forwarded-For": "198.51.100.1"})
    assert r.status_code == 401
    r = attacker.get(s.v2(""), auth=("bob", "bobpw"), headers={"X-Forwarded-For": "198.51.100.2"})
    assert_error(r, 429, "TOOMANYREQUESTS")
    time.sleep(0.2)
    log = s.log()
    assert "remote=127.0.0.2" in log and "203.0.113." not in log and "198.51.100." not in log


def test_forwarded_for_from_a_trusted_proxy_is_honoured(
    start_server: ServerFactory, users: Path
) -> None:
    s = htpasswd_server(
        start_server, users, http={**limits(), "trustedproxies": ["127.0.0.2", "10.0.0.0/8"]}
    )
    proxy, direct = session_from("127.0.0.2"), session_from("127.0.0.3")

    def via_proxy(chain: str, auth: tuple[str, str]) -> requests.Response:
        return proxy.get(s.v2(""), auth=auth, headers={"X-Forwarded-For": chain})

    for _ in range(3):
        assert via_proxy("203.0.113.7", ("alice", "wrong")).status_code == 401
    assert_error(via_proxy("203.0.113.7", ALICE), 429, "TOOMANYREQUESTS")
    # the rightmost untrusted entry is the client, whatever it put in front; trusted hops
    # (another proxy in 10/8) are skipped
    assert_error(via_proxy("198.51.100.1, 203.0.113.7", ALICE), 429, "TOOMANYREQUESTS")
    assert_error(via_proxy("203.0.113.7, 10.1.1.1", ALICE), 429, "TOOMANYREQUESTS")
    # what nginx's $proxy_add_x_forwarded_for makes of a client sending garbage
    assert_error(via_proxy("bogus, 203.0.113.7", ALICE), 429, "TOOMANYREQUESTS")
    # another client behind the proxy is not locked out (from here on alice's password is in
    # the verification cache, which is never throttled)
    assert via_proxy("203.0.113.8", ALICE).status_code == 200
    # a peer that is not a trusted proxy: its header means nothing, the peer is the client
    r = direct.get(s.v2(""), auth=("alice", "x"), headers={"X-Forwarded-For": "203.0.113.9"})
    assert r.status_code == 401
    time.sleep(0.2)
    log = s.log()
    assert "remote=203.0.113.7" in log and "remote=203.0.113.8" in log
    assert "user=alice remote=127.0.0.3" in log and "203.0.113.9" not in log


def test_password_spraying_locks_the_address(start_server: ServerFactory, users: Path) -> None:
    s = htpasswd_server(start_server, users, http=limits(addressattempts=4))
    sprayer = session_from("127.0.0.2")
    for user in ("alice", "bob", "carol", "dave"):  # one guess each: no user key is near 3
        assert sprayer.get(s.v2(""), auth=(user, "Summer2024!")).status_code == 401
    assert_error(sprayer.get(s.v2(""), auth=("erin", "x")), 429, "TOOMANYREQUESTS")
    assert_error(sprayer.get(s.v2(""), auth=ALICE), 429, "TOOMANYREQUESTS")
    assert session_from("127.0.0.3").get(s.v2(""), auth=ALICE).status_code == 200


# -- connections per address ------------------------------------------------------------------


def refused(server: Server, source: str = "127.0.0.1") -> dict[str, Any] | None:
    """Open one more connection and send a request: the OCI error body if the server refused
    it (checking the raw answer and that the connection is closed), None if it was served."""
    with socket.create_connection(
        ("127.0.0.1", server.port), timeout=10, source_address=(source, 0)
    ) as sock:
        sock.sendall(b"GET /v2/ HTTP/1.1\r\nHost: registry\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        if not lines[0].startswith("HTTP/1.1 429"):
            assert lines[0].startswith("HTTP/1.1 200"), lines[0]
            return None
        assert lines[0] == "HTTP/1.1 429 Too Many Requests"
        headers = dict(line.split(": ", 1) for line in lines[1:])
        assert headers["Content-Type"] == "application/json"
        assert headers["Connection"] == "close"
        assert headers["Docker-Distribution-API-Version"] == "registry/2.0"
        while len(body) < int(headers["Content-Length"]):
            body += sock.recv(65536)
        assert sock.recv(65536) == b""  # closed by the server
        error = json.loads(body)["errors"][0]
        assert error["code"] == "TOOMANYREQUESTS"
        assert "connectionsperaddress" in error["message"]
        return error


@pytest.mark.slow
def test_connections_per_address_across_workers(start_server: ServerFactory) -> None:
    s = start_server(workers=2, http=limits(connections=3))
    held = spread_over_workers(s, 2)
    held.append(Connection(s))
    assert all(c.served() for c in held)
    error = refused(s)
    assert error is not None and error["detail"] == {"limit": 3}
    assert refused(s, "127.0.0.2") is None  # another address
    held.pop(0).close()
    deadline = time.monotonic() + 5
    while refused(s) is not None:  # the close reaches the server
        assert time.monotonic() < deadline
        time.sleep(0.05)
    for conn in held:
        conn.close()


def test_trusted_proxies_are_exempt_from_the_connection_limit(
    start_server: ServerFactory,
) -> None:
    s = start_server(http={**limits(connections=2), "trustedproxies": ["127.0.0.2"]})
    proxy = [Connection(s, "127.0.0.2") for _ in range(4)]
    assert all(c.served() for c in proxy)
    direct = [Connection(s, "127.0.0.3") for _ in range(2)]
    assert all(c.served() for c in direct)
    assert refused(s, "127.0.0.3") is not None
    for conn in proxy + direct:
        conn.close()


@pytest.mark.slow
def test_a_restarted_worker_forgets_the_connections_it_held(
    start_server: ServerFactory,
) -> None:
    s = start_server(workers=2, http=limits(connections=2))
    for _ in range(50):
        pair = [Connection(s), Connection(s)]
        pids = {worker_of(s, c.sock) for c in pair}
        if len(pids) == 1:
            break
        for conn in pair:
            conn.close()
        time.sleep(0.05)
    assert len(pids) == 1, "never got two connections on one worker"
    assert all(c.served() for c in pair) and refused(s) is not None
    (victim,) = pids
    os.kill(victim, signal.SIGKILL)  # its connections die with it
    for conn in pair:
        conn.close()
    deadline = time.monotonic() + 15
    while victim in workers_of(s) or len(workers_of(s)) < 2:
        assert time.monotonic() < deadline, s.log()
        time.sleep(0.1)
    while True:  # the replacement listens once it has zeroed its column
        fresh: list[Connection] = []
        try:
            fresh = [Connection(s), Connection(s)]
            if all(c.served() for c in fresh):
                break
        except (ConnectionError, http.client.HTTPException):
            pass
        for conn in fresh:
            conn.close()
        assert time.monotonic() < deadline, "the dead worker's connections are still counted"
        time.sleep(0.1)
    assert refused(s) is not None
    for conn in fresh:
        conn.close()
