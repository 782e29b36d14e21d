"""Notifications with two instances on Ceph RGW and Redis: each instance records and delivers
the events of the requests it served, from its own outbox, so every event reaches the receiver
once (one id, not once per instance), whichever instance served the request."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest

from harness import DockyardProcess, S3Endpoint, flush_redis, new_bucket
from harness.receiver import Receiver


def _index(n: int) -> bytes:
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [],
            "annotations": {"n": str(n)},
        }
    ).encode()


def test_two_instances_deliver_each_event_once(
    rgw_s3: S3Endpoint, redis_addr: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    bucket = new_bucket(rgw_s3, "events")
    flush_redis(redis_addr)
    receiver = Receiver().start()
    instances: list[DockyardProcess] = []
    try:
        for n in (1, 2):
            work = tmp_path_factory.mktemp(f"events{n}")
            overrides: dict[str, Any] = {
                "storage": {
                    "s3": rgw_s3.storage_config(bucket),
                    "cache": {"blobdescriptor": "redis"},
                    "redirect": {"disable": True},
                },
                "redis": {"addr": redis_addr},
                "http": {"secret": "shared-secret"},
                "notifications": {
                    "endpoints": [{"name": "hook", "url": receiver.url}],
                    "outbox": {"directory": str(work / "outbox"), "pollinterval": "50ms"},
                },
            }
            instances.append(DockyardProcess.launch(work, workers=2, **overrides))
        for i in range(20):
            server = instances[i % 2]
            r = server.push_manifest(
                "shared", f"t{i}", _index(i), "application/vnd.oci.image.index.v1+json"
            )
            assert r.status_code == 201, r.text
        # a tag pushed through one instance, deleted through the other
        r = instances[1].session.delete(instances[1].v2("shared/manifests/t0"))
        assert r.status_code == 202
        events = receiver.wait_for(21, settle=1.5)
        assert len(events) == 21, [(e["action"], e["target"]) for e in events]
        assert len({e["id"] for e in events}) == 21
        pushes = sorted(e["target"]["tag"] for e in events if e["action"] == "push")
        assert pushes == sorted(f"t{i}" for i in range(20))
        assert [e["target"] for e in events if e["action"] == "delete"] == [
            {"repository": "shared", "tag": "t0"}
        ]
        assert len({e["source"]["instanceID"] for e in events}) == 2
    finally:
        receiver.stop()
        for server in instances:
            server.stop()
        with contextlib.suppress(Exception):
            rgw_s3.delete_bucket(bucket)
