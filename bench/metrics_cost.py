"""The hot-path cost of metrics and events: HEAD and GET of a manifest, requests/s, on three
``dockyard serve --workers N`` side by side (same machine, same run): ``off`` (neither),
``metrics`` (``http.debug.prometheus`` on) and ``events`` (metrics, and a notification endpoint
that gets every event, a pull event for each request included, delivered to a receiver process
that answers 200), loaded in turn, round after round, so that drift of a shared machine falls on
all alike. Medians are reported, with the cost against ``off`` in per cent.

    PYTHONPATH=src:tests:. python -m bench.metrics_cost [--rounds 5] [--seconds 5] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
import yaml

from bench.clients import MANIFEST_ACCEPT, ab_head, wrk
from harness.client import OCI_MANIFEST
from harness.net import free_port, wait_for_port

#: ``events``: the request path's cost (events built and written to the outbox; the receiver
#: is down, so delivery waits); ``delivered``: the same with each event POSTed to a receiver
MODES = ("off", "metrics", "events", "delivered")

#: the webhook receiver of the ``events`` server: answers 200 to every POST, in a process of its
#: own (so its CPU is not the bench's)
RECEIVER = """
import sys
from aiohttp import web

async def hook(request):
    await request.read()
    return web.Response()

app = web.Application()
app.router.add_post("/hook", hook)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""


def start(
    work: Path, name: str, workers: int, receiver: int | None
) -> tuple[subprocess.Popen, int]:
    port = free_port()
    http: dict = {"addr": f"127.0.0.1:{port}", "secret": "bench"}
    if name != "off":
        http["debug"] = {"addr": f"127.0.0.1:{free_port()}", "prometheus": {"enabled": True}}
    config: dict = {
        "version": "0.1",
        "log": {"level": "warn", "accesslog": {"disabled": True}},
        "storage": {"filesystem": {"rootdirectory": str(work / name / "data")}},
        "http": http,
    }
    if name in ("events", "delivered"):
        assert receiver is not None
        hook = receiver if name == "delivered" else free_port()  # nobody listens there
        endpoint = {"name": "bench", "url": f"http://127.0.0.1:{hook}/hook", "backoff": "10s"}
        config["notifications"] = {"endpoints": [endpoint]}
    path = work / f"{name}.yml"
    path.write_text(yaml.safe_dump(config))
    log = open(work / f"{name}.log", "wb")  # noqa: SIM115 - the server's for its lifetime
    proc = subprocess.Popen(
        [sys.executable, "-m", "dockyard", "serve", str(path), "--workers", str(workers)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    wait_for_port(port, proc)
    return proc, port


def cpu_seconds(proc: subprocess.Popen) -> float:
    """CPU time (user + system) of the server's workers so far."""
    with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
        children = [int(p) for p in f.read().split()]
    total = 0
    for pid in children:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / os.sysconf("SC_CLK_TCK")


def push(port: int) -> str:
    import hashlib
    import json

    base = f"http://127.0.0.1:{port}/v2/bench/app"
    layers = []
    for data in (b'{"architecture":"amd64","os":"linux"}', os.urandom(1024)):
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        r = requests.post(f"{base}/blobs/uploads/", params={"digest": digest}, data=data)
        assert r.status_code == 201, r.text
        layers.append(
            {"mediaType": "application/octet-stream", "digest": digest, "size": len(data)}
        )
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {**layers[0], "mediaType": "application/vnd.oci.image.config.v1+json"},
        "layers": layers[1:],
    }
    r = requests.put(
        f"{base}/manifests/latest",
        data=json.dumps(manifest),
        headers={"Content-Type": OCI_MANIFEST},
    )
    assert r.status_code == 201, r.text
    return f"{base}/manifests/latest"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args()
    headers = {"Accept": MANIFEST_ACCEPT}
    with tempfile.TemporaryDirectory(prefix="dockyard-bench-metrics-") as tmp:
        work = Path(tmp)
        receiver_port = free_port()
        receiver = subprocess.Popen([sys.executable, "-c", RECEIVER, str(receiver_port)])
        wait_for_port(receiver_port, receiver)
        servers = {mode: start(work, mode, args.workers, receiver_port) for mode in MODES}
        try:
            urls = {mode: push(port) for mode, (_, port) in servers.items()}
            rates: dict[tuple[str, str], list[float]] = {}
            cpu_per_request: dict[tuple[str, str], list[float]] = {}
            for _ in range(args.rounds):
                for mode in MODES:
                    proc = servers[mode][0]
                    cpu = cpu_seconds(proc)
                    get, _ = wrk(
                        urls[mode],
                        headers,
                        threads=1,
                        connections=args.connections,
                        seconds=args.seconds,
                        script=work / "wrk.lua",
                    )
                    cpu_get = cpu_seconds(proc) - cpu
                    cpu = cpu_seconds(proc)
                    head, _ = ab_head(
                        urls[mode],
                        headers,
                        connections=args.connections,
                        seconds=args.seconds,
                        most=10_000_000,
                    )
                    cpu_head = cpu_seconds(proc) - cpu
                    rates.setdefault(("GET", mode), []).append(get)
                    rates.setdefault(("HEAD", mode), []).append(head)
                    # the server's CPU per request, in microseconds: steadier than the rate
                    # on a machine shared with other work
                    us = cpu_per_request.setdefault
                    us(("GET", mode), []).append(1e6 * cpu_get / (get * args.seconds))
                    us(("HEAD", mode), []).append(1e6 * cpu_head / (head * args.seconds))
                    time.sleep(0.5)
            backlog = outbox_backlog(work / "delivered" / "data")
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(30)
            receiver.terminate()
            receiver.wait(30)
    print(
        f"workers={args.workers} connections={args.connections} "
        f"rounds={args.rounds} x {args.seconds}s"
    )
    for method in ("HEAD", "GET"):
        off = statistics.median(rates[(method, "off")])
        cpu_off = statistics.median(cpu_per_request[(method, "off")])
        print(f"{method} manifest: off {off:8.0f} req/s, {cpu_off:6.1f} us server CPU per request")
        for mode in MODES[1:]:
            on = statistics.median(rates[(method, mode)])
            cpu_on = statistics.median(cpu_per_request[(method, mode)])
            print(
                f"{method} manifest: {mode:7} {on:8.0f} req/s "
                f"(cost {100 * (off - on) / off:5.1f} %), "
                f"{cpu_on:6.1f} us server CPU per request (cost "
                f"{100 * (cpu_on - cpu_off) / cpu_off:5.1f} %)   "
                f"rates {[round(r) for r in rates[(method, mode)]]}"
            )
        print(f"  off rates {[round(r) for r in rates[(method, 'off')]]}")
    print(
        f"delivered: {backlog['delivered']} events delivered, {backlog['waiting']} waiting "
        "at the end"
    )


def outbox_backlog(root: Path) -> dict[str, int]:
    """How many events the ``delivered`` server delivered, and how many wait (its outbox)."""
    import json

    directory = root / "dockyard" / "events"
    state = json.loads((directory / "endpoints" / "bench.json").read_text())
    with open(directory / "outbox.jsonl", "rb") as f:
        f.seek(state["offset"])
        waiting = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    return {"delivered": state["delivered"], "waiting": waiting}


if __name__ == "__main__":
    main()
