"""The metadata index shared by several instances: three Dockyard instances (two workers each)
on one Ceph RGW bucket and one Redis, which is where the index lives then (``index.backend:
auto`` with S3 and ``redis.addr``: registry.index_redis). Each test talks to the instances
directly, so which instance serves which request is chosen, not left to a balancer.

1. A push through one instance is in the index as another instance reads it (its JSON API, its
   configuration) as soon as the push is answered, and a quota counts it on every instance at
   once.
2. 20 concurrent pushes into one quota'd namespace, spread over the three instances, end at
   most at the limit: the overshoot bound of 0 bytes (``dockyard du --json``: ``used`` from a
   walk of the store, ``indexed`` from the index, which agree once nothing is in flight).
3. Pulls through one instance reach the index, for all to read, after the pull flush.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest

from dockyard.config import load_config
from dockyard.registry.configured import open_store
from dockyard.registry.index import Index
from dockyard.registry.index_redis import RedisIndex
from harness import DockyardProcess, S3Endpoint, flush_redis, new_bucket, sha256
from harness.client import OCI_MANIFEST, pushers_at_once

pytestmark = [pytest.mark.timeout(300)]

T = TypeVar("T")
KiB = 1024
#: the namespace of the concurrent pushes, and its limit
NAMESPACE, LIMIT = "quota", 1024 * KiB
#: a repository with a small quota of its own (test 1)
SMALL, SMALL_LIMIT = "small/app", 100 * KiB


@dataclass
class Deployment:
    endpoint: S3Endpoint
    bucket: str
    instances: list[DockyardProcess]

    def context(self) -> str:
        return "".join(
            f"\n--- instance {n} log (tail) ---\n{s.log()[-3000:]}"
            for n, s in enumerate(self.instances)
        )

    def assert_clean_logs(self) -> None:
        """No index write failed, nothing crashed: the index in Redis kept up."""
        for n, server in enumerate(self.instances):
            log = server.log()
            assert "Traceback" not in log, f"instance {n}:\n{log[-6000:]}"
            errors = [line for line in log.splitlines() if "level=error" in line]
            assert not errors, f"instance {n}:\n" + "\n".join(errors[:20])


@pytest.fixture(scope="module")
def deployment(
    rgw_s3: S3Endpoint, redis_addr: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    bucket = new_bucket(rgw_s3, "index")
    flush_redis(redis_addr)
    overrides: dict[str, Any] = {
        "storage": {
            "s3": rgw_s3.storage_config(bucket),
            "cache": {"blobdescriptor": "redis"},
            "redirect": {"disable": True},
        },
        "redis": {"addr": redis_addr},
        "http": {"secret": "one-secret-for-all"},
        "index": {"pullflush": "0.2s"},
        "quotas": [
            {"scope": f"{NAMESPACE}/*", "limit": LIMIT},
            {"scope": SMALL, "limit": SMALL_LIMIT},
        ],
    }
    instances: list[DockyardProcess] = []
    try:
        for n in range(3):
            work = tmp_path_factory.mktemp(f"index{n}")
            instances.append(DockyardProcess.launch(work, workers=2, **overrides))
        yield Deployment(rgw_s3, bucket, instances)
    finally:
        for server in instances:
            server.stop()
        with contextlib.suppress(Exception):
            rgw_s3.delete_bucket(bucket)


def through(server: DockyardProcess, read: Callable[[Index], Awaitable[T]]) -> T:
    """``read`` on the index that ``server``'s configuration opens (as its workers do)."""

    async def go() -> T:
        registry = open_store(load_config(str(server.config_path), environ={}))
        try:
            assert isinstance(registry.index, RedisIndex)
            return await read(registry.index)
        finally:
            await registry.close()

    return asyncio.run(go())


