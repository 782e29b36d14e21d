"""Notifications: registry:2's envelope and events, the durable outbox, retries, signatures."""

from __future__ import annotations

import json
import time
from typing import Any

from harness.client import sha256
from harness.receiver import Receiver, verify_signature


def notifications(receiver: Receiver, **endpoint: Any) -> dict[str, Any]:
    return {
        "events": {"includereferences": True},
        "endpoints": [
            {
                "name": "test",
                "url": receiver.url,
                "timeout": "2s",
                "threshold": 2,
                "backoff": "50ms",
                "maxbackoff": "200ms",
                **endpoint,
            }
        ],
        "outbox": {"pollinterval": "50ms", "pullflush": "100ms"},
    }


def test_push_pull_delete_events(start_server: Any) -> None:
    receiver = Receiver().start()
    try:
        server = start_server(notifications=notifications(receiver))
        digest, manifest = server.push_image("team/app", "1.0")
        events = receiver.wait_for(3)
        assert [e["action"] for e in events] == ["push"] * 3
        assert receiver.received[0].headers["Content-Type"] == (
            "application/vnd.docker.distribution.events.v1+json"
        )
        # registry:2's indentation
        assert receiver.received[0].body.startswith(b'{\n   "events": [\n      {\n')
        config_push, layer_push, manifest_push = events
        assert config_push["target"] == {
            "mediaType": "application/octet-stream",
            "size": manifest["config"]["size"],
            "digest": manifest["config"]["digest"],
            "length": manifest["config"]["size"],
            "repository": "team/app",
            "url": f"{server.url}/v2/team/app/blobs/{manifest['config']['digest']}",
        }
        assert layer_push["target"]["digest"] == manifest["layers"][0]["digest"]
        body = json.dumps(manifest).encode()
        assert manifest_push["target"] == {
            "mediaType": manifest["mediaType"],
            "size": len(body),
            "digest": digest,
            "length": len(body),
            "repository": "team/app",
            "url": f"{server.url}/v2/team/app/manifests/{digest}",
            "tag": "1.0",
            "references": [
                {k: manifest["config"][k] for k in ("mediaType", "size", "digest")},
                {k: manifest["layers"][0][k] for k in ("mediaType", "size", "digest")},
            ],
        }
        for e in events:
            assert set(e) == {"id", "timestamp", "action", "target", "request", "actor", "source"}
            assert e["actor"] == {}
            assert set(e["request"]) == {"id", "addr", "host", "method", "useragent"}
            assert set(e["source"]) == {"addr", "instanceID"}
            assert e["timestamp"].endswith("Z")

        # pulls: GET and HEAD of the manifest (by tag), HEAD of a blob; a 304 is no pull
        server.session.get(server.v2("team/app/manifests/1.0")).raise_for_status()
        server.session.head(server.v2(f"team/app/manifests/{digest}")).raise_for_status()
        r = server.session.get(
            server.v2("team/app/manifests/1.0"), headers={"If-None-Match": f'"{digest}"'}
        )
        assert r.status_code == 304
        server.session.head(server.v2(f"team/app/blobs/{manifest['config']['digest']}"))
        events = receiver.wait_for(6, settle=0.5)[3:]
        assert [(e["action"], e["request"]["method"]) for e in events] == [
            ("pull", "GET"),
            ("pull", "HEAD"),
            ("pull", "HEAD"),
        ]
        assert events[0]["target"]["tag"] == "1.0"
        assert "tag" not in events[1]["target"]

        # mount, then deletes: by digest (with its tags), a tag, a blob
        r = server.session.post(
            server.v2("other/app/blobs/uploads/"),
            params={"mount": manifest["config"]["digest"], "from": "team/app"},
        )
        assert r.status_code == 201
        server.push_manifest("team/app", "2.0", body).raise_for_status()
        server.session.delete(server.v2(f"team/app/manifests/{digest}")).raise_for_status()
        other, _ = server.push_image("team/app", "3.0")
        server.session.delete(server.v2("team/app/manifests/3.0")).raise_for_status()
        layer = manifest["layers"][0]["digest"]
        server.session.delete(server.v2(f"team/app/blobs/{layer}")).raise_for_status()
        events = receiver.wait_for(16, settle=0.5)[6:]
        assert len(events) == 10
        assert events[0]["action"] == "mount"
        assert events[0]["target"]["fromRepository"] == "team/app"
        assert events[0]["target"]["repository"] == "other/app"
        assert [(e["action"], e["target"]) for e in events[1:3]] == [
            ("push", events[1]["target"]),
            ("delete", {"digest": digest, "repository": "team/app"}),
        ]
        deleted_tags = sorted(e["target"]["tag"] for e in events[3:5])
        assert deleted_tags == ["1.0", "2.0"]
        assert [e["action"] for e in events[5:8]] == ["push"] * 3
        assert events[7]["target"]["digest"] == other
        assert [(e["action"], e["target"]) for e in events[8:]] == [
            ("delete", {"repository": "team/app", "tag": "3.0"}),
            ("delete", {"digest": layer, "repository": "team/app"}),
        ]
    finally:
        receiver.stop()


