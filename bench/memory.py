"""Peak server memory during a large upload and download (a benchmark, not a test).

    python bench/memory.py --size-gib 4

Starts ``dockyard serve`` with one worker on a temporary store, pushes a blob of the given size
the way docker does (POST, one streamed PATCH without Content-Length, PUT ?digest=), pulls it
back, and prints the server's resident memory before, at its peak (VmHWM) and after, with the
throughput of each step. The data is generated on the fly, so the client stays small too.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the bench package

from bench.suite import MiB
from harness.dockyard import DockyardProcess, memory_kib


def stream(size: int, digest: hashlib._Hash | None = None) -> Iterator[bytes]:
    block = os.urandom(MiB)
    sent = 0
    while sent < size:
        chunk = block[: min(MiB, size - sent)]
        if digest is not None:
            digest.update(chunk)
        sent += len(chunk)
        yield chunk


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gib", type=float, default=4.0)
    parser.add_argument("--dir", help="where to put the temporary store (default: $TMPDIR)")
    args = parser.parse_args()
    size = int(args.size_gib * 1024 * MiB)

    with tempfile.TemporaryDirectory(dir=args.dir) as work:
        server = DockyardProcess.launch(
            Path(work), workers=1, log={"level": "warn", "accesslog": {"disabled": True}}
        )
        pid = server.proc.pid
        try:
            base = server.v2("bench/blob")
            requests.get(server.v2(""), timeout=30)  # answered once the server is ready
            rss_before = memory_kib(pid, "VmRSS")

            hasher = hashlib.sha256()
            t0 = time.monotonic()
            r = requests.post(f"{base}/blobs/uploads/")
            r = requests.patch(r.headers["Location"], data=stream(size, hasher))
            assert r.status_code == 202, r.text
            digest = "sha256:" + hasher.hexdigest()
            r = requests.put(r.headers["Location"], params={"digest": digest})
            assert r.status_code == 201, r.text
            upload_s = time.monotonic() - t0
            peak_upload = memory_kib(pid, "VmHWM")

            t0 = time.monotonic()
            got = hashlib.sha256()
            with requests.get(f"{base}/blobs/{digest}", stream=True) as r:
                for chunk in r.iter_content(MiB):
                    got.update(chunk)
            download_s = time.monotonic() - t0
            assert "sha256:" + got.hexdigest() == digest
            peak_all = memory_kib(pid, "VmHWM")
            rss_after = memory_kib(pid, "VmRSS")
        finally:
            server.stop(timeout=60)

    gib = size / (1024 * MiB)
    print(f"blob: {gib:.2f} GiB")
    print(f"upload (streamed PATCH + PUT): {upload_s:.1f} s, {size / MiB / upload_s:.0f} MiB/s")
    print(f"download (sendfile): {download_s:.1f} s, {size / MiB / download_s:.0f} MiB/s")
    print(f"server RSS before: {rss_before / 1024:.1f} MiB")
    print(
        f"server peak RSS during upload: {peak_upload / 1024:.1f} MiB "
        f"(+{(peak_upload - rss_before) / 1024:.1f} MiB)"
    )
    print(
        f"server peak RSS overall: {peak_all / 1024:.1f} MiB "
        f"(+{(peak_all - rss_before) / 1024:.1f} MiB)"
    )
    print(f"server RSS after: {rss_after / 1024:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
