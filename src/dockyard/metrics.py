"""Prometheus metrics: registry:2's names and labels where the meaning matches, distribution 3's
where it added or renamed some, and Dockyard's own (``dockyard_*``).

Collected only when ``http.debug.prometheus.enabled`` (with ``http.debug.addr``): until
:func:`enable` is called :data:`active` is None, every instrumented place tests that and does
nothing else, and prometheus-client is not even imported.

With several workers the server (server.py) gives them a directory of their own in
``PROMETHEUS_MULTIPROC_DIR`` before they start: each worker writes its values there
(prometheus-client's multiprocess mode) and the scrape (:func:`exposition`) sums them. That is
why prometheus-client is imported here only after the fork: it reads the variable on import.
Labels stay low-cardinality: route names, methods, status codes, storage actions; never a
repository or a digest.
"""

from __future__ import annotations

import asyncio
import os
import time
from bisect import bisect_left
from collections.abc import Awaitable, Callable
from functools import wraps
from typing import Any, ParamSpec, TypeVar

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: how often the hot path's counts reach the exported values (worker 0 also adds its own
#: before each scrape): a scrape may miss up to this much of the other workers' last moments
FLUSH_SECONDS = 1.0

#: registry:2's HTTP duration buckets (go-metrics' defaults)
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60)
#: registry:2's size buckets: 1 KiB ... 2 GiB, doubling
SIZE_BUCKETS = tuple(1024.0 * 2**k for k in range(22))
#: Prometheus' default buckets, which registry:2 uses for storage actions
STORAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
GC_BUCKETS = (0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600)

#: registry:2's ``driver`` label for Dockyard's drivers
DRIVER_NAMES = {"filesystem": "filesystem", "s3": "s3aws"}

#: aiohttp handler function -> registry:2's route name (``handler`` label); Dockyard's own
#: routes keep names of their own
HANDLERS = {
    "version_check": "base",
    "catalog": "catalog",
    "list_tags": "tags",
    "get_manifest": "manifest",
    "put_manifest": "manifest",
    "delete_manifest": "manifest",
    "get_blob": "blob",
    "delete_blob": "blob",
    "start_upload": "blob_upload",
    "patch_upload": "blob_upload_chunk",
    "finish_upload": "blob_upload_chunk",
    "upload_status": "blob_upload_chunk",
    "cancel_upload": "blob_upload_chunk",
    "list_referrers": "referrers",
    "health": "health",
    "get_token": "token",
    "post_token": "token",
}
#: requests no route matched (404, 405)
UNMATCHED = "unmatched"


