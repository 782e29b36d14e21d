"""kill -9 of the whole Dockyard server (supervisor and workers) during uploads, then a restart
on the same storage.

What must hold afterwards: completed blobs are intact; an interrupted upload leaves nothing that
can be served (its digest is 404 and nothing of it is under ``blobs/``); the client can start the
upload again from scratch; and an upload session whose chunks were acknowledged before the crash
can be continued after the restart through the ``Location`` it was given (``_state`` is signed
with the fixed ``http.secret`` conftest configures, so it survives the restart).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import requests

from harness import ServerFactory, sha256

MiB = 1024 * 1024
BIG_CHUNKS = 256  # the interrupted blobs are 256 MiB, sent 1 MiB at a time
V2 = "docker/registry/v2"


# -- a large blob produced on the fly -------------------------------------------------------------


class BigBlob:
    """``BIG_CHUNKS`` MiB of pseudo-random bytes, generated chunk by chunk (never held whole)."""

    def __init__(self, seed: int, chunks: int = BIG_CHUNKS) -> None:
        self.block = os.urandom(MiB)
        self.seed = seed
        self.chunks = chunks
        hasher = hashlib.sha256()
        for chunk in self.iter():
            hasher.update(chunk)
        self.digest = "sha256:" + hasher.hexdigest()

    @property
    def size(self) -> int:
        return self.chunks * MiB

    def chunk(self, i: int) -> bytes:
        return struct.pack(">QQ", self.seed, i) + self.block[16:]

    def iter(self, start: int = 0) -> Iterator[bytes]:
        """The bytes from offset ``start`` on."""
        first, skip = divmod(start, MiB)
        for i in range(first, self.chunks):
            yield self.chunk(i)[skip:]
            skip = 0

    def slow(self, stop: threading.Event, delay: float = 0.02) -> Iterator[bytes]:
        """The whole blob, slowly, until ``stop`` is set."""
        for chunk in self.iter():
            if stop.is_set():
                return
            yield chunk
            time.sleep(delay)


class Upload(threading.Thread):
    """A request with a streamed body in the background; the server is expected to die."""

    def __init__(self, method: str, url: str, body: Iterator[bytes], **kwargs: Any) -> None:
        super().__init__(daemon=True)
        self.args = (method, url)
        self.body = body
        self.kwargs = kwargs
        self.response: requests.Response | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.response = requests.request(*self.args, data=self.body, timeout=60, **self.kwargs)
        except BaseException as exc:
            self.error = exc


# -- the kill -------------------------------------------------------------------------------------


def _parent_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            parent = _parent_of(int(entry))
            if parent is not None:
                children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill9(server: Any) -> None:
    """SIGKILL the supervisor and every worker (the supervisor first, so it cannot respawn
    one), then wait until they are all gone and the port is closed."""
    workers = descendants(server.proc.pid)
    assert workers, "expected forked worker processes"
    os.kill(server.proc.pid, signal.SIGKILL)
    for pid in workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    server.proc.wait(10)
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in workers):
        assert time.monotonic() < deadline, "workers survived SIGKILL"
        time.sleep(0.02)
    # A killed process's sockets close only when its last thread is gone (a thread in the
    # middle of a disk write finishes the write first): wait until the port refuses.
    while True:
        try:
            with socket.create_connection(("127.0.0.1", server.port), 0.5):
                pass
        except OSError:
            return
        assert time.monotonic() < deadline, "the killed server's port still accepts connections"
        time.sleep(0.02)


# -- storage probes -------------------------------------------------------------------------------


def upload_files(root: Path, repo: str) -> dict[str, Path]:
    """Upload id -> the chunk being written into it now (a temporary file beside the chunk's
    final name), for the repository's uploads with a request in flight."""
    base = root / V2 / "repositories" / repo / "_uploads"
    if not base.is_dir():
        return {}
    found = {}
    for upload in base.iterdir():
        writing = [p for p in (upload / "chunks").glob("*.tmp-*") if p.is_file()]
        if writing:
            found[upload.name] = writing[0]
    return found


def wait_for_bytes(files: Callable[[], list[Path]], minimum: int, uploads: list[Upload]) -> None:
    """Until every file returned by ``files`` holds at least ``minimum`` bytes."""
    deadline = time.monotonic() + 30
    while True:
        current = files()
        if current and all(p.exists() and p.stat().st_size >= minimum for p in current):
            return
        for upload in uploads:
            assert upload.is_alive(), f"upload ended early: {upload.response} {upload.error}"
        assert time.monotonic() < deadline, "uploads made no progress"
        time.sleep(0.02)