def du(server: DockyardProcess) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "dockyard", "du", str(server.config_path), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_a_push_through_one_instance_is_indexed_for_every_other_at_once(
    deployment: Deployment,
) -> None:
    instances = deployment.instances
    pushed: dict[str, str] = {}
    for i in range(6):
        server, reader = instances[i % 3], instances[(i + 1) % 3]
        tag = f"t{i}"
        pushed[tag], _ = server.push_image("shared/app", tag, [os.urandom(100)])
        # read at once through the next instance's configuration: no verification between
        snap = through(reader, lambda index: index.snapshot("shared/app"))
        assert {t.tag: str(t.digest) for t in snap.tags} == pushed, deployment.context()
        # and through its JSON API, which answers from the index
        r = reader.session.get(f"{reader.url}/dockyard/api/v1/repositories/shared/app/-/tags")
        assert r.status_code == 200, r.text
        assert {t["tag"]: t["digest"] for t in r.json()["tags"]} == pushed
    r = instances[1].session.delete(instances[1].v2("shared/app/manifests/t0"))
    assert r.status_code == 202, r.text
    tags = through(instances[2], lambda index: index.tags("shared/app"))
    assert [t.tag for t in tags] == ["t1", "t2", "t3", "t4", "t5"]

    # A quota counts another instance's push at once: 90 KiB pushed through one leaves no
    # room for 20 KiB through another.
    first, second, third = instances
    first.push_blob(SMALL, os.urandom(90 * KiB))
    data = os.urandom(20 * KiB)
    r = second.session.post(
        second.v2(f"{SMALL}/blobs/uploads/"), params={"digest": sha256(data)}, data=data
    )
    assert r.status_code == 403, r.text
    assert f"quota exceeded for {SMALL}" in r.json()["errors"][0]["message"]
    third.push_blob(SMALL, os.urandom(5 * KiB))  # what fits is accepted

    # and none of them kept a SQLite index: the index is the one in Redis
    for server in instances:
        assert not list(server.root.rglob("metadata.sqlite3"))
    deployment.assert_clean_logs()


def test_concurrent_pushes_across_instances_never_exceed_the_limit(
    deployment: Deployment,
) -> None:
    """20 pushers, three 40 KiB blobs each (chunked or whole), spread over the instances and
    their workers, into one namespace limited to 1 MiB: the namespace ends at most at its
    limit, what is indexed is what the store holds, and the limit is really reached."""
    instances = deployment.instances
    outcomes = pushers_at_once(instances, NAMESPACE)
    assert set(outcomes) <= {201, 403}, (outcomes, deployment.context())
    accepted = outcomes.count(201)
    assert 0 < accepted < 60
    for server in instances:  # the same answer through every instance's configuration
        scopes = {q["scope"]: q for q in du(server)["quotas"]}
        scope = scopes[f"{NAMESPACE}/*"]
        assert scope["used"] <= LIMIT, scope
        assert scope["indexed"] == scope["used"], scope
        assert scope["uploading"] == 0, scope
        assert scope["used"] == accepted * 40 * KiB, (scope, accepted)
    # the limit is really reached: what was refused would not have fitted
    assert LIMIT - scope["used"] < 40 * KiB
    deployment.assert_clean_logs()


def test_pulls_through_one_instance_reach_every_other_after_the_flush(
    deployment: Deployment,
) -> None:
    first, second, third = deployment.instances
    pushed = {tag: first.push_image("pulled/app", tag, [os.urandom(100)])[0] for tag in "abc"}
    before = time.time()
    r = second.session.get(second.v2("pulled/app/manifests/a"), headers={"Accept": OCI_MANIFEST})
    assert r.status_code == 200, r.text
    r = third.session.head(
        third.v2(f"pulled/app/manifests/{pushed['b']}"), headers={"Accept": OCI_MANIFEST}
    )
    assert r.status_code == 200, r.text
    deadline = time.time() + 15
    while True:
        tags = {t.tag: t for t in through(first, lambda index: index.tags("pulled/app"))}
        if tags["a"].pulled is not None and tags["b"].pulled is not None:
            break
        assert time.time() < deadline, (tags, deployment.context())
        time.sleep(0.2)
    assert before - 1 <= tags["a"].pulled <= time.time()
    assert before - 1 <= tags["b"].pulled <= time.time()
    assert tags["c"].pulled is None  # never pulled
    deployment.assert_clean_logs()
