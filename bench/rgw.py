"""``compare.py --s3``: both servers storing into S3 buckets on Ceph RGW, and the workload
groups that run there (docs/performance.md, "On S3 (Ceph RGW)").

RGW is the test harness's (``harness.s3.launch_rgw``: ``tests/rgw/rgw-up.sh``, one monitor,
one in-memory OSD and radosgw on loopback) with a larger OSD, RGW's garbage collection within
seconds, and radosgw restarted with ``tcp_nodelay=1``; buckets, clients and the ``storage.s3``
section are the harness's ``S3Endpoint``'s.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.machine import filesystem, first_line
from bench.procstat import rss_kib
from bench.servers import BenchError, Registry2, Server
from bench.suite import Metric, Params, Suite
from bench.workloads import BlobSuite, RequestsSuite, SkopeoSuite, large_skopeo_suite
from harness.net import wait_for_port
from harness.s3 import S3Endpoint, launch_rgw
from harness.store import V2, blob_data

S3_SUITE_KEYS = ["blob", "large", "requests"]
#: Ceph options on top of rgw-up.sh's ceph.conf (CEPH_ARGS): an in-memory OSD big enough for the
#: GiB-sized workloads, and RGW's garbage collection within seconds instead of hours, so the
#: memory of deleted objects and of the copies made by moves comes back during the run.
RGW_CEPH_ARGS = [
    f"--memstore_device_bytes={16 * 1024**3}",
    "--rgw_gc_obj_min_wait=10",
    "--rgw_gc_processor_period=10",
]


class RGW:
    """Ceph RGW started by the harness in ``directory`` (or a shorter one of its own), and
    stopped by ``rgw-down.sh``."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.endpoint = S3Endpoint(
            url=state["url"],
            access_key=state["access_key"],
            secret_key=state["secret_key"],
            kind="rgw",
        )
        self.directory = Path(state["directory"])
        self.port = int(self.endpoint.url.rsplit(":", 1)[1])
        self.stop_command: list[str] = state["stop_command"]
        self.started_in: float = state["started_in"]
        self._client: Any = None

    @property
    def url(self) -> str:
        return self.endpoint.url

    @classmethod
    def start(cls, directory: Path) -> RGW:
        t0 = time.monotonic()
        try:
            rgw = cls(launch_rgw(directory, timeout=240, ceph_args=RGW_CEPH_ARGS))
        except RuntimeError as e:
            raise BenchError(str(e)[-1500:]) from None
        try:
            rgw._restart_radosgw()
        except BaseException:
            rgw.stop()
            raise
        rgw.started_in = time.monotonic() - t0
        return rgw

    def _restart_radosgw(self) -> None:
        """radosgw again, with TCP_NODELAY on its sockets. Without it every GET of a small
        object waits about 40 ms (the response goes out in two segments: Nagle's algorithm
        holds the second until the client's delayed ACK), which would swamp what is measured:
        8.5 instead of 49 ms per GET here. The option holds a space, which CEPH_ARGS cannot
        carry, and rgw-up.sh starts every daemon at once: hence the restart."""
        pid_file = self.directory / "run" / "client.rgw.a.pid"
        pid = int(pid_file.read_text().strip())
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
            time.sleep(0.1)
        frontends = f"beast endpoint=127.0.0.1:{self.port} tcp_nodelay=1"
        with open(self.directory / "radosgw-restart.log", "wb") as log:
            config = str(self.directory / "ceph.conf")
            restarted = subprocess.run(
                ["radosgw", "-c", config, "-n", "client.rgw.a", "--rgw_frontends", frontends],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "CEPH_ARGS": " ".join(RGW_CEPH_ARGS)},
                timeout=120,
                check=False,
            )
        if restarted.returncode:
            raise BenchError(f"radosgw restart exited with {restarted.returncode}")
        try:
            wait_for_port(self.port, timeout=60, path="/")
        except TimeoutError:
            raise BenchError(f"radosgw did not answer on {self.port} after its restart") from None

    def stop(self) -> None:
        subprocess.run(self.stop_command, capture_output=True, timeout=120, check=False)

    def pids(self) -> list[int]:
        """The monitor, the OSD and radosgw."""
        found = []
        for pid_file in sorted((self.directory / "run").glob("*.pid")):
            try:
                found.append(int(pid_file.read_text().strip()))
            except (OSError, ValueError):
                continue
        return found

    def rss_mib(self) -> float:
        return rss_kib(self.pids()) / 1024

    @property
    def client(self) -> Any:
        """One boto3 S3 client, kept (the harness's makes a new one on each call)."""
        if self._client is None:
            self._client = self.endpoint.client()
        return self._client

    def storage(self, bucket: str) -> dict[str, object]:
        """The ``storage`` section both servers get: registry:2's ``storage.s3`` keys (their
        defaults otherwise: 10 MiB chunks, 32 MiB multipart copies), deletes, no redirects."""
        return {
            "s3": self.endpoint.storage_config(bucket),
            "delete": {"enabled": True},
            "redirect": {"disable": True},
        }

    def create_bucket(self, name: str) -> str:
        return self.endpoint.create_bucket(name)

    def delete_bucket(self, name: str) -> None:
        self.endpoint.delete_bucket(name)

    def _keys(self, bucket: str, prefix: str) -> list[str]:
        keys = []
        for page in self.client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=prefix
        ):
            keys += [o["Key"] for o in page.get("Contents", [])]
        return keys

    def purge_repository(self, bucket: str, repo: str) -> None:
        """Delete a repository and every blob it links, behind the server's back (to keep the
        in-memory OSD small; nothing else in these workloads shares those blobs)."""
        keys = self._keys(bucket, f"{V2}/repositories/{repo}/")
        linked = re.compile(r"/(?:_layers|_manifests/revisions)/sha256/([0-9a-f]{64})/link$")
        digests = {m.group(1) for k in keys if (m := linked.search(k))}
        for hexa in digests:
            keys += self._keys(bucket, f"{V2}/{blob_data(hexa).removesuffix('data')}")
        for i in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[i : i + 1000]]
            self.client.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})