def test_ignore_filters(start_server: Any) -> None:
    receiver = Receiver().start()
    try:
        server = start_server(
            notifications=notifications(
                receiver,
                ignoredmediatypes=["application/octet-stream"],
                ignore={"actions": ["pull"]},
            )
        )
        server.push_image("a", "1")
        server.session.get(server.v2("a/manifests/1")).raise_for_status()
        server.push_image("a", "2")
        events = receiver.wait_for(2, settle=0.5)
        assert [(e["action"], e["target"]["tag"]) for e in events] == [
            ("push", "1"),
            ("push", "2"),
        ]
    finally:
        receiver.stop()


def test_receiver_down_then_up_gets_everything_in_order(start_server: Any) -> None:
    receiver = Receiver()  # not started: down
    server = start_server(
        notifications=notifications(receiver, ignoredmediatypes=["application/octet-stream"])
    )
    pushed = []
    for i in range(100):
        body = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "manifests": [],
                "annotations": {"n": str(i)},
            }
        ).encode()
        r = server.push_manifest("many", f"t{i}", body, "application/vnd.oci.image.index.v1+json")
        assert r.status_code == 201, r.text
        pushed.append(sha256(body))
    receiver.start()
    try:
        events = receiver.wait_for(100, timeout=30, settle=0.5)
        assert [e["target"]["digest"] for e in events] == pushed
        assert [e["target"]["tag"] for e in events] == [f"t{i}" for i in range(100)]
        assert len({e["id"] for e in events}) == 100
    finally:
        receiver.stop()


def test_hmac_signature_with_two_keys(start_server: Any) -> None:
    receiver = Receiver().start()
    try:
        server = start_server(notifications=notifications(receiver, secrets=["new-key", "old-key"]))
        server.push_blob("signed", b"x" * 10)
        receiver.wait_for(1)
        received = receiver.received[0]
        header = received.headers["Dockyard-Signature"]
        assert verify_signature(header, received.body, "new-key")
        assert verify_signature(header, received.body, "old-key")
        assert not verify_signature(header, received.body, "other")
        assert not verify_signature(header, received.body + b" ", "new-key")
    finally:
        receiver.stop()


def test_custom_headers_and_disabled_endpoint(start_server: Any) -> None:
    receiver = Receiver().start()
    off = Receiver().start()
    try:
        config = notifications(receiver, headers={"Authorization": ["Bearer abc"], "X-One": "1"})
        config["endpoints"].append({"name": "off", "url": off.url, "disabled": True})
        server = start_server(notifications=config)
        server.push_blob("h", b"y" * 10)
        receiver.wait_for(1, settle=0.3)
        assert receiver.received[0].headers["Authorization"] == "Bearer abc"
        assert receiver.received[0].headers["X-One"] == "1"
        assert off.received == []
    finally:
        receiver.stop()
        off.stop()


def _events_cli(server: Any, *args: str) -> Any:
    from click.testing import CliRunner

    from dockyard.cli import main

    result = CliRunner().invoke(main, ["events", str(server.config_path), *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.output) if "--json" in args else result.output


def test_cli_status_and_replay_keeps_ids(start_server: Any) -> None:
    receiver = Receiver().start()
    try:
        server = start_server(notifications=notifications(receiver))
        server.push_blob("r", b"1" * 10)
        server.push_blob("r", b"2" * 10)
        first = receiver.wait_for(2, settle=0.3)
        status = _events_cli(server, "--json")["endpoints"][0]
        assert (status["endpoint"], status["delivered"], status["backlog"]) == ("test", 2, 0)
        assert "test" in _events_cli(server)  # the table
        assert _events_cli(server, "--replay-from", "1h", "--json")["events"] == 2
        again = receiver.wait_for(4, settle=0.3)[2:]
        assert [e["id"] for e in again] == [e["id"] for e in first]
        future = _events_cli(server, "--replay-from", "2099-01-01T00:00:00Z", "--json")
        assert future["events"] == 0
    finally:
        receiver.stop()


def test_backlog_bound_drops_the_oldest(start_server: Any) -> None:
    receiver = Receiver()  # down
    config = notifications(receiver)
    config["outbox"]["maxbytes"] = 8192
    server = start_server(notifications=config)
    for i in range(40):
        body = json.dumps({"schemaVersion": 2, "manifests": [], "annotations": {"n": str(i)}})
        r = server.push_manifest(
            "bound", f"t{i}", body.encode(), "application/vnd.oci.image.index.v1+json"
        )
        assert r.status_code == 201
    deadline = time.monotonic() + 10
    while True:  # the delivery loop applies the bound after each failed attempt
        status = _events_cli(server, "--json")["endpoints"][0]
        if status["dropped"] and status["backlog_bytes"] <= 8192:
            break
        assert time.monotonic() < deadline, f"the bound is not applied: {status}"
        time.sleep(0.1)
    assert status["failures"] > 0 and status["last_error"]
    receiver.start()
    try:
        events = receiver.wait_for(40 - status["dropped"], settle=0.5)
        tags = [e["target"]["tag"] for e in events]
        # the newest, in order, with no gap; the oldest are gone
        assert tags == [f"t{i}" for i in range(40 - len(tags), 40)]
        assert 5 < len(tags) < 40
    finally:
        receiver.stop()
