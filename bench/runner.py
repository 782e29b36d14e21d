"""Runs the workload groups against both servers: fresh storage (a directory, or a bucket on
RGW) for each group, both servers started and set up, then every round of every workload
against each in turn, with the memory sampled and the CPU others took counted."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from bench.machine import loadavg
from bench.procstat import TICKS, MemorySampler, cpu_ticks, hwm_kib
from bench.report import fmt_value
from bench.results import DOCKYARD, REGISTRY2, Result
from bench.rgw import RGW, Registry2S3, S3Suite
from bench.servers import BenchError, Dockyard, Registry2, Server
from bench.suite import Params, Suite


class Runner:
    """Runs workload groups against both servers and keeps the results (see compare.py)."""

    def __init__(self, params: Params, workdir: Path, sampler: MemorySampler) -> None:
        self.params = params
        self.workdir = workdir
        self.sampler = sampler
        self.results: list[Result] = []
        self.loads: list[float] = []
        self.notes: list[str] = []
        self.live: list[Server] = []
        self.keep = False  # keep each group's work directory (--keep)
        self.rgw: RGW | None = None  # --s3: the servers store into buckets on this RGW
        self.buckets: list[str] = []  # the current group's buckets

    def log(self, text: str) -> None:
        print(text, flush=True)

    def run_suite(self, suite: Suite) -> None:
        suite.work.mkdir(parents=True, exist_ok=True)
        self.loads.append(loadavg())
        self.log(f"== {suite.title} (1-min load average {self.loads[-1]:.2f})")
        results = [Result(suite, metric) for metric in suite.metrics]
        self.results += results
        try:
            self._run_suite(suite, results)
        finally:
            for server in self.live:
                server.stop()
            self.live.clear()
            self.notes += suite.notes
            if not self.keep:
                suite.cleanup()
            if self.rgw is not None:
                for bucket in self.buckets:
                    try:
                        self.rgw.delete_bucket(bucket)
                    except Exception as e:
                        self.log(f"   could not delete bucket {bucket}: {e}")
                self.buckets.clear()

    def _run_suite(self, suite: Suite, results: list[Result]) -> None:
        t0 = time.monotonic()
        suite.prepare()
        servers: list[Server] = []
        registry2_class = Registry2 if self.rgw is None else Registry2S3
        for cls, name in ((registry2_class, REGISTRY2), (Dockyard, DOCKYARD)):
            slug = "registry2" if name == REGISTRY2 else "dockyard"
            extra_config = suite.extra_config
            if self.rgw is not None:
                # Its own bucket for each server, the same storage section otherwise.
                assert isinstance(suite, S3Suite)
                bucket = f"bench-{suite.key}-{slug}-{os.urandom(4).hex()}"
                self.buckets.append(self.rgw.create_bucket(bucket))
                suite.rgw = self.rgw
                suite.buckets = {**getattr(suite, "buckets", {}), name: bucket}
                extra_config = {**extra_config, "storage": self.rgw.storage(bucket)}
            server = cls(
                name=name,
                work=suite.work / slug,
                root=suite.storage(slug),
                htpasswd=suite.htpasswd,
                authorization=suite.authorization,
                extra_config=extra_config,
            )
            suite.populate(server.root)
            servers.append(server)
        if self.rgw is not None:
            self.log(f"   RGW (mon, OSD, radosgw): ΣRSS {self.rgw.rss_mib():.0f} MiB")
        self.log(f"   prepared in {time.monotonic() - t0:.1f} s")
        broken: dict[str, str] = {}
        for server in servers:
            self.live.append(server)
            try:
                t0 = time.monotonic()
                server.start()
                suite.setup(server)
                self.log(f"   {server.name} started and set up in {time.monotonic() - t0:.1f} s")
            except BenchError as e:
                broken[server.name] = f"start/set-up failed: {e}"
                self.log(f"   {server.name}: {broken[server.name]}")
        for result in results:
            self._run_metric(suite, result, servers, dict(broken))

    def _run_metric(
        self, suite: Suite, result: Result, servers: list[Server], failed: dict[str, str]
    ) -> None:
        metric = result.metric
        self.log(f"-- {metric.title}")
        for server in servers:
            if server.name in failed or not (self.params.restart_each or not server.alive()):
                continue
            try:
                server.restart()  # VmHWM from here on belongs to this workload
            except BenchError as e:
                failed[server.name] = f"restart failed: {e}"
        for round_no in range(suite.rounds(metric)):
            try:
                suite.before_round(metric, round_no)
            except BenchError as e:
                for server in servers:
                    failed.setdefault(server.name, f"preparing round {round_no + 1}: {e}")
                break
            order = servers if round_no % 2 == 0 else servers[::-1]
            for server in order:
                if server.name in failed:
                    continue
                outcome = result.outcomes[server.name]
                rgw_pids = self.rgw.pids() if self.rgw is not None else []
                server_pids = server.pids()
                cpu_before = (cpu_ticks(server_pids), cpu_ticks(rgw_pids), time.monotonic())
                with self.sampler.track(server) as track:
                    try:
                        value = suite.run(metric, server, round_no)
                    except BenchError as e:
                        failed[server.name] = str(e)
                        value = None
                if self.rgw is not None:
                    # Servers and RGW: CPU in cores over the run; RGW is not "other CPU" here.
                    seconds = max(time.monotonic() - cpu_before[2], 1e-3)
                    server_ticks = cpu_ticks(sorted({*server_pids, *server.pids()}))
                    rgw_cores = (cpu_ticks(rgw_pids) - cpu_before[1]) / TICKS / seconds
                    outcome.server_cores.append((server_ticks - cpu_before[0]) / TICKS / seconds)
                    outcome.rgw_cores.append(rgw_cores)
                    if track.foreign_cores is not None:
                        track.foreign_cores = max(0.0, track.foreign_cores - rgw_cores)
                with contextlib.suppress(BenchError, OSError):
                    suite.after_run(metric, server, round_no)
                outcome.peak_rss_kib = max(outcome.peak_rss_kib, track.peak_rss_kib)
                outcome.peak_pss_kib = max(outcome.peak_pss_kib, track.peak_pss_kib)
                outcome.processes = max(outcome.processes, len(track.pids))
                if track.foreign_cores is not None:
                    outcome.foreign_cores = max(outcome.foreign_cores or 0.0, track.foreign_cores)
                if metric.timeline:
                    outcome.timelines.append(track.samples)
                if value is None:
                    alive = "" if server.alive() else " (the server is no longer running)"
                    failed[server.name] += alive
                    self.log(f"   round {round_no + 1} {server.name}: ERROR {failed[server.name]}")
                    tail = server.log_tail(10)
                    if tail:
                        self.log("   " + tail.replace("\n", "\n   "))
                    continue
                outcome.values.append(value)
                self.log(
                    f"   round {round_no + 1} {server.name:10} {fmt_value(value, metric.unit):>10}"
                    f" {metric.unit:6} peak ΣRSS {track.peak_rss_kib / 1024:6.0f} MiB"
                )
        for server in servers:
            outcome = result.outcomes[server.name]
            if server.name in failed:
                outcome.error = failed[server.name]
            elif server.alive():
                outcome.hwm_kib = hwm_kib(server.pids())
        speedup = result.speedup
        if speedup is not None:
            self.log(f"   Dockyard speed-up {speedup:.2f}x (target {metric.target_text})")
