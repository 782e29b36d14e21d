"""The pull-through cache when its upstream misbehaves, and under concurrent pulls (issue 14).

The upstream is a Dockyard in the test process behind ``harness.faulty_upstream``, which breaks
the requests a test names and counts every request it sees; the proxy gives up on an upstream
that sends nothing for ``TIMEOUT`` seconds. What must hold whatever the upstream does: a client
never receives a whole blob that is wrong (its response fails, or ends short of its length),
nothing partial or corrupt is cached, and the next pull once the upstream behaves is right.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests
from requests.adapters import HTTPAdapter

from harness.client import OCI_MANIFEST, assert_error, sha256
from harness.faulty_upstream import FaultyUpstream, faulty_upstream
from harness.plugin import BucketFactory, Server, ServerFactory
from harness.redis import flush_redis
from harness.s3 import S3Endpoint
from harness.store import BucketStore, DiskStore

pytestmark = pytest.mark.filesystem  # looks for cached files in the proxy's data directory

PREFIX = "hub"
TIMEOUT = 1.0
#: a blob of several of the proxy's 256 KiB reads (it streams all but the last to the client
#: before the digest is checked), and one it holds back whole
LARGE = 3_000_000
SMALL = 1_000


@dataclass
class Image:
    name: str  # on the upstream
    tag: str
    digest: str
    blobs: dict[str, bytes] = field(default_factory=dict)  # config and layers

    @property
    def proxied(self) -> str:
        return f"{PREFIX}/{self.name}"

    @property
    def layers(self) -> list[str]:
        return list(self.blobs)[1:]


def push(upstream: Server, name: str, sizes: list[int], tag: str = "1") -> Image:
    digest, manifest = upstream.push_image(name, tag, [os.urandom(n) for n in sizes])
    image = Image(name, tag, digest)
    for blob in [manifest["config"], *manifest["layers"]]:
        r = upstream.session.get(upstream.v2(f"{name}/blobs/{blob['digest']}"))
        image.blobs[blob["digest"]] = r.content
    return image


def proxy_config(url: str, timeout: float = TIMEOUT) -> dict[str, Any]:
    return {"upstreams": [{"prefix": PREFIX, "remoteurl": url, "timeout": timeout}]}


@pytest.fixture
def upstream(start_server: ServerFactory) -> Server:
    return start_server()


@pytest.fixture
def faulty(upstream: Server) -> Iterator[FaultyUpstream]:
    with faulty_upstream(upstream.url) as front:
        yield front


@pytest.fixture
def mirror(start_server: ServerFactory, faulty: FaultyUpstream) -> Server:
    return start_server(proxy=proxy_config(faulty.url))


@dataclass
class Pulled:
    status: int
    body: bytes
    broke: bool  # reading the body raised: the connection ended before Content-Length
    elapsed: float


class _SmallWindow(HTTPAdapter):
    """Connections with a small receive buffer: a client that does not read holds the server
    back after 64 KiB (plus the server's own send buffer), not after the kernel's megabytes."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["socket_options"] = [(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)]
        super().init_poolmanager(*args, **kwargs)


def get(url: str, headers: dict[str, str] | None = None) -> Pulled:
    """GET, reading the body to its end or until the connection fails."""
    start = time.monotonic()
    r = requests.get(url, headers=headers, stream=True, timeout=8)
    body, broke = bytearray(), False
    try:
        for chunk in r.iter_content(65536):
            body += chunk
    except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError):
        broke = True
    r.close()
    return Pulled(r.status_code, bytes(body), broke, time.monotonic() - start)


def blob_url(mirror: Server, image: Image, digest: str) -> str:
    return mirror.v2(f"{image.proxied}/blobs/{digest}")


def assert_not_delivered(pulled: Pulled, blob: bytes) -> None:
    """An error status, or a 200 whose body breaks off short: never the whole blob."""
    if pulled.status == 200:
        assert pulled.broke, "a 200 that ended normally"
        assert len(pulled.body) < len(blob), len(pulled.body)
        assert sha256(pulled.body) != sha256(blob)
    else:
        assert pulled.status in (502, 503), (pulled.status, pulled.body[:300])
        assert pulled.body.startswith(b'{"errors"'), pulled.body[:300]


