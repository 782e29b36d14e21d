"""The notifications section (registry:2's keys and defaults, distribution 3's ignore rules)
and the pieces of the envelope that need no server."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from typing import Any

import pytest

from dockyard.config import ConfigError, validate
from dockyard.events.delivery import envelope_body, signature
from dockyard.events.envelope import new_id, references_of, rfc3339
from dockyard.events.outbox import Outbox


def config(notifications: dict[str, Any]) -> Any:
    return validate(
        {
            "version": "0.1",
            "storage": {"filesystem": {"rootdirectory": "/tmp/x"}},
            "notifications": notifications,
        }
    )


def test_registry2_defaults_and_keys(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        c = config(
            {
                "events": {"includereferences": True},
                "endpoints": [
                    {
                        "name": "a",
                        "url": "http://hook.example/x",
                        "headers": {"Authorization": ["Bearer x"], "X-One": "1"},
                        "timeout": "0s",
                        "threshold": 0,
                        "ignoredmediatypes": ["application/octet-stream"],
                        "ignore": {"mediatypes": ["text/plain"], "actions": ["pull"]},
                        "unknownkey": 1,
                    },
                    {"name": "b", "url": "https://x", "disabled": True, "timeout": "3s"},
                ],
            }
        )
    n = c.notifications
    a = n.endpoints[0]
    assert n.events.includereferences
    assert a.headers == {"Authorization": ["Bearer x"], "X-One": ["1"]}
    assert (a.effective_timeout, a.effective_threshold, a.effective_backoff) == (1.0, 10, 1.0)
    assert n.endpoints[1].effective_timeout == 3.0
    assert [e.name for e in n.active] == ["a"]
    assert a.ignored_media_types == {"application/octet-stream", "text/plain"}
    assert "has no effect" not in caplog.text
    assert "notifications.endpoints.0.unknownkey" in caplog.text


def test_ignore_rules_are_distribution3s() -> None:
    c = config({"endpoints": [{"name": "a", "url": "http://h", "ignore": {"actions": ["pull"]}}]})
    endpoint = c.notifications.endpoints[0]
    # 2.8 needed media types for ignore.actions to apply; distribution 3 does not
    assert endpoint.ignores({"action": "pull", "target": {"mediaType": "x"}})
    assert not endpoint.ignores({"action": "push", "target": {"mediaType": "x"}})
    c = config({"endpoints": [{"name": "a", "url": "http://h", "ignoredmediatypes": ["x"]}]})
    endpoint = c.notifications.endpoints[0]
    assert endpoint.ignores({"action": "push", "target": {"mediaType": "x"}})
    assert not endpoint.ignores({"action": "delete", "target": {"repository": "r"}})


@pytest.mark.parametrize(
    "endpoints, key",
    [
        ([{"name": "a", "url": "ftp://h"}], "notifications.endpoints.0.url"),
        ([{"name": "a", "url": "http://h", "ignore": {"actions": ["get"]}}], "actions"),
        ([{"name": "a", "url": "http://h"}, {"name": "a", "url": "http://i"}], "endpoints"),
        ([{"url": "http://h"}], "name"),
    ],
)
def test_invalid_endpoints(endpoints: list[dict[str, Any]], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        config({"endpoints": endpoints})
    assert key in str(info.value)


def test_signature_covers_timestamp_and_body_with_every_key() -> None:
    body = envelope_body({"id": "1"})
    header = signature(["new", "old"], body, timestamp=1700000000)
    t, v1, v1_old = header.split(",")
    assert t == "t=1700000000"
    for part, key in ((v1, "new"), (v1_old, "old")):
        expected = hmac.new(key.encode(), b"1700000000." + body, hashlib.sha256).hexdigest()
        assert part == f"v1={expected}"


def test_envelope_body_is_registry2s_indentation() -> None:
    assert (
        envelope_body({"id": "1"})
        == b'{\n   "events": [\n      {\n         "id": "1"\n      }\n   ]\n}'
    )


def test_rfc3339_is_gos_nano_format() -> None:
    assert rfc3339(1_700_000_000_123_456_789) == "2023-11-14T22:13:20.123456789Z"
    assert rfc3339(1_700_000_000_120_000_000) == "2023-11-14T22:13:20.12Z"
    assert rfc3339(1_700_000_000_000_000_000) == "2023-11-14T22:13:20Z"


def test_references_config_then_layers_or_manifests() -> None:
    image = {
        "config": {"mediaType": "c", "digest": "sha256:1", "size": 1},
        "layers": [{"mediaType": "l", "digest": "sha256:2", "size": 2, "urls": ["http://u"]}],
    }
    assert references_of(json.dumps(image).encode()) == [
        {"mediaType": "c", "size": 1, "digest": "sha256:1"},
        {"mediaType": "l", "size": 2, "digest": "sha256:2", "urls": ["http://u"]},
    ]
    index = {"manifests": [{"mediaType": "m", "digest": "sha256:3", "size": 3, "platform": {}}]}
    assert references_of(json.dumps(index).encode()) == [
        {"mediaType": "m", "size": 3, "digest": "sha256:3"}
    ]


def test_outbox_lines_holes_and_partial_writes(tmp_path: Any) -> None:
    outbox = Outbox(str(tmp_path))
    outbox.append([{"n": 1}, {"n": 2}], durable=True)
    outbox.append([{"n": 3}], durable=False)
    with open(outbox.path, "ab") as f:
        f.write(b'{"n": 4')  # a line still being written is not read
    lines = outbox.read(0)
    assert [json.loads(line)["n"] for _, line in lines] == [1, 2, 3]
    second = lines[0][0]
    assert outbox.line_start_after(second - 1) == second
    assert outbox.line_start_after(second) == second
    assert outbox.count_lines(second, lines[-1][0]) == 2
    outbox.reclaim(second)
    assert outbox.reclaimed() == second
    assert [json.loads(line)["n"] for _, line in outbox.read(0) if line] == [2, 3]


def test_event_ids_are_version_4_uuids_unique_across_forked_workers() -> None:
    import os
    import uuid

    for _ in range(1000):
        text = new_id()
        parsed = uuid.UUID(text)
        assert str(parsed) == text
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122
    # workers are forked from one process: each must draw other ids
    read, write = os.pipe()
    children = []
    for _ in range(2):
        pid = os.fork()
        if pid == 0:
            os.write(write, ("\n".join(new_id() for _ in range(100)) + "\n").encode())
            os._exit(0)
        children.append(pid)
    os.close(write)
    for pid in children:
        os.waitpid(pid, 0)
    with os.fdopen(read) as pipe:
        ids = pipe.read().split()
    assert len(ids) == 200 and len(set(ids)) == 200


def test_an_event_line_is_the_compact_json_of_the_event() -> None:
    """The pull path writes pre-serialised lines: they must parse to what :func:`event` makes,
    field for field and in registry:2's order, whatever a client put in its headers."""
    import json

    from dockyard.events import envelope

    target = envelope.target(
        media_type="application/vnd.oci.image.manifest.v1+json",
        size=12,
        digest="sha256:" + "a" * 64,
        repository="team/app",
        url="https://r.example/v2/team/app/manifests/sha256:" + "a" * 64,
        tag='we"ird\\tag\n',
    )
    request = {"id": "r", "addr": "[::1]:5", "host": "h", "method": "GET", "useragent": '"\x00<b>'}
    source = {"addr": "host:5000", "instanceID": "i"}
    for actor in (None, 'al"ice'):
        line = envelope.event_line(
            "pull",
            envelope.compact(target),
            envelope.compact(request),
            actor,
            envelope.compact(source),
        )
        assert line.endswith("\n") and line.count("\n") == 1
        assert envelope.request_json(request) == envelope.compact(request)
        parsed = json.loads(line)
        expected = envelope.event("pull", target, request, actor, source)
        assert list(parsed) == list(expected)
        assert {k: v for k, v in parsed.items() if k not in ("id", "timestamp")} == {
            k: v for k, v in expected.items() if k not in ("id", "timestamp")
        }


def test_recent_json_is_bounded_in_entries_and_in_what_clients_send() -> None:
    from dockyard.events import _RecentJSON

    recent = _RecentJSON()
    for i in range(recent.ENTRIES + 10):
        recent.put(("k", str(i)), "{}")
    assert recent.get(("k", "0")) is None  # the least recently used went first
    assert recent.get(("k", str(recent.ENTRIES + 9))) == "{}"
    assert len(recent._texts) == recent.ENTRIES
    huge = "x" * (recent.LARGEST + 1)
    assert recent.put(("k", huge), "{}") == "{}"  # answered, not kept
    assert recent.get(("k", huge)) is None
    assert recent.put(("k", "big"), huge) == huge
    assert recent.get(("k", "big")) is None
