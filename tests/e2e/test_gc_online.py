"""Online garbage collection under load: ``dockyard gc`` runs in a loop, as fast as it goes,
while ~16 client threads push, delete and re-push images the way docker and skopeo do.

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

import json
import os
import random
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin

import pytest
import requests

from support import OCI_MANIFEST, Server, ServerFactory, sha256

pytestmark = pytest.mark.e2e

#: the grace period of every collection in the loop, in seconds (as given to ``--grace``)
GRACE = 1.0
#: how often the registry refreshes the time of content in use: a quarter of the grace period
#: configured in ``storage.maintenance.gc.grace`` (``GCConfig.touch_interval``)
TOUCH_INTERVAL = GRACE / 4
#: the registry is told the grace period the collections use, so that it stamps content in use
#: often enough for them (its default, 24 h, means a stamp at most every hour)
SERVER_OVERRIDES: dict[str, Any] = {"storage": {"maintenance": {"gc": {"grace": f"{GRACE:g}s"}}}}
THREADS = 16
JOBS = 64
REPOSITORIES = [f"load/app{i}" for i in range(8)] + ["load/team/svc0", "load/team/svc1"]
SHARED_LAYERS = 20
LAYER_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
CONFIG_MEDIA_TYPE = "application/vnd.oci.image.config.v1+json"
REMOVED = re.compile(r"\bremoved (\d+) blobs \((\d+) bytes\), (\d+) untagged manifests")


# -- what the clients did -----------------------------------------------------------------------


@dataclass(frozen=True)
class Image:
    repo: str
    tag: str
    config: bytes
    layers: tuple[bytes, ...]

    def blobs(self) -> list[bytes]:
        return [self.config, *self.layers]

    def manifest(self) -> bytes:
        def descriptor(media_type: str, data: bytes) -> dict[str, Any]:
            return {"mediaType": media_type, "digest": sha256(data), "size": len(data)}

        return json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": descriptor(CONFIG_MEDIA_TYPE, self.config),
                "layers": [descriptor(LAYER_MEDIA_TYPE, layer) for layer in self.layers],
            }
        ).encode()

    @property
    def digest(self) -> str:
        return sha256(self.manifest())


class ClientError(AssertionError):
    """A response a well-behaved registry must not give; carries the whole exchange."""


@dataclass
class Ledger:
    """Shared by the client threads: where each blob was pushed (mount sources), the images
    that must survive, counters, and every failure with its evidence."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    holders: dict[str, set[str]] = field(default_factory=dict)
    kept: dict[tuple[str, str], Image] = field(default_factory=dict)
    stable: list[Image] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    #: (seconds from a blob's "it exists" answer to the manifest PUT), the longest seen
    longest_reference: float = 0.0

    def count(self, what: str, n: int = 1) -> None:
        with self.lock:
            self.counts[what] = self.counts.get(what, 0) + n

    def hold(self, digest: str, repo: str) -> None:
        with self.lock:
            self.holders.setdefault(digest, set()).add(repo)

    def mount_source(self, digest: str, repo: str, rng: random.Random) -> str | None:
        with self.lock:
            others = sorted(self.holders.get(digest, set()) - {repo})
        return rng.choice(others) if others else None


def _missing_blobs(r: requests.Response) -> list[str]:
    """The digests of a 400 MANIFEST_BLOB_UNKNOWN; empty for any other answer."""
    if r.status_code != 400:
        return []
    try:
        error = r.json()["errors"][0]
    except (ValueError, KeyError, IndexError):
        return []
    if error.get("code") != "MANIFEST_BLOB_UNKNOWN":
        return []
    return list(error.get("detail", {}).get("digests", []))


def describe(r: requests.Response) -> str:
    req = r.request
    return (
        f"{req.method} {req.url} -> {r.status_code} {r.reason}\n"
        f"  response headers: {dict(r.headers)}\n  response body: {r.text[:2000]}"
    )


