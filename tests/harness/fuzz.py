"""How every property-based test runs: derandomised (CI sees the same examples every run), no
example database, no deadline (the machine is shared), and big or slow examples allowed."""

from __future__ import annotations

from hypothesis import HealthCheck, settings


def fuzz(max_examples: int = 100) -> settings:
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