def assert_not_cached(mirror: Server, image: Image, digest: str) -> None:
    store = DiskStore(mirror.root)
    assert not store.blob_path(digest).exists()
    assert not store.layer_link(image.proxied, digest).exists()
    incoming = mirror.root / "dockyard" / "proxy" / "incoming"
    assert not incoming.exists() or not list(incoming.iterdir()), list(incoming.iterdir())
    assert not store.leftovers()


def assert_pulls_right(mirror: Server, image: Image, digest: str) -> None:
    pulled = get(blob_url(mirror, image, digest))
    assert pulled.status == 200 and not pulled.broke
    assert pulled.body == image.blobs[digest]
    assert DiskStore(mirror.root).read_blob(digest) == image.blobs[digest]


# -- a blob that arrives broken --------------------------------------------------------------

BROKEN = {
    "cut": {"kind": "cut", "after": 0.5},  # connection reset halfway
    "corrupt": {"kind": "corrupt"},  # one byte flipped, the length right
    "short": {"kind": "short", "missing": 1},  # one byte short of Content-Length, then closed
    "stall": {"kind": "hang", "after": 0.5},  # half, then nothing (the upstream timeout)
}


@pytest.mark.parametrize("size", [SMALL, LARGE], ids=["small", "large"])
@pytest.mark.parametrize("fault", list(BROKEN))
def test_a_broken_blob_is_never_served_whole_nor_cached(
    upstream: Server, faulty: FaultyUpstream, mirror: Server, fault: str, size: int
) -> None:
    image = push(upstream, "library/app", [size])
    layer = image.layers[0]
    options = dict(BROKEN[fault])
    if isinstance(options.get("after"), float):
        options["after"] = int(size * options["after"])
    faulty.inject(path="/blobs/", **options)
    pulled = get(blob_url(mirror, image, layer))
    assert_not_delivered(pulled, image.blobs[layer])
    if size == SMALL:  # held back whole: nothing was sent when the fault showed, so an error
        assert pulled.status in (502, 503)
    assert pulled.elapsed < TIMEOUT + 3
    assert_not_cached(mirror, image, layer)

    faulty.clear()
    assert_pulls_right(mirror, image, layer)
    assert_pulls_right(mirror, image, layer)  # from the cache
    assert faulty.count("GET", f"/blobs/{layer}") == 2


@pytest.mark.parametrize("fault", list(BROKEN))
def test_a_broken_manifest_or_tag_list_is_an_error_and_not_cached(
    upstream: Server, faulty: FaultyUpstream, mirror: Server, fault: str
) -> None:
    image = push(upstream, "library/app", [SMALL])
    options = dict(BROKEN[fault])
    if "after" in options:
        options["after"] = 10
    broken = "/manifests/sha256:|/tags/list"
    faulty.inject(path=broken, method="GET", **options)
    manifest_url = mirror.v2(f"{image.proxied}/manifests/1")
    tags_url = mirror.v2(f"{image.proxied}/tags/list")
    r = requests.get(manifest_url, headers={"Accept": OCI_MANIFEST}, timeout=8)
    assert r.status_code in (502, 503), r.text
    assert not DiskStore(mirror.root).blob_path(image.digest).exists()
    assert not DiskStore(mirror.root).links()
    r = requests.get(tags_url, timeout=8)
    assert_error(r, 503, "UNAVAILABLE")

    faulty.clear()
    r = requests.get(manifest_url, headers={"Accept": OCI_MANIFEST}, timeout=8)
    assert r.status_code == 200 and sha256(r.content) == image.digest
    r = requests.get(tags_url, timeout=8)
    assert r.status_code == 200 and "Cache-Status" not in r.headers
    faulty.inject(path=broken, method="GET", **options)
    r = requests.get(tags_url, timeout=8)
    assert r.status_code == 200 and r.json()["tags"] == ["1"]
    assert "stale" in r.headers["Cache-Status"]


