"""The notification endpoints' metrics, read at scrape time from the outbox's state files (the
same files ``dockyard events`` reads), so they are the instance's whatever worker delivers and
they survive restarts: events delivered, dropped, failed attempts, the backlog in bytes and the
consecutive failures now. The label is the endpoint's configured name (few, chosen by the
operator). The backlog is counted in bytes: counting its events would read the whole backlog at
each scrape."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from dockyard.events.outbox import Outbox
from dockyard.notificationsconfig import EndpointConfig


class EventsCollector:
    """A prometheus-client collector (``collect``) of every enabled endpoint's state."""

    def __init__(self, outbox: Outbox, endpoints: list[EndpointConfig]) -> None:
        self.outbox = outbox
        self.names = [e.name for e in endpoints]

    def describe(self) -> list[Any]:
        # Nothing to check for duplicates at registration, and no scrape at registration.
        return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        delivered = CounterMetricFamily(
            "dockyard_events_delivered",
            "Events an endpoint accepted (2xx or 3xx)",
            labels=["endpoint"],
        )
        failures = CounterMetricFamily(
            "dockyard_events_delivery_failures",
            "Failed attempts to deliver an event (each retry counts)",
            labels=["endpoint"],
        )
        dropped = CounterMetricFamily(
            "dockyard_events_dropped",
            "Events dropped undelivered because the backlog passed notifications.outbox.maxbytes",
            labels=["endpoint"],
        )
        backlog = GaugeMetricFamily(
            "dockyard_events_backlog_bytes",
            "Bytes of events written to the outbox and not yet delivered to the endpoint",
            labels=["endpoint"],
        )
        failing = GaugeMetricFamily(
            "dockyard_events_consecutive_failures",
            "Failed attempts since the endpoint last accepted an event (0: healthy)",
            labels=["endpoint"],
        )
        try:
            size = self.outbox.size()
        except OSError:
            return
        for name in self.names:
            try:
                state = self.outbox.load_state(name)
            except OSError:
                continue
            delivered.add_metric([name], state.delivered)
            failures.add_metric([name], state.failed_attempts)
            dropped.add_metric([name], state.dropped)
            backlog.add_metric([name], max(size - state.offset, 0))
            failing.add_metric([name], state.failures)
        yield from (delivered, failures, dropped, backlog, failing)
