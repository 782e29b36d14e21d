"""S3 servers for tests, on loopback and free ports (fixtures: harness/plugin.py).

Two S3 servers, for different jobs:

- moto (``start_moto``, kind ``"moto"``): an emulator in a thread of the test process; starts in
  a fraction of a second and accepts any keys. It checks **no** signatures: a wrong secret, a
  tampered or an expired presigned URL all get 200. Never let a test of signing, presigned
  redirects or credentials rely on moto alone.
- Ceph RADOS Gateway (``start_rgw``, kind ``"rgw"``): a real S3 server (Debian packages radosgw,
  ceph-mon, ceph-osd, ceph-common) run by ``tests/rgw/rgw-up.sh``: one monitor, one in-memory
  OSD, radosgw; about 12 s to start and 750 MB of memory, so one per session. It checks
  signatures and presigned-URL expiry (403 otherwise). Keys ``testkey``/``testsecret``.

Both are plain http. This machine's environment sets ``AWS_CA_BUNDLE`` (and
``REQUESTS_CA_BUNDLE``, ``SSL_CERT_FILE``) to the system bundle: boto3 and requests only read it
for https, so these helpers work with or without it, but code under test must too (registry:2's
S3 driver crashes on it) -- test Dockyard with it set and with ``env -u AWS_CA_BUNDLE``.

Clients made here turn botocore's flexible checksums (default since botocore 1.36) down to
``when_required``, so that setting up and inspecting buckets uses only plain requests that any
S3 implementation takes. (Debian 12's RGW 16.2.15 did accept the defaults over http: single
and multipart uploads.) Code under test keeps whatever it configures.

Each test makes its own bucket (``new_bucket``), so session-wide servers can be shared.
moto, boto3 and redis are imported lazily: collecting the other tests stays fast.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest

from harness.net import free_port, wait_for_port

RGW_DIR = Path(__file__).resolve().parents[1] / "rgw"
RGW_ACCESS_KEY = "testkey"
RGW_SECRET_KEY = "testsecret"
RGW_BINARIES = {  # binary -> Debian package
    "radosgw": "radosgw",
    "ceph-mon": "ceph-mon",
    "ceph-osd": "ceph-osd",
    "ceph": "ceph-common",
    "radosgw-admin": "ceph-common",
    "monmaptool": "ceph-common",
    "curl": "curl",
}


@dataclass
class S3Endpoint:
    """An S3 server: ``url`` is ``http://127.0.0.1:PORT`` (path-style addressing)."""

    url: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"
    kind: Literal["moto", "rgw"] = "moto"
    started_in: float = 0.0  # seconds the server took to start

    def client(self, **overrides: Any) -> Any:
        """A synchronous boto3 S3 client for this endpoint (signature v4, path style);
        ``overrides`` go to ``boto3.client`` (e.g. ``aws_secret_access_key="wrong"``)."""
        import boto3
        from botocore.config import Config

        kwargs: dict[str, Any] = {
            "endpoint_url": self.url,
            "aws_access_key_id": self.access_key,
            "aws_secret_access_key": self.secret_key,
            "region_name": self.region,
            "config": Config(
                signature_version="s3v4",
                s3={"addressing_style": "path"},
                retries={"max_attempts": 2, "mode": "standard"},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        }
        kwargs.update(overrides)
        return boto3.session.Session().client("s3", **kwargs)

    def create_bucket(self, name: str) -> str:
        """Create bucket ``name`` and return the name."""
        kwargs: dict[str, Any] = {"Bucket": name}
        if self.region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        self.client().create_bucket(**kwargs)
        return name

    def delete_bucket(self, name: str) -> None:
        """Delete bucket ``name`` with its objects and unfinished multipart uploads."""
        s3 = self.client()
        for page in s3.get_paginator("list_multipart_uploads").paginate(Bucket=name):
            for upload in page.get("Uploads", []):
                s3.abort_multipart_upload(
                    Bucket=name, Key=upload["Key"], UploadId=upload["UploadId"]
                )
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=name):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                s3.delete_objects(Bucket=name, Delete={"Objects": keys, "Quiet": True})
        s3.delete_bucket(Bucket=name)

    def storage_config(self, bucket: str, **extra: Any) -> dict[str, Any]:
        """registry:2's ``storage.s3`` section for this endpoint and ``bucket``; ``extra``
        adds or overrides keys (e.g. ``rootdirectory="/prefix"``, ``chunksize=5242880``)."""
        return {
            "accesskey": self.access_key,
            "secretkey": self.secret_key,
            "region": self.region,
            "regionendpoint": self.url,
            "bucket": bucket,
            "secure": False,
            "v4auth": True,
            **extra,
        }