def test_a_manifest_that_arrives_in_pieces_is_read_whole(
    upstream: Server, faulty: FaultyUpstream, mirror: Server
) -> None:
    image = push(upstream, "library/app", [SMALL])
    faulty.inject("trickle", "/manifests/sha256:", after=100, seconds=0.02)
    r = requests.get(mirror.v2(f"{image.proxied}/manifests/1"), timeout=8)
    assert r.status_code == 200, r.text
    assert sha256(r.content) == image.digest


def test_a_client_that_stops_reading_does_not_hold_up_the_others(
    upstream: Server, faulty: FaultyUpstream, mirror: Server
) -> None:
    """The first client's pace holds the fetch back; one that stops reading altogether (but
    keeps its connection) must not keep the blob from every other client for ever."""
    size = 12_000_000
    image = push(upstream, "library/app", [size])
    layer = image.layers[0]
    stalled = requests.Session()
    stalled.mount("http://", _SmallWindow())
    r = stalled.get(blob_url(mirror, image, layer), stream=True, timeout=8)
    assert r.status_code == 200
    try:
        pulled = get(blob_url(mirror, image, layer))
        assert pulled.status == 200 and pulled.body == image.blobs[layer]
        assert pulled.elapsed < TIMEOUT + 5, pulled.elapsed
        with pytest.raises((requests.ConnectionError, requests.exceptions.ChunkedEncodingError)):
            for _ in r.iter_content(65536):  # dropped: its response ends short
                pass
    finally:
        r.close()
        stalled.close()
    assert faulty.count("GET", f"/blobs/{layer}") == 1


def test_a_client_that_leaves_midway_still_fills_the_cache(
    upstream: Server, faulty: FaultyUpstream, mirror: Server
) -> None:
    image = push(upstream, "library/app", [LARGE])
    layer = image.layers[0]
    r = requests.get(blob_url(mirror, image, layer), stream=True, timeout=8)
    assert r.status_code == 200
    r.raw.read(100_000)
    r.close()  # gone, a third of the way in
    deadline = time.monotonic() + 10
    while not DiskStore(mirror.root).layer_link(image.proxied, layer).exists():
        assert time.monotonic() < deadline, "the fetch stopped with its client"
        time.sleep(0.05)
    assert_pulls_right(mirror, image, layer)
    assert faulty.count("GET", f"/blobs/{layer}") == 1


# -- the upstream answers an error, or nothing -------------------------------------------------

ERRORS = {
    "500": {"kind": "status", "status": 500},
    "503": {"kind": "status", "status": 503},
    "hang": {"kind": "hang"},  # accepts, never answers
}


@pytest.mark.parametrize("fault", list(ERRORS))
def test_an_upstream_failure_on_an_uncached_blob_is_an_error_and_caches_nothing(
    upstream: Server, faulty: FaultyUpstream, mirror: Server, fault: str
) -> None:
    image = push(upstream, "library/app", [LARGE])
    layer = image.layers[0]
    faulty.inject(path="/blobs/", **ERRORS[fault])
    pulled = get(blob_url(mirror, image, layer))
    assert pulled.status == 503, pulled.body[:300]
    assert b"UNAVAILABLE" in pulled.body
    if fault == "hang":
        assert TIMEOUT * 0.8 < pulled.elapsed < TIMEOUT + 2, pulled.elapsed
    r = requests.head(blob_url(mirror, image, layer), timeout=8)
    assert r.status_code == 503
    assert_not_cached(mirror, image, layer)
    faulty.clear()
    assert_pulls_right(mirror, image, layer)


