"""Dockyard against registry:2, side by side, in one run (a benchmark, not a test).

    python bench/compare.py                 # full: 3 rounds, 1 GiB blob, 16 GiB upload, ...
    python bench/compare.py --quick         # smoke: same code paths, tiny sizes, 1 round
    python bench/compare.py --rounds 5 --big-gib 4 --output results.md
    python bench/compare.py --s3            # a subset on S3: Ceph RGW, one bucket per server

For each workload it starts registry:2 (``docker-registry serve``) and Dockyard (``python -m
dockyard serve``, default worker count) with the same configuration on separate fresh storage,
runs the workload against each in turn for several rounds (alternating which goes first) and
prints, per workload, the median for each server, Dockyard's speed-up (>1: Dockyard faster) and
each server's peak memory (the sum of VmRSS over its processes, sampled every 100 ms).
docs/performance.md describes the workloads and the targets.

With ``--s3`` it brings up Ceph RGW (``tests/rgw/rgw-up.sh``: one monitor, one in-memory OSD and
radosgw, on loopback), gives each server its own bucket with the same ``storage.s3`` section
(and ``storage.redirect.disable: true``, so downloads go through the servers) and runs the 1 GiB
upload and download, the skopeo push and pull of the 4 x 256 MiB image and HEAD of a manifest.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the bench package

from bench.machine import code_fingerprint, dockyard_version, loadavg, machine_description
from bench.procstat import MemorySampler
from bench.report import error_notes, report
from bench.results import results_json
from bench.rgw import RGW, S3_SUITE_KEYS, s3_description, s3_suites
from bench.runner import Runner
from bench.servers import BenchError, kill_all, require_binaries
from bench.suite import Params, remove_tree
from bench.workloads import SUITE_KEYS, suites
from harness.s3 import RGW_BINARIES

BINARIES = {
    "docker-registry": "docker-registry",
    "curl": "curl",
    "skopeo": "skopeo",
    "wrk": "wrk",
    "ab": "apache2-utils",
    "htpasswd": "apache2-utils",
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one round (CI smoke)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per workload (default 3)")
    parser.add_argument(
        "--big-gib", type=float, default=16, help="size of the big upload in GiB (default 16)"
    )
    parser.add_argument(
        "--big-rounds", type=int, default=1, help="rounds of the big upload (default 1)"
    )
    parser.add_argument(
        "--only",
        help=f"comma-separated workload groups to run: {','.join(SUITE_KEYS)} "
        f"(with --s3: {','.join(S3_SUITE_KEYS)})",
    )
    parser.add_argument(
        "--s3",
        action="store_true",
        help="on S3 instead of the filesystem: bring up Ceph RGW (tests/rgw/rgw-up.sh), one "
        "bucket per server, and run the 1 GiB blob, 4 x 256 MiB skopeo and HEAD manifest "
        "workloads",
    )
    parser.add_argument(
        "--catalog-on-disk",
        action="store_true",
        help="keep the catalog stores in the work directory, not on /dev/shm",
    )
    parser.add_argument(
        "--seconds", type=int, default=10, help="duration of each HTTP load run (default 10)"
    )
    parser.add_argument("--wrk-threads", type=int, default=1, help="wrk threads (default 1)")
    parser.add_argument("--output", type=Path, help="also write the markdown report here")
    parser.add_argument("--json", type=Path, help="write every measured value here")
    parser.add_argument("--workdir", type=Path, help="where temporary data goes (default $TMPDIR)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary data and logs")
    args = parser.parse_args()
    if min(args.rounds, args.big_rounds, args.seconds, args.wrk_threads) < 1 or args.big_gib <= 0:
        parser.error("--rounds, --big-rounds, --seconds, --wrk-threads and --big-gib must be > 0")
    if args.only:
        keys = S3_SUITE_KEYS if args.s3 else SUITE_KEYS
        unknown = set(args.only.split(",")) - set(keys)
        if unknown:
            parser.error(f"--only: unknown {', '.join(sorted(unknown))}; use {keys}")
    return args


def _terminate(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    args = parse_args()
    missing = require_binaries({**BINARIES, **(RGW_BINARIES if args.s3 else {})})
    try:
        import dockyard  # noqa: F401
    except ImportError:
        missing.append("the dockyard package (pip install -e .)")
    if args.s3:
        try:
            import boto3  # noqa: F401
        except ImportError:
            missing.append("boto3 (pip install -e '.[test]')")
    if missing:
        print("compare.py: missing: " + "; ".join(missing), file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    # Ctrl-C stops the run cleanly even when started with SIGINT ignored (`cmd &` in a script).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if args.quick:
        params = Params.smoke(args.wrk_threads, not args.catalog_on_disk)
    else:
        params = Params.full(
            args.rounds,
            args.big_gib,
            args.big_rounds,
            args.wrk_threads,
            not args.catalog_on_disk,
            args.seconds,
        )
    workdir = Path(tempfile.mkdtemp(prefix="dockyard-bench-", dir=args.workdir))
    machine = machine_description(workdir)
    code_at_start = code_fingerprint()
    if loadavg() > 0.5:
        print(f"warning: 1-min load average is {loadavg():.2f}; the machine is not idle")
    sampler = MemorySampler(0.1)
    runner = Runner(params, workdir, sampler)
    runner.keep = args.keep
    only = set(args.only.split(",")) if args.only else None
    interrupted = False
    started = time.monotonic()
    rgw: RGW | None = None
    failed_setup = ""
    try:
        if args.s3:
            print("== bringing up Ceph RGW (tests/rgw/rgw-up.sh)", flush=True)
            rgw = RGW.start(workdir / "rgw")
            runner.rgw = rgw
            print(f"   RGW at {rgw.url} in {rgw.started_in:.1f} s", flush=True)
            machine.update(s3_description(rgw, workdir))
            chosen = s3_suites(params, workdir, only)
        else:
            chosen = suites(params, workdir, only)
        for suite in chosen:
            runner.run_suite(suite)
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: stopping the servers", file=sys.stderr)
    except BenchError as e:
        failed_setup = str(e)
        print(f"compare.py: {e}", file=sys.stderr)
    finally:
        for server in runner.live:
            server.stop()
        kill_all()
        sampler.close()
        if rgw is not None:
            rgw.stop()
            if not args.keep:
                remove_tree(rgw.directory)
        if args.keep:
            print(f"kept {workdir}")
        else:
            remove_tree(workdir)
    if failed_setup:
        return 1
    elapsed = time.monotonic() - started
    if code_fingerprint() != code_at_start:
        # The servers are restarted for every workload: later rows ran the newer code.
        runner.notes.append(
            f"Dockyard's code (src/) changed during the run: {machine['Dockyard']} at the"
            f" start, {dockyard_version()} at the end; later rows ran the newer code."
        )
    text = report(runner.results, machine, runner, args, elapsed, interrupted)
    print()
    print(text)
    if args.output:
        args.output.write_text(text)
    if args.json:
        args.json.write_text(
            json.dumps(results_json(runner.results, machine, rgw is not None), indent=1)
        )
    if interrupted:
        return 130
    return 1 if error_notes(runner.results) else 0


if __name__ == "__main__":
    sys.exit(main())
