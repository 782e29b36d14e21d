"""The HTTP side of the metrics: the middleware that counts and times every request (the one
place HTTP is instrumented), and the debug server's application (``http.debug.addr``): the
Prometheus endpoint and ``/debug/health`` with each failing check's error."""

from __future__ import annotations

import time

from aiohttp import web

from dockyard.api.health import HEALTH_PATH, HealthCheck
from dockyard.http.responses import Handler, json_response
from dockyard.metrics import HANDLERS, UNMATCHED, Metrics

#: handlers whose response bodies are blob or manifest bytes served
_SERVED = frozenset({"blob", "manifest"})
#: handlers whose request bodies are blob bytes received
_RECEIVED = frozenset({"blob_upload", "blob_upload_chunk"})


def metrics_middleware(metrics: Metrics) -> web.Middleware:
    """registry:2's HTTP metrics (as client_golang's promhttp measures them: latency until the
    handler returns, sizes of bodies, method lower-cased), and Dockyard's bytes in and out."""
    served = {name: metrics.local_counter(metrics.served_bytes.labels(name)) for name in _SERVED}
    received = metrics.local_counter(metrics.upload_bytes)
    uploads = metrics.uploads_in_progress

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        name = HANDLERS.get(getattr(request.match_info.handler, "__name__", ""), UNMATCHED)
        child = metrics.http_child(name, request.method)
        flight = child.flight
        flight.value += 1
        start = time.perf_counter()
        status = 500
        response = None
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            child.duration.observe(time.perf_counter() - start)
            flight.value -= 1
            child.count(status)
            size = request.content.total_bytes if request.body_exists else 0
            child.req.observe(size)
            if name in _RECEIVED:
                if size and status < 300:
                    received.value += size
                if status == 202 and name == "blob_upload":
                    uploads.inc()  # a session opened (201 is a monolithic upload or a mount)
                elif status in (201, 204) and request.method in ("PUT", "DELETE"):
                    uploads.dec()  # a session finished or cancelled
            sent = 0
            if response is not None and request.method != "HEAD":
                sent = response.content_length or 0
            child.resp.observe(sent)
            if sent and name in _SERVED and status < 300:
                served[name].value += sent

    return middleware


def debug_app(metrics: Metrics | None, path: str, health: HealthCheck) -> web.Application:
    """What ``http.debug.addr`` serves: the metrics at ``path`` (when Prometheus is enabled)
    and the health checks with their errors. Not for the public: nothing is authenticated."""

    async def scrape(_: web.Request) -> web.Response:
        assert metrics is not None
        body, content_type = metrics.exposition()
        response = web.Response(body=body)
        response.headers["Content-Type"] = content_type
        return response

    async def debug_health(_: web.Request) -> web.Response:
        failures = await health.failures()
        return json_response(failures, status=503 if failures else 200)

    app = web.Application()
    app.router.add_get(HEALTH_PATH, debug_health)
    if metrics is not None:
        app.router.add_get(path, scrape)
    return app
