"""Delete events made outside a request (``events.deletes``): the same events an API delete
makes, appended to the outbox by whatever process deleted, beside the server's workers."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

from dockyard.config import validate
from dockyard.events.deletes import delete_listener, record_deletes
from dockyard.events.outbox import Outbox, outbox_directory

DIGEST = "sha256:" + "a" * 64


def config(root: Path, endpoints: list[dict[str, Any]]) -> Any:
    return validate(
        {
            "version": "0.1",
            "storage": {"filesystem": {"rootdirectory": str(root)}},
            "http": {"addr": ":5000"},
            "notifications": {"endpoints": endpoints},
        }
    )


def events_in(c: Any) -> list[dict[str, Any]]:
    return [event for _, event in Outbox(outbox_directory(c)).events()]


def test_a_manifest_and_its_tags_make_registry2_delete_events(tmp_path: Path) -> None:
    c = config(tmp_path, [{"name": "ci", "url": "http://127.0.0.1:9/hook"}])
    assert record_deletes(c, "team/app", digests=[DIGEST], tags=["1.0", "latest"]) == 3
    assert record_deletes(c, "team/app", tags=["old"], actor="dockyard rm", command="rm") == 1
    events = events_in(c)
    assert [e["action"] for e in events] == ["delete"] * 4
    assert [e["target"] for e in events] == [
        {"digest": DIGEST, "repository": "team/app"},
        {"repository": "team/app", "tag": "1.0"},
        {"repository": "team/app", "tag": "latest"},
        {"repository": "team/app", "tag": "old"},
    ]
    first = events[0]
    assert list(first) == ["id", "timestamp", "action", "target", "request", "actor", "source"]
    assert first["actor"] == {"name": "dockyard retention"}
    assert first["request"]["method"] == "DELETE"
    assert first["request"]["addr"] == "" and first["request"]["useragent"].endswith(" retention")
    assert events[3]["actor"] == {"name": "dockyard rm"}
    assert first["source"]["addr"].endswith(":5000")
    assert len({e["id"] for e in events}) == 4


def test_nothing_is_written_when_no_endpoint_wants_deletes(tmp_path: Path) -> None:
    none = config(tmp_path / "a", [])
    assert record_deletes(none, "r", tags=["x"]) == 0
    assert not os.path.exists(outbox_directory(none))
    ignoring = config(
        tmp_path / "b",
        [
            {"name": "x", "url": "http://h/", "ignore": {"actions": ["delete"]}},
            {"name": "y", "url": "http://h/", "disabled": True},
        ],
    )
    assert record_deletes(ignoring, "r", digests=[DIGEST]) == 0


def test_the_listener_records_each_deletion(tmp_path: Path) -> None:
    c = config(tmp_path, [{"name": "ci", "url": "http://127.0.0.1:9/hook"}])
    listener = delete_listener(c, "dockyard retention (scheduled)")

    async def deletions() -> None:
        await listener("team/app", DIGEST, ["a"])
        await listener("team/app", None, ["b"])

    asyncio.run(deletions())
    events = events_in(c)
    assert [e["target"].get("tag") or e["target"]["digest"] for e in events] == [DIGEST, "a", "b"]
    assert events[0]["actor"] == {"name": "dockyard retention (scheduled)"}


def test_appends_from_other_processes_never_interleave(tmp_path: Path) -> None:
    """A command appending while the workers do: each batch is one O_APPEND write of whole
    lines, which the file system never interleaves, so no lock is needed."""
    c = config(tmp_path, [{"name": "ci", "url": "http://127.0.0.1:9/hook"}])
    children = []
    for writer in range(3):
        pid = os.fork()
        if pid == 0:
            try:
                for i in range(100):
                    # batches of different sizes, some larger than a pipe buffer
                    tags = [f"w{writer}-{i}-{j}-" + "x" * (i * 50) for j in range(1 + i % 4)]
                    record_deletes(c, f"repo{writer}", tags=tags)
            finally:
                os._exit(0)
        children.append(pid)
    for pid in children:
        assert os.waitpid(pid, 0)[1] == 0
    with open(Outbox(outbox_directory(c)).path, "rb") as f:
        lines = f.read().splitlines()
    events = [json.loads(line) for line in lines]  # every line whole
    assert len(events) == 3 * sum(1 + i % 4 for i in range(100))
    for writer in range(3):
        mine = [e["target"]["tag"] for e in events if e["target"]["repository"] == f"repo{writer}"]
        assert mine == [
            f"w{writer}-{i}-{j}-" + "x" * (i * 50) for i in range(100) for j in range(1 + i % 4)
        ]
