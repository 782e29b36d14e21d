"""What the metadata index and quotas cost a push (a benchmark, not a test).

    python bench/index_cost.py                          # this tree: quotas off / on
    python bench/index_cost.py --base /tmp/base/src      # and another checkout's src (A/B)
    python bench/index_cost.py --pushes 500 --rounds 3

Each configuration starts ``python -m dockyard serve --workers 2`` on a fresh store in
/dev/shm and pushes small images one after another (a 2 kB layer and a config, each a
monolithic ``POST ?digest=``, then the manifest) into 10 repositories, timing each push. With
quotas, two scopes hold every repository (``*`` and ``bench/*``), so every blob reserves
against both. Prints the median and p90 per configuration and round; run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
import yaml

MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def push(session: requests.Session, base: str, repo: str, tag: str) -> None:
    blobs = []
    for data in (os.urandom(2000), json.dumps({"n": os.urandom(8).hex()}).encode()):
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        r = session.post(f"{base}/{repo}/blobs/uploads/", params={"digest": digest}, data=data)
        assert r.status_code == 201, r.text
        blobs.append({"digest": digest, "size": len(data)})
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": {**blobs[1], "mediaType": "application/vnd.oci.image.config.v1+json"},
        "layers": [{**blobs[0], "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip"}],
    }
    r = session.put(
        f"{base}/{repo}/manifests/{tag}",
        data=json.dumps(manifest),
        headers={"Content-Type": MANIFEST},
    )
    assert r.status_code == 201, r.text


def run(src: str, quotas: bool, pushes: int) -> list[float]:
    work = Path(tempfile.mkdtemp(dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    port = free_port()
    config = {
        "version": 0.1,
        "log": {"level": "error"},
        "storage": {"filesystem": {"rootdirectory": str(work / "data")}},
        "http": {"addr": f"127.0.0.1:{port}", "secret": "bench"},
    }
    if quotas:
        config["quotas"] = [
            {"scope": "*", "limit": "100GiB"},
            {"scope": "bench/*", "limit": "50GiB"},
        ]
    (work / "config.yml").write_text(yaml.safe_dump(config))
    server = subprocess.Popen(
        [sys.executable, "-m", "dockyard", "serve", str(work / "config.yml"), "--workers", "2"],
        env={**os.environ, "PYTHONPATH": src},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}/v2"
    try:
        for _ in range(100):
            try:
                requests.get(f"{base}/", timeout=1)
                break
            except requests.ConnectionError:
                time.sleep(0.1)
        session = requests.Session()
        times = []
        for i in range(pushes):
            started = time.perf_counter()
            push(session, base, f"bench/app{i % 10}", f"t{i}")
            times.append(time.perf_counter() - started)
        return times
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", help="another checkout's src directory, run first")
    parser.add_argument("--pushes", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    here = str(Path(__file__).resolve().parent.parent / "src")
    configurations = [("this tree", here, False), ("this tree, quotas", here, True)]
    if args.base:
        configurations.insert(0, ("base", args.base, False))
    for round_ in range(args.rounds):
        for label, src, quotas in configurations:
            times = run(src, quotas, args.pushes)
            p90 = sorted(times)[int(len(times) * 0.9)]
            print(
                f"round {round_ + 1}  {label:<18} median {statistics.median(times) * 1000:6.2f} ms"
                f"  p90 {p90 * 1000:6.2f} ms"
            )


if __name__ == "__main__":
    main()
