"""The benchmark: Dockyard against registry:2, side by side (docs/performance.md).

Scripts, run as ``python bench/NAME.py``:

- ``compare.py``: the side-by-side run (command line, then the runner and the report)
- ``memory.py``: Dockyard's peak memory during a large upload and download
- ``auth.py``: authenticated manifest GETs per second, with the bcrypt cache and without
- ``proxy.py``: cold and warm pulls through the pull-through cache and registry:2's proxy mode
- ``ui_pages.py``: server time (p50/p95/p99) of each web UI page on a store of 10,000
  repositories and a repository of 5,000 tags
- ``load_scale.py`` (``python -m bench.load_scale``): 200 concurrent pulls, 50 concurrent pushes
  with shared base layers, those pulls on S3 (RGW) with Redis, and throughput and p99 against
  concurrency (docs/benchmarks.md, sections 3-5)

The package behind ``compare.py``:

- ``bench.servers``: the two servers, started with one configuration, restartable
- ``bench.procstat``: memory and CPU of process trees, from ``/proc``, sampled in a thread
- ``bench.suite``: sizes (``Params``), what is measured (``Metric``), the ``Suite`` protocol
- ``bench.clients``: HTTP, curl, wrk and ab as the workloads drive them
- ``bench.content``: blob and image content, and stores written directly on disk
- ``bench.workloads``: the filesystem workload groups; ``bench.rgw``: the S3 ones, on Ceph RGW
- ``bench.runner``: runs the groups against both servers; ``bench.results``: what it measured
- ``bench.report``: the markdown report; ``bench.machine``: the machine it ran on

Ports, readiness, RGW, S3 buckets, media types and registry clients come from the test
harness (``tests/harness``), which this package puts on ``sys.path``: the benchmark needs the
test dependencies (``pip install -e '.[test]'``).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

if str(ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests"))

try:
    import harness  # noqa: F401
except ModuleNotFoundError as e:  # stop as compare.py does for a missing tool
    print(
        f"bench: missing {e.name}: the benchmark uses the test harness (pip install -e '.[test]')",
        file=sys.stderr,
    )
    raise SystemExit(2) from None
