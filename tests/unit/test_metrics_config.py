"""The configuration of the debug server and health checks (http.debug.*, health.*), and the
threshold logic of the periodic storage check."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from dockyard.api.health import HealthCheck
from dockyard.config import HealthStorageDriverConfig, apply_env_overrides, validate
from dockyard.errors import ConfigError
from dockyard.storage.driver import StorageError


def config(**extra: Any) -> dict[str, Any]:
    return {"version": "0.1", "storage": {"filesystem": {"rootdirectory": "/tmp/x"}}, **extra}


def test_debug_and_health_keys() -> None:
    c = validate(
        config(
            http={"debug": {"addr": ":5001", "prometheus": {"enabled": True, "path": "/m"}}},
            health={"storagedriver": {"enabled": True, "interval": "30s", "threshold": 3}},
        )
    )
    assert c.http.debug.addr == ":5001"
    assert c.http.debug.prometheus.enabled and c.http.debug.prometheus.path == "/m"
    sd = c.health.storagedriver
    assert (sd.enabled, sd.interval, sd.threshold) == (True, 30.0, 3)


def test_defaults() -> None:
    c = validate(config())
    assert c.http.debug.addr == "" and not c.http.debug.prometheus.enabled
    assert c.http.debug.prometheus.path == "/metrics"
    sd = c.health.storagedriver
    assert (sd.enabled, sd.interval, sd.threshold) == (None, 10.0, 0)


def test_environment_overrides() -> None:
    raw = apply_env_overrides(
        config(),
        {
            "REGISTRY_HTTP_DEBUG_ADDR": "localhost:5001",
            "REGISTRY_HTTP_DEBUG_PROMETHEUS_ENABLED": "true",
            "REGISTRY_HEALTH_STORAGEDRIVER_ENABLED": "true",
            "REGISTRY_HEALTH_STORAGEDRIVER_THRESHOLD": "5",
        },
    )
    c = validate(raw)
    assert c.http.debug.addr == "localhost:5001" and c.http.debug.prometheus.enabled
    assert c.health.storagedriver.enabled and c.health.storagedriver.threshold == 5


@pytest.mark.parametrize(
    ("health", "key"),
    [
        ({"storagedriver": {"threshold": -1}}, "health.storagedriver.threshold"),
        ({"storagedriver": {"interval": "soon"}}, "health.storagedriver.interval"),
        ({"storagedriver": {"enabled": "maybe"}}, "health.storagedriver.enabled"),
    ],
)
def test_bad_health_values(health: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate(config(health=health))
    assert info.value.key == key


def test_bad_prometheus_path() -> None:
    with pytest.raises(ConfigError) as info:
        validate(
            config(
                http={
                    "debug": {"addr": ":5001", "prometheus": {"enabled": True, "path": "metrics"}}
                }
            )
        )
    assert info.value.key == "http.debug.prometheus.path"


def test_what_has_no_effect_is_named(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="dockyard.config"):
        validate(config(http={"debug": {"prometheus": {"enabled": True}}}))
        validate(config(health={"tcp": [{"addr": "redis:6379"}]}))
    text = caplog.text
    assert "http.debug.prometheus.enabled has no effect without http.debug.addr" in text
    assert "health.tcp is not applied" in text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dockyard.config"):
        validate(config(health={"storagedriver": {"enabled": True}}))
    assert "health" not in caplog.text  # no "accepted but has no effect" any more


class FlakyStorage:
    name = "filesystem"

    def __init__(self) -> None:
        self.failing = False
        self.checks = 0

    async def check_storage(self) -> None:
        self.checks += 1
        if self.failing:
            raise StorageError("disk on fire")


class FakeRegistry:
    def __init__(self) -> None:
        self.storage = FlakyStorage()

    async def check_storage(self) -> None:
        await self.storage.check_storage()


def test_threshold_counts_failures_in_a_row() -> None:
    async def run() -> None:
        registry = FakeRegistry()
        sd = HealthStorageDriverConfig(enabled=True, interval=10, threshold=3)
        check = HealthCheck(registry, sd)  # type: ignore[arg-type]
        await check.check_once()
        assert await check.failures() == {}
        registry.storage.failing = True
        for _ in range(2):
            await check.check_once()
            assert await check.failures() == {}  # under the threshold
        registry.storage.failing = False
        await check.check_once()  # a pass starts the count again
        registry.storage.failing = True
        for _ in range(2):
            await check.check_once()
        assert await check.failures() == {}
        await check.check_once()
        assert await check.failures() == {"storagedriver_filesystem": "disk on fire"}
        assert await check.failed_checks() == ["storagedriver_filesystem"]
        checks = registry.storage.checks
        await check.failures()
        assert registry.storage.checks == checks  # asking does not check: the period does
        registry.storage.failing = False
        await check.check_once()
        assert await check.failures() == {}  # passing again at once

    asyncio.run(run())


def test_threshold_zero_fails_at_once() -> None:
    async def run() -> None:
        registry = FakeRegistry()
        check = HealthCheck(registry, HealthStorageDriverConfig(enabled=True))  # type: ignore[arg-type]
        registry.storage.failing = True
        await check.check_once()
        assert list(await check.failures()) == ["storagedriver_filesystem"]

    asyncio.run(run())


def test_disabled_never_checks() -> None:
    async def run() -> None:
        registry = FakeRegistry()
        registry.storage.failing = True
        check = HealthCheck(registry, HealthStorageDriverConfig(enabled=False))  # type: ignore[arg-type]
        await check.start()
        assert await check.failures() == {}
        assert registry.storage.checks == 0
        await check.stop()

    asyncio.run(run())


def _exported_names() -> set[str]:
    import tempfile

    from dockyard.events.metrics import EventsCollector
    from dockyard.events.outbox import Outbox
    from dockyard.metrics import Metrics
    from dockyard.notificationsconfig import EndpointConfig

    metrics = Metrics()
    with tempfile.TemporaryDirectory() as directory:
        endpoint = EndpointConfig(name="hook", url="http://127.0.0.1:1/")
        metrics.set_scrape_collector("events", EventsCollector(Outbox(directory), [endpoint]))
        families = list(metrics.registry.collect())
    names = set()
    for family in families:
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names |= {family.name + s for s in ("_bucket", "_sum", "_count")}
        else:
            names.add(family.name)
    return names


def test_registry2_names_are_exported() -> None:
    names = _exported_names()
    for name in (
        "registry_http_requests_total",
        "registry_http_request_duration_seconds_bucket",
        "registry_http_request_size_bytes_bucket",
        "registry_http_response_size_bytes_bucket",
        "registry_http_in_flight_requests",
        "registry_storage_action_seconds_bucket",
        "registry_storage_cache_total",
        "registry_storage_cache_requests_total",
        "registry_proxy_hits_total",
    ):
        assert name in names


def test_the_dashboard_uses_only_exported_metrics() -> None:
    import json
    import re
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "dockyard.json"
    dashboard = json.loads(path.read_text())
    names = _exported_names()
    used = set()
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            used |= set(re.findall(r"\b(?:registry|dockyard)_[a-z_]+", target["expr"]))
    assert used and used <= names, used - names
    for wanted in (
        "registry_http_requests_total",
        "dockyard_gc_runs_total",
        "registry_proxy_hits_total",
        "dockyard_uploads_in_progress",
        "dockyard_events_backlog_bytes",
        "dockyard_events_delivery_failures_total",
    ):
        assert wanted in used


def test_local_counts_flush_to_what_prometheus_client_would_have_counted() -> None:
    """The hot path's plain-Python histograms use prometheus-client's bucket layout: flushed,
    they must equal the same observations made through prometheus-client itself."""
    from prometheus_client import generate_latest

    from dockyard.metrics import Metrics

    local_side, direct_side = Metrics(), Metrics()
    observations = [0.0, 0.004, 0.005, 0.0051, 0.3, 7.0, 59.9, 61.0, 1e9]
    local = local_side.local_histogram(local_side.duration.labels("manifest", "get"))
    direct = direct_side.duration.labels("manifest", "get")
    for amount in observations:
        local.observe(amount)
        direct.observe(amount)
    counter = local_side.local_counter(local_side.requests.labels("200", "manifest", "get"))
    counter.inc(3)
    direct_side.requests.labels("200", "manifest", "get").inc(3)
    local_side.flush()
    local_side.flush()  # nothing twice

    def ours(m: Metrics) -> list[str]:
        text = generate_latest(m.registry).decode()
        return [line for line in text.splitlines() if line.startswith("registry_http_")]

    assert ours(local_side) == ours(direct_side)
    assert any('le="0.005",method="get"} 3.0' in line for line in ours(local_side))


def test_the_supervising_parent_does_not_import_prometheus_client() -> None:
    """prometheus-client reads PROMETHEUS_MULTIPROC_DIR when it is imported: the parent sets it
    before forking the workers, so nothing the parent loads may import it first."""
    import subprocess
    import sys

    code = "import sys, dockyard.server, dockyard.cli; print('prometheus_client' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
