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
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import requests

from dockyard.auth.htpasswd import hash_password

USER, PASSWORD = "bench", "bench-password"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def push_image(base: str, auth: tuple[str, str]) -> str:
    config = json.dumps({"os": "linux"}).encode()
    digest = "sha256:" + hashlib.sha256(config).hexdigest()
    requests.post(
        f"{base}/bench/app/blobs/uploads/", params={"digest": digest}, data=config, auth=auth
    ).raise_for_status()
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": digest,
            "size": len(config),
        },
        "layers": [],
    }
    r = requests.put(
        f"{base}/bench/app/manifests/latest",
        data=json.dumps(manifest),
        headers={"Content-Type": manifest["mediaType"]},
        auth=auth,
    )
    r.raise_for_status()
    return "/v2/bench/app/manifests/latest"


def run_wrk(url: str, header: str, seconds: int, connections: int) -> float:
    out = subprocess.run(
        [
            "wrk",
            "-t",
            "2",
            "-c",
            str(connections),
            "-d",
            f"{seconds}s",
            "-H",
            header,
            "-H",
            "Accept: application/vnd.oci.image.manifest.v1+json",
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        raise SystemExit(f"{non2xx.group(1)} requests failed:\n{out}")
    return float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]


async def run_aiohttp(url: str, header: str, seconds: int, connections: int) -> float:
    done = 0
    deadline = time.monotonic() + seconds
    name, value = header.split(": ", 1)

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal done
        while time.monotonic() < deadline:
            async with session.get(url, headers={name: value}) as r:
                await r.read()
                if r.status != 200:
                    raise SystemExit(f"request failed: {r.status}")
            done += 1

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections)) as s:
        await asyncio.gather(*(client(s) for _ in range(connections)))
    return done / seconds


def measure(cache_ttl: str, args: argparse.Namespace) -> float:
    with tempfile.TemporaryDirectory() as work:
        users = Path(work) / "htpasswd"
        users.write_text(f"{USER}:{hash_password(PASSWORD, rounds=args.cost)}\n")
        port = free_port()
        config = Path(work) / "config.yml"
        config.write_text(
            "version: 0.1\nlog: {level: warn, accesslog: {disabled: true}}\n"
            f"storage: {{filesystem: {{rootdirectory: {work}/data}}}}\n"
            f"http: {{addr: '127.0.0.1:{port}', secret: bench}}\n"
            f"auth: {{htpasswd: {{realm: bench, path: {users}, cachettl: {cache_ttl}}}}}\n"
        )
        server = subprocess.Popen(
            [sys.executable, "-m", "dockyard", "serve", str(config), "--workers", str(args.workers)]
        )
        try:
            base = f"http://127.0.0.1:{port}"
            for _ in range(200):
                try:
                    requests.get(base + "/v2/", timeout=1)
                    break
                except requests.ConnectionError:
                    time.sleep(0.05)
            path = push_image(base + "/v2", (USER, PASSWORD))
            token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
            header = f"Authorization: Basic {token}"
            if shutil.which("wrk"):
                return run_wrk(base + path, header, args.seconds, args.connections)
            return asyncio.run(run_aiohttp(base + path, header, args.seconds, args.connections))
        finally:
            server.terminate()
            server.wait(30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--cost", type=int, default=10, help="bcrypt cost of the user's hash")
    args = parser.parse_args()
    with_cache = measure("5m", args)
    without = measure("0", args)
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