class Client:
    """A pushing client (one per thread): docker's and skopeo's sequence of requests."""

    def __init__(self, server: Server, ledger: Ledger) -> None:
        self.server = server
        self.ledger = ledger
        self.http = requests.Session()

    def _check(self, r: requests.Response, *expected: int, what: str) -> requests.Response:
        if r.status_code not in expected:
            raise ClientError(f"{what}: expected {expected} at {time.time():.3f}\n{describe(r)}")
        return r

    def _upload(self, repo: str, data: bytes, location: str, rng: random.Random) -> None:
        """PATCH the bytes (in one or two chunks), then PUT ?digest=."""
        digest = sha256(data)
        split = rng.choice([len(data), len(data) // 2]) or len(data)
        offset = 0
        for chunk in (data[:split], data[split:]):
            if not chunk:
                continue
            r = self.http.patch(
                location,
                data=chunk,
                headers={
                    "Content-Type": "application/octet-stream",
                    "Content-Range": f"{offset}-{offset + len(chunk) - 1}",
                },
                timeout=60,
            )
            self._check(r, 202, what=f"PATCH {digest} into {repo}")
            offset += len(chunk)
            location = urljoin(r.url, r.headers["Location"])
        r = self.http.put(location, params={"digest": digest}, timeout=60)
        self._check(r, 201, what=f"PUT {digest} into {repo}")
        self.ledger.count("uploaded")

    def push_blob(self, repo: str, data: bytes, rng: random.Random) -> tuple[float, str]:
        """Make the blob present in ``repo``; return when the registry said it is there, and
        how (``exists``, ``mounted`` or ``uploaded``)."""
        digest = sha256(data)
        base = self.server.v2(repo)
        r = self._check(
            self.http.head(f"{base}/blobs/{digest}", timeout=60), 200, 404, what="HEAD blob"
        )
        if r.status_code == 200:
            if int(r.headers["Content-Length"]) != len(data):
                raise ClientError(f"HEAD {digest}: wrong size\n{describe(r)}")
            self.ledger.count("head-exists")
            self.ledger.hold(digest, repo)
            return time.time(), "exists"
        source = self.ledger.mount_source(digest, repo, rng)
        if source is not None:
            r = self.http.post(
                f"{base}/blobs/uploads/", params={"mount": digest, "from": source}, timeout=60
            )
            self._check(r, 201, 202, what=f"mount {digest} from {source}")
            if r.status_code == 201:
                self.ledger.count("mounted")
                self.ledger.hold(digest, repo)
                return time.time(), "mounted"
            self.ledger.count("mount-fell-back")
            location = urljoin(r.url, r.headers["Location"])  # the spec's fallback upload
        else:
            r = self._check(
                self.http.post(f"{base}/blobs/uploads/", timeout=60), 202, what="start upload"
            )
            location = urljoin(r.url, r.headers["Location"])
        self._upload(repo, data, location, rng)
        self.ledger.hold(digest, repo)
        return time.time(), "uploaded"

    def push(self, image: Image, rng: random.Random, watch: str = "") -> None:
        """Blobs in a random order (docker pushes layers concurrently), then the manifest.

        A push is only promised to survive a collection if it references what it was told
        exists within ``GRACE - TOUCH_INTERVAL`` (the registry refreshes a stamp at most every
        ``TOUCH_INTERVAL``, so a stamp may be that much older than the answer). A manifest
        refused for a blob told present longer ago than that is what a user of a registry with
        a one-second grace period must expect: it is counted and the push is retried, as the
        user would. Refused for a blob told present more recently, it is a failure.

        With ``watch``, how the image's own blobs (config and last layer) were found is counted
        under that name."""
        for _attempt in range(3):
            blobs = image.blobs()
            rng.shuffle(blobs)
            told = {}
            for blob in blobs:
                told[sha256(blob)], how = self.push_blob(image.repo, blob, rng)
                if watch and blob in (image.config, image.layers[-1]):
                    self.ledger.count(f"{watch}: own blob {how}")
            r = self.http.put(
                self.server.v2(f"{image.repo}/manifests/{image.tag}"),
                data=image.manifest(),
                headers={"Content-Type": OCI_MANIFEST},
                timeout=60,
            )
            now = time.time()
            if r.status_code == 201:
                break
            ages = {d: now - t for d, t in told.items()}
            missing = _missing_blobs(r)
            if missing and all(ages.get(d, 0) > GRACE - TOUCH_INTERVAL for d in missing):
                self.ledger.count("push-outlived-grace")
                continue
            shown = {d: f"{a:.3f}s" for d, a in ages.items()}
            raise ClientError(
                f"PUT manifest {image.repo}:{image.tag} ({image.digest}) answered at {now:.3f}; "
                f"each blob had been reported present this long before: {shown}\n{describe(r)}"
            )
        else:
            raise ClientError(f"{image.repo}:{image.tag}: three pushes outlived the grace period")
        if r.headers.get("Docker-Content-Digest") != image.digest:
            raise ClientError(f"manifest stored under another digest\n{describe(r)}")
        with self.ledger.lock:
            oldest = now - min(told.values())
            self.ledger.longest_reference = max(self.ledger.longest_reference, oldest)
        self.ledger.count("manifests")

    def delete(self, image: Image) -> None:
        r = self.http.delete(self.server.v2(f"{image.repo}/manifests/{image.digest}"), timeout=60)
        self._check(r, 202, what=f"DELETE {image.repo}@{image.digest}")
        r = self.http.get(self.server.v2(f"{image.repo}/manifests/{image.tag}"), timeout=60)
        self._check(r, 404, what=f"GET deleted {image.repo}:{image.tag}")
        self.ledger.count("deleted")

    def pull(self, image: Image) -> None:
        """Manifest by tag and every blob, byte for byte."""
        r = self.http.get(
            self.server.v2(f"{image.repo}/manifests/{image.tag}"),
            headers={"Accept": OCI_MANIFEST},
            timeout=60,
        )
        self._check(r, 200, what=f"pull {image.repo}:{image.tag}")
        if r.headers.get("Docker-Content-Digest") != image.digest or r.content != image.manifest():
            raise ClientError(f"{image.repo}:{image.tag} is not {image.digest}\n{describe(r)}")
        for data in image.blobs():
            digest = sha256(data)
            r = self.http.get(self.server.v2(f"{image.repo}/blobs/{digest}"), timeout=60)
            self._check(r, 200, what=f"pull blob {digest} of {image.repo}:{image.tag}")
            if r.content != data:
                raise ClientError(
                    f"blob {digest} of {image.repo}:{image.tag}: {len(r.content)} bytes hashing "
                    f"to {sha256(r.content)} instead of {len(data)} bytes\n{describe(r)}"
                )
        self.ledger.count("pulls")


# -- the collector loop ---------------------------------------------------------------------------


@dataclass
class GCRun:
    args: tuple[str, ...]
    started: float
    ended: float
    returncode: int
    stdout: str
    stderr: str

    @property
    def removed_blobs(self) -> int:
        match = REMOVED.search(self.stdout)
        return int(match.group(1)) if match else 0

    @property
    def removed_manifests(self) -> int:
        match = REMOVED.search(self.stdout)
        return int(match.group(3)) if match else 0


def gc(server: Server, *args: str, timeout: float = 60) -> GCRun:
    started = time.time()
    result = subprocess.run(
        [sys.executable, "-m", "dockyard", "gc", str(server.config_path), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return GCRun(args, started, time.time(), result.returncode, result.stdout, result.stderr)


def gc_loop(
    server: Server, args: tuple[str, ...], stop: threading.Event, runs: list[GCRun], pause: float
) -> None:
    while not stop.is_set():
        runs.append(gc(server, *args))
        stop.wait(pause)


def evidence(failure: str, runs: list[GCRun]) -> str:
    """A failure with the collections that ran around it, and what they said about the digests
    it names (runs without --quiet list every blob they removed)."""
    digests = set(re.findall(r"sha256:[0-9a-f]{64}", failure))
    stamps = [float(t) for t in re.findall(r"at (\d{10}\.\d{3})", failure)]
    lines = [failure, "  collections:"]
    for r in sorted(runs, key=lambda r: r.started):
        near = any(r.started - 5 <= t <= r.ended + 5 for t in stamps)
        said = [line for line in r.stdout.splitlines() if any(d in line for d in digests)]
        if near or said:
            lines.append(
                f"    {r.started:.3f}-{r.ended:.3f} gc {' '.join(r.args)} -> {r.returncode}: "
                f"{r.removed_blobs} blobs removed"
            )
            lines += [f"      {line}" for line in said]
    return "\n".join(lines)


# -- the load -------------------------------------------------------------------------------------


def make_jobs(rng: random.Random, shared: list[bytes]) -> list[Callable[[Client], None]]:
    """``JOBS`` closures, each one client's work: push, and maybe delete / re-push / re-tag."""

    def new_image(n: int, repo: str | None = None, tag: str | None = None) -> Image:
        config = json.dumps(
            {"architecture": "amd64", "os": "linux", "job": n, "nonce": os.urandom(8).hex()}
        ).encode()
        chosen = rng.sample(shared, rng.randint(1, 4))
        unique = os.urandom(rng.randint(16 * 1024, 512 * 1024))
        layers = (*chosen, unique)
        return Image(repo or rng.choice(REPOSITORIES), tag or f"job{n}", config, layers)

    kinds = ["stable"] * 26 + ["churn"] * 18 + ["garbage"] * 10 + ["retag"] * 10
    assert len(kinds) == JOBS
    rng.shuffle(kinds)
    jobs: list[Callable[[Client], None]] = []
    for n, kind in enumerate(kinds):
        seed = rng.random()
        image = new_image(n)
        if kind == "stable":  # pushed once, pulled by other jobs while the collector runs

            def job(c: Client, image: Image = image, seed: float = seed) -> None:
                job_rng = random.Random(seed)
                c.push(image, job_rng)
                with c.ledger.lock:
                    c.ledger.kept[(image.repo, image.tag)] = image
                    c.ledger.stable.append(image)

        elif kind == "churn":  # deleted, left for the collector, pushed again identically

            def job(c: Client, image: Image = image, seed: float = seed) -> None:
                job_rng = random.Random(seed)
                c.push(image, job_rng)
                for _ in range(job_rng.randint(1, 2)):
                    time.sleep(job_rng.uniform(0, 0.5))
                    c.delete(image)
                    # Long enough that the unique blobs are older than the grace period.
                    time.sleep(job_rng.uniform(GRACE, 2.5 * GRACE))
                    c.push(image, job_rng, watch="re-push")
                    c.ledger.count("re-pushed")
                with c.ledger.lock:
                    c.ledger.kept[(image.repo, image.tag)] = image

        elif kind == "garbage":  # deleted for good

            def job(c: Client, image: Image = image, seed: float = seed) -> None:
                job_rng = random.Random(seed)
                c.push(image, job_rng)
                time.sleep(job_rng.uniform(0, 1))
                c.delete(image)

        else:  # the tag moves to another image; the first one is left untagged
            second = new_image(n, repo=image.repo, tag=image.tag)

            def job(
                c: Client, image: Image = image, second: Image = second, seed: float = seed
            ) -> None:
                job_rng = random.Random(seed)
                c.push(image, job_rng)
                time.sleep(job_rng.uniform(0, 1.5 * GRACE))
                c.push(second, job_rng)
                c.ledger.count("re-tagged")
                with c.ledger.lock:
                    c.ledger.kept[(second.repo, second.tag)] = second

        jobs.append(job)
    return jobs


def run_job(server: Server, ledger: Ledger, job: Callable[[Client], None], seed: int) -> None:
    client = Client(server, ledger)
    try:
        job(client)
        # Now and then, pull an image that must be there while the collector runs.
        rng = random.Random(seed)
        with ledger.lock:
            candidates = list(ledger.stable)
        for image in rng.sample(candidates, min(len(candidates), 2)):
            client.pull(image)
    except ClientError as exc:
        with ledger.lock:
            ledger.failures.append(str(exc))
    except Exception as exc:  # the client itself: keep it with the rest
        with ledger.lock:
            ledger.failures.append(f"{type(exc).__name__}: {exc}")


def test_gc_loop_while_pushing_deleting_and_repushing(start_server: ServerFactory) -> None:
    server = start_server(workers=2, **SERVER_OVERRIDES)
    rng = random.Random(int.from_bytes(os.urandom(4)))
    shared = [os.urandom(rng.randint(64 * 1024, 2 * 1024 * 1024)) for _ in range(SHARED_LAYERS)]
    jobs = make_jobs(rng, shared)
    ledger = Ledger()

    stop = threading.Event()
    untagged_runs: list[GCRun] = []
    plain_runs: list[GCRun] = []
    grace = f"{GRACE:g}s"
    loops = [
        threading.Thread(
            target=gc_loop,
            args=(
                server,
                ("--grace", grace, "--delete-untagged", "--quiet"),
                stop,
                untagged_runs,
                0,
            ),
        ),
        # Another collector without --delete-untagged, which often finds the lease taken (3).
        threading.Thread(target=gc_loop, args=(server, ("--grace", grace), stop, plain_runs, 0.3)),
    ]
    started = time.monotonic()
    for loop in loops:
        loop.start()
    try:
        with ThreadPoolExecutor(THREADS) as pool:
            for i, job in enumerate(jobs):
                pool.submit(run_job, server, ledger, job, i)
            # ThreadPoolExecutor.__exit__ waits for every job.
        load_seconds = time.monotonic() - started
    finally:
        stop.set()
        for loop in loops:
            loop.join(120)
    runs = untagged_runs + plain_runs

    # The collector behaved: finished (0) or found another collection running (3), nothing else.
    odd = [r for r in runs if r.returncode not in (0, 3)]
    assert not odd, "\n".join(f"gc {r.args} -> {r.returncode}\n{r.stderr}" for r in odd)
    busy = [r for r in runs if r.returncode == 3]
    assert all("another garbage collection is running" in r.stderr for r in busy)
    completed = [r for r in runs if r.returncode == 0]
    removed_blobs = sum(r.removed_blobs for r in completed)
    removed_manifests = sum(r.removed_manifests for r in completed)
    print(
        f"\nload: {load_seconds:.1f} s, {dict(sorted(ledger.counts.items()))}, longest "
        f"'present' -> manifest PUT {ledger.longest_reference:.2f} s\n"
        f"gc: {len(runs)} runs ({len(untagged_runs)} with --delete-untagged), {len(busy)} "
        f"found the lease taken; removed {removed_blobs} blobs and {removed_manifests} "
        f"untagged manifests in {sum(1 for r in completed if r.removed_blobs)} runs"
    )

    # No client was ever told something wrong or refused a push it was entitled to.
    assert not ledger.failures, f"{len(ledger.failures)} failures:\n" + "\n\n".join(
        evidence(failure, runs) for failure in ledger.failures[:10]
    )
    # Otherwise the test proves nothing: the collector took garbage while the pushes ran.
    assert any(r.removed_blobs > 0 for r in completed), [r.stdout for r in completed]
    assert removed_manifests > 0, "no untagged manifest was ever collected"
    # Re-pushes found their deleted blobs still there (HEAD 200, upload skipped): the race the
    # collector must survive. (Others found them collected and uploaded them again: counted as
    # "re-push: own blob uploaded", how many depends on how fast the collections go.)
    assert ledger.counts.get("re-push: own blob exists", 0) > 0, ledger.counts

    # Everything that was pushed and not deleted is there, whole.
    verify_all(server, ledger)
    fsck = subprocess.run(
        [sys.executable, "-m", "dockyard", "fsck", str(server.config_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr

    # A last collection with nobody pushing leaves every kept image alone.
    time.sleep(GRACE + 0.1)
    final = gc(server, "--grace", grace, "--delete-untagged", "--quiet")
    assert final.returncode == 0, final.stderr
    verify_all(server, ledger)

    log = server.log()
    assert "Traceback" not in log, log[-5000:]
    assert "level=error" not in log, [line for line in log.splitlines() if "level=error" in line]


def verify_all(server: Server, ledger: Ledger) -> None:
    client = Client(server, ledger)
    problems = []
    assert len(ledger.kept) >= 40
    for image in ledger.kept.values():
        try:
            client.pull(image)
        except ClientError as exc:
            problems.append(str(exc))
    assert not problems, f"{len(problems)} of {len(ledger.kept)} images do not pull:\n" + (
        "\n\n".join(problems[:10])
    )


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
    client = Client(server, Ledger())
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
