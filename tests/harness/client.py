"""Talking to a registry under test: content pushed through the API, error bodies checked,
clients at other loopback addresses, and raw HTTP where a client library would normalise what
is sent or hide what comes back."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin

import requests
from requests.adapters import HTTPAdapter

from harness.net import Loopback

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class RegistryClient(Loopback):
    """What Dockyard under test offers tests (in a process of its own or in the test's): its
    URLs, and content pushed through the API with ``session``."""

    scheme: str = "http"
    session: requests.Session

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

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


def chunked_push(
    registry: Loopback,
    repo: str,
    tag: str,
    layer: bytes,
    config: bytes,
    manifest: bytes,
    cuts: Sequence[int],
    *,
    last_in_put: bool = False,
) -> str:
    """Push an image by hand, the layer in chunks, to any registry (Dockyard or registry:2).

    The layer: ``POST``, a ``PATCH`` with its ``Content-Range`` for each span between ``cuts``
    (offsets from 0 to the layer's length), each answered 202 with the ``Range`` received so
    far, then ``PUT ?digest=`` without a body; or, with ``last_in_put``, the last span in that
    ``PUT`` instead, after a ``GET`` of the upload's state (204 and its ``Range``). The config:
    ``POST``, then the whole blob in the ``PUT`` (registry:2 has no single-``POST`` upload).
    Then ``manifest`` (referencing both) by ``tag``. Returns the manifest digest."""
    base = registry.v2(repo)
    assert cuts[0] == 0 and cuts[-1] == len(layer), cuts
    patched = cuts[:-1] if last_in_put else cuts
    r = requests.post(f"{base}/blobs/uploads/", timeout=30)
    assert r.status_code == 202, r.text
    location = urljoin(registry.url, r.headers["Location"])
    for start, end in itertools.pairwise(patched):
        r = requests.patch(
            location,
            data=layer[start:end],
            headers={
                "Content-Type": "application/octet-stream",
                "Content-Range": f"{start}-{end - 1}",
            },
            timeout=60,
        )
        assert r.status_code == 202, r.text
        assert r.headers["Range"] == f"0-{end - 1}"
        location = urljoin(registry.url, r.headers["Location"])
    last = b""
    if last_in_put:
        status = requests.get(location, timeout=30)
        assert status.status_code == 204, status.text
        assert status.headers["Range"] == f"0-{cuts[-2] - 1}"
        last = layer[cuts[-2] :]
    r = requests.put(
        location,
        params={"digest": sha256(layer)},
        data=last,
        headers={"Content-Type": "application/octet-stream"} if last else {},
        timeout=60,
    )
    assert r.status_code == 201, r.text
    assert r.headers["Docker-Content-Digest"] == sha256(layer)

    r = requests.post(f"{base}/blobs/uploads/", timeout=30)
    assert r.status_code == 202, r.text
    r = requests.put(
        urljoin(registry.url, r.headers["Location"]),
        params={"digest": sha256(config)},
        data=config,
        headers={"Content-Type": "application/octet-stream"},
        timeout=30,
    )
    assert r.status_code == 201, r.text

    r = requests.put(
        f"{base}/manifests/{tag}",
        data=manifest,
        headers={"Content-Type": OCI_MANIFEST},
        timeout=30,
    )
    assert r.status_code == 201, r.text
    assert r.headers["Docker-Content-Digest"] == sha256(manifest)
    return sha256(manifest)


def upload_in_steps(
    session: requests.Session, registry: Loopback, repo: str, data: bytes, *, chunked: bool
) -> int:
    """POST, one PATCH (``chunked``: the body in two pieces of a chunked transfer, no length
    announced; else whole), then ``PUT ?digest=``: the status of the first request that was
    not accepted, or the PUT's (201)."""
    r = session.post(registry.v2(f"{repo}/blobs/uploads/"))
    if r.status_code != 202:
        return r.status_code
    half = len(data) // 2
    body: Any = iter([data[:half], data[half:]]) if chunked else data
    r = session.patch(urljoin(registry.url, r.headers["Location"]), data=body)
    if r.status_code != 202:
        return r.status_code
    r = session.put(urljoin(registry.url, r.headers["Location"]), params={"digest": sha256(data)})
    return r.status_code


def pushers_at_once(
    registries: Sequence[Loopback], namespace: str, pushers: int = 20, size: int = 40 * 1024
) -> list[int]:
    """``pushers`` threads at once, each pushing three random blobs of ``size`` bytes (the
    first and third chunked, the second whole) into ``<namespace>/repo<i % 5>`` of
    ``registries[i % len(registries)]``: every upload's final status (what a quota race
    looks like from the clients)."""
    outcomes: list[int] = []
    lock = threading.Lock()

    def push(i: int) -> None:
        registry = registries[i % len(registries)]
        session = requests.Session()
        repo = f"{namespace}/repo{i % 5}"
        statuses = [
            upload_in_steps(session, registry, repo, os.urandom(size), chunked=not part % 2)
            for part in range(3)
        ]
        with lock:
            outcomes.extend(statuses)

    threads = [threading.Thread(target=push, args=(i,)) for i in range(pushers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes


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
