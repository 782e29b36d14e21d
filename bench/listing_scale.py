"""Tag-list and catalog pages against registry:2 as the listings grow (a benchmark, not a test).

    python bench/listing_scale.py                        # 1k/10k/100k tags, 1k/10k repositories
    python bench/listing_scale.py --base /tmp/base/src    # also a Dockyard from another src tree
    python bench/listing_scale.py --quick                # smoke run: 100/1,000 tags, 200 repos

Writes stores in registry:2's layout directly on disk (in /dev/shm when it has room) with the
writer of workload 8 (``bench.content.write_catalog_store``, as ``CatalogSuite`` does):

- the first store: the first repository count (``org-NNN/repo-NNNNN``, 100 per directory) and
  one repository per tag count, ``bench/tags-NNNNNN`` with that many tags ``t-NNNNNN``,
  written in shuffled order;
- one store per further repository count (repositories only).

The servers (registry:2, this tree's Dockyard, and with ``--base`` another Dockyard) are started
together on each store with ``catalog.maxentries: 10000`` (registry:2 refuses larger ``n``) and
their default processes (Dockyard: one worker per CPU). Each server gets one keep-alive
connection, and each request goes to every server in turn (so that whatever else the machine
runs weighs on all of them alike). The requests, for every tag count: the full ``tags/list``,
the first page ``?n=100`` and a page in the middle (``?n=100&last=`` the middle tag); for every
repository count: ``_catalog?n=100`` first page, a middle page (``last=`` the middle
repository) and the whole catalog (``n=10000``, following ``Link``). The first request of each
kind is reported on its own (``cold``: Dockyard lists and caches a tag list then); then
``--requests`` more, of which the median and p90 are shown. Every answer is checked (count and
first item). Output: a markdown table, and ``--json`` the raw numbers.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the bench package

from bench.content import shuffled_tags, write_catalog_store
from bench.servers import BenchError, Dockyard, Registry2, Server, kill_all
from bench.suite import remove_tree

PAGE = 100
MAXENTRIES = 10_000


class BaseDockyard(Dockyard):
    """Dockyard run from another source tree (``--base``), to compare before and after."""

    src: str = ""

    def command(self, config_path: Path) -> list[str]:
        return ["env", f"PYTHONPATH={self.src}", *super().command(config_path)]


@dataclass
class Probe:
    """One kind of request: its path, what a complete answer holds, and its timings."""

    kind: str  # "tags" or "catalog"
    size: int  # tags or repositories in the store
    label: str  # "full", "first page", "middle page"
    path: str
    key: str  # the JSON list
    want: int  # items over all pages followed
    first: str | None  # the first item, when the order is known
    follow: bool = False
    cold: dict[str, float] = field(default_factory=dict)
    times: dict[str, list[float]] = field(default_factory=dict)
    got: dict[str, int] = field(default_factory=dict)


def repos_of(count: int) -> list[str]:
    return [f"org-{i // 100:03d}/repo-{i:05d}" for i in range(count)]


def tag_repo(count: int) -> str:
    return f"bench/tags-{count:06d}"


def probes_for(tag_counts: list[int], repo_counts: list[int], small: int) -> list[Probe]:
    probes = []
    for count in tag_counts:
        base = f"/v2/{tag_repo(count)}/tags/list"
        middle = f"t-{count // 2:06d}"
        probes += [
            Probe("tags", count, "full", base, "tags", count, None),
            Probe("tags", count, "first page", f"{base}?n={PAGE}", "tags", PAGE, "t-000000"),
            Probe(
                "tags",
                count,
                "middle page",
                f"{base}?n={PAGE}&last={middle}",
                "tags",
                min(PAGE, count - count // 2 - 1),
                f"t-{count // 2 + 1:06d}",
            ),
        ]
    for count in repo_counts:
        names = sorted(
            repos_of(count) + ([tag_repo(c) for c in tag_counts] if count == small else [])
        )
        mid = len(names) // 2
        probes += [
            Probe(
                "catalog",
                count,
                "first page",
                f"/v2/_catalog?n={PAGE}",
                "repositories",
                PAGE,
                names[0],
            ),
            Probe(
                "catalog",
                count,
                "middle page",
                f"/v2/_catalog?n={PAGE}&last={names[mid]}",
                "repositories",
                min(PAGE, len(names) - mid - 1),
                names[mid + 1],
            ),
            Probe(
                "catalog",
                count,
                "full",
                f"/v2/_catalog?n={MAXENTRIES}",
                "repositories",
                len(names),
                names[0],
                follow=True,
            ),
        ]
    return probes


def fetch(conn: http.client.HTTPConnection, probe: Probe) -> tuple[float, list[str]]:
    """One request (every page when ``follow``): seconds and the items."""
    items: list[str] = []
    url: str | None = probe.path
    t0 = time.perf_counter()
    while url:
        conn.request("GET", url)
        r = conn.getresponse()
        body = r.read()
        if r.status != 200:
            raise BenchError(f"GET {url}: {r.status} {body[:200]!r}")
        items += json.loads(body)[probe.key] or []
        link = r.getheader("Link")
        match = re.match(r"\s*<([^>]+)>", link) if link and probe.follow else None
        url = match.group(1) if match else None
    return time.perf_counter() - t0, items


def check(server: Server, probe: Probe, items: list[str]) -> None:
    probe.got[server.name] = len(items)
    # registry:2 2.8 sends tag lists unsorted and whole (it ignores n and last there): what it
    # returned is reported below the table instead.
    if probe.kind == "tags" and server.name == "registry:2":
        return
    if len(items) != probe.want:
        raise BenchError(f"{server.name} {probe.path}: {len(items)} items, want {probe.want}")
    if probe.first is not None and items[0] != probe.first:
        raise BenchError(f"{server.name} {probe.path}: starts at {items[0]}")


def measure(servers: list[Server], probes: list[Probe], requests: int) -> None:
    """Each probe on every server in turn, request by request (so that what else the machine
    runs meanwhile weighs on all servers alike), each server over its own kept-alive
    connection."""
    conns = [http.client.HTTPConnection("127.0.0.1", s.port, timeout=300) for s in servers]
    try:
        for probe in probes:
            for server, conn in zip(servers, conns, strict=True):
                cold, items = fetch(conn, probe)
                probe.cold[server.name] = cold
                check(server, probe, items)
                probe.times[server.name] = []
            for _ in range(requests):
                for server, conn in zip(servers, conns, strict=True):
                    probe.times[server.name].append(fetch(conn, probe)[0])
    finally:
        for conn in conns:
            conn.close()


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}" if seconds < 0.1 else f"{seconds * 1000:.0f}"


def p90(values: list[float]) -> float:
    return sorted(values)[max(0, int(len(values) * 0.9) - 1)] if values else float("nan")


def table(probes: list[Probe], names: list[str]) -> str:
    head = ["listing", "size", "request"]
    for name in names:
        head += [f"{name} median (p90) ms", f"{name} cold ms"]
    head += [f"{n} / registry:2" for n in names if n != "registry:2"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in probes:
        row = [p.kind, f"{p.size:,}", f"`{p.path.split('/v2/', 1)[1]}`"]
        for name in names:
            t = p.times.get(name, [])
            row += [f"{ms(statistics.median(t))} ({ms(p90(t))})", ms(p.cold[name])]
        ref = statistics.median(p.times["registry:2"])
        row += [f"{statistics.median(p.times[n]) / ref:.2f}" for n in names if n != "registry:2"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tags", default="1000,10000,100000", help="tag counts")
    parser.add_argument("--repos", default="1000,10000", help="repository counts")
    parser.add_argument("--requests", type=int, default=15, help="timed requests per probe")
    parser.add_argument("--base", help="also run Dockyard from this src directory")
    parser.add_argument("--registry2", default="/usr/bin/docker-registry")
    parser.add_argument("--quick", action="store_true", help="100/1,000 tags, 200 repositories")
    parser.add_argument("--json", type=Path, help="write the raw numbers here")
    args = parser.parse_args()
    tag_counts = [100, 1000] if args.quick else [int(x) for x in args.tags.split(",")]
    repo_counts = [200] if args.quick else [int(x) for x in args.repos.split(",")]
    shm = Path("/dev/shm")
    work = Path(tempfile.mkdtemp(prefix="dockyard-listing-", dir=shm if shm.is_dir() else None))
    probes = probes_for(tag_counts, repo_counts, repo_counts[0])
    names = ["registry:2", "Dockyard"] + (["Dockyard (base)"] if args.base else [])
    notes = []
    try:
        for count in repo_counts:
            root = work / f"store-{count}"
            t0 = time.monotonic()
            tags = (
                {tag_repo(c): shuffled_tags(c) for c in tag_counts}
                if count == repo_counts[0]
                else {}
            )
            write_catalog_store(root, repos_of(count) + list(tags), tags)
            what = f"{count:,} repositories" + (" and the tag repositories" if tags else "")
            notes.append(f"store of {what}: written in {time.monotonic() - t0:.0f} s")
            here = [
                p
                for p in probes
                if (p.kind == "tags" and tags) or (p.kind == "catalog" and p.size == count)
            ]
            extra = {"catalog": {"maxentries": MAXENTRIES}}
            servers: list[Server] = []
            try:
                for name in names:
                    server: Server
                    if name == "registry:2":
                        server = Registry2(
                            name, work / name, root, extra_config=extra, binary=args.registry2
                        )
                    elif name == "Dockyard":
                        server = Dockyard(name, work / name, root, extra_config=extra)
                    else:
                        server = BaseDockyard(name, work / name, root, extra_config=extra)
                        server.src = os.path.abspath(args.base)
                    server.start()
                    servers.append(server)
                # The store's directories age past Dockyard's racy margin (2 s), as those of a
                # store in use have, and start-up work settles.
                time.sleep(3)
                measure(servers, here, args.requests)
            finally:
                for server in servers:
                    server.stop()
            print(f"store-{count}: done", file=sys.stderr, flush=True)
        out = table(probes, names)
        print(out)
        print()
        for note in notes:
            print(f"- {note}")
        r2 = {p.path: p.got["registry:2"] for p in probes if p.kind == "tags"}
        print(f"- registry:2 items returned for tag probes: {r2}")
        if args.json:
            args.json.write_text(
                json.dumps(
                    [
                        {
                            "kind": p.kind,
                            "size": p.size,
                            "label": p.label,
                            "path": p.path,
                            "cold": p.cold,
                            "times": p.times,
                            "items": p.got,
                        }
                        for p in probes
                    ],
                    indent=1,
                )
            )
    finally:
        kill_all()
        remove_tree(work)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
