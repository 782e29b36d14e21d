"""Notifications against real clients and a real receiver: the events Dockyard sends for a
skopeo push, a pull, a cross-repository mount and deletes are the ones registry:2 sends for the
same operations (both run side by side with the same endpoint configuration); a push event
survives kill -9; several workers deliver each event once."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from harness import OciLayout, Push, Registry2Factory, gzip_layer, needs_skopeo, push
from harness.receiver import Receiver
from harness.skopeo import MANIFEST_ACCEPT, skopeo

#: registry:2's keys only: the same section for both registries
REGISTRY2_SECTION: dict[str, Any] = {
    "events": {"includereferences": True},
    "endpoints": [{"name": "hook", "timeout": "2s", "threshold": 3, "backoff": "100ms"}],
}


def section(receiver: Receiver, dockyard: bool = False) -> dict[str, Any]:
    config = json.loads(json.dumps(REGISTRY2_SECTION))
    config["endpoints"][0]["url"] = receiver.url
    if dockyard:
        config["outbox"] = {"pollinterval": "50ms", "pullflush": "100ms"}
    return config


def normalise(event: dict[str, Any], base: str) -> dict[str, Any]:
    """What must match: action, target (URLs relative to the registry), request method and
    user agent, actor. Ids, timestamps, addresses and hosts differ by nature."""
    target = dict(event["target"])
    if "url" in target:
        assert target["url"].startswith(base + "/v2/"), target["url"]
        target["url"] = target["url"][len(base) :]
    return {
        "action": event["action"],
        "target": target,
        "method": event["request"]["method"],
        "useragent": event["request"]["useragent"],
        "actor": event["actor"],
    }


def settled(receiver: Receiver, quiet: float = 1.5, timeout: float = 30) -> list[dict]:
    """The events once none has arrived for ``quiet`` seconds."""
    deadline = time.monotonic() + timeout
    count, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        now = len(receiver.events())
        if now != count:
            count, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            break
        time.sleep(0.05)
    return receiver.events()


class Side:
    def __init__(self, registry: Any, receiver: Receiver) -> None:
        self.registry, self.receiver, self.seen = registry, receiver, 0

    def phase(self) -> list[dict[str, Any]]:
        """The events of the last phase, normalised, in a stable order (skopeo sends blobs in
        parallel, so their order is the client's, not the registry's)."""
        events = settled(self.receiver)[self.seen :]
        self.seen += len(events)
        out = [normalise(e, self.registry.url) for e in events]
        return sorted(out, key=lambda e: json.dumps(e, sort_keys=True))


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> OciLayout:
    out = OciLayout(tmp_path_factory.mktemp("oci-layout"))
    shared = gzip_layer(5000)
    out.tag("a", out.image("amd64", [shared, gzip_layer(3000)]))
    out.tag("b", out.image("amd64", [shared, gzip_layer(4000)]))
    return out


@needs_skopeo
def test_same_events_as_registry2(
    start_server: Any, start_registry2: Registry2Factory, layout: OciLayout, tmp_path: Path
) -> None:
    receivers = [Receiver().start(), Receiver().start()]
    try:
        dockyard = start_server(notifications=section(receivers[0], dockyard=True))
        registry2 = start_registry2(root=tmp_path / "r2", notifications=section(receivers[1]))
        sides = [Side(dockyard, receivers[0]), Side(registry2, receivers[1])]

        def both(operation: Any) -> list[dict[str, Any]]:
            results = []
            for side in sides:
                operation(side.registry)
            for side in sides:
                results.append(side.phase())
            assert results[0] == results[1], json.dumps(results, indent=1)
            return results[0]

        # a skopeo push: config and layers, then the manifest by tag
        digests: dict[str, str] = {}

        def push_a(r: Any) -> None:
            digests[r.url] = push(r, layout, Push("team/app", "1.0", "a"), tmp_path / r.url[-5:])

        events = both(push_a)
        assert sorted(e["action"] for e in events) == ["push"] * 4
        assert any(e["target"].get("tag") == "1.0" for e in events)

        # a skopeo pull of the tag
        def pull(r: Any) -> None:
            skopeo(
                "copy",
                "--quiet",
                "--src-tls-verify=false",
                f"docker://{r.host}/team/app:1.0",
                f"dir:{tmp_path / ('pulled-' + r.url[-5:])}",
            )

        events = both(pull)
        assert events and {e["action"] for e in events} == {"pull"}

        # a cross-repository mount of the shared layer (the manifest, read to find it, is a pull)
        layers: dict[str, str] = {}

        def mount(r: Any) -> None:
            manifest = requests.get(
                r.v2("team/app/manifests/1.0"), headers={"Accept": MANIFEST_ACCEPT}, timeout=10
            ).json()
            layers[r.url] = manifest["layers"][0]["digest"]
            answer = requests.post(
                r.v2("other/app/blobs/uploads/"),
                params={"mount": layers[r.url], "from": "team/app"},
                timeout=10,
            )
            assert answer.status_code == 201, answer.text

        events = both(mount)
        assert sorted((e["action"], e["target"].get("fromRepository")) for e in events) == [
            ("mount", "team/app"),
            ("pull", None),
        ]
        layer = layers[dockyard.url]
        assert layer == layers[registry2.url]

        # a second tag on the image, then a delete by digest: the manifest and both tags
        def tag_and_delete(r: Any) -> None:
            body = requests.get(
                r.v2("team/app/manifests/1.0"), headers={"Accept": MANIFEST_ACCEPT}, timeout=10
            )
            answer = requests.put(
                r.v2("team/app/manifests/2.0"),
                data=body.content,
                headers={"Content-Type": body.headers["Content-Type"]},
                timeout=10,
            )
            assert answer.status_code == 201
            answer = requests.delete(r.v2(f"team/app/manifests/{digests[r.url]}"), timeout=10)
            assert answer.status_code == 202, answer.text

        events = both(tag_and_delete)
        deletes = [e["target"] for e in events if e["action"] == "delete"]
        assert len(deletes) == 3 and sorted(t.get("tag", "") for t in deletes) == ["", "1.0", "2.0"]

        # a blob delete
        def delete_blob(r: Any) -> None:
            answer = requests.delete(r.v2(f"other/app/blobs/{layer}"), timeout=10)
            assert answer.status_code == 202, answer.text

        events = both(delete_blob)
        assert events == [
            {
                "action": "delete",
                "target": {"digest": layer, "repository": "other/app"},
                "method": "DELETE",
                "useragent": events[0]["useragent"],
                "actor": {},
            }
        ]

        # delete by tag: registry:2 2.8 refuses it; Dockyard accepts it and sends distribution
        # 3's event, one {repository, tag}
        for side in sides:
            push(side.registry, layout, Push("team/app", "3.0", "b"), tmp_path / "b")
            side.phase()
        answer = requests.delete(registry2.v2("team/app/manifests/3.0"), timeout=10)
        assert answer.status_code >= 400
        answer = requests.delete(dockyard.v2("team/app/manifests/3.0"), timeout=10)
        assert answer.status_code == 202
        events = sides[0].phase()
        assert [(e["action"], e["target"]) for e in events] == [
            ("delete", {"repository": "team/app", "tag": "3.0"})
        ]
    finally:
        for receiver in receivers:
            receiver.stop()


def _tiny_index(n: int) -> bytes:
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [],
            "annotations": {"n": str(n)},
        }
    ).encode()


def test_push_event_survives_kill9(start_server: Any) -> None:
    receiver = Receiver()  # down: nothing can be delivered before the kill
    config = {
        "endpoints": [{"name": "hook", "url": receiver.url, "backoff": "100ms"}],
        "outbox": {"pollinterval": "50ms"},
    }
    server = start_server(notifications=config, process=True)
    r = server.push_manifest(
        "crash", "1", _tiny_index(1), "application/vnd.oci.image.index.v1+json"
    )
    assert r.status_code == 201
    server.restart(signal.SIGKILL)
    receiver.start()
    try:
        events = receiver.wait_for(1, settle=1.0)
        assert [(e["action"], e["target"]["tag"]) for e in events] == [("push", "1")]
    finally:
        receiver.stop()


def test_several_workers_deliver_each_event_once(start_server: Any) -> None:
    receiver = Receiver().start()
    try:
        config = {
            "endpoints": [{"name": "hook", "url": receiver.url}],
            "outbox": {"pollinterval": "50ms"},
        }
        server = start_server(notifications=config, workers=2)
        for i in range(40):  # new connections: spread over both workers
            r = requests.put(
                server.v2(f"multi/manifests/t{i}"),
                data=_tiny_index(i),
                headers={"Content-Type": "application/vnd.oci.image.index.v1+json"},
                timeout=10,
            )
            assert r.status_code == 201
        events = settled(receiver)
        assert sorted(e["target"]["tag"] for e in events) == sorted(f"t{i}" for i in range(40))
        assert len({e["id"] for e in events}) == 40
        assert len({e["source"]["instanceID"] for e in events}) == 1
    finally:
        receiver.stop()
