"""Keep the benchmarks working: their smoke versions run in CI (timings are not checked —
performance is judged by the full runs in docs/performance.md, not by tests)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness import need_binaries

ROOT = Path(__file__).resolve().parents[2]


def test_compare_quick_runs_against_both_servers(tmp_path: Path) -> None:
    need_binaries("docker-registry", "skopeo", "wrk", "ab", "htpasswd", "curl")
    report = tmp_path / "report.md"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench/compare.py"), "--quick", "--output", str(report)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    text = report.read_text()
    assert "| 1 |" in text and "error" not in text.lower().split("notes:")[0]


def test_memory_and_auth_benchmarks_run(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench/memory.py"),
            "--size-gib",
            "0.05",
            "--dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "server peak RSS during upload" in result.stdout
    if shutil.which("wrk") is None:
        pytest.skip("wrk is not installed")
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench/auth.py"), "--seconds", "1", "--cost", "4"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "speed-up" in result.stdout


def test_proxy_benchmark_pulls_through_both_caches(tmp_path: Path) -> None:
    need_binaries("docker-registry", "curl")
    report = tmp_path / "proxy.md"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench/proxy.py"), "--quick", "--output", str(report)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [
        line for line in report.read_text().splitlines() if line.startswith(("| cold", "| warm"))
    ]
    assert len(rows) == 2, report.read_text()


def test_ui_pages_benchmark_measures_every_page(tmp_path: Path) -> None:
    report = tmp_path / "ui.md"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench/ui_pages.py"), "--quick", "--output", str(report)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [
        line
        for line in report.read_text().splitlines()
        if line.startswith("| ") and not line.startswith("| page ")
    ]
    assert len(rows) == 14, report.read_text()


def run_bench(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run a benchmark from the repository's root (``-m bench.NAME`` or a script), which must
    succeed."""
    result = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_gc_scale_benchmark_compares_both_collectors(tmp_path: Path) -> None:
    need_binaries("docker-registry")
    report = tmp_path / "gc.md"
    run_bench(
        "-m", "bench.gc_scale", "--quick", "--warm-dir", str(tmp_path), "--output", str(report)
    )
    rows = [line for line in report.read_text().splitlines() if line.startswith("| 10,001 |")]
    assert [row.split("|")[5].strip() for row in rows] == ["registry:2", "dockyard"], rows


def test_listing_scale_benchmark_pages_both_servers() -> None:
    need_binaries("docker-registry")
    result = run_bench("bench/listing_scale.py", "--quick", "--requests", "2")
    assert "catalog" in result.stdout and "tags" in result.stdout, result.stdout[-3000:]


def test_load_scale_benchmark_pulls_and_pushes_on_both_servers(tmp_path: Path) -> None:
    need_binaries("docker-registry")
    report = tmp_path / "load.md"
    run_bench(
        "-m", "bench.load_scale", "--quick", "--only", "pulls,pushes",
        "--workdir", str(tmp_path), "--output", str(report),
    )  # fmt: skip
    assert "pushes" in report.read_text().lower(), report.read_text()
