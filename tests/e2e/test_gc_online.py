"""Online garbage collection under load: ``dockyard gc`` runs in a loop, as fast as it goes,
while 8 client threads push, delete and re-push images the way docker and skopeo do.

Every push goes blob by blob: ``HEAD`` the blob in the target repository; if it is missing, try a
cross-repository mount from a repository that had it, and otherwise upload it (``POST``,
``PATCH``, ``PUT ?digest=``); then ``PUT`` the manifest by tag. Images share a pool of layers
across repositories and each has a unique layer and config. Some jobs delete what they pushed
(``DELETE`` by digest, or move the tag away) so that its unique blobs become garbage, and some
later push the very same content again: the ``HEAD`` may still find a blob the collector is
about to take, and the client then skips the upload. That is the race the collector must
survive (see ``dockyard.registry.gc``).

At the end every image that was pushed and not deleted pulls completely and byte for byte,
``dockyard fsck`` finds nothing wrong, the server logged no error, and the collector really did
remove blobs while the pushes ran. The registry is configured with the collections' grace period
(``storage.maintenance.gc.grace``), from which it derives how often it refreshes stamps; a
manifest refused for a blob the client was told about longer ago than the grace period minus
that interval is the documented limit (docs/gc.md), counted and retried, never hidden otherwise.

Then rule 1, one request at a time and without timing luck: content is made older than the
grace period (file times moved back), a client is told it exists (blob ``HEAD``/``GET``, a mount
from another repository or from the same one, a manifest ``HEAD``), a collection starts at once,
and the content must still be there for the push that relies on the answer.
"""

from __future__ import annotations

import functools
import json
import os
import random
import threading
import time
from typing import Any

import pytest

from harness import OCI_MANIFEST, Server, ServerFactory, sha256
from harness.workloads import (
    Client,
    GCRun,
    Image,
    Ledger,
    Workload,
    assert_collected,
    assert_no_failures,
    completed_runs,
    describe,
    dockyard,
    gc_loop,
    make_jobs,
    report,
    run_load,
    verify_all,
)

#: the grace period of every collection in the loop, in seconds (as given to ``--grace``)
GRACE = 1.0
#: the registry is told the grace period the collections use, so that it stamps content in use
#: often enough for them (every quarter of it; its default, 24 h, means a stamp at most every
#: hour)
SERVER_OVERRIDES: dict[str, Any] = {"storage": {"maintenance": {"gc": {"grace": f"{GRACE:g}s"}}}}
THREADS = 8
JOBS = 32
WORKLOAD = Workload(
    grace=GRACE,
    repositories=(*(f"load/app{i}" for i in range(4)), "load/team/svc0", "load/team/svc1"),
    pool=10,
    pool_layer=(64 * 1024, 2 * 1024 * 1024),
    stable=13,
    churn=9,
    garbage=5,
    retag=5,
    layers_from_pool=(1, 4),
    own_layer=(16 * 1024, 512 * 1024),
    churn_rounds=(1, 2),
    churn_delay=0.5,
    # Long enough that the unique blobs are older than the grace period.
    churn_wait=(1, 2.5),
)
#: after its own work, each job pulls this many images of stable jobs
PULLS = 2


def gc(server: Server, *args: str) -> GCRun:
    return dockyard(server.config_path, "gc", *args, timeout=60)


def test_gc_loop_while_pushing_deleting_and_repushing(start_server: ServerFactory) -> None:
    server = start_server(workers=2, **SERVER_OVERRIDES)
    jobs = make_jobs(WORKLOAD)
    assert len(jobs) == JOBS
    ledger = Ledger()

    stop = threading.Event()
    untagged_runs: list[GCRun] = []
    plain_runs: list[GCRun] = []
    grace = f"{GRACE:g}s"
    untagged = functools.partial(gc, server, "--grace", grace, "--delete-untagged", "--quiet")
    plain = functools.partial(gc, server, "--grace", grace)
    loops = [
        threading.Thread(target=gc_loop, args=(untagged, stop, untagged_runs, 0)),
        # Another collector without --delete-untagged, which often finds the lease taken (3).
        threading.Thread(target=gc_loop, args=(plain, stop, plain_runs, 0.3)),
    ]
    started = time.monotonic()
    for loop in loops:
        loop.start()
    try:
        run_load(lambda: Client(server, ledger, GRACE), jobs, threads=THREADS, pulls=PULLS)
        load_seconds = time.monotonic() - started
    finally:
        stop.set()
        for loop in loops:
            loop.join(120)
    runs = untagged_runs + plain_runs

    # The collector behaved: finished (0) or found another collection running (3), nothing else.
    completed = completed_runs(runs)
    print(report(load_seconds, ledger, runs))

    # No client was ever told something wrong or refused a push it was entitled to.
    assert_no_failures(ledger, runs)
    # Otherwise the test proves nothing: the collector took garbage (blobs and untagged
    # manifests) while the pushes ran.
    assert_collected(completed)
    # Re-pushes found their deleted blobs still there (HEAD 200, upload skipped): the race the
    # collector must survive. (Others found them collected and uploaded them again: counted as
    # "re-push: own blob uploaded", how many depends on how fast the collections go.)
    assert ledger.counts.get("re-push: own blob exists", 0) > 0, ledger.counts

    # Everything that was pushed and not deleted is there, whole.
    client = Client(server, ledger, GRACE)
    assert len(ledger.kept) >= 20
    verify_all(client, runs)
    fsck = dockyard(server.config_path, "fsck")
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr

    # A last collection with nobody pushing leaves every kept image alone.
    time.sleep(GRACE + 0.1)
    final = gc(server, "--grace", grace, "--delete-untagged", "--quiet")
    assert final.returncode == 0, final.stderr
    verify_all(client, [*runs, final])

    log = server.log()
    assert "Traceback" not in log, log[-5000:]
    assert "level=error" not in log, [line for line in log.splitlines() if "level=error" in line]


