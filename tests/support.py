"""Test support: a real Dockyard server in a subprocess, on loopback, with its own storage."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
import yaml
from requests.adapters import HTTPAdapter

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(
    port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 20.0
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {port} after {timeout}s")


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Server:
    """A running ``dockyard serve`` subprocess."""

    port: int
    root: Path
    config_path: Path
    log_path: Path
    proc: subprocess.Popen[bytes]
    session: requests.Session = field(default_factory=requests.Session)
    scheme: str = "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def v2(self, path: str) -> str:
        return f"{self.url}/v2/{path}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    # -- helpers for building content through the API --------------------------------------
    def push_blob(self, name: str, data: bytes) -> str:
        digest = sha256(data)
        r = self.session.post(
            self.v2(f"{name}/blobs/uploads/"), params={"digest": digest}, data=data
        )
        assert r.status_code == 201, r.text
        return digest

    def push_manifest(
        self,
        name: str,
        reference: str,
        manifest: dict[str, Any] | bytes,
        media_type: str | None = None,
    ) -> requests.Response:
        body = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
        if media_type is None and isinstance(manifest, dict):
            media_type = manifest.get("mediaType", OCI_MANIFEST)
        r = self.session.put(
            self.v2(f"{name}/manifests/{reference}"),
            data=body,
            headers={"Content-Type": media_type or OCI_MANIFEST},
        )
        return r

    def push_image(
        self,
        name: str,
        tag: str | None,
        layers: list[bytes] | None = None,
        media_type: str = OCI_MANIFEST,
        **extra: Any,
    ) -> tuple[str, dict[str, Any]]:
        """Push a config, layers and a manifest; return (manifest digest, manifest)."""
        layers = layers if layers is not None else [os.urandom(64)]
        config = json.dumps(
            {"architecture": "amd64", "os": "linux", "nonce": os.urandom(8).hex()}
        ).encode()
        docker = media_type == DOCKER_MANIFEST
        manifest: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": media_type,
            "config": {
                "mediaType": "application/vnd.docker.container.image.v1+json"
                if docker
                else "application/vnd.oci.image.config.v1+json",
                "digest": self.push_blob(name, config),
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip"
                    if docker
                    else "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": self.push_blob(name, layer),
                    "size": len(layer),
                }
                for layer in layers
            ],
            **extra,
        }
        body = json.dumps(manifest).encode()
        r = self.push_manifest(name, tag or sha256(body), body, media_type)
        assert r.status_code == 201, r.text
        return sha256(body), manifest


def write_config(path: Path, root: Path, port: int, **overrides: Any) -> None:
    config: dict[str, Any] = {
        "version": 0.1,
        "log": {"level": "info"},
        "storage": {"filesystem": {"rootdirectory": str(root)}, "delete": {"enabled": True}},
        "http": {"addr": f"127.0.0.1:{port}", "secret": "test-secret"},
    }
    s3 = os.environ.get("DOCKYARD_TEST_S3")
    if s3 and not {"s3", "filesystem"} & set(overrides.get("storage", {})):
        # The API suite on S3 instead of a disk: DOCKYARD_TEST_S3 holds storage.s3 as JSON (each
        # data directory becomes its own prefix; blobs are served by Dockyard, not redirected).
        prefix = hashlib.sha256(str(root).encode()).hexdigest()[:16]  # one per data directory
        config["storage"]["s3"] = {**json.loads(s3), "rootdirectory": f"/{prefix}"}
        config["storage"]["redirect"] = {"disable": True}
    _merge(config, overrides)
    if "s3" in config["storage"]:  # another driver replaces the default filesystem one
        del config["storage"]["filesystem"]
    path.write_text(yaml.safe_dump(config))


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


ServerFactory = Callable[..., Server]


def launch(
    work: Path,
    *,
    root: Path | None = None,
    workers: int = 1,
    env: dict[str, str] | None = None,
    port: int | None = None,
    args: list[str] | None = None,
    **overrides: Any,
) -> Server:
    """Write a config (test defaults merged with ``overrides``) into ``work`` and start
    ``dockyard serve`` on it; return once the port accepts connections."""
    root = root or work / "data"
    port = port or free_port()
    config_path = work / "config.yml"
    write_config(config_path, root, port, **overrides)
    log_path = work / "server.log"
    command = [
        sys.executable,
        "-m",
        "dockyard",
        "serve",
        str(config_path),
        "--workers",
        str(workers),
        *(args or []),
    ]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
    tls = overrides.get("http", {}).get("tls")
    server = Server(
        port=port,
        root=root,
        config_path=config_path,
        log_path=log_path,
        proc=proc,
        scheme="https" if tls else "http",
    )
    try:
        wait_for_port(port, proc)
    except Exception:
        server.stop()
        raise RuntimeError(f"server did not start:\n{server.log()}") from None
    return server


def assert_error(r: requests.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["Content-Type"].startswith("application/json")
    assert r.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    body = r.json()
    assert body["errors"][0]["code"] == code, body
    assert body["errors"][0]["message"]
    return body["errors"][0]


class _FromAddress(HTTPAdapter):
    def __init__(self, source: str) -> None:
        self.source = source
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["source_address"] = (self.source, 0)
        super().init_poolmanager(*args, **kwargs)


def session_from(source: str) -> requests.Session:
    """A session whose connections come from ``source``, another loopback address such as
    127.0.0.2 (all of 127.0.0.0/8 is local on Linux): a client at another address."""
    session = requests.Session()
    session.mount("http://", _FromAddress(source))
    return session


# -- raw HTTP: what requests and http.client would normalise, refuse, or hide (1xx) -----------


@dataclass
class RawResponse:
    status_line: bytes
    status: int
    headers: dict[str, str]  # lower-case names; a repeated header keeps its last value
    body: bytes
    interim: list[int]  # 1xx statuses that came first (100 Continue)

    def json(self) -> Any:
        return json.loads(self.body)


class RawConnection:
    """One TCP connection to a server, bytes in and responses out, nothing normalised."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buffer = b""

    def __enter__(self) -> RawConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError(f"connection closed; received so far: {self.buffer[:300]!r}")
        self.buffer += chunk

    def response(self, head: bool = False) -> RawResponse:
        """The next final response (``head``: to a HEAD request, so without a body)."""
        interim: list[int] = []
        while True:
            while b"\r\n\r\n" not in self.buffer:
                self._fill()
            block, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            status_line, *lines = block.split(b"\r\n")
            status = int(status_line.split(b" ", 2)[1])
            headers = {}
            for line in lines:
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            if 100 <= status < 200:
                interim.append(status)
                continue
            assert "chunked" not in headers.get("transfer-encoding", ""), headers
            length = 0 if head or status in (204, 304) else int(headers.get("content-length", 0))
            while len(self.buffer) < length:
                self._fill()
            body, self.buffer = self.buffer[:length], self.buffer[length:]
            return RawResponse(status_line, status, headers, body, interim)

    def closed_within(self, seconds: float) -> bool:
        """True once the server closes the connection (anything it still sends is dropped),
        False if it is still open after ``seconds``."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                if not self.sock.recv(65536):
                    return True
            except TimeoutError:
                return False
            except ConnectionResetError:
                return True
        return False


def raw_request(port: int, data: bytes, head: bool = False, timeout: float = 10.0) -> RawResponse:
    with RawConnection(port, timeout) as conn:
        conn.send(data)
        return conn.response(head=head)
