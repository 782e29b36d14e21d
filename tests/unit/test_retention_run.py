"""Running retention on a filesystem store through the model (``registry.retention_run``):
snapshots from the layout and from the metadata index, the safety rules (first run, share,
the second look, the guard at deletion), audit lines, delete events, and the schedule."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dockyard.config import PolicyConfig, validate
from dockyard.oci.digest import Digest
from dockyard.registry import layout
from dockyard.registry.index import MetadataIndex
from dockyard.registry.lease import Lease, LeaseBusy
from dockyard.registry.records import RepositorySnapshot
from dockyard.registry.repository import Registry
from dockyard.registry.retention import RetentionPolicy, plan
from dockyard.registry.retention_run import (
    RepositoryRun,
    apply_plan,
    layout_snapshot,
    record_confirmation,
    run_retention,
    snapshot_source,
)
from dockyard.storage.filesystem import FilesystemDriver
from dockyard.storage.store import Store

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DAY = 86400.0


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path


def open_registry(root: Path, index: MetadataIndex | None = None) -> Registry:
    store = Store(FilesystemDriver(str(root), max_threads=8))
    return Registry(store, secret="s", delete_enabled=True, index=index)


@pytest.fixture
def registry(root: Path) -> Iterator[Registry]:
    registry = open_registry(root)
    yield registry
    run(registry.close())


async def put_blob(registry: Registry, name: str, data: bytes) -> dict[str, Any]:
    digest = Digest.from_bytes(data)
    await registry.blobs.put(digest, data)
    await registry.repository(name).blobs.link(digest)
    return {"mediaType": "application/octet-stream", "digest": str(digest), "size": len(data)}


async def push(
    registry: Registry,
    name: str,
    tag: str | None,
    n: int,
    *,
    subject: Digest | None = None,
    children: list[Digest] | None = None,
) -> Digest:
    repo = registry.repository(name)
    if children is not None:
        body: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {
                    "mediaType": OCI_MANIFEST,
                    "digest": str(c),
                    "size": len(await registry.blobs.read(c)),
                }
                for c in children
            ],
        }
        media_type = OCI_INDEX
    else:
        body = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": await put_blob(registry, name, f'{{"n":{n}}}'.encode()),
            "layers": [await put_blob(registry, name, f"layer {n}".encode())],
        }
        media_type = OCI_MANIFEST
    if subject is not None:
        body["subject"] = {
            "mediaType": OCI_MANIFEST,
            "digest": str(subject),
            "size": len(await registry.blobs.read(subject)),
        }
        body["artifactType"] = "application/vnd.example.signature"
    data = json.dumps(body).encode()
    pushed = await repo.manifests.put(data, media_type, None, [tag] if tag else [])
    return pushed.digest


def age(root: Path, path: str, days: float) -> None:
    when = time.time() - days * DAY
    os.utime(root / path.lstrip("/"), (when, when))


def age_tag(root: Path, name: str, tag: str, days: float, revision: Digest | None = None) -> None:
    """Pushed ``days`` ago: the tag's link and, given, its manifest's revision link."""
    age(root, layout.tag_current_link(name, tag), days)
    if revision is not None:
        age(root, layout.revision_link(name, revision), days)


def policies(**retention: Any) -> list[PolicyConfig]:
    return [PolicyConfig(repositories=["team/*"], retention=retention)]


async def build(registry: Registry, root: Path) -> dict[str, Digest]:
    """team/app: ten tags pushed 0..9 days ago (t0..t9), t9's manifest signed, and an index
    "multi" pushed 9 days ago over two children of its own."""
    made: dict[str, Digest] = {}
    for i in range(10):
        made[f"t{i}"] = await push(registry, "team/app", f"t{i}", i)
    made["sig"] = await push(registry, "team/app", None, 100, subject=made["t9"])
    children = [await push(registry, "team/app", None, 200 + i) for i in range(2)]
    made["multi"] = await push(registry, "team/app", "multi", 0, children=children)
    made["child0"], made["child1"] = children
    for i in range(10):
        age_tag(root, "team/app", f"t{i}", i, made[f"t{i}"])
    for what in ("sig", "child0", "child1"):
        age(root, layout.revision_link("team/app", made[what]), 9)
    age_tag(root, "team/app", "multi", 9, made["multi"])
    return made


def present(root: Path, name: str, digest: Digest) -> bool:
    return (root / layout.revision_link(name, digest).lstrip("/")).exists()


def tags(root: Path, name: str) -> set[str]:
    return set(os.listdir(root / layout.tags_dir(name).lstrip("/")))


# -- snapshots --------------------------------------------------------------------------------


def test_the_layout_snapshot_reads_times_and_references(registry: Registry, root: Path) -> None:
    made = run(build(registry, root))
    # a pull of t5 five minutes ago stamped its revision link
    age(root, layout.revision_link("team/app", made["t5"]), 5 / 1440)
    snap = run(layout_snapshot(registry.storage, "team/app"))
    by_tag = {t.tag: t for t in snap.tags}
    assert sorted(by_tag) == ["multi", *(f"t{i}" for i in range(10))]
    assert abs(by_tag["t3"].pushed - (time.time() - 3 * DAY)) < 60
    assert by_tag["t3"].pulled is None  # its revision link is as old as the push
    assert by_tag["t5"].pulled is not None and time.time() - by_tag["t5"].pulled < 400
    assert snap.manifests[made["sig"]].subject == made["t9"]
    assert snap.manifests[made["multi"]].children == (made["child0"], made["child1"])
    assert len(snap.manifests) == 14


def test_index_snapshots_give_pull_times(root: Path) -> None:
    """With the metadata index, pull times are the index's; a repository it does not hold yet
    is indexed from the layout first."""
    bare = open_registry(root)
    made = run(build(bare, root))
    run(bare.close())
    index = MetadataIndex(str(root / "index.sqlite3"))
    registry = open_registry(root, index)

    async def go() -> Any:
        source = snapshot_source(registry)
        first = await source("team/app")  # indexed now, from the layout
        await index.set_pulled("team/app", made["t8"], time.time() - DAY)
        return first, await source("team/app")

    try:
        first, snap = run(go())
        assert {t.tag for t in first.tags} == {t.tag for t in snap.tags}
        pulled = {t.tag: t.pulled for t in snap.tags}
        assert pulled["t8"] is not None and pulled["t7"] is None
        report = run(
            run_retention(
                registry,
                policies(keeplatest=2, keeppulledwithin="2d"),
                confirm=True,
            )
        )
    finally:
        run(registry.close())
    deleted = set(report.repositories[0].deleted_tags)
    assert deleted == {"t2", "t3", "t4", "t5", "t6", "t7", "t9", "multi"}


# -- whole runs -------------------------------------------------------------------------------


def test_first_run_reports_then_confirm_applies_and_records(
    registry: Registry, root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    made = run(build(registry, root))
    rules = policies(keeplatest=3, keeppushedwithin="5d12h", maxshare=0.7)
    before = tags(root, "team/app")

    dry = run(run_retention(registry, rules, dry_run=True))
    (repo,) = dry.repositories
    assert repo.withheld is not None and "first run" in repo.withheld
    assert {v.tag for v in repo.plan.deleted_tags} == {"t6", "t7", "t8", "t9", "multi"}
    assert tags(root, "team/app") == before

    first = run(run_retention(registry, rules))
    assert first.withheld and first.repositories[0].deleted_tags == []
    assert tags(root, "team/app") == before
    assert not (root / "dockyard" / "retention").exists()

    events: list[tuple[str, Digest | None, list[str]]] = []

    async def listener(name: str, digest: Digest | None, removed: Any) -> None:
        events.append((name, digest, list(removed)))

    with caplog.at_level(logging.INFO, logger="dockyard.audit"):
        confirmed = run(run_retention(registry, rules, confirm=True, deletions=listener))
    (repo,) = confirmed.repositories
    assert repo.withheld is None and repo.errors == [] and repo.spared == []
    assert sorted(repo.deleted_tags) == ["multi", "t6", "t7", "t8", "t9"]
    doomed = ["t6", "t7", "t8", "t9", "sig", "multi", "child0", "child1"]
    assert set(repo.deleted_manifests) == {made[x] for x in doomed}
    assert tags(root, "team/app") == {f"t{i}" for i in range(6)}
    for name, digest in made.items():
        assert present(root, "team/app", digest) == (name not in doomed), name
    policy = RetentionPolicy.from_config(rules[0])
    assert policy is not None and confirmed.confirmed == [policy.id]
    record = json.loads((root / "dockyard/retention" / policy.id).read_text())
    assert record["policy"] == ["team/*"] and record["rules"]["keeppushedwithin"] == "132h"
    # one call per deletion: a manifest with the tags that pointed at it
    assert ("team/app", made["t9"], ["t9"]) in events
    assert ("team/app", made["sig"], []) in events
    assert len(events) == len(doomed)
    audit = [r for r in caplog.records if r.name == "dockyard.audit"]
    assert len(audit) == len(doomed) + 5  # a line per manifest and one per tag
    t9 = next(r for r in audit if r.fields.get("tag") == "t9")  # type: ignore[attr-defined]
    fields = t9.fields  # type: ignore[attr-defined]
    assert fields["repository"] == "team/app" and fields["digest"] == str(made["t9"])
    assert "no rule keeps it" in fields["rule"] and fields["policy"] == "team/*"

    # confirmed now: the next (unconfirmed) run applies, within maxshare
    age_tag(root, "team/app", "t5", 30)
    again = run(run_retention(registry, rules))
    assert again.repositories[0].deleted_tags == ["t5"] and not again.withheld


def test_only_an_unrestricted_confirmed_run_confirms_a_policy(
    registry: Registry, root: Path
) -> None:
    run(build(registry, root))
    rules = policies(keeplatest=9)
    # another policy's confirmation does not count for this one
    run(run_retention(registry, policies(keeplatest=100), confirm=True))
    assert run(run_retention(registry, rules, dry_run=True, confirm=True)).confirmed == []
    restricted = run(run_retention(registry, rules, confirm=True, only="other/*"))
    assert restricted.repositories == [] and restricted.confirmed == []
    report = run(run_retention(registry, rules))
    assert "first run" in (report.repositories[0].withheld or "")
    assert len(tags(root, "team/app")) == 11


def test_a_run_over_maxshare_only_reports_unless_confirmed(registry: Registry, root: Path) -> None:
    run(build(registry, root))
    rules = policies(keeplatest=2, maxshare=0.5)
    policy = RetentionPolicy.from_config(rules[0])
    assert policy is not None
    run(record_confirmation(registry.storage, policy, "test"))  # past its first run
    (repo,) = run(run_retention(registry, rules)).repositories
    assert repo.withheld == (
        "it would delete 9 of 11 tags (82%), more than maxshare 50%: confirm with dockyard "
        "retention --confirm"
    )
    assert repo.deleted_tags == [] and len(tags(root, "team/app")) == 11
    (repo,) = run(run_retention(registry, rules, confirm=True)).repositories
    assert repo.withheld is None and len(repo.deleted_tags) == 9
    assert tags(root, "team/app") == {"t0", "t1"}


def test_the_second_look_spares_what_changed_since_the_snapshot(
    registry: Registry, root: Path
) -> None:
    """The snapshot is stale (as the index may be): what moved, was tagged again, is
    referenced by a new index or was pulled since is kept."""
    made = run(build(registry, root))
    stale = run(layout_snapshot(registry.storage, "team/app"))

    async def changed() -> Digest:
        repo = registry.repository("team/app")
        await repo.tags.tag("t8", made["t0"])  # moved
        await repo.tags.tag("pinned", made["t7"])  # t7's manifest tagged again
        return await push(registry, "team/app", None, 300, children=[made["child0"]])

    new_index = run(changed())
    # t6 was pulled an hour ago, on another instance: only its revision link's stamp says so
    age(root, layout.revision_link("team/app", made["t6"]), 1 / 24)

    async def from_stale(name: str) -> RepositorySnapshot:
        return stale

    rules = policies(keeplatest=3, keeppulledwithin="1d")
    (repo,) = run(run_retention(registry, rules, snapshot=from_stale, confirm=True)).repositories
    assert {v.tag for v in stale_plan(stale, rules).deleted_tags} == {
        "t3",
        "t4",
        "t5",
        "t6",
        "t7",
        "t8",
        "t9",
        "multi",
    }
    # t7 itself goes (no rule keeps it), its manifest stays for "pinned"
    assert sorted(repo.deleted_tags) == ["multi", "t3", "t4", "t5", "t7", "t9"]
    spared = {getattr(v, "tag", None) or v.digest: v.reason for v in repo.plan.spared}
    assert spared == {
        "t6": "kept on a second look: kept by keeppulledwithin 1d",
        "t8": f"kept on a second look: now points to {made['t0']}",
        made["t6"]: "kept on a second look: tagged t6",
        made["t7"]: "kept on a second look: tagged pinned",
        made["t8"]: "kept on a second look: untagged before this run (no untaggedafter)",
        made["child0"]: f"kept on a second look: child of kept index {new_index}",
    }
    assert tags(root, "team/app") == {"t0", "t1", "t2", "t6", "t8", "pinned"}
    assert present(root, "team/app", made["child0"])
    assert not present(root, "team/app", made["child1"])
    assert not present(root, "team/app", made["multi"])


def stale_plan(snapshot: RepositorySnapshot, rules: list[PolicyConfig]) -> Any:
    policy = RetentionPolicy.from_config(rules[0])
    assert policy is not None
    return plan(snapshot, policy, time.time())


def test_a_manifest_tagged_during_the_run_is_refused_by_the_guard(
    registry: Registry, root: Path
) -> None:
    made = run(build(registry, root))
    rules = RetentionPolicy(("team/*",), keeplatest=9)
    p = plan(run(layout_snapshot(registry.storage, "team/app")), rules, time.time())
    assert {v.tag for v in p.deleted_tags} == {"t9", "multi"}

    async def racing() -> RepositoryRun:
        # tagged after the second look, while the run deletes
        await registry.repository("team/app").tags.tag("late", made["t9"])
        outcome = RepositoryRun(p)
        await apply_plan(registry.repository("team/app"), outcome)
        return outcome

    outcome = run(racing())
    assert present(root, "team/app", made["t9"])
    assert f"manifest {made['t9']}: tagged late since the plan" in outcome.spared
    # the planned tag still goes on its own, and the index with its children as planned
    assert sorted(outcome.deleted_tags) == ["multi", "t9"]
    assert tags(root, "team/app") == {*(f"t{i}" for i in range(9)), "late"}
    # The signature went before its subject (referrers first, so that an interrupted run
    # leaves what remains reachable from tags still to delete): a tag that appears in that
    # moment saves the manifest it names, not what hung on it. The second look, just before,
    # makes the window that small.
    assert made["sig"] in outcome.deleted_manifests


def test_one_run_at_a_time(registry: Registry, root: Path) -> None:
    run(build(registry, root))

    async def while_held() -> None:
        async with Lease(registry.storage, "retention"):
            with pytest.raises(LeaseBusy):
                await run_retention(registry, policies(keeplatest=1), confirm=True)
            # a dry run changes nothing and takes no lease
            report = await run_retention(registry, policies(keeplatest=1), dry_run=True)
            assert report.repositories[0].plan.deleted_tags

    run(while_held())


def test_the_schedule_reports_loudly_and_deletes_once_confirmed(
    registry: Registry, root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from dockyard.maintenance import scheduled_retention

    run(build(registry, root))
    config = validate(
        {
            "version": "0.1",
            "storage": {"filesystem": {"rootdirectory": str(root)}},
            "policies": [{"repositories": ["team/*"], "retention": {"keeplatest": 8}}],
        }
    )
    with caplog.at_level(logging.INFO):
        run(scheduled_retention(config, registry, dry_run=False))
    warning = next(r for r in caplog.records if r.levelno == logging.WARNING).getMessage()
    assert "scheduled retention deleted nothing in team/app: first run" in warning
    assert "it would delete 3 tags and 6 manifests" in warning
    assert len(tags(root, "team/app")) == 11
    # as after a `dockyard retention --confirm` once: the schedule applies the policy
    policy = RetentionPolicy.from_config(config.policies[0])
    assert policy is not None
    run(record_confirmation(registry.storage, policy, "test"))
    run(scheduled_retention(config, registry, dry_run=True))  # gc.dryrun: reports only
    assert len(tags(root, "team/app")) == 11
    run(scheduled_retention(config, registry, dry_run=False))
    assert tags(root, "team/app") == {f"t{i}" for i in range(8)}


def test_the_command_prints_each_decision_with_its_rule(registry: Registry, root: Path) -> None:
    from dockyard.cli.retention import render

    made = run(build(registry, root))
    rules = policies(keeplatest=8)
    report = run(run_retention(registry, rules, dry_run=True))
    lines = list(render(report, verbose=True))
    assert lines[0] == ("team/app: policy team/*; would delete 3 of 11 tags and 6 of 14 manifests")
    assert lines[1].startswith("  only reported, nothing deleted: first run of the policy")
    assert (
        f"  would delete tag team/app:t9 ({made['t9']}): no rule keeps it: not among the 8 "
        "most recently pushed (keeplatest 8)"
    ) in lines
    assert (
        f"  would delete manifest team/app@{made['sig']}: referrer of deleted {made['t9']}" in lines
    )
    assert f"  keep tag team/app:t0 ({made['t0']}): kept by keeplatest 8" in lines
    assert f"  keep tag team/app:multi ({made['multi']}): kept by keeplatest 8" not in lines
    assert lines[-1].startswith(
        "retention: 1 repositories under policies; would delete 3 tags and 6 manifests; would "
        "withhold 3 tags and 6 manifests in 1 repositories"
    )
    # without --verbose only what goes is printed
    assert not any(line.startswith("  keep ") for line in render(report))


def test_the_maintenance_schedule_runs_retention_before_each_collection(
    registry: Registry, root: Path
) -> None:
    """With storage.maintenance.gc on, each collection is preceded by retention, so the same
    job reclaims the blobs of what retention deleted."""
    from dockyard import maintenance

    run(build(registry, root))
    config = validate(
        {
            "version": "0.1",
            "storage": {
                "filesystem": {"rootdirectory": str(root)},
                "maintenance": {
                    "gc": {"enabled": True, "interval": "0.2s", "grace": "0s"},
                    "uploadpurging": {"enabled": False},
                },
            },
            "policies": [{"repositories": ["team/*"], "retention": {"keeplatest": 8}}],
        }
    )
    policy = RetentionPolicy.from_config(config.policies[0])
    assert policy is not None
    run(record_confirmation(registry.storage, policy, "test"))
    layer = root / layout.blob_data(Digest.from_bytes(b"layer 9")).lstrip("/")
    assert layer.exists()

    async def scheduled() -> None:
        task = asyncio.create_task(maintenance.run(config, registry))
        try:
            for _ in range(100):
                await asyncio.sleep(0.05)
                if not layer.exists():
                    break
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    run(scheduled())
    assert tags(root, "team/app") == {f"t{i}" for i in range(8)}
    assert not layer.exists()  # t9's own layer, collected in the same job
    assert (root / layout.blob_data(Digest.from_bytes(b"layer 0")).lstrip("/")).exists()