@pytest.mark.parametrize("fault", list(ERRORS))
def test_a_cached_tag_is_served_stale_while_the_upstream_fails(
    upstream: Server, faulty: FaultyUpstream, mirror: Server, fault: str
) -> None:
    image = push(upstream, "library/app", [SMALL])
    other = push(upstream, "library/other", [SMALL])
    manifest_url = mirror.v2(f"{image.proxied}/manifests/1")
    r = requests.get(manifest_url, headers={"Accept": OCI_MANIFEST}, timeout=8)
    assert r.status_code == 200 and "Cache-Status" not in r.headers
    faulty.inject(**ERRORS[fault])

    start = time.monotonic()
    r = requests.get(manifest_url, headers={"Accept": OCI_MANIFEST}, timeout=8)
    elapsed = time.monotonic() - start
    assert r.status_code == 200, r.text
    assert r.headers["Docker-Content-Digest"] == image.digest
    assert sha256(r.content) == image.digest
    assert "stale" in r.headers["Cache-Status"]
    assert r.headers["Warning"].startswith("110 ")
    if fault == "hang":
        assert TIMEOUT * 0.8 < elapsed < TIMEOUT + 2, elapsed
    r = requests.get(mirror.v2(f"{image.proxied}/tags/list"), timeout=8)
    assert r.status_code == 200 and r.json()["tags"] == ["1"]
    assert "stale" in r.headers["Cache-Status"]
    # nothing cached to fall back on
    start = time.monotonic()
    r = requests.get(mirror.v2(f"{other.proxied}/manifests/1"), timeout=8)
    assert_error(r, 503, "UNAVAILABLE")
    if fault == "hang":
        assert time.monotonic() - start < TIMEOUT + 2

    faulty.clear()
    r = requests.get(mirror.v2(f"{other.proxied}/manifests/1"), timeout=8)
    assert r.status_code == 200 and r.headers["Docker-Content-Digest"] == other.digest
    r = requests.get(manifest_url, headers={"Accept": OCI_MANIFEST}, timeout=8)
    assert r.status_code == 200 and "Cache-Status" not in r.headers


@pytest.mark.slow  # waits out Retry-After
def test_429_is_honoured_without_asking_again_during_retry_after(
    upstream: Server, faulty: FaultyUpstream, mirror: Server
) -> None:
    image = push(upstream, "library/app", [SMALL])
    other = push(upstream, "library/other", [SMALL])
    manifest_url = mirror.v2(f"{image.proxied}/manifests/1")
    assert requests.get(manifest_url, timeout=8).status_code == 200
    faulty.inject("status", status=429, headers={"Retry-After": "3"})
    faulty.reset_counts()
    throttled = time.monotonic()
    for _ in range(5):
        r = requests.get(manifest_url, timeout=8)
        assert r.status_code == 200 and r.headers["Docker-Content-Digest"] == image.digest
        assert "stale" in r.headers["Cache-Status"] and "Warning" in r.headers
        r = requests.get(mirror.v2(f"{image.proxied}/tags/list"), timeout=8)
        assert r.status_code == 200 and "stale" in r.headers["Cache-Status"]
    for path in ("manifests/1", f"blobs/{other.layers[0]}", "tags/list"):
        r = requests.get(mirror.v2(f"{other.proxied}/{path}"), timeout=8)
        assert_error(r, 429, "TOOMANYREQUESTS")
        assert 1 <= int(r.headers["Retry-After"]) <= 3
    assert time.monotonic() - throttled < 3, "too slow to test Retry-After"
    assert faulty.counts() == {"HEAD /v2/library/app/manifests/1": 1}

    faulty.clear()
    time.sleep(max(0.0, throttled + 3.2 - time.monotonic()))
    r = requests.get(mirror.v2(f"{other.proxied}/manifests/1"), timeout=8)
    assert r.status_code == 200 and r.headers["Docker-Content-Digest"] == other.digest
    r = requests.get(manifest_url, timeout=8)
    assert r.status_code == 200 and "Cache-Status" not in r.headers


# -- concurrent pulls ------------------------------------------------------------------------

PULLERS = 20
#: the upstream timeout here: everything but the second worker shares the test process (and its
#: GIL), where twenty clients, three servers and moto's S3 kept the upstream from answering for
#: over ten seconds once in CI. These tests are about fetching once, not about timing.
PATIENT = 60.0


