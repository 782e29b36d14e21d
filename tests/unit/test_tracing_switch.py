"""Tracing's switch: the standard OTEL_* variables, and nothing of OpenTelemetry loaded when it
is off."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dockyard import tracing
from dockyard.errors import ConfigError

SOURCE = Path(__file__).resolve().parents[2] / "src"


@pytest.mark.parametrize(
    ("environ", "on"),
    [
        ({}, False),
        ({"OTEL_SERVICE_NAME": "registry"}, False),  # nowhere to send spans
        ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
        ({"OTEL_TRACES_EXPORTER": "console"}, True),
        ({"OTEL_TRACES_EXPORTER": "none"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"}, False),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "TRUE"}, False),
    ],
)
def test_the_environment_decides(environ: dict[str, str], on: bool) -> None:
    assert tracing.wanted(environ) is on


def test_nothing_is_traced_or_loaded_when_off() -> None:
    """Building the app (as a worker does) with no OTEL_* variables loads no OpenTelemetry."""
    code = (
        "import sys\n"
        "from dockyard.app import build_app\n"
        "from dockyard.config import default_raw_config, validate\n"
        "import tempfile\n"
        "raw = default_raw_config()\n"
        "raw['storage']['filesystem']['rootdirectory'] = tempfile.mkdtemp()\n"
        "app = build_app(validate(raw), 'secret')\n"
        "from dockyard import tracing\n"
        "assert not tracing.enabled()\n"
        "loaded = [m for m in sys.modules if m.startswith('opentelemetry')]\n"
        "assert loaded == [], loaded\n"
    )
    env = {"PYTHONPATH": str(SOURCE), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_configure_from_the_environment() -> None:
    pytest.importorskip("opentelemetry.sdk.trace")
    assert not tracing.enabled()
    with pytest.raises(ConfigError, match="OTEL_TRACES_EXPORTER"):
        tracing.configure({"OTEL_TRACES_EXPORTER": "zipkin-thrift"})
    assert not tracing.enabled()
    assert not tracing.configure({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"})
    try:
        assert tracing.configure({"OTEL_TRACES_EXPORTER": "otlp"})
        assert tracing.enabled()
    finally:
        tracing.disable()
    assert not tracing.enabled()
