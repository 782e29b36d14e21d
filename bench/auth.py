"""Authenticated manifest GETs per second, with the bcrypt verification cache and without it
(a benchmark, not a test).

    python bench/auth.py [--seconds 10] [--connections 32] [--workers 2] [--cost 10]

For each mode it starts ``dockyard serve`` with htpasswd auth (one user, bcrypt at ``--cost``;
``htpasswd -B`` uses 5, ``dockyard user add`` 10), pushes a small image, then drives
``GET /v2/<name>/manifests/<tag>`` with Basic credentials on every request, as clients do. It
uses wrk when installed and a built-in aiohttp load generator otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the bench package

from bench.clients import wrk
from bench.servers import BenchError
from dockyard.auth.htpasswd import hash_password
from harness.client import OCI_MANIFEST
from harness.dockyard import DockyardProcess

USER, PASSWORD = "bench", "bench-password"


async def run_aiohttp(url: str, headers: dict[str, str], seconds: int, connections: int) -> float:
    done = 0
    deadline = time.monotonic() + seconds

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal done
        while time.monotonic() < deadline:
            async with session.get(url, headers=headers) as r:
                await r.read()
                if r.status != 200:
                    raise BenchError(f"request failed: {r.status}")
            done += 1

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections)) as s:
        await asyncio.gather(*(client(s) for _ in range(connections)))
    return done / seconds


def measure(cache_ttl: str, args: argparse.Namespace) -> float:
    with tempfile.TemporaryDirectory() as work:
        users = Path(work) / "htpasswd"
        users.write_text(f"{USER}:{hash_password(PASSWORD, rounds=args.cost)}\n")
        server = DockyardProcess.launch(
            Path(work),
            workers=args.workers,
            log={"level": "warn", "accesslog": {"disabled": True}},
            auth={"htpasswd": {"realm": "bench", "path": str(users), "cachettl": cache_ttl}},
        )
        try:
            server.session.auth = (USER, PASSWORD)
            server.push_image("bench/app", "latest", layers=[])
            url = server.v2("bench/app/manifests/latest")
            token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
            headers = {"Authorization": f"Basic {token}", "Accept": OCI_MANIFEST}
            if shutil.which("wrk"):
                rate, _ = wrk(
                    url,
                    headers,
                    threads=2,
                    connections=args.connections,
                    seconds=args.seconds,
                    script=Path(work) / "wrk.lua",
                )
                return rate
            return asyncio.run(run_aiohttp(url, headers, args.seconds, args.connections))
        finally:
            server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--cost", type=int, default=10, help="bcrypt cost of the user's hash")
    args = parser.parse_args()
    try:
        with_cache = measure("5m", args)
        without = measure("0", args)
    except BenchError as e:
        print(f"auth.py: {e}", file=sys.stderr)
        return 1
    tool = "wrk" if shutil.which("wrk") else "aiohttp"
    print(
        f"authenticated GET manifest, {args.connections} connections, {args.workers} workers,"
        f" bcrypt cost {args.cost}, {tool}:"
    )
    print(f"  with the verification cache:    {with_cache:10.0f} requests/s")
    print(f"  without (bcrypt every request): {without:10.0f} requests/s")
    print(f"  speed-up: {with_cache / without:.0f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
