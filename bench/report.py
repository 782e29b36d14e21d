"""The markdown report: the results table, the memory and noise table (and, on S3, the CPU
table), and the notes; docs/performance.md shows what it looks like."""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from bench.results import DOCKYARD, REGISTRY2, Outcome, Result, rss_growth_kib

if TYPE_CHECKING:
    from bench.runner import Runner


def fmt_value(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    if unit == "s":
        if value < 1:
            return f"{value:.3f}"
        return f"{value:.2f}" if value < 10 else f"{value:.1f}"
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def fmt_speedup(speedup: float | None, target: float | None) -> str:
    if speedup is None:
        return "—"
    text = f"{speedup:.2f}x"
    # 0.998 would print as 1.00 next to a missed target of 1: show the digit that decides
    if target is not None and (float(text[:-1]) >= target) != (speedup >= target):
        text = f"{speedup:.3f}x"
    return text


def fmt_outcome(outcome: Outcome, unit: str) -> str:
    if outcome.error:
        return "error"
    text = fmt_value(outcome.median, unit)
    if len(outcome.values) > 1 and outcome.median:
        spread = (max(outcome.values) - min(outcome.values)) / 2 / outcome.median * 100
        text += f" ±{spread:.0f}%"
    return text


def mib(kib: int | None) -> str:
    return "—" if not kib else f"{kib / 1024:,.0f} MiB"


def table(header: list[str], rows: list[list[str]], align: str) -> str:
    lines = ["| " + " | ".join(header) + " |"]
    lines.append("|" + "|".join(":---" if a == "l" else "---:" for a in align) + "|")
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


#: a column of a per-workload table: header, alignment ("l", "r"), and its cell from the result
#: and the outcomes of registry:2 and Dockyard
Column = tuple[str, str, Callable[[Result, Outcome, Outcome], str]]


def workload_table(results: list[Result], columns: list[Column]) -> str:
    """A row per workload: its number, its title, then ``columns``."""
    rows = [
        [
            str(i),
            res.metric.title,
            *(cell(res, res.outcomes[REGISTRY2], res.outcomes[DOCKYARD]) for _, _, cell in columns),
        ]
        for i, res in enumerate(results, 1)
    ]
    header = ["#", "workload", *(name for name, _, _ in columns)]
    return table(header, rows, "ll" + "".join(align for _, align, _ in columns))


def results_table(results: list[Result]) -> str:
    def dockyard_rss(res: Result, r2: Outcome, dy: Outcome) -> str:
        return mib(dy.peak_rss_kib) + (f" ({dy.processes} proc.)" if dy.processes else "")

    return workload_table(
        results,
        [
            ("unit", "l", lambda res, r2, dy: res.metric.unit),
            ("registry:2 (median)", "r", lambda res, r2, dy: fmt_outcome(r2, res.metric.unit)),
            ("Dockyard (median)", "r", lambda res, r2, dy: fmt_outcome(dy, res.metric.unit)),
            (
                "Dockyard speed-up",
                "r",
                lambda res, r2, dy: fmt_speedup(res.speedup, res.metric.target),
            ),
            ("target", "l", lambda res, r2, dy: res.metric.target_text),
            ("met", "l", lambda res, r2, dy: res.met),
            ("registry:2 peak RSS", "r", lambda res, r2, dy: mib(r2.peak_rss_kib)),
            ("Dockyard peak ΣRSS", "r", dockyard_rss),
        ],
    )


def memory_table(results: list[Result]) -> str:
    return workload_table(
        results,
        [
            ("registry:2 peak RSS", "r", lambda res, r2, dy: mib(r2.peak_rss_kib)),
            ("registry:2 VmHWM", "r", lambda res, r2, dy: mib(r2.hwm_kib)),
            ("Dockyard peak ΣRSS", "r", lambda res, r2, dy: mib(dy.peak_rss_kib)),
            ("Dockyard ΣVmHWM", "r", lambda res, r2, dy: mib(dy.hwm_kib)),
            ("Dockyard peak ΣPSS", "r", lambda res, r2, dy: mib(dy.peak_pss_kib)),
            ("other CPU (cores)", "r", lambda res, r2, dy: fmt_cores(res)),
        ],
    )


def cpu_table(results: list[Result]) -> str:
    """--s3: where the CPU went during the runs (medians over the rounds, in cores)."""

    def cores(values: list[float]) -> str:
        return f"{statistics.median(values):.2f}" if values else "—"

    return workload_table(
        results,
        [
            ("registry:2 CPU", "r", lambda res, r2, dy: cores(r2.server_cores)),
            ("RGW CPU, registry:2 runs", "r", lambda res, r2, dy: cores(r2.rgw_cores)),
            ("Dockyard CPU", "r", lambda res, r2, dy: cores(dy.server_cores)),
            ("RGW CPU, Dockyard runs", "r", lambda res, r2, dy: cores(dy.rgw_cores)),
        ],
    )


def timeline_notes(results: list[Result]) -> list[str]:
    notes = []
    for res in results:
        if not res.metric.timeline:
            continue
        for name, outcome in res.outcomes.items():
            for timeline in outcome.timelines:
                if len(timeline) < 2:
                    continue
                end = timeline[-1].t
                points = []
                for frac in (0.1, 0.25, 0.5, 0.75, 0.9):
                    s = min(timeline, key=lambda s, f=frac: abs(s.t - f * end))
                    points.append(f"{frac:.0%} {s.rss_kib / 1024:.0f}")
                notes.append(
                    f"{res.metric.title}, {name}: ΣRSS (MiB) over {end:.0f} s at "
                    + ", ".join(points)
                    + f"; peak {max(s.rss_kib for s in timeline) / 1024:.0f}; "
                    f"second half vs first half {rss_growth_kib(timeline) / 1024:+.1f} MiB"
                )
    return notes


def foreign_cores(res: Result) -> float | None:
    values = [o.foreign_cores for o in res.outcomes.values() if o.foreign_cores is not None]
    return max(values) if values else None


def fmt_cores(res: Result) -> str:
    cores = foreign_cores(res)
    return "—" if cores is None else f"{cores:.2f}"


def noise_notes(results: list[Result], threshold: float = 0.1) -> list[str]:
    noisy = [
        f"#{i} ({fmt_cores(res)})"
        for i, res in enumerate(results, 1)
        if (foreign_cores(res) or 0.0) >= threshold
    ]
    if not noisy:
        return []
    return [
        "Possible noise: other processes used CPU during some runs of workloads "
        + ", ".join(noisy)
        + " (cores, see the last column above)."
    ]


def error_notes(results: list[Result]) -> list[str]:
    return [
        f"{res.metric.title}, {name}: {outcome.error}"
        for res in results
        for name, outcome in res.outcomes.items()
        if outcome.error
    ]


def report(
    results: list[Result],
    machine: dict[str, str],
    runner: Runner,
    args: argparse.Namespace,
    elapsed: float,
    interrupted: bool,
) -> str:
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    mode = "quick (smoke)" if args.quick else "full"
    rounds = runner.params.rounds
    on = " on S3 (Ceph RGW)" if runner.rgw is not None else ""
    big = runner.params.big_bytes and runner.rgw is None
    lines = [
        f"## Dockyard vs registry:2{on} — {mode} run, {when}",
        "",
        f"`{' '.join(['python', 'bench/compare.py', *sys.argv[1:]])}`: {rounds} round(s)"
        + (f" ({runner.params.big_rounds} for the big upload)" if big else "")
        + f", medians; took {elapsed / 60:.1f} min."
        + (" **Interrupted: partial results.**" if interrupted else ""),
        "",
    ]
    if runner.rgw is not None:
        lines += [
            "Both servers get the same `storage` section, each with its own bucket on the same"
            " RGW: `s3: {accesskey, secretkey, region: us-east-1, regionendpoint:"
            f" {runner.rgw.url}, bucket, secure: false, v4auth: true}}` (registry:2's defaults"
            " otherwise: 10 MiB chunks, multipart copies above 32 MiB), `delete: {enabled: true}`"
            " and **`redirect: {disable: true}`: blob downloads go through the servers**, not"
            " straight to RGW. registry:2 runs without `AWS_CA_BUNDLE` (its S3 driver fails on"
            " it), Dockyard with the machine's environment (which sets it). RGW runs on the same"
            " machine and shares its cores with the servers and the clients.",
            "",
        ]
    lines += [f"- {key}: {value}" for key, value in machine.items()]
    if runner.loads:
        lines.append(f"- 1-min load average at the start: {runner.loads[0]:.2f}")
    lines += [
        "",
        "Speed-up: Dockyard's throughput / registry:2's (MiB/s, req/s), or registry:2's time /"
        " Dockyard's (s); >1 means Dockyard is faster. ± is half the range over the rounds."
        " Peak RSS: the largest sum of VmRSS over the server's processes, sampled every 100 ms"
        " during the workload (Dockyard: the parent and its forked children).",
        "",
        results_table(results),
        "",
        "Memory and noise detail: VmHWM is summed over the processes at the end of the workload"
        + (
            " (each server is restarted before each workload, so it covers start-up and that"
            " workload)"
            if runner.params.restart_each
            else " (--quick does not restart the servers between the workloads of a group)"
        )
        + "; PSS shares the pages common to Dockyard's forked processes among them instead of"
        " counting them once per process. Other CPU: the most CPU time that processes this"
        " harness did not start (and kernel threads, including those writing back the"
        " harness's own files) used during one run of the workload, in cores on average over"
        " that run (— when every run was shorter than 2 s); well above 0 means the numbers of"
        " that row may be disturbed.",
        "",
        memory_table(results),
    ]
    if runner.rgw is not None:
        lines += [
            "",
            "CPU during the runs, in cores on average over each run (median over the rounds):"
            " the server's processes, and RGW's (monitor, OSD, radosgw; excluded from 'other"
            " CPU' above). The clients (curl, skopeo, ab) take the rest.",
            "",
            cpu_table(results),
        ]
    notes = timeline_notes(results) + noise_notes(results) + error_notes(results) + runner.notes
    if notes:
        lines += ["", "Notes:", ""] + [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"