def files_for(root: Path, digest: str) -> list[Path]:
    hexa = digest.removeprefix("sha256:")
    return [p for p in (root / V2 / "blobs").rglob("*") if hexa in p.name or hexa in str(p)]


def check_absent(server: Any, repo: str, digest: str) -> None:
    url = server.v2(f"{repo}/blobs/{digest}")
    head = requests.head(url, timeout=30)
    assert head.status_code == 404, (url, head.status_code, head.headers)
    get = requests.get(url, timeout=30)
    assert get.status_code == 404, (url, get.status_code, get.text[:500])
    assert get.json()["errors"][0]["code"] == "BLOB_UNKNOWN"
    assert files_for(server.root, digest) == []


def check_served(
    server: Any, repo: str, digest: str, size: int, content: bytes | None = None
) -> None:
    url = server.v2(f"{repo}/blobs/{digest}")
    head = requests.head(url, timeout=30)
    assert head.status_code == 200, (url, head.status_code)
    assert int(head.headers["Content-Length"]) == size
    assert head.headers["Docker-Content-Digest"] == digest
    with requests.get(url, stream=True, timeout=60) as r:
        assert r.status_code == 200, (url, r.status_code)
        hasher, received, data = hashlib.sha256(), 0, bytearray()
        for chunk in r.iter_content(MiB):
            hasher.update(chunk)
            received += len(chunk)
            if content is not None:
                data += chunk
    assert received == size
    assert "sha256:" + hasher.hexdigest() == digest
    if content is not None:
        assert bytes(data) == content


def start_upload(server: Any, repo: str) -> str:
    r = requests.post(server.v2(f"{repo}/blobs/uploads/"), timeout=30)
    assert r.status_code == 202, r.text
    return r.headers["Location"]


# -- the tests ------------------------------------------------------------------------------------


def test_kill9_during_large_uploads_leaves_nothing_servable(
    start_server: ServerFactory,
) -> None:
    repo = "crash/big"
    server = start_server(workers=2)

    # A blob completed before the crash (POST, PATCH, PUT ?digest=).
    done = os.urandom(8 * MiB + 5)
    location = start_upload(server, repo)
    r = requests.patch(location, data=done, timeout=60)
    assert r.status_code == 202, r.text
    r = requests.put(r.headers["Location"], params={"digest": sha256(done)}, timeout=60)
    assert r.status_code == 201, r.text
    check_served(server, repo, sha256(done), len(done), done)

    # Two large uploads in flight at the kill: a streamed PATCH (as docker sends it: chunked,
    # no Content-Range) and a monolithic POST ?digest= with a streamed body.
    patched, posted = BigBlob(1), BigBlob(2)
    stop = threading.Event()
    patch_location = start_upload(server, repo)
    patch_id = patch_location.split("/blobs/uploads/")[1].split("?")[0]
    uploads = [
        Upload(
            "PATCH",
            patch_location,
            patched.slow(stop),
            headers={"Content-Type": "application/octet-stream"},
        ),
        Upload(
            "POST",
            server.v2(f"{repo}/blobs/uploads/"),
            posted.slow(stop),
            params={"digest": posted.digest},
            headers={"Content-Type": "application/octet-stream"},
        ),
    ]
    for upload in uploads:
        upload.start()
    try:
        # Both have written a good part of their data when the server dies.
        wait_for_bytes(
            lambda: (
                [] if len(found := upload_files(server.root, repo)) < 2 else list(found.values())
            ),
            16 * MiB,
            uploads,
        )
        assert patch_id in upload_files(server.root, repo)
        kill9(server)
    finally:
        stop.set()
        for upload in uploads:
            upload.join(30)
    for upload in uploads:
        assert upload.response is None, f"an interrupted upload succeeded: {upload.response}"
    for blob in (patched, posted):
        assert files_for(server.root, blob.digest) == []

    restarted = start_server(root=server.root, workers=2)

    # What was complete is intact.
    check_served(restarted, repo, sha256(done), len(done), done)
    # What was interrupted does not exist.
    for blob in (patched, posted):
        check_absent(restarted, repo, blob.digest)

    # The client starts again from scratch: POST, then the whole blob in the PUT ...
    location = start_upload(restarted, repo)
    r = requests.put(
        location,
        params={"digest": patched.digest},
        data=patched.iter(),
        headers={"Content-Type": "application/octet-stream"},
        timeout=120,
    )
    assert r.status_code == 201, r.text
    assert r.headers["Docker-Content-Digest"] == patched.digest
    check_served(restarted, repo, patched.digest, patched.size)
    # ... and the monolithic POST ?digest= again.
    r = requests.post(
        restarted.v2(f"{repo}/blobs/uploads/"),
        params={"digest": posted.digest},
        data=posted.iter(),
        headers={"Content-Type": "application/octet-stream"},
        timeout=120,
    )
    assert r.status_code == 201, r.text
    check_served(restarted, repo, posted.digest, posted.size)
    check_served(restarted, repo, sha256(done), len(done), done)
    assert "Traceback" not in restarted.log(), restarted.log()


