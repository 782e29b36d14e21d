"""Clients that push, delete and re-push images the way docker and skopeo do, for the tests that
run ``dockyard gc`` in a loop while the pushes go on (test_gc_online.py on the filesystem,
test_multi_instance.py on Ceph RGW behind nginx).

Every push goes blob by blob: ``HEAD`` the blob in the target repository; if it is missing, try a
cross-repository mount from a repository that had it, and otherwise upload it (``POST``,
``PATCH`` in one or two chunks, ``PUT ?digest=``); then ``PUT`` the manifest by tag. Images share
a pool of layers across repositories and each has a unique layer and config. The jobs of a
``Workload`` push, delete by digest, push the very same content again or move a tag away; the
``Ledger`` they share records what must survive and every failure with its evidence.
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
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urljoin

import requests

from harness.client import OCI_MANIFEST, sha256
from harness.oci import CONFIG_MEDIA_TYPE, LAYER_MEDIA_TYPE

REMOVED = re.compile(r"\bremoved (\d+) blobs \((\d+) bytes\), (\d+) untagged manifests")
#: the last line of ``dockyard gc``, with ``--dry-run`` or without
SUMMARY = re.compile(
    r"(?P<verb>would remove|removed) (?P<blobs>\d+) blobs \((?P<bytes>\d+) bytes\), "
    r"(?P<manifests>\d+) untagged manifests, (?P<links>\d+) dangling layer links"
)


def touch_interval(grace: float) -> float:
    """How often a registry configured with the grace period ``grace``
    (``storage.maintenance.gc.grace``) refreshes the time of content in use: a quarter of it
    (``GCConfig.touch_interval``)."""
    return grace / 4


def oci_manifest(config: bytes, layers: Sequence[bytes]) -> bytes:
    """The OCI image manifest of a config and gzip layers, as a client sends it."""

    def descriptor(media_type: str, data: bytes) -> dict[str, Any]:
        return {"mediaType": media_type, "digest": sha256(data), "size": len(data)}

    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": descriptor(CONFIG_MEDIA_TYPE, config),
            "layers": [descriptor(LAYER_MEDIA_TYPE, layer) for layer in layers],
        }
    ).encode()


def session() -> requests.Session:
    s = requests.Session()
    s.trust_env = False  # no proxy between the test and loopback
    return s


def describe(r: requests.Response) -> str:
    """The whole exchange, redirects included, for an assertion message."""
    chain = " -> ".join(f"{h.status_code} {h.headers.get('Location', '')}" for h in r.history)
    req = r.request
    return (
        f"{req.method} {req.url} -> {r.status_code} {r.reason}"
        + (f" (after {chain})" if chain else "")
        + f"\n  response headers: {dict(r.headers)}\n  response body: {r.text[:2000]}"
    )


# -- what the clients did -------------------------------------------------------------------------


@dataclass(frozen=True)
class Image:
    repo: str
    tag: str
    config: bytes
    layers: tuple[bytes, ...]

    def blobs(self) -> list[bytes]:
        return [self.config, *self.layers]

    def manifest(self) -> bytes:
        return oci_manifest(self.config, self.layers)

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


class Registry(Protocol):
    """Where the clients push: a Dockyard server, or nginx in front of several."""

    def v2(self, path: str) -> str: ...


class Client:
    """A pushing client (one per thread): docker's and skopeo's sequence of requests.

    ``grace`` is the grace period the registry is configured with; with ``redirects``, the
    registry answers a blob ``HEAD`` that finds the blob with a 307 (to presigned storage), which
    the client follows and requires; the blob ``GET`` of a pull follows redirects either way."""

    def __init__(
        self, registry: Registry, ledger: Ledger, grace: float, *, redirects: bool = False
    ) -> None:
        self.registry = registry
        self.ledger = ledger
        self.grace = grace
        self.redirects = redirects
        self.http = session()

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
        base = self.registry.v2(repo)
        r = self.http.head(f"{base}/blobs/{digest}", allow_redirects=self.redirects, timeout=60)
        self._check(r, 200, 404, what=f"HEAD {repo}@{digest}")
        if r.status_code == 200:
            if self.redirects and [h.status_code for h in r.history] != [307]:
                raise ClientError(f"HEAD {digest}: not redirected\n{describe(r)}")
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
            self._check(r, 201, 202, what=f"mount {digest} from {source} into {repo}")
            if r.status_code == 201:
                self.ledger.count("mounted")
                self.ledger.hold(digest, repo)
                return time.time(), "mounted"
            self.ledger.count("mount-fell-back")  # the spec's fallback: an upload was started
        else:
            r = self.http.post(f"{base}/blobs/uploads/", timeout=60)
            self._check(r, 202, what=f"start upload into {repo}")
        self._upload(repo, data, urljoin(r.url, r.headers["Location"]), rng)
        self.ledger.hold(digest, repo)
        return time.time(), "uploaded"

    def push(self, image: Image, rng: random.Random, watch: str = "") -> None:
        """Blobs in a random order (docker pushes layers concurrently), then the manifest.

        A push is only promised to survive a collection if it references what it was told
        exists within the grace period minus the touch interval (the registry refreshes a stamp
        at most every touch interval, so a stamp may be that much older than the answer). A
        manifest refused for a blob told present longer ago than that is the documented limit
        of a registry with so short a grace period (docs/gc.md): it is counted and the push is
        retried, as the user would. Refused for a blob told present more recently, it is a
        failure.

        With ``watch``, how the image's own blobs (config and last layer) were found is counted
        under that name."""
        limit = self.grace - touch_interval(self.grace)
        for _attempt in range(3):
            blobs = image.blobs()
            rng.shuffle(blobs)
            told = {}
            for blob in blobs:
                told[sha256(blob)], how = self.push_blob(image.repo, blob, rng)
                if watch and blob in (image.config, image.layers[-1]):
                    self.ledger.count(f"{watch}: own blob {how}")
            r = self.http.put(
                self.registry.v2(f"{image.repo}/manifests/{image.tag}"),
                data=image.manifest(),
                headers={"Content-Type": OCI_MANIFEST},
                timeout=60,
            )
            now = time.time()
            if r.status_code == 201:
                break
            ages = {d: now - t for d, t in told.items()}
            missing = _missing_blobs(r)
            if missing and all(ages.get(d, 0) > limit for d in missing):
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
        r = self.http.delete(self.registry.v2(f"{image.repo}/manifests/{image.digest}"), timeout=60)
        self._check(r, 202, what=f"DELETE {image.repo}@{image.digest}")
        r = self.http.get(self.registry.v2(f"{image.repo}/manifests/{image.tag}"), timeout=60)
        self._check(r, 404, what=f"GET deleted {image.repo}:{image.tag}")
        self.ledger.count("deleted")

    def pull(self, image: Image) -> None:
        """Manifest by tag and every blob (following any redirect), byte for byte."""
        r = self.http.get(
            self.registry.v2(f"{image.repo}/manifests/{image.tag}"),
            headers={"Accept": OCI_MANIFEST},
            timeout=60,
        )
        self._check(r, 200, what=f"pull {image.repo}:{image.tag}")
        if r.headers.get("Docker-Content-Digest") != image.digest or r.content != image.manifest():
            raise ClientError(f"{image.repo}:{image.tag} is not {image.digest}\n{describe(r)}")
        for data in image.blobs():
            digest = sha256(data)
            r = self.http.get(self.registry.v2(f"{image.repo}/blobs/{digest}"), timeout=60)
            self._check(r, 200, what=f"pull blob {digest} of {image.repo}:{image.tag}")
            if r.content != data:
                raise ClientError(
                    f"blob {digest} of {image.repo}:{image.tag}: {len(r.content)} bytes hashing "
                    f"to {sha256(r.content)} instead of {len(data)} bytes\n{describe(r)}"
                )
        self.ledger.count("pulls")


# -- the load -------------------------------------------------------------------------------------

Job = Callable[[Client], None]


@dataclass(frozen=True)
class Workload:
    """What the client threads do: how many jobs of each kind, the images they push, and how
    long a churn job leaves its deleted image to the collector."""

    #: the collections' grace period in seconds (``--grace``); churn and retag jobs wait in
    #: multiples of it
    grace: float
    repositories: tuple[str, ...]
    #: layers in the pool the images share (across repositories)
    pool: int
    #: (smallest, largest) size of a layer of the pool, in bytes
    pool_layer: tuple[int, int]
    #: jobs that push an image once (and keep it)
    stable: int
    #: jobs that push an image, delete it, leave it to the collector and push it again
    #: identically, ``churn_rounds`` times
    churn: int
    #: jobs that push an image and delete it for good
    garbage: int
    #: jobs that push an image, then another under the same tag (the first is left untagged)
    retag: int
    #: (fewest, most) layers an image takes from the shared pool, besides its own
    layers_from_pool: tuple[int, int]
    #: (smallest, largest) size of an image's own layer, in bytes
    own_layer: tuple[int, int]
    #: (fewest, most) deletes and re-pushes of a churn job
    churn_rounds: tuple[int, int]
    #: a churn job waits up to this many seconds between a push and the delete
    churn_delay: float
    #: (shortest, longest) wait between a churn job's delete and its re-push, in grace periods
    churn_wait: tuple[float, float]


def make_jobs(workload: Workload) -> list[Job]:
    """One closure per job of the workload, in a random order, each one client's work: push,
    and maybe delete / re-push / re-tag. The images share a pool of layers made here."""
    w = workload
    rng = random.Random(int.from_bytes(os.urandom(4)))
    shared = [os.urandom(rng.randint(*w.pool_layer)) for _ in range(w.pool)]

    def new_image(n: int, repo: str | None = None, tag: str | None = None) -> Image:
        config = json.dumps(
            {"architecture": "amd64", "os": "linux", "job": n, "nonce": os.urandom(8).hex()}
        ).encode()
        chosen = rng.sample(shared, rng.randint(*w.layers_from_pool))
        unique = os.urandom(rng.randint(*w.own_layer))
        layers = (*chosen, unique)
        return Image(repo or rng.choice(w.repositories), tag or f"job{n}", config, layers)

    kinds = ["stable"] * w.stable + ["churn"] * w.churn + ["garbage"] * w.garbage
    kinds += ["retag"] * w.retag
    rng.shuffle(kinds)
    jobs: list[Job] = []
    for n, kind in enumerate(kinds):
        seed = rng.random()
        image = new_image(n)
        if kind == "stable":  # pushed once (and pulled by other jobs, see ``run_load``)

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
                for _ in range(job_rng.randint(*w.churn_rounds)):
                    time.sleep(job_rng.uniform(0, w.churn_delay))
                    c.delete(image)
                    shortest, longest = w.churn_wait
                    time.sleep(job_rng.uniform(shortest * w.grace, longest * w.grace))
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
                time.sleep(job_rng.uniform(0, 1.5 * w.grace))
                c.push(second, job_rng)
                c.ledger.count("re-tagged")
                with c.ledger.lock:
                    c.ledger.kept[(second.repo, second.tag)] = second

        jobs.append(job)
    return jobs


def run_job(client: Client, job: Job, seed: int, pulls: int = 0) -> None:
    """One job, then ``pulls`` images that must be there while the collector runs; a failure
    goes to the ledger with the rest."""
    ledger = client.ledger
    try:
        job(client)
        rng = random.Random(seed)
        with ledger.lock:
            candidates = list(ledger.stable)
        for image in rng.sample(candidates, min(len(candidates), pulls)):
            client.pull(image)
    except ClientError as exc:
        with ledger.lock:
            ledger.failures.append(str(exc))
    except Exception as exc:  # the client itself: keep it with the rest
        with ledger.lock:
            ledger.failures.append(f"{type(exc).__name__}: {exc}")


def run_load(
    new_client: Callable[[], Client], jobs: list[Job], *, threads: int, pulls: int = 0
) -> None:
    """Every job on a pool of ``threads`` client threads, each with a client of its own, then
    ``pulls`` images of stable jobs (while the collector runs); returns when all are done."""
    with ThreadPoolExecutor(threads) as pool:
        for i, job in enumerate(jobs):
            pool.submit(run_job, new_client(), job, i, pulls)
        # ThreadPoolExecutor.__exit__ waits for every job.


# -- the collector --------------------------------------------------------------------------------


@dataclass
class GCRun:
    """One run of a ``dockyard`` maintenance command (``gc``, ``fsck``)."""

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


def dockyard(config: Path, command: str, *args: str, timeout: float = 120) -> GCRun:
    """``dockyard COMMAND CONFIG ARGS...``, run to the end."""
    started = time.time()
    result = subprocess.run(
        [sys.executable, "-m", "dockyard", command, str(config), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return GCRun(args, started, time.time(), result.returncode, result.stdout, result.stderr)


def gc_summary(output: str) -> dict[str, Any]:
    """What ``dockyard gc`` said it removed (or would): ``verb`` ("removed" or "would
    remove"), ``blobs``, ``bytes``, ``manifests`` (untagged) and ``links`` (dangling layer
    links), the counts as numbers."""
    match = SUMMARY.search(output)
    assert match, output
    return {k: (v if k == "verb" else int(v)) for k, v in match.groupdict().items()}


def gc_loop(
    collect: Callable[[], GCRun], stop: threading.Event, runs: list[GCRun], pause: float = 0
) -> None:
    """Collections one after the other, ``pause`` seconds apart, until ``stop``."""
    while not stop.is_set():
        runs.append(collect())
        stop.wait(pause)


def completed_runs(runs: list[GCRun]) -> list[GCRun]:
    """The collections behaved: each finished (0) or found another collection running (3),
    nothing else; returns the ones that finished."""
    odd = [r for r in runs if r.returncode not in (0, 3)]
    assert not odd, "\n".join(
        f"gc {' '.join(r.args)} -> {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr}" for r in odd
    )
    busy = [r for r in runs if r.returncode == 3]
    assert all("another garbage collection is running" in r.stderr for r in busy)
    return [r for r in runs if r.returncode == 0]


def report(load_seconds: float, ledger: Ledger, runs: list[GCRun], each: bool = False) -> str:
    """What the clients and the collections did, for the test's output; with ``each``, a line
    for every collection too."""
    completed = [r for r in runs if r.returncode == 0]
    untagged = sum(1 for r in runs if "--delete-untagged" in r.args)
    busy = sum(1 for r in runs if r.returncode == 3)
    lines = [
        f"load: {load_seconds:.1f} s, {dict(sorted(ledger.counts.items()))}, longest "
        f"'present' -> manifest PUT {ledger.longest_reference:.2f} s",
        f"gc: {len(runs)} runs ({untagged} with --delete-untagged), {len(completed)} completed, "
        f"{busy} found the lease taken; removed {sum(r.removed_blobs for r in completed)} blobs "
        f"and {sum(r.removed_manifests for r in completed)} untagged manifests in "
        f"{sum(1 for r in completed if r.removed_blobs)} runs",
    ]
    for r in runs if each else []:
        summary = (r.stdout.strip().splitlines() or [r.stderr.strip()])[-1:]
        lines.append(f"  gc {r.started:.1f}-{r.ended:.1f} -> {r.returncode}: {summary}")
    return "\n" + "\n".join(lines)


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


def assert_no_failures(ledger: Ledger, runs: list[GCRun], context: str = "") -> None:
    """No client was ever told something wrong or refused a push it was entitled to."""
    assert not ledger.failures, (
        f"{len(ledger.failures)} failures:\n"
        + "\n\n".join(evidence(failure, runs) for failure in ledger.failures[:10])
        + context
    )


def assert_collected(completed: list[GCRun]) -> None:
    """Otherwise the test proves nothing: the collector took garbage while the pushes ran."""
    assert any(r.removed_blobs > 0 for r in completed), [r.stdout[-1500:] for r in completed]
    assert sum(r.removed_manifests for r in completed) > 0, (
        "no untagged manifest was ever collected"
    )


def verify_all(client: Client, runs: list[GCRun]) -> None:
    """Everything that was pushed and not deleted (``ledger.kept``) is there, whole."""
    kept = client.ledger.kept
    problems = []
    for image in kept.values():
        try:
            client.pull(image)
        except ClientError as exc:
            problems.append(str(exc))
    assert not problems, f"{len(problems)} of {len(kept)} images do not pull:\n" + (
        "\n\n".join(evidence(p, runs) for p in problems[:10])
    )
