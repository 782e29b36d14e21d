"""What a run measured: each server's values and memory for each workload (``Outcome``),
the two side by side (``Result``), and all of it as JSON (``--json``)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

from bench.procstat import MemorySample
from bench.suite import Metric, Suite

REGISTRY2, DOCKYARD = "registry:2", "Dockyard"
MB = 1_000_000


@dataclass
class Outcome:
    """One server's measurements of one workload."""

    values: list[float] = field(default_factory=list)
    error: str | None = None
    peak_rss_kib: int = 0
    peak_pss_kib: int = 0
    hwm_kib: int | None = None
    processes: int = 0
    foreign_cores: float | None = None  # the most CPU others took during one run (>= 2 s)
    timelines: list[list[MemorySample]] = field(default_factory=list)
    server_cores: list[float] = field(default_factory=list)  # --s3: the server's CPU per run
    rgw_cores: list[float] = field(default_factory=list)  # --s3: RGW's CPU per run

    @property
    def median(self) -> float | None:
        return statistics.median(self.values) if self.values and not self.error else None


@dataclass
class Result:
    suite: Suite
    metric: Metric
    outcomes: dict[str, Outcome] = field(
        default_factory=lambda: {REGISTRY2: Outcome(), DOCKYARD: Outcome()}
    )

    @property
    def speedup(self) -> float | None:
        r2, dy = self.outcomes[REGISTRY2].median, self.outcomes[DOCKYARD].median
        if not r2 or not dy:
            return None
        return dy / r2 if self.metric.higher_is_better else r2 / dy

    @property
    def met(self) -> str:
        metric = self.metric
        if metric.memory_limit_mb is not None:
            dockyard = self.outcomes[DOCKYARD]
            if dockyard.error or not dockyard.peak_rss_kib:
                return "—"
            below = dockyard.peak_rss_kib * 1024 < metric.memory_limit_mb * MB
            growth = max((rss_growth_kib(t) for t in dockyard.timelines), default=0)
            flat = growth < 10 * 1024
            return "yes" if below and flat else "no"
        if metric.target is None or self.speedup is None:
            return "—"
        return "yes" if self.speedup >= metric.target else "no"


def rss_growth_kib(timeline: list[MemorySample]) -> int:
    """Peak ΣRSS in the second half of a run minus the peak in the first half."""
    if len(timeline) < 4:
        return 0
    end = timeline[-1].t
    first = max(s.rss_kib for s in timeline if s.t <= end / 2)
    second = max(s.rss_kib for s in timeline if s.t > end / 2)
    return second - first


def results_json(results: list[Result], machine: dict[str, str], s3: bool) -> dict[str, Any]:
    """Every measured value (``--json``); with ``s3``, the CPU of the server and of RGW too."""
    return {
        "machine": machine,
        "storage": "s3" if s3 else "filesystem",
        "results": [
            {
                "group": res.suite.key,
                "workload": res.metric.key,
                "title": res.metric.title,
                "unit": res.metric.unit,
                "speedup": res.speedup,
                "servers": {
                    name: {
                        "values": o.values,
                        "error": o.error,
                        "peak_rss_kib": o.peak_rss_kib,
                        "peak_pss_kib": o.peak_pss_kib,
                        "hwm_kib": o.hwm_kib,
                        **(
                            {"server_cores": o.server_cores, "rgw_cores": o.rgw_cores} if s3 else {}
                        ),
                    }
                    for name, o in res.outcomes.items()
                },
            }
            for res in results
        ],
    }