def pull_image(mirror: Server, image: Image) -> None:
    r = requests.get(
        mirror.v2(f"{image.proxied}/manifests/{image.tag}"),
        headers={"Accept": OCI_MANIFEST},
        timeout=PATIENT + 30,
    )
    assert r.status_code == 200, r.text
    assert r.headers["Docker-Content-Digest"] == image.digest == sha256(r.content)
    for digest, content in image.blobs.items():
        r = requests.get(blob_url(mirror, image, digest), timeout=PATIENT + 30)
        assert r.status_code == 200, r.text
        assert r.content == content


def pull_together(mirrors: list[Server], image: Image) -> None:
    """PULLERS clients pull the image at once, spread over ``mirrors``; each succeeds."""
    barrier = threading.Barrier(PULLERS)

    def puller(i: int) -> None:
        barrier.wait()
        pull_image(mirrors[i % len(mirrors)], image)

    with ThreadPoolExecutor(PULLERS) as pool:
        for future in [pool.submit(puller, i) for i in range(PULLERS)]:
            future.result()


def assert_fetched_once(faulty: FaultyUpstream, image: Image) -> None:
    gets = faulty.counts("GET")
    wanted = [f"/v2/{image.name}/manifests/{image.digest}"]
    wanted += [f"/v2/{image.name}/blobs/{digest}" for digest in image.blobs]
    assert {path: gets.get(path, 0) for path in wanted} == dict.fromkeys(wanted, 1), gets
    assert set(gets) == set(wanted), gets  # nothing else (the tag is asked with HEAD)


