"""Requests racing on one upload session can never change a stored blob.

The attack (hardening issue, defect 1): a pusher uploads the bytes of a blob another repository
holds, opens a second PATCH on the same session with its body held back, completes the upload
with PUT ?digest= while that PATCH is in flight, then sends the PATCH body. Before the fix the
commit renamed the upload file over the existing blob and the PATCH kept writing into it.

Every case ends with the same checks: every blob reads back with its digest, and ``dockyard
fsck`` finds the store clean. The servers run several workers (and, on S3, two instances), so
the racing requests land on different processes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from urllib.parse import urlencode, urlsplit

import pytest

from harness import S3Endpoint, Server, ServerFactory, sha256
from harness.workers import spread_over_workers

ROUNDS = 3
HELD_BODY = b"X" * 100


class HeldRequest:
    """A request whose headers are sent now and whose body is sent later, on its own
    connection (as an attacker holding a PATCH open would)."""

    def __init__(self, server: Server, method: str, location: str, length: int) -> None:
        path = urlsplit(location)
        target = path.path + (f"?{path.query}" if path.query else "")
        self.sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        self.sock.sendall(
            f"{method} {target} HTTP/1.1\r\nHost: {server.host}\r\n"
            f"Content-Type: application/octet-stream\r\nContent-Length: {length}\r\n\r\n".encode()
        )

    def finish(self, body: bytes) -> int:
        """Send the body; return the response status (0 if the server closed first)."""
        try:
            self.sock.sendall(body)
            response = b""
            while b"\r\n" not in response:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return 0
                response += chunk
            return int(response.split(b" ", 2)[1])
        except OSError:
            return 0
        finally:
            self.sock.close()


def start(server: Server, name: str) -> str:
    r = server.session.post(server.v2(f"{name}/blobs/uploads/"))
    assert r.status_code == 202, r.text
    return absolute(server, r.headers["Location"])


def absolute(server: Server, location: str) -> str:
    return location if location.startswith("http") else server.url + location


def patch(server: Server, location: str, data: bytes) -> str:
    r = server.session.patch(
        location, data=data, headers={"Content-Type": "application/octet-stream"}
    )
    assert r.status_code == 202, r.text
    return absolute(server, r.headers["Location"])


def settle() -> None:
    """Let the server reach the held request's handler before the racing request."""
    time.sleep(0.3)


def check_blobs(servers: list[Server], blobs: dict[str, tuple[str, bytes]]) -> None:
    """Every blob reads back, from every server, with its digest and its exact bytes."""
    for server in servers:
        for digest, (name, data) in blobs.items():
            r = server.session.get(server.v2(f"{name}/blobs/{digest}"))
            assert r.status_code == 200, (name, digest, r.status_code)
            assert sha256(r.content) == digest, f"{name}@{digest} was rewritten"
            assert r.content == data


