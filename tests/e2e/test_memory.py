"""Streaming: the server's memory stays flat whatever the blob size.

A 1 GiB blob is pushed as docker does (one chunked PATCH) and as a monolithic PUT, then pulled
back; the worker's peak RSS (VmHWM) may not grow by more than a few tens of MB. The 4 GiB figure
for the docs comes from ``bench/memory.py``, which runs the same measurement at any size.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import pytest
import requests

from harness import ServerFactory
from harness.dockyard import memory_kib

GiB = 1024 * 1024 * 1024
PIECE = 1024 * 1024
LIMIT = 48 * 1024 * 1024  # allowed growth of the peak RSS


def pattern_stream(size: int, digest: hashlib._Hash) -> Iterator[bytes]:
    block = bytes(range(256)) * (PIECE // 256)
    sent = 0
    while sent < size:
        chunk = block[: min(PIECE, size - sent)]
        digest.update(chunk)
        sent += len(chunk)
        yield chunk


class Sized:
    """A streamed body of known length: requests sends it with ``Content-Length`` (a bare
    generator goes chunked), as a monolithic upload does."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[bytes]:
        return pattern_stream(self.size, hashlib.sha256())


def expected_digest(size: int) -> str:
    h = hashlib.sha256()
    for _ in pattern_stream(size, h):
        pass
    return "sha256:" + h.hexdigest()


@pytest.mark.e2e
def test_one_gib_upload_and_download_keep_memory_flat(start_server: ServerFactory) -> None:
    s = start_server(process=True)  # one worker: the server process itself serves
    pid = s.proc.pid
    requests.get(s.v2(""))
    before = memory_kib(pid, "VmHWM") * 1024
    digest = expected_digest(GiB)

    # docker's way: POST, one streamed PATCH (chunked), PUT ?digest=
    loc = requests.post(s.v2("mem/blobs/uploads/")).headers["Location"]
    r = requests.patch(loc, data=pattern_stream(GiB, hashlib.sha256()))
    assert r.status_code == 202, r.text
    r = requests.put(r.headers["Location"], params={"digest": digest})
    assert r.status_code == 201, r.text
    after_upload = memory_kib(pid, "VmHWM") * 1024

    # the monolithic way: POST, then the whole blob in the PUT ?digest= (Content-Length)
    loc = requests.post(s.v2("mem/put/blobs/uploads/")).headers["Location"]
    r = requests.put(loc, params={"digest": digest}, data=Sized(GiB))
    assert r.status_code == 201, r.text
    assert r.request.headers["Content-Length"] == str(GiB)
    after_monolithic = memory_kib(pid, "VmHWM") * 1024

    # pull it back through sendfile, hashing on the client
    h = hashlib.sha256()
    with requests.get(s.v2(f"mem/blobs/{digest}"), stream=True) as r:
        assert r.status_code == 200
        for chunk in r.iter_content(PIECE):
            h.update(chunk)
    assert "sha256:" + h.hexdigest() == digest
    after_download = memory_kib(pid, "VmHWM") * 1024

    print(
        f"peak RSS before {before >> 20} MiB, after 1 GiB upload {after_upload >> 20} MiB, "
        f"after a 1 GiB monolithic PUT {after_monolithic >> 20} MiB, "
        f"after download {after_download >> 20} MiB"
    )
    assert after_upload - before < LIMIT
    assert after_monolithic - before < LIMIT
    assert after_download - before < LIMIT