@pytest.mark.parametrize(
    "workers", [1, pytest.param(2, marks=pytest.mark.slow)], ids=["in-process", "two-workers"]
)
def test_concurrent_pulls_of_an_uncached_image_fetch_each_blob_once(
    start_server: ServerFactory, upstream: Server, faulty: FaultyUpstream, workers: int
) -> None:
    """Two workers: a process of its own, whose workers share the flock of each fetch."""
    mirror = start_server(workers=workers, proxy=proxy_config(faulty.url, PATIENT))
    image = push(upstream, "library/app", [LARGE, LARGE // 2, SMALL])
    faulty.inject("delay", "/(blobs|manifests)/sha256:", method="GET", seconds=0.3)
    pull_together([mirror], image)
    assert_fetched_once(faulty, image)


@pytest.mark.slow
def test_concurrent_pulls_across_two_instances_on_s3_and_redis_fetch_each_blob_once(
    start_server: ServerFactory,
    upstream: Server,
    faulty: FaultyUpstream,
    moto_s3: S3Endpoint,
    s3_bucket_factory: BucketFactory,
    redis_addr: str,
) -> None:
    """Two instances sharing a bucket: no flock between them, the fetch lock is a Redis key."""
    flush_redis(redis_addr)
    bucket = s3_bucket_factory(moto_s3)
    storage = {"s3": moto_s3.storage_config(bucket), "redirect": {"disable": True}}
    mirrors = [
        start_server(
            storage=storage, redis={"addr": redis_addr}, proxy=proxy_config(faulty.url, PATIENT)
        )
        for _ in range(2)
    ]
    image = push(upstream, "library/app", [LARGE, LARGE // 2, SMALL])
    faulty.inject("delay", "/(blobs|manifests)/sha256:", method="GET", seconds=0.3)
    pull_together(mirrors, image)
    assert_fetched_once(faulty, image)
    stored = BucketStore(moto_s3, bucket).stored_blobs()
    assert {d: stored.get(d) for d in image.blobs} == {d: len(b) for d, b in image.blobs.items()}


@pytest.mark.parametrize("what", ["blobs", "manifests"])
def test_concurrent_pulls_from_a_hung_upstream_all_fail_in_about_the_timeout(
    upstream: Server, faulty: FaultyUpstream, mirror: Server, what: str
) -> None:
    """Those waiting for another request's fetch share its failure: they do not queue up for
    an attempt each, the last answered after one timeout per client before it."""
    image = push(upstream, "library/app", [SMALL])
    digest = image.layers[0] if what == "blobs" else image.digest
    url = mirror.v2(f"{image.proxied}/{what}/{digest}")
    faulty.inject("hang", f"/{what}/")
    with ThreadPoolExecutor(5) as pool:
        pulled = list(pool.map(lambda _: get(url), range(5)))
    assert [p.status for p in pulled] == [503] * 5
    assert max(p.elapsed for p in pulled) < TIMEOUT + 2, [p.elapsed for p in pulled]
    assert faulty.count("GET", f"/{what}/") == 1
    faulty.clear()
    r = requests.get(url, headers={"Accept": OCI_MANIFEST}, timeout=8)
    assert r.status_code == 200 and sha256(r.content) == digest


# -- HEAD and ranges -------------------------------------------------------------------------


def test_head_of_an_uncached_blob_answers_its_size_and_caches_nothing(
    upstream: Server, faulty: FaultyUpstream, mirror: Server
) -> None:
    image = push(upstream, "library/app", [LARGE])
    layer = image.layers[0]
    r = requests.head(blob_url(mirror, image, layer), timeout=8)
    assert r.status_code == 200
    assert r.headers["Content-Length"] == str(LARGE)
    assert r.headers["Docker-Content-Digest"] == layer
    assert not r.content
    assert_not_cached(mirror, image, layer)
    assert faulty.counts() == {f"HEAD /v2/library/app/blobs/{layer}": 1}
    r = requests.head(blob_url(mirror, image, sha256(b"nowhere")), timeout=8)
    assert r.status_code == 404


def test_ranges_of_uncached_and_cached_blobs(
    upstream: Server, faulty: FaultyUpstream, mirror: Server
) -> None:
    image = push(upstream, "library/app", [LARGE])
    layer = image.layers[0]
    blob = image.blobs[layer]
    url = blob_url(mirror, image, layer)
    # uncached: served once the whole blob is fetched and verified (a range of a blob not
    # verified yet could be wrong bytes)
    r = requests.get(url, headers={"Range": "bytes=1000-1999"}, timeout=8)
    assert r.status_code == 206, r.text
    assert r.headers["Content-Range"] == f"bytes 1000-1999/{LARGE}"
    assert r.headers["Content-Length"] == "1000"
    assert r.content == blob[1000:2000]
    assert DiskStore(mirror.root).read_blob(layer) == blob
    # cached
    cases = {
        "bytes=-500": (blob[-500:], f"bytes {LARGE - 500}-{LARGE - 1}/{LARGE}"),
        f"bytes={LARGE - 10}-": (blob[-10:], f"bytes {LARGE - 10}-{LARGE - 1}/{LARGE}"),
        "bytes=0-0": (blob[:1], f"bytes 0-0/{LARGE}"),
        f"bytes=5-{LARGE * 2}": (blob[5:], f"bytes 5-{LARGE - 1}/{LARGE}"),
    }
    for header, (content, content_range) in cases.items():
        r = requests.get(url, headers={"Range": header}, timeout=8)
        assert r.status_code == 206, (header, r.text)
        assert r.headers["Content-Range"] == content_range
        assert r.content == content
    r = requests.get(url, headers={"Range": f"bytes={LARGE}-"}, timeout=8)
    assert_error(r, 416, "RANGE_INVALID")
    assert r.headers["Content-Range"] == f"bytes */{LARGE}"
    r = requests.head(url, timeout=8)
    assert r.status_code == 200 and r.headers["Content-Length"] == str(LARGE)
    assert faulty.count("GET", "/blobs/") == 1
    assert faulty.count("HEAD", "/blobs/") == 0


def test_a_range_of_a_blob_that_arrives_broken_is_an_error(
    upstream: Server, faulty: FaultyUpstream, mirror: Server
) -> None:
    image = push(upstream, "library/app", [LARGE])
    layer = image.layers[0]
    faulty.inject("corrupt", "/blobs/", after=LARGE - 1)
    r = requests.get(blob_url(mirror, image, layer), headers={"Range": "bytes=0-99"}, timeout=8)
    assert_error(r, 502, "BLOB_UNKNOWN")
    assert_not_cached(mirror, image, layer)
    faulty.clear()
    r = requests.get(blob_url(mirror, image, layer), headers={"Range": "bytes=0-99"}, timeout=8)
    assert r.status_code == 206 and r.content == image.blobs[layer][:100]
