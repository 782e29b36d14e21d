"""Tracing with OpenTelemetry (``dockyard[otel]``): a server span per request, with child spans
for authentication, registry operations and storage calls, W3C trace context from clients, and
the trace id in the access log. Spans go to an in-memory exporter in this process (the server
runs in a thread of it)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import pytest
import requests

from harness import ServerFactory
from harness.client import sha256
from harness.dockyard import add_user

pytest.importorskip("opentelemetry.sdk.trace")

from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from opentelemetry.trace import SpanKind, StatusCode

from dockyard import tracing

CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on in this process (before the server is built), off again afterwards."""
    assert not tracing.enabled()
    exporter = InMemorySpanExporter()
    tracing.enable(SimpleSpanProcessor(exporter))
    try:
        yield exporter
    finally:
        tracing.disable()


def _ancestors(span: Any, by_id: dict[int, Any]) -> list[str]:
    names = []
    while span.parent is not None and span.parent.span_id in by_id:
        span = by_id[span.parent.span_id]
        names.append(span.name)
    return names


def _request_spans(exporter: InMemorySpanExporter, method: str) -> tuple[Any, list[Any]]:
    """The server span of the (one) ``method`` request, and every span of its trace."""
    finished = exporter.get_finished_spans()
    servers = [s for s in finished if s.kind == SpanKind.SERVER and s.name.startswith(method + " ")]
    assert len(servers) == 1, [s.name for s in finished]
    trace_id = servers[0].context.trace_id
    return servers[0], [s for s in finished if s.context.trace_id == trace_id]


def test_blob_upload_is_a_request_registry_storage_span_tree(
    start_server: ServerFactory, spans: InMemorySpanExporter, repo: str
) -> None:
    s = start_server()
    data = b"traced layer" * 100
    digest = sha256(data)
    r = requests.post(s.v2(f"{repo}/blobs/uploads/"))
    assert r.status_code == 202, r.text
    r = requests.put(urljoin(s.url, r.headers["Location"]), params={"digest": digest}, data=data)
    assert r.status_code == 201, r.text

    server, trace = _request_spans(spans, "PUT")
    assert server.name == "PUT /v2/{name}/blobs/uploads/{upload_id}", server.name
    assert server.attributes["http.response.status_code"] == 201
    assert server.attributes["http.route"] == "/v2/{name}/blobs/uploads/{upload_id}"
    assert "_state" not in server.attributes["url.path"]
    by_id = {span.context.span_id: span for span in trace}
    commits = [span for span in trace if span.name == "registry.upload.commit"]
    assert len(commits) == 1
    commit = commits[0]
    assert commit.attributes["dockyard.repository"] == repo
    assert _ancestors(commit, by_id)[-1] == server.name  # the request is the root
    below_commit = [
        span
        for span in trace
        if span.name.startswith("storage.") and "registry.upload.commit" in _ancestors(span, by_id)
    ]
    assert below_commit, [span.name for span in trace]
    assert all(span.attributes["dockyard.storage.path"].startswith("/") for span in below_commit)
    # the blob is then served: registry and storage spans under a GET
    spans.clear()
    assert requests.get(s.v2(f"{repo}/blobs/{digest}")).content == data
    server, trace = _request_spans(spans, "GET")
    names = {span.name for span in trace}
    assert {"registry.blob.stat", "registry.blob.open"} <= names, names
    assert any(name.startswith("storage.") for name in names), names


def test_a_clients_trace_context_is_continued_and_logged(
    start_server: ServerFactory, spans: InMemorySpanExporter
) -> None:
    s = start_server()
    r = requests.get(s.v2(""), headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"})
    assert r.status_code == 200
    server, _ = _request_spans(spans, "GET")
    assert server.context.trace_id == int(CLIENT_TRACE, 16)
    assert server.parent is not None and server.parent.span_id == int(CLIENT_SPAN, 16)
    assert server.parent.is_remote
    # the access log line names the trace (written just after the response is sent)
    deadline = time.monotonic() + 5
    while CLIENT_TRACE not in s.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    line = next(line for line in s.log().splitlines() if CLIENT_TRACE in line)
    assert "trace_id" in line and "GET" in line


def test_authentication_is_a_span_of_its_own(
    start_server: ServerFactory, spans: InMemorySpanExporter, tmp_path: Path, repo: str
) -> None:
    users = tmp_path / "htpasswd"
    add_user(users, "alice", "secret-password")
    s = start_server(auth={"htpasswd": {"realm": "R", "path": str(users)}})
    r = requests.head(s.v2(f"{repo}/manifests/latest"), auth=("alice", "secret-password"))
    assert r.status_code == 404
    server, trace = _request_spans(spans, "HEAD")
    auth = [span for span in trace if span.name == "auth"]
    assert len(auth) == 1 and auth[0].parent.span_id == server.context.span_id
    # a missing tag is routine: named in its spans, not an error
    resolve = next(span for span in trace if span.name == "registry.tag.resolve")
    assert resolve.attributes["error.type"] == "RegistryError"
    read = next(span for span in trace if span.name == "storage.read")
    assert read.attributes["error.type"] == "PathNotFound"
    assert all(span.status.status_code != StatusCode.ERROR for span in trace)
    assert server.attributes["http.response.status_code"] == 404


def test_no_trace_id_in_the_access_log_when_tracing_is_off(start_server: ServerFactory) -> None:
    assert not tracing.enabled()
    s = start_server()
    assert requests.get(s.v2("")).status_code == 200
    deadline = time.monotonic() + 5
    while '"/v2/"' not in s.log() and "/v2/" not in s.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "trace_id" not in s.log()