class Registry2S3(Registry2):
    """registry:2 without AWS_CA_BUNDLE in its environment: its S3 driver fails on it (this
    machine sets it). ``env`` execs the registry, which keeps the process id."""

    def command(self, config_path: Path) -> list[str]:
        return ["env", "-u", "AWS_CA_BUNDLE", *super().command(config_path)]


class S3Suite(Suite):
    """What the S3 suites get from the runner: the RGW and each server's bucket."""

    rgw: RGW
    buckets: dict[str, str]  # server name -> bucket


class S3BlobSuite(BlobSuite, S3Suite):
    """The 1 GiB upload and download. Each server keeps only its latest upload (the download
    reads that one): the in-memory OSD holds every byte stored."""

    def after_run(self, metric: Metric, server: Server, round_no: int) -> None:
        super().after_run(metric, server, round_no)
        if metric is self.upload and round_no > 0:
            self.rgw.purge_repository(self.buckets[server.name], f"bench/blob-{round_no - 1}")


class S3SkopeoSuite(SkopeoSuite, S3Suite):
    """skopeo push and pull of the 4 x 256 MiB image; each round's image is deleted from the
    bucket once that server has been pulled from."""

    def after_run(self, metric: Metric, server: Server, round_no: int) -> None:
        super().after_run(metric, server, round_no)
        if metric is self.pull:
            self.rgw.purge_repository(self.buckets[server.name], f"bench/{self.key}-{round_no}")


class S3RequestsSuite(RequestsSuite, S3Suite):
    """HEAD of a manifest by tag only (ab, as the filesystem run)."""

    def __init__(self, params: Params, work: Path) -> None:
        super().__init__(params, work, auth=False)
        self.title = "HEAD manifest"
        self.metrics = [self.head]


def s3_suites(params: Params, work: Path, only: set[str] | None) -> list[Suite]:
    all_suites: list[Suite] = [
        S3BlobSuite(params, work / "blob"),
        large_skopeo_suite(params, work, S3SkopeoSuite),
        S3RequestsSuite(params, work / "requests"),
    ]
    return [s for s in all_suites if not only or s.key in only]


def s3_description(rgw: RGW, workdir: Path) -> dict[str, str]:
    version = first_line(["radosgw", "--version"]).split(" (")[0]
    return {
        "storage": f"S3: {version} RGW at {rgw.url} (radosgw with the beast frontend and"
        " `tcp_nodelay=1`, one monitor, one in-memory (memstore) OSD; on this machine, plain"
        " http on loopback),"
        f" one bucket per server and group; client files in {workdir} ({filesystem(workdir)})",
    }