# -- rule 1, one request at a time -----------------------------------------------------------------

#: a longer grace for the deterministic checks: content is made older than it by moving file
#: times back, and the request under test comes well inside it
SLOW_GRACE = 60.0


def backdate(server: Server, seconds: float) -> None:
    """Every file of the store was last touched ``seconds`` ago (as if time had passed)."""
    when = time.time() - seconds
    for path in (server.root / "docker" / "registry" / "v2").rglob("*"):
        if path.is_file():
            os.utime(path, (when, when))


@pytest.mark.parametrize(
    ("how", "server_grace"),
    [
        ("head", f"{SLOW_GRACE:g}s"),
        ("get", f"{SLOW_GRACE:g}s"),
        ("mount-from-other-repository", f"{SLOW_GRACE:g}s"),
        ("mount-from-same-repository", f"{SLOW_GRACE:g}s"),
        ("manifest-head", f"{SLOW_GRACE:g}s"),
        # The registry left at its default grace (24 h, so a stamp at most every hour) while the
        # collection is run with --grace 60s: the README says content used within the grace
        # period given is kept.
        ("head", None),
    ],
)
def test_content_reported_present_survives_the_next_collection(
    start_server: ServerFactory, how: str, server_grace: str | None
) -> None:
    """Rule 1 of ``dockyard.registry.gc``: a request that tells a client a blob (or manifest)
    exists stamps it, so a collection started right after keeps it (it was used within the
    grace period) and the push that relies on the answer succeeds."""
    overrides = (
        {"storage": {"maintenance": {"gc": {"grace": server_grace}}}} if server_grace else {}
    )
    server = start_server(**overrides)
    client = Client(server, Ledger(), GRACE)
    rng = random.Random(0)
    source = "solo/app"
    target = "solo/target" if how == "mount-from-other-repository" else source
    config = json.dumps({"architecture": "amd64", "os": "linux", "n": os.urandom(8).hex()})
    image = Image(source, "v1", config.encode(), (os.urandom(100_000),))
    client.push(image, rng)
    if how != "manifest-head":
        # Tagged once, then deleted: its blobs are garbage unless someone uses them again.
        client.delete(image)
    else:
        # Left untagged: --delete-untagged takes it unless someone uses it.
        r = client.http.delete(server.v2(f"{source}/manifests/{image.tag}"), timeout=30)
        assert r.status_code == 202, describe(r)
    bystander = server.push_blob("solo/other", os.urandom(5000))  # garbage nobody uses
    backdate(server, 2 * SLOW_GRACE)

    # The client learns that the content is there...
    for data in image.blobs() if how != "manifest-head" else []:
        digest = sha256(data)
        if how in ("head", "get"):
            r = client.http.request(how.upper(), server.v2(f"{source}/blobs/{digest}"), timeout=30)
            assert r.status_code == 200, describe(r)
        else:
            r = client.http.post(
                server.v2(f"{target}/blobs/uploads/"),
                params={"mount": digest, "from": source},
                timeout=30,
            )
            assert r.status_code == 201, describe(r)
    if how == "manifest-head":
        r = client.http.head(
            server.v2(f"{source}/manifests/{image.digest}"),
            headers={"Accept": OCI_MANIFEST},
            timeout=30,
        )
        assert r.status_code == 200, describe(r)

    # ...a collection starts at once (a fraction of its grace period later)...
    run = gc(server, "--grace", f"{SLOW_GRACE:g}s", "--delete-untagged")
    if server_grace is None and run.returncode != 0:
        # Refusing a grace period shorter than the registry's stamps are meant for is safe too.
        assert "grace" in run.stderr.lower(), run.stdout + run.stderr
    else:
        assert run.returncode == 0, run.stderr
    if server_grace is not None:
        # (it did collect what nobody used)
        assert f"removed blob {bystander}" in run.stdout, run.stdout
    wrongly_removed = [
        line
        for line in run.stdout.splitlines()
        if any(sha256(b) in line for b in [image.manifest(), *image.blobs()])
        and not (how != "manifest-head" and sha256(image.manifest()) in line)
    ]
    assert not wrongly_removed, (
        f"content reported present just before the collection was collected:\n{run.stdout}"
    )

    # ...and the client, relying on the answer, finishes its push without uploading anything.
    if how == "manifest-head":
        r = client.http.get(
            server.v2(f"{source}/manifests/{image.digest}"),
            headers={"Accept": OCI_MANIFEST},
            timeout=30,
        )
        assert r.status_code == 200, describe(r)
    else:
        r = client.http.put(
            server.v2(f"{target}/manifests/{image.tag}"),
            data=image.manifest(),
            headers={"Content-Type": OCI_MANIFEST},
            timeout=30,
        )
        assert r.status_code == 201, describe(r)
    reference = image.digest if how == "manifest-head" else image.tag
    client.pull(Image(target, reference, image.config, image.layers))
    assert "level=error" not in server.log()