def new_bucket(endpoint: S3Endpoint, prefix: str = "t") -> str:
    """Create a bucket with a fresh name (``prefix`` plus a random suffix) and return its name.
    The prefix is reduced to what S3 allows in bucket names."""
    clean = "".join(c if c.isalnum() else "-" for c in prefix.lower()).strip("-")
    clean = "-".join(p for p in clean.split("-") if p)[:40] or "t"
    return endpoint.create_bucket(f"{clean}-{uuid.uuid4().hex[:16]}")


@contextlib.contextmanager
def start_moto() -> Iterator[S3Endpoint]:
    """moto's S3 server in a thread of this process, on a free loopback port."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    started = time.monotonic()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        wait_for_port(port)
        yield S3Endpoint(
            url=f"http://127.0.0.1:{port}",
            access_key="testkey",
            secret_key="testsecret",
            kind="moto",
            started_in=time.monotonic() - started,
        )
    finally:
        server.stop()


@contextlib.contextmanager
def start_rgw(directory: Path, timeout: float = 180.0) -> Iterator[S3Endpoint]:
    """Ceph RGW (``tests/rgw/rgw-up.sh``) with its state in ``directory``, stopped on exit by
    ``rgw-down.sh`` (a session shares one instead: ``plugin.rgw_s3``). Skips the test if the
    Ceph packages are not installed."""
    state = launch_rgw(directory, timeout)
    try:
        yield S3Endpoint(
            url=state["url"],
            access_key=state["access_key"],
            secret_key=state["secret_key"],
            kind="rgw",
            started_in=state["started_in"],
        )
    finally:
        subprocess.run(state["stop_command"], capture_output=True, timeout=60, check=False)


def _rgw_logs(directory: Path, script_log: Path) -> str:
    parts = [script_log.read_text(errors="replace")[-3000:]]
    for path in sorted((directory / "log").glob("*.log")):
        parts.append(f"--- {path.name}\n" + path.read_text(errors="replace")[-2000:])
    return "\n".join(parts)


def launch_rgw(
    directory: Path, timeout: float = 180.0, ceph_args: Sequence[str] = ()
) -> dict[str, Any]:
    """Start Ceph RGW with its state in ``directory`` (or a short directory of its own when
    that path is too long for the daemons' sockets) and return its state for
    ``harness.shared.shared_daemon``: the endpoint's fields, the ``directory`` used and the
    command that stops it. ``ceph_args``: Ceph options on top of ``rgw-up.sh``'s ceph.conf,
    passed to every daemon in ``CEPH_ARGS`` (the benchmark's larger in-memory OSD)."""
    missing = sorted({pkg for binary, pkg in RGW_BINARIES.items() if shutil.which(binary) is None})
    if missing:
        pytest.skip(f"Ceph RGW is not installed (Debian packages {' '.join(missing)})")
    if len(str(directory / "run" / "client.rgw.a.asok")) > 100:
        directory = Path(tempfile.mkdtemp(prefix="rgw-", dir="/tmp"))
    directory.mkdir(parents=True, exist_ok=True)
    mon_port, rgw_port = free_port(), free_port()
    while rgw_port == mon_port:
        rgw_port = free_port()
    stop_command = [str(RGW_DIR / "rgw-down.sh"), str(directory)]
    log_path = directory / "rgw-up.log"
    env = {**os.environ, "CEPH_ARGS": " ".join(ceph_args)} if ceph_args else None
    started = time.monotonic()
    with open(log_path, "wb") as log:  # a file, not a pipe: the daemons could hold a pipe open
        try:
            result = subprocess.run(
                [str(RGW_DIR / "rgw-up.sh"), str(directory), str(mon_port), str(rgw_port)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                timeout=timeout,
                check=False,
            )
            failed = f"exited with {result.returncode}" if result.returncode else ""
        except subprocess.TimeoutExpired:
            failed = f"did not finish in {timeout:.0f} s"
        except BaseException:  # interrupted (Ctrl-C): stop whatever has started
            subprocess.run(stop_command, capture_output=True, timeout=60, check=False)
            raise
    if failed:
        logs = _rgw_logs(directory, log_path)
        subprocess.run(stop_command, capture_output=True, timeout=60, check=False)
        raise RuntimeError(f"rgw-up.sh {failed}:\n{logs}")
    return {
        "url": f"http://127.0.0.1:{rgw_port}",
        "access_key": RGW_ACCESS_KEY,
        "secret_key": RGW_SECRET_KEY,
        "kind": "rgw",
        "started_in": time.monotonic() - started,
        "directory": str(directory),
        "stop_command": stop_command,
    }