def fsck_clean(server: Server) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "dockyard", "fsck", str(server.config_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "clean" in done.stdout


def race_commit_against_held_patch(
    patcher: Server, committer: Server, name: str, data: bytes, locks: bool = True
) -> None:
    """The attack: the upload holds ``data``; a PATCH is held open on one server while the
    upload is completed on another; then the PATCH body arrives.

    Either the commit wins (201) and the PATCH, too late, is refused (400/404/416), or (with
    upload locks) the commit is refused while the PATCH is in flight (400) and the PATCH then
    lands (202). Without locks nothing holds the commit back: it wins. Never a 5xx."""
    location = patch(patcher, start(patcher, name), data)
    held = HeldRequest(patcher, "PATCH", location, len(HELD_BODY))
    settle()
    digest = sha256(data)
    r = committer.session.put(location, params={"digest": digest})
    assert r.status_code in ((201, 400) if locks else (201,)), (r.status_code, r.text)
    status = held.finish(HELD_BODY)
    if r.status_code == 201:
        assert status in (400, 404, 416), f"a PATCH answered {status} after the commit"
    else:
        assert r.json()["errors"][0]["code"] == "BLOB_UPLOAD_INVALID"
        assert status == 202, f"the PATCH that held the commit back answered {status}"


def run_attack_rounds(
    servers: list[Server],
    blobs: dict[str, tuple[str, bytes]],
    new_blob_repo: str,
    locks: bool = True,
) -> None:
    victim = "victim/app"
    secret = os.urandom(100_000)
    digest = servers[0].push_blob(victim, secret)
    blobs[digest] = (victim, secret)
    for i in range(ROUNDS):
        patcher, committer = servers[i % len(servers)], servers[(i + 1) % len(servers)]
        # An existing blob (another repository's), then a brand-new one.
        race_commit_against_held_patch(patcher, committer, "attacker/app", secret, locks)
        fresh = os.urandom(64_000)
        race_commit_against_held_patch(patcher, committer, new_blob_repo, fresh, locks)
        r = patcher.session.head(patcher.v2(f"{new_blob_repo}/blobs/{sha256(fresh)}"))
        if r.status_code == 200:
            blobs[sha256(fresh)] = (new_blob_repo, fresh)
        # A later pusher of the same content gets exactly it.
        later = "later/app"
        blobs[patcher.push_blob(later, fresh)] = (later, fresh)
    check_blobs(servers, blobs)


def concurrent_patches(server: Server, name: str, blobs: dict[str, tuple[str, bytes]]) -> None:
    """Two PATCHes on one session, bodies held back then sent: each either lands whole (202)
    or is refused whole (400 busy, 416 overtaken); the upload holds exactly what landed, in
    order, and commits exactly that."""
    location = start(server, name)
    first, second = os.urandom(64_000), os.urandom(64_000)
    a = HeldRequest(server, "PATCH", location, len(first))
    settle()
    b = HeldRequest(server, "PATCH", location, len(second))
    settle()
    landed_a, landed_b = a.finish(first), b.finish(second)
    assert landed_a in (202, 400, 416) and landed_b in (202, 400, 416), (landed_a, landed_b)
    content = (first if landed_a == 202 else b"") + (second if landed_b == 202 else b"")
    r = server.session.put(location, params={"digest": sha256(content)})
    assert r.status_code == 201, r.text
    if content:
        blobs[sha256(content)] = (name, content)


def patch_against_delete(server: Server, name: str) -> None:
    location = patch(server, start(server, name), os.urandom(10_000))
    held = HeldRequest(server, "PATCH", location, len(HELD_BODY))
    settle()
    r = server.session.delete(location)
    assert r.status_code in (204, 400), r.text
    status = held.finish(HELD_BODY)
    if r.status_code == 204:  # cancelled under the PATCH: its bytes went nowhere
        assert status in (400, 404), f"PATCH after DELETE answered {status}"
        assert server.session.get(location).status_code == 404
    else:  # refused while the PATCH was in flight, which then landed
        assert status == 202, f"the PATCH that held the DELETE back answered {status}"


@pytest.mark.slow
def test_racing_requests_on_one_session_never_change_a_blob(
    start_server: ServerFactory,
) -> None:
    server = start_server(workers=3)
    blobs: dict[str, tuple[str, bytes]] = {}
    run_attack_rounds([server], blobs, "attacker/new")
    for i in range(ROUNDS):
        concurrent_patches(server, f"pp/app{i}", blobs)
        patch_against_delete(server, f"pd/app{i}")
    check_blobs([server], blobs)
    fsck_clean(server)


@pytest.fixture
def s3_storage(
    rgw_s3: S3Endpoint, s3_bucket_factory: Callable[[S3Endpoint], str]
) -> Iterator[dict[str, object]]:
    bucket = s3_bucket_factory(rgw_s3)
    yield {"s3": rgw_s3.storage_config(bucket), "redirect": {"disable": True}}


@pytest.mark.slow
@pytest.mark.s3
def test_racing_requests_across_two_instances_on_s3_without_locks(
    start_server: ServerFactory, s3_storage: dict[str, object]
) -> None:
    """Without Redis nothing serialises requests across instances: the commit really does run
    while the PATCH is in flight, and the chunk/claim/seal design alone keeps blobs intact."""
    servers = [start_server(workers=2, storage=s3_storage) for _ in range(2)]
    blobs: dict[str, tuple[str, bytes]] = {}
    run_attack_rounds(servers, blobs, "attacker/new", locks=False)
    for i in range(2):
        concurrent_patches(servers[i], f"pp/app{i}", blobs)
        patch_against_delete(servers[i], f"pd/app{i}")
    check_blobs(servers, blobs)
    fsck_clean(servers[0])


@pytest.mark.slow
@pytest.mark.skipif(
    bool(os.environ.get("DOCKYARD_TEST_S3")),
    reason="S3 without Redis has no upload locks (registry.upload_locks)",
)
def test_a_second_request_on_a_busy_session_is_refused_at_once(
    start_server: ServerFactory,
) -> None:
    """Where it is cheap (flock on a filesystem), a PUT or a second PATCH while a PATCH is in
    flight gets 400 BLOB_UPLOAD_INVALID at once, from any worker."""
    server = start_server(workers=3)
    data = os.urandom(1000)
    location = patch(server, start(server, "busy/app"), data)
    held = HeldRequest(server, "PATCH", location, len(HELD_BODY))
    settle()
    parts = urlsplit(location)
    target = f"{parts.path}?{parts.query}"
    for worker in spread_over_workers(server, 3):  # each worker, the held PATCH's one too
        started = time.monotonic()
        status, _, body = worker.request("PUT", f"{target}&{urlencode({'digest': sha256(data)})}")
        assert status == 400, body
        error = json.loads(body)["errors"][0]
        assert error["code"] == "BLOB_UPLOAD_INVALID" and "in progress" in error["message"]
        status, _, body = worker.request("PATCH", target, b"more")
        assert status == 400, body
        assert time.monotonic() - started < 5  # refused, not kept waiting for the lock
        worker.close()
    assert held.finish(HELD_BODY) == 202
    r = server.session.put(location, params={"digest": sha256(data + HELD_BODY)})
    assert r.status_code == 201, r.text


@pytest.mark.slow
@pytest.mark.s3
def test_racing_requests_across_two_instances_on_rgw_with_redis(
    start_server: ServerFactory,
    rgw_s3: S3Endpoint,
    redis_addr: str,
    s3_bucket_factory: Callable[[S3Endpoint], str],
) -> None:
    """The deployment of several instances: Ceph RGW, Redis for the blob descriptor cache and
    the upload locks (so a request racing a held PATCH on the other instance is refused at
    once), the attack in every round, and fsck clean at the end."""
    storage = {
        "s3": rgw_s3.storage_config(s3_bucket_factory(rgw_s3)),
        "redirect": {"disable": True},
        "cache": {"blobdescriptor": "redis"},
    }
    servers = [
        start_server(workers=2, storage=storage, redis={"addr": redis_addr}) for _ in range(2)
    ]
    blobs: dict[str, tuple[str, bytes]] = {}
    run_attack_rounds(servers, blobs, "attacker/new")
    for i in range(2):
        concurrent_patches(servers[i], f"pp/app{i}", blobs)
        patch_against_delete(servers[i], f"pd/app{i}")
    # The lock is shared: a PUT on one instance during a PATCH held on the other is refused.
    data = os.urandom(1000)
    location = patch(servers[0], start(servers[0], "busy/app"), data)
    held = HeldRequest(servers[0], "PATCH", location, len(HELD_BODY))
    settle()
    r = servers[1].session.put(location, params={"digest": sha256(data)})
    assert r.status_code == 400 and "in progress" in r.text, r.text
    assert held.finish(HELD_BODY) == 202
    check_blobs(servers, blobs)
    fsck_clean(servers[0])