class Metrics:
    """Every metric Dockyard exports, in a registry of its own."""

    def __init__(self) -> None:
        from prometheus_client import (
            CollectorRegistry,
            Counter,
            Gauge,
            Histogram,
            disable_created_metrics,
        )

        disable_created_metrics()
        self.multiprocess_dir = os.environ.get(MULTIPROC_ENV) or None
        r = self.registry = CollectorRegistry(auto_describe=True)
        if self.multiprocess_dir is None:
            from prometheus_client import GC_COLLECTOR, PLATFORM_COLLECTOR, PROCESS_COLLECTOR

            for collector in (GC_COLLECTOR, PLATFORM_COLLECTOR, PROCESS_COLLECTOR):
                r.register(collector)

        # -- HTTP (registry:2 2.8) ---------------------------------------------------------------
        self.requests = Counter(
            "registry_http_requests_total",
            "Total number of HTTP requests made.",
            ["code", "handler", "method"],
            registry=r,
        )
        self.duration = Histogram(
            "registry_http_request_duration_seconds",
            "The HTTP request latencies in seconds.",
            ["handler", "method"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.request_size = Histogram(
            "registry_http_request_size_bytes",
            "The HTTP request sizes in bytes.",
            ["handler"],
            buckets=SIZE_BUCKETS,
            registry=r,
        )
        self.response_size = Histogram(
            "registry_http_response_size_bytes",
            "The HTTP response sizes in bytes.",
            ["handler"],
            buckets=SIZE_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "registry_http_in_flight_requests",
            "The in-flight HTTP requests",
            ["handler"],
            multiprocess_mode="livesum",
            registry=r,
        )
        # -- storage (registry:2 2.8; ``URLFor`` is distribution 3's ``RedirectURL``) ---------
        self.storage_action = Histogram(
            "registry_storage_action_seconds",
            "The number of seconds that the storage action takes",
            ["driver", "action"],
            buckets=STORAGE_BUCKETS,
            registry=r,
        )
        # the blob descriptor cache: registry:2 2.8's one counter, and distribution 3's three
        self.cache_total = Counter(
            "registry_storage_cache",
            "The number of cache request received",
            ["type"],
            registry=r,
        )
        self.cache_requests = Counter(
            "registry_storage_cache_requests",
            "The number of cache request received",
            registry=r,
        )
        self.cache_hits = Counter(
            "registry_storage_cache_hits", "The number of cache request hits", registry=r
        )
        self.cache_errors = Counter(
            "registry_storage_cache_errors", "The number of cache request errors", registry=r
        )
        # -- the pull-through cache (distribution 3's names, plus upstream errors) -------------
        self.proxy_requests = Counter(
            "registry_proxy_requests",
            "The number of total incoming proxy request received",
            ["type"],
            registry=r,
        )
        self.proxy_hits = Counter(
            "registry_proxy_hits", "The number of total proxy request hits", ["type"], registry=r
        )
        self.proxy_misses = Counter(
            "registry_proxy_misses",
            "The number of total proxy request misses",
            ["type"],
            registry=r,
        )
        self.proxy_pulled_bytes = Counter(
            "registry_proxy_pulled_bytes",
            "The size of total bytes pulled from the upstream",
            ["type"],
            registry=r,
        )
        self.proxy_upstream_errors = Counter(
            "dockyard_proxy_upstream_errors",
            "Upstream requests of the pull-through cache that failed, by kind "
            "(unavailable, throttled, denied, invalid)",
            ["kind"],
            registry=r,
        )
        # -- Dockyard's own ----------------------------------------------------------------------
        self.uploads_in_progress = Gauge(
            "dockyard_uploads_in_progress",
            "Upload sessions started and not yet finished or cancelled (since the start)",
            multiprocess_mode="sum",
            registry=r,
        )
        self.upload_bytes = Counter(
            "dockyard_upload_bytes_received",
            "Bytes of blob data received in uploads (PATCH, PUT and monolithic POST bodies)",
            registry=r,
        )
        self.served_bytes = Counter(
            "dockyard_served_bytes",
            "Bytes of blobs and manifests served (response bodies of GET)",
            ["handler"],
            registry=r,
        )
        self.auth_failures = Counter(
            "dockyard_auth_failures",
            "Requests refused for missing or wrong credentials (401), and logins refused "
            "while throttled",
            ["reason"],
            registry=r,
        )
        self.gc_runs = Counter(
            "dockyard_gc_runs", "Garbage collections run (scheduled or immediate)", registry=r
        )
        self.gc_duration = Histogram(
            "dockyard_gc_duration_seconds",
            "How long garbage collections took",
            buckets=GC_BUCKETS,
            registry=r,
        )
        self.gc_reclaimed = Counter(
            "dockyard_gc_reclaimed_bytes", "Bytes of blobs garbage collection removed", registry=r
        )
        self.storage_used = Gauge(
            "dockyard_storage_used_bytes",
            "Bytes of blobs in storage, as found by the last garbage collection",
            multiprocess_mode="mostrecent",
            registry=r,
        )
        #: collectors that compute their values at scrape time (added to the multiprocess
        #: scrape too: their values are the instance's, not a worker's)
        self.scrape_collectors: dict[str, Any] = {}
        self.http_children: dict[tuple[str, str], HTTPChild] = {}
        self.in_flight_by_handler: dict[str, LocalGauge] = {}
        self.storage_timers: dict[tuple[str, str], LocalHistogram] = {}
        #: what the hot path counts locally, flushed every FLUSH_SECONDS
        self.locals: list[LocalHistogram | LocalCounter | LocalGauge] = []

    # -- the hot path: plain Python values, added to prometheus-client's every FLUSH_SECONDS ---
    def local_histogram(self, child: Any) -> LocalHistogram:
        local = LocalHistogram(child)
        self.locals.append(local)
        return local

    def local_counter(self, child: Any) -> LocalCounter:
        local = LocalCounter(child)
        self.locals.append(local)
        return local

    def http_child(self, handler: str, method: str) -> HTTPChild:
        """The labelled metrics of one (handler, method), looked up once."""
        key = (handler, method)
        child = self.http_children.get(key)
        if child is None:
            flight = self.in_flight_by_handler.get(handler)
            if flight is None:
                flight = self.in_flight_by_handler[handler] = LocalGauge(
                    self.in_flight.labels(handler)
                )
                self.locals.append(flight)
            child = self.http_children[key] = HTTPChild(self, handler, method.lower(), flight)
        return child

    def storage_timer(self, driver: str, action: str) -> LocalHistogram:
        key = (driver, action)
        local = self.storage_timers.get(key)
        if local is None:
            local = self.storage_timers[key] = self.local_histogram(
                self.storage_action.labels(DRIVER_NAMES.get(driver, driver), action)
            )
        return local

    def flush(self) -> None:
        """Add what the hot path counted since the last flush to the exported values (in
        multiprocess mode, this worker's file)."""
        for local in self.locals:
            local.flush()

    async def flush_forever(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            self.flush()

    def exposition(self) -> tuple[bytes, str]:
        """The text format of every metric (summed over the workers in multiprocess mode)."""
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

        self.flush()
        if self.multiprocess_dir is None:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.multiprocess_dir)
        for collector in self.scrape_collectors.values():
            registry.register(collector)
        return generate_latest(registry), CONTENT_TYPE_LATEST

    def set_scrape_collector(self, name: str, collector: Any) -> None:
        """The collector called ``name``, read at each scrape (e.g. from files every worker
        can read); it replaces one set before under that name (a server started again in the
        same process)."""
        old = self.scrape_collectors.pop(name, None)
        if old is not None and self.multiprocess_dir is None:
            self.registry.unregister(old)
        self.scrape_collectors[name] = collector
        if self.multiprocess_dir is None:
            self.registry.register(collector)


class LocalHistogram:
    """Observations of one labelled histogram, counted per bucket in plain Python. (Each
    observation through prometheus-client takes a lock and, in multiprocess mode, writes to a
    mapped file per value: a third of the time of a HEAD of a manifest.)"""

    __slots__ = ("bounds", "child", "counts", "total")

    def __init__(self, child: Any) -> None:
        self.child = child
        # prometheus-client's bucket bounds, +Inf last; its buckets are not cumulative
        self.bounds: list[float] = list(child._upper_bounds)
        self.counts = [0] * len(self.bounds)
        self.total = 0.0

    def observe(self, amount: float) -> None:
        self.counts[bisect_left(self.bounds, amount)] += 1
        self.total += amount

    def flush(self) -> None:
        counts, total = self.counts, self.total
        if not any(counts):
            return
        self.counts = [0] * len(counts)
        self.total = 0.0
        buckets = self.child._buckets
        for i, n in enumerate(counts):
            if n:
                buckets[i].inc(n)
        self.child._sum.inc(total)


class LocalCounter:
    __slots__ = ("child", "value")

    def __init__(self, child: Any) -> None:
        self.child = child
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        self.value += amount

    def flush(self) -> None:
        if self.value:
            value, self.value = self.value, 0.0
            self.child.inc(value)


class LocalGauge:
    """A gauge this process alone moves (its requests in flight): its value is exported as
    it is at each flush."""

    __slots__ = ("child", "exported", "value")

    def __init__(self, child: Any) -> None:
        self.child = child
        self.value = 0
        self.exported = 0

    def flush(self) -> None:
        if self.value != self.exported:
            self.exported = self.value
            self.child.set(self.value)


class HTTPChild:
    """One (handler, method): its labelled metrics, and the requests counter per status."""

    __slots__ = ("codes", "duration", "flight", "handler", "method", "metrics", "req", "resp")

    def __init__(self, metrics: Metrics, handler: str, method: str, flight: LocalGauge) -> None:
        self.metrics = metrics
        self.handler = handler
        self.method = method
        self.flight = flight
        self.duration = metrics.local_histogram(metrics.duration.labels(handler, method))
        self.req = metrics.local_histogram(metrics.request_size.labels(handler))
        self.resp = metrics.local_histogram(metrics.response_size.labels(handler))
        self.codes: dict[int, LocalCounter] = {}

    def count(self, status: int) -> None:
        counter = self.codes.get(status)
        if counter is None:
            counter = self.codes[status] = self.metrics.local_counter(
                self.metrics.requests.labels(str(status), self.handler, self.method)
            )
        counter.value += 1


#: the metrics, once enabled (None: not collected)
active: Metrics | None = None


def enable() -> Metrics:
    """Start collecting (idempotent: one set of metrics per process)."""
    global active
    if active is None:
        active = Metrics()
    return active


P = ParamSpec("P")
T = TypeVar("T")


def timed_action(
    action: str,
) -> Callable[[Callable[P, Awaitable[T]]], Callable[P, Awaitable[T]]]:
    """Time a ``Store`` method as registry:2's storage ``action`` (when metrics are on)."""

    def wrap(method: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
        @wraps(method)
        async def timed(*args: P.args, **kwargs: P.kwargs) -> T:
            m = active
            if m is None:
                return await method(*args, **kwargs)
            start = time.perf_counter()
            try:
                return await method(*args, **kwargs)
            finally:
                store = args[0]
                m.storage_timer(store.name, action).observe(  # type: ignore[attr-defined]
                    time.perf_counter() - start
                )

        return timed

    return wrap