def test_chunked_upload_resumes_after_kill9(start_server: ServerFactory) -> None:
    """The first chunk is acknowledged, the server is killed, a new server on the same port and
    storage takes the rest through the old ``Location``."""
    repo = "crash/resume"
    blob = os.urandom(6 * MiB + 333)
    split = 2 * MiB + 11
    server = start_server(workers=2)

    location = start_upload(server, repo)
    r = requests.patch(
        location,
        data=blob[:split],
        timeout=60,
        headers={"Content-Type": "application/octet-stream", "Content-Range": f"0-{split - 1}"},
    )
    assert r.status_code == 202, r.text
    assert r.headers["Range"] == f"0-{split - 1}"
    location = r.headers["Location"]

    kill9(server)
    restarted = start_server(root=server.root, port=server.port, workers=2)

    r = requests.get(location, timeout=30)
    assert r.status_code == 204, r.text
    assert r.headers["Range"] == f"0-{split - 1}"
    r = requests.patch(
        location,
        data=blob[split:],
        timeout=60,
        headers={
            "Content-Type": "application/octet-stream",
            "Content-Range": f"{split}-{len(blob) - 1}",
        },
    )
    assert r.status_code == 202, r.text
    assert r.headers["Range"] == f"0-{len(blob) - 1}"
    r = requests.put(r.headers["Location"], params={"digest": sha256(blob)}, timeout=60)
    assert r.status_code == 201, r.text
    assert r.headers["Docker-Content-Digest"] == sha256(blob)
    check_served(restarted, repo, sha256(blob), len(blob), blob)
    assert upload_files(restarted.root, repo) == {}


def test_chunked_upload_resumes_after_kill9_mid_chunk(start_server: ServerFactory) -> None:
    """Killed while a chunk is streaming in: after the restart the upload's status tells the
    client how many bytes it holds (a prefix of what was sent), the client sends the rest from
    there, and the blob is right."""
    repo = "crash/mid-chunk"
    blob = BigBlob(3, chunks=128)
    first = 4 * MiB + 7
    server = start_server(workers=2)

    location = start_upload(server, repo)
    upload_id = location.split("/blobs/uploads/")[1].split("?")[0]
    head = b"".join(blob.chunk(i) for i in range(first // MiB + 1))[:first]
    r = requests.patch(
        location,
        data=head,
        timeout=60,
        headers={"Content-Type": "application/octet-stream", "Content-Range": f"0-{first - 1}"},
    )
    assert r.status_code == 202, r.text
    location = r.headers["Location"]

    stop = threading.Event()

    def rest() -> Iterator[bytes]:
        for i, chunk in enumerate(blob.iter(first)):
            if stop.is_set():
                return
            yield chunk
            if i > 8:
                time.sleep(0.02)

    upload = Upload(
        "PATCH",
        location,
        rest(),
        headers={
            "Content-Type": "application/octet-stream",
            "Content-Range": f"{first}-{blob.size - 1}",
        },
    )
    upload.start()
    try:
        # The chunk in flight holds what this PATCH sent so far (the first one is claimed).
        wait_for_bytes(
            lambda: [p for i, p in upload_files(server.root, repo).items() if i == upload_id],
            16 * MiB,
            [upload],
        )
        kill9(server)
    finally:
        stop.set()
        upload.join(30)
    assert upload.response is None, f"the interrupted chunk succeeded: {upload.response}"

    restarted = start_server(root=server.root, port=server.port, workers=2)
    r = requests.get(location, timeout=30)
    assert r.status_code == 204, r.text
    held = int(r.headers["Range"].split("-")[1]) + 1
    assert first <= held < blob.size, r.headers["Range"]
    location = r.headers["Location"]
    r = requests.patch(
        location,
        data=blob.iter(held),
        timeout=120,
        headers={
            "Content-Type": "application/octet-stream",
            "Content-Range": f"{held}-{blob.size - 1}",
        },
    )
    assert r.status_code == 202, r.text
    assert r.headers["Range"] == f"0-{blob.size - 1}"
    r = requests.put(r.headers["Location"], params={"digest": blob.digest}, timeout=120)
    assert r.status_code == 201, r.text
    check_served(restarted, repo, blob.digest, blob.size)
