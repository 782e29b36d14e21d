"""The clients the workloads drive the servers with: plain HTTP (http.client, one connection
when asked), curl for blobs, wrk for GET loads and ApacheBench for HEAD loads.

Every function raises ``BenchError`` with what went wrong; clients send the server's
``Authorization`` header when it has one (the htpasswd groups).
"""

from __future__ import annotations

import http.client
import json
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit

from bench.servers import BenchError, Server
from bench.suite import size_text
from harness.client import DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST, sha256

#: what docker and containerd send when they fetch a manifest
MANIFEST_ACCEPT = ", ".join([OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST])


@dataclass
class Response:
    status: int
    headers: http.client.HTTPMessage
    body: bytes


def request(
    server: Server,
    method: str,
    url: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    conn: http.client.HTTPConnection | None = None,
) -> Response:
    """One HTTP request (on ``conn`` when given, which is kept open)."""
    parts = urlsplit(urljoin(server.url, url))
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    all_headers = dict(headers or {})
    if server.authorization:
        all_headers["Authorization"] = server.authorization
    own = conn is None
    if conn is None:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=300)
    try:
        conn.request(method, path, body=body, headers=all_headers)
        r = conn.getresponse()
        return Response(r.status, r.headers, r.read())
    finally:
        if own:
            conn.close()


def expect(r: Response, status: int, what: str) -> Response:
    if r.status != status:
        raise BenchError(f"{what}: HTTP {r.status} (wanted {status}): {r.body[:300]!r}")
    return r


def start_upload(server: Server, repo: str) -> str:
    """POST an upload session; the absolute URL to PUT to (with ``&digest=`` still missing)."""
    r = expect(request(server, "POST", f"/v2/{repo}/blobs/uploads/"), 202, f"POST upload {repo}")
    location = urljoin(server.url, r.headers["Location"])
    return location + ("&" if "?" in location else "?")


def upload_bytes(server: Server, repo: str, data: bytes) -> str:
    """POST + PUT with the whole blob (registry:2 2.8 answers a POST ?digest= with 202)."""
    digest = sha256(data)
    url = start_upload(server, repo) + f"digest={digest}"
    headers = {"Content-Type": "application/octet-stream"}
    expect(request(server, "PUT", url, data, headers), 201, f"PUT blob {repo}")
    return digest


def run_tool(args: list[str], what: str, timeout: float) -> subprocess.CompletedProcess[str]:
    try:
        result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{what}: no result after {timeout:.0f}s") from None
    if result.returncode != 0:
        raise BenchError(
            f"{what}: {args[0]} exited with {result.returncode}: "
            f"{(result.stderr or result.stdout).strip()[-600:]}"
        )
    return result


def curl_upload(server: Server, repo: str, path: Path, digest: str, size: int) -> float:
    """POST, then ``curl -T file -X PUT <Location>&digest=``; seconds from POST to the 201."""
    t0 = time.monotonic()
    url = start_upload(server, repo) + f"digest={digest}"
    args = ["curl", "-sS", "-T", str(path), "-X", "PUT", "-o", "/dev/null"]
    args += ["-H", "Content-Type: application/octet-stream"]
    if server.authorization:
        args += ["-H", f"Authorization: {server.authorization}"]
    args += ["-w", "%{http_code} %{size_upload}", url]
    out = run_tool(args, f"curl PUT {size_text(size)}", timeout=3600).stdout.split()
    elapsed = time.monotonic() - t0
    if out[0] != "201" or int(float(out[1])) != size:
        raise BenchError(f"curl PUT: HTTP {out[0]}, {out[1]} of {size} bytes sent")
    return elapsed


def curl_download(server: Server, repo: str, digest: str, size: int) -> float:
    args = ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{size_download} %{time_total}"]
    if server.authorization:
        args += ["-H", f"Authorization: {server.authorization}"]
    args.append(f"{server.url}/v2/{repo}/blobs/{digest}")
    code, got, seconds = run_tool(args, "curl GET blob", timeout=3600).stdout.split()
    if code != "200" or int(float(got)) != size:
        raise BenchError(f"curl GET: HTTP {code}, {got} of {size} bytes")
    return float(seconds)


def wrk(
    url: str,
    headers: dict[str, str],
    *,
    threads: int,
    connections: int,
    seconds: int,
    script: Path,
) -> tuple[float, str | None]:
    """GETs of ``url`` with wrk for ``seconds``, the ``headers`` set by a Lua script (written
    to ``script``): requests/s, and wrk's "Socket errors" line if it printed one. A response
    other than 2xx/3xx fails the run."""
    lines = ['wrk.method = "GET"']
    lines += [f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}" for k, v in headers.items()]
    script.write_text("\n".join(lines) + "\n")
    args = ["wrk", "-t", str(threads), "-c", str(connections)]
    args += ["-d", f"{seconds}s", "--timeout", "10s", "-s", str(script), url]
    out = run_tool(args, "wrk", timeout=seconds + 60).stdout
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if rate is None:
        raise BenchError(f"wrk printed no rate:\n{out}")
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        raise BenchError(f"wrk: {non2xx.group(1)} responses were not 2xx/3xx")
    errors = re.search(r"Socket errors: (.*)", out)
    return float(rate.group(1)), errors.group(1) if errors else None


def ab_head(
    url: str, headers: dict[str, str], *, connections: int, seconds: int, most: int
) -> tuple[float, int]:
    """HEADs of ``url`` with ApacheBench for ``seconds``, or until ``most`` requests are done
    (keep-alive): requests/s and the number of failed requests. wrk 4.1 cannot do HEAD (it
    waits for the body Content-Length announces: wrk#198). A response other than 2xx fails the
    run."""
    args = ["ab", "-q", "-r", "-k", "-i", "-c", str(connections), "-t", str(seconds)]
    args += ["-n", str(most), "-s", "10"]
    for k, v in headers.items():
        args += ["-H", f"{k}: {v}"]
    out = run_tool([*args, url], "ab", timeout=seconds + 60).stdout
    rate = re.search(r"Requests per second:\s+([\d.]+)", out)
    complete = re.search(r"Complete requests:\s+(\d+)", out)
    if rate is None or complete is None or int(complete.group(1)) == 0:
        raise BenchError(f"ab: no completed requests:\n{out[-800:]}")
    non2xx = re.search(r"Non-2xx responses:\s+(\d+)", out)
    if non2xx:
        raise BenchError(f"ab: {non2xx.group(1)} responses were not 2xx")
    failed = re.search(r"Failed requests:\s+(\d+)", out)
    return float(rate.group(1)), int(failed.group(1)) if failed else 0
