"""What one client can hold of the server: stalled request bodies are abandoned after
``http.limits.bodyidletimeout`` and hold no buffers meanwhile; a repository has at most
``http.limits.uploadsperrepository`` upload sessions open."""

from __future__ import annotations

import os
import socket
import time
from urllib.parse import urlsplit

import pytest
import requests

from harness import Server, ServerFactory, assert_error
from harness.dockyard import memory_kib

STALLED = 300


def rss_mib(pid: int) -> float:
    return memory_kib(pid) / 1024


def stalled_patch(server: Server, session: requests.Session, sent: bytes) -> socket.socket:
    """A PATCH announcing 64 MiB that sends ``sent`` and then nothing."""
    location = session.post(server.v2("stall/app/blobs/uploads/")).headers["Location"]
    parts = urlsplit(location)
    conn = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    conn.sendall(
        f"PATCH {parts.path}?{parts.query} HTTP/1.1\r\nHost: {server.host}\r\n"
        f"Content-Length: {64 * 1024 * 1024}\r\n\r\n".encode()
    )
    conn.sendall(sent)
    return conn


def closed_by_server(conn: socket.socket, deadline: float) -> bool:
    conn.settimeout(max(0.05, deadline - time.monotonic()))
    try:
        while conn.recv(65536):
            pass  # the 408 response, then end of stream
    except TimeoutError:
        return False
    except OSError:
        pass  # reset: closed too
    return True


@pytest.mark.slow
def test_stalled_uploads_hold_no_buffers_and_are_closed(start_server: ServerFactory) -> None:
    """Hundreds of PATCHes that send 256 KiB and stall: the worker writes out what each sent
    instead of holding it, closes every one of them after the idle timeout, and its memory
    comes back down afterwards."""
    server = start_server(
        process=True,  # one worker, the server process itself: its RSS is what we measure
        http={"limits": {"bodyidletimeout": "6s", "connectionsperaddress": 0}},
    )
    session = requests.Session()
    session.get(server.v2(""))
    time.sleep(0.5)
    baseline = rss_mib(server.proc.pid)
    sent = os.urandom(256 * 1024)
    opened = time.monotonic()
    conns = [stalled_patch(server, session, sent) for _ in range(STALLED)]
    time.sleep(2.5)  # every client has paused for longer than the pump's pause
    stalled_growth = rss_mib(server.proc.pid) - baseline
    # Held as buffers that would be 75 MiB (plus allocator slack, which was the bigger part);
    # written out, what is left per connection is its socket and request objects.
    assert stalled_growth < 45, f"{stalled_growth:.0f} MiB for {STALLED} stalled uploads"
    deadline = opened + 6 + 15
    still_open = [c for c in conns if not closed_by_server(c, deadline)]
    assert not still_open, f"{len(still_open)} stalled connections were never closed"
    for conn in conns:
        conn.close()
    time.sleep(1)
    after = rss_mib(server.proc.pid) - baseline
    assert after < 30, f"{after:.0f} MiB still held after the connections closed"
    # A stalled body fails its request with 408; the upload is left as it was.
    assert " status=408 " in server.log()


@pytest.mark.slow
def test_a_slow_body_that_keeps_moving_finishes(start_server: ServerFactory) -> None:
    server = start_server(http={"limits": {"bodyidletimeout": "1s"}})
    data = os.urandom(40_000)

    def trickle():  # type: ignore[no-untyped-def]
        for i in range(0, len(data), 4000):  # 10 pieces over 4 s, never 1 s apart
            time.sleep(0.4)
            yield data[i : i + 4000]

    digest = "sha256:" + __import__("hashlib").sha256(data).hexdigest()
    r = requests.post(
        server.v2("slow/app/blobs/uploads/"), params={"digest": digest}, data=trickle()
    )
    assert r.status_code == 201, r.text


def test_uploads_per_repository_are_limited(start_server: ServerFactory) -> None:
    server = start_server(http={"limits": {"uploadsperrepository": 3}})
    locations = [
        server.session.post(server.v2("busy/app/blobs/uploads/")).headers["Location"]
        for _ in range(3)
    ]
    r = server.session.post(server.v2("busy/app/blobs/uploads/"))
    error = assert_error(r, 429, "TOOMANYREQUESTS")
    assert "uploadsperrepository" in error["message"]
    assert r.headers["Retry-After"]
    # Another repository is not affected; finishing or cancelling one frees a place.
    assert server.session.post(server.v2("other/app/blobs/uploads/")).status_code == 202
    url = locations[0] if locations[0].startswith("http") else server.url + locations[0]
    assert server.session.delete(url).status_code == 204
    assert server.session.post(server.v2("busy/app/blobs/uploads/")).status_code == 202
