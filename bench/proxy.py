"""Pull-through cache: cold and warm pulls through Dockyard's cache and registry:2's proxy mode,
side by side, against the same upstream on this machine.

    python bench/proxy.py                # 8 layers, 192 MiB, 3 rounds
    python bench/proxy.py --quick        # a smoke run (CI): small layers, 1 round

The upstream is a plain registry:2 holding one multi-layer image. Each round starts both caches
empty, then pulls the image through each the way a Docker engine does (the manifest by tag, then
the config and layers three at a time; curl, so that the client costs little CPU): the *cold*
pull fetches everything from the upstream while the client receives it, the *warm* pull (the
same again) is served from the cache, the tag still checked with the upstream as both do by
default. Both have the machine's cores (registry:2 is one multi-threaded Go process; Dockyard
gets as many workers as cores).
Targets (issue 14): cold at least as fast as registry:2, warm at least 1.2x faster.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the bench package

import bench  # noqa: F401  (puts the test harness on sys.path)
from harness.dockyard import DockyardProcess
from harness.net import free_port
from harness.registry2 import REGISTRY2, Registry2

MIB = 1024 * 1024
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
#: Docker's default max-concurrent-downloads
PARALLEL = 3


def push_image(registry: str, name: str, layer_sizes: list[int]) -> dict[str, Any]:
    """An image with incompressible layers of these sizes; returns its manifest."""
    session = requests.Session()

    def blob(data: bytes) -> dict[str, Any]:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        # registry:2 2.8 takes no monolithic POST: open a session, then PUT the bytes
        r = session.post(f"{registry}/v2/{name}/blobs/uploads/")
        assert r.status_code == 202, r.text
        location = requests.compat.urljoin(registry, r.headers["Location"])
        r = session.put(location, params={"digest": digest}, data=data)
        assert r.status_code == 201, r.text
        return {"digest": digest, "size": len(data)}

    config = json.dumps({"architecture": "amd64", "os": "linux", "nonce": os.urandom(8).hex()})
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            **blob(config.encode()),
        },
        "layers": [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **blob(os.urandom(size))}
            for size in layer_sizes
        ],
    }
    r = session.put(
        f"{registry}/v2/{name}/manifests/latest",
        data=json.dumps(manifest),
        headers={"Content-Type": OCI_MANIFEST},
    )
    assert r.status_code == 201, r.text
    return manifest


def pull(registry: str, name: str) -> float:
    """Seconds to pull the image as an engine does; every blob's size is checked."""
    start = time.perf_counter()
    with requests.Session() as session:
        r = session.get(f"{registry}/v2/{name}/manifests/latest", headers={"Accept": OCI_MANIFEST})
        assert r.status_code == 200, r.text
        manifest = r.json()
        blobs = [manifest["config"], *manifest["layers"]]

    def fetch(blob: dict[str, Any]) -> None:
        # curl: a client that costs little CPU, so the two servers, not the client, are measured
        out = subprocess.run(
            [
                "curl",
                "-sS",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code} %{size_download}",
                f"{registry}/v2/{name}/blobs/{blob['digest']}",
            ],
            capture_output=True,
            text=True,
            timeout=600,
            check=True,
        ).stdout.split()
        assert out == ["200", str(blob["size"])], (blob, out)

    with ThreadPoolExecutor(PARALLEL) as pool:
        list(pool.map(fetch, blobs))
    return time.perf_counter() - start


def registry2_proxy(work: Path, upstream: str) -> Registry2:
    assert REGISTRY2 is not None
    port = free_port()
    config = {
        "version": 0.1,
        "log": {"level": "error", "accesslog": {"disabled": True}},
        "storage": {"filesystem": {"rootdirectory": str(work / "data")}},
        "http": {"addr": f"127.0.0.1:{port}", "secret": "bench"},
        "proxy": {"remoteurl": upstream},
    }
    return Registry2.launch(REGISTRY2, work, config, port, root=work / "data")


def dockyard_proxy(work: Path, upstream: str, workers: int) -> DockyardProcess:
    return DockyardProcess.launch(
        work,
        workers=workers,
        log={"level": "warn", "accesslog": {"disabled": True}},
        proxy={"remoteurl": upstream},
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small image, one round (smoke)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--output", type=Path, help="also write the report here")
    args = parser.parse_args()
    sizes = (
        [MIB // 4] * 4
        if args.quick
        else [4 * MIB, 8 * MIB, 12 * MIB, 16 * MIB, 24 * MIB, 32 * MIB, 40 * MIB, 56 * MIB]
    )
    rounds = args.rounds or (1 if args.quick else 3)
    work = Path(tempfile.mkdtemp(prefix="dockyard-bench-proxy-"))
    results: dict[str, dict[str, list[float]]] = {
        "registry:2": {"cold": [], "warm": []},
        "dockyard": {"cold": [], "warm": []},
    }
    servers: list[Any] = []
    try:
        (work / "upstream").mkdir()
        upstream = Registry2.start(work / "upstream", root=work / "upstream" / "data")
        servers.append(upstream)
        push_image(upstream.url, "library/app", sizes)
        for n in range(rounds):
            for kind in ("registry:2", "dockyard"):
                where = work / f"{kind.replace(':', '')}-{n}"
                where.mkdir()
                if kind == "registry:2":
                    cache: Any = registry2_proxy(where, upstream.url)
                else:
                    cache = dockyard_proxy(where, upstream.url, args.workers)
                try:
                    results[kind]["cold"].append(pull(cache.url, "library/app"))
                    # registry:2 2.8 fills its cache with a second download after the first
                    # client is served; let it finish before the warm pull.
                    time.sleep(0.5 if args.quick else 3)
                    results[kind]["warm"].append(pull(cache.url, "library/app"))
                finally:
                    cache.stop()
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    report = render(results, sizes, rounds, args.workers)
    print(report)
    if args.output:
        args.output.write_text(report)
    return 0


def render(
    results: dict[str, dict[str, list[float]]], sizes: list[int], rounds: int, workers: int
) -> str:
    total = sum(sizes) / MIB
    lines = [
        f"Pull-through cache: one image of {len(sizes)} layers ({total:.1f} MiB), "
        f"{rounds} round(s), median seconds; Dockyard with {workers} workers",
        "",
        "| pull | registry:2 | Dockyard | speed-up | target |",
        "|---|---:|---:|---:|---:|",
    ]
    for phase, target in (("cold", 1.0), ("warm", 1.2)):
        theirs = statistics.median(results["registry:2"][phase])
        ours = statistics.median(results["dockyard"][phase])
        speedup = theirs / ours if ours else float("inf")
        mark = "met" if speedup >= target else "NOT met"
        lines.append(
            f"| {phase} | {theirs:.3f} | {ours:.3f} | {speedup:.2f}x | {target:.1f}x {mark} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
