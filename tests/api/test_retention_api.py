"""Retention policies end to end (issue 16): a store of about 200 tags in three repositories
with controlled push and pull times; ``dockyard retention --dry-run`` lists exactly the tags
each rule decides; the first run only reports; the confirmed run deletes exactly those, the
referrers and index children of deleted manifests too, with an audit line and a delete event
each; ``dockyard gc`` then reclaims their unique blobs; every kept tag still pulls; and the
share threshold stops a run that would delete too much."""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from harness import OCI_INDEX, OCI_MANIFEST, ServerFactory, write_config
from harness.dockyard import run_command as dockyard

RELEASE = r"^v?\d+\.\d+\.\d+$"
DAY = 86400.0
V2 = "docker/registry/v2"
POLICIES = [
    {
        "repositories": ["team/app"],
        "immutabletags": ["stable-.*"],
        "retention": {"keeplatest": 5, "keeptags": [RELEASE, "latest"]},
    },
    {
        "repositories": ["team/web"],
        "retention": {"keeppushedwithin": "7d", "keeppulledwithin": "30d"},
    },
    {
        "repositories": ["team/*"],
        "retention": {"keeplatest": 10, "untaggedafter": "24h", "maxshare": 0.9},
    },
]


@dataclass
class Image:
    repository: str
    digest: str
    #: the blobs only this manifest references (its config and its own layer), and its body
    unique: list[str] = field(default_factory=list)


@dataclass
class Store:
    root: Path
    images: dict[str, Image] = field(default_factory=dict)
    #: repository -> tag -> manifest name (a key of ``images``)
    tags: dict[str, dict[str, str]] = field(default_factory=dict)
    base: str = ""

    def digest(self, name: str) -> str:
        return self.images[name].digest

    def blob_exists(self, digest: str) -> bool:
        hexpart = digest.split(":")[1]
        return (self.root / V2 / "blobs/sha256" / hexpart[:2] / hexpart / "data").exists()

    def link(self, repo: str, *parts: str) -> Path:
        return self.root / V2 / "repositories" / repo / "_manifests" / Path(*parts) / "link"

    def revision(self, repo: str, name: str) -> Path:
        return self.link(repo, "revisions", "sha256", self.digest(name).split(":")[1])

    def age(self, path: Path, days: float) -> None:
        when = time.time() - days * DAY
        os.utime(path, (when, when))


async def build(root: Path) -> Store:
    """team/app, team/web and team/tools as described in the test, through the model."""
    from dockyard.oci.digest import Digest
    from dockyard.registry.repository import Registry
    from dockyard.storage.filesystem import FilesystemDriver
    from dockyard.storage.store import Store as Storage

    registry = Registry(Storage(FilesystemDriver(str(root))), secret="s", delete_enabled=True)
    store = Store(root)
    base_layer = b"a base layer every image shares" * 40

    async def blob(repo: str, data: bytes) -> dict[str, Any]:
        d = Digest.from_bytes(data)
        await registry.blobs.put(d, data)
        await registry.repository(repo).blobs.link(d)
        return {
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": str(d),
            "size": len(data),
        }

    async def manifest(repo: str, name: str, body: dict[str, Any], media_type: str) -> str:
        data = json.dumps(body).encode()
        pushed = await registry.repository(repo).manifests.put(data, media_type, None, [])
        image = store.images.setdefault(name, Image(repo, str(pushed.digest)))
        image.unique.append(str(pushed.digest))
        return str(pushed.digest)

    async def image(repo: str, name: str, subject: str | None = None) -> str:
        config = await blob(repo, json.dumps({"image": name}).encode())
        own = await blob(repo, f"the layer of {name}".encode() * 20)
        body: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {**config, "mediaType": "application/vnd.oci.image.config.v1+json"},
            "layers": [await blob(repo, base_layer), own],
        }
        if subject is not None:
            body["artifactType"] = "application/spdx+json"
            body["subject"] = {"mediaType": OCI_MANIFEST, "digest": subject, "size": 1}
        store.images[name] = Image(repo, "", [config["digest"], own["digest"]])
        digest = await manifest(repo, name, body, OCI_MANIFEST)
        store.images[name].digest = digest
        return digest

    async def index(repo: str, name: str, children: list[str]) -> str:
        body = {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {"mediaType": OCI_MANIFEST, "digest": store.digest(c), "size": 1} for c in children
            ],
        }
        return await manifest(repo, name, body, OCI_INDEX)

    async def tag(repo: str, tag_name: str, name: str) -> None:
        await registry.repository(repo).tags.tag(tag_name, Digest.parse(store.digest(name)))
        store.tags.setdefault(repo, {})[tag_name] = name

    try:
        # team/app: keeplatest 5, keeptags releases and latest, immutable stable-*
        for i in range(60):
            await image("team/app", f"app-ci-{i:03d}")
            await tag("team/app", f"ci-{i:03d}", f"app-ci-{i:03d}")
        await tag("team/app", "latest", "app-ci-000")
        for i in range(5):
            await image("team/app", f"app-v1.0.{i}")
            await tag("team/app", f"v1.0.{i}", f"app-v1.0.{i}")
        for name in ("stable-1", "1.0.0-rc1", "nightly"):
            await image("team/app", f"app-{name}")
            await tag("team/app", name, f"app-{name}")
        for signed in ("app-ci-001", "app-ci-050"):  # cosign's tag-based signatures
            await image("team/app", f"sig-{signed}")
            await tag("team/app", f"sha256-{store.digest(signed)[7:]}.sig", f"sig-{signed}")
        for subject in ("app-ci-040", "app-v1.0.0"):  # SBOMs pushed by digest, as referrers
            await image("team/app", f"sbom-{subject}", subject=store.digest(subject))
        for i in range(2):
            await image("team/app", f"old-child-{i}")
        await index("team/app", "app-multi-old", ["old-child-0", "old-child-1"])
        await tag("team/app", "multi-old", "app-multi-old")
        await image("team/app", "new-child")
        await index("team/app", "app-multi", ["new-child", "app-ci-030"])
        await tag("team/app", "multi", "app-multi")
        # team/web: keeppushedwithin 7d, keeppulledwithin 30d
        for i in range(60):
            await image("team/web", f"web-{i:02d}")
            await tag("team/web", f"w-{i:02d}", f"web-{i:02d}")
        await tag("team/web", "w-alias", "web-03")
        await image("team/web", "web-untagged")
        # team/tools (team/*): keeplatest 10, untaggedafter 24h
        for i in range(60):
            await image("team/tools", f"tools-{i:02d}")
            await tag("team/tools", f"t-{i:02d}", f"tools-{i:02d}")
        for name in ("tools-untagged-old", "tools-untagged-new", "tools-untagged-pulled"):
            await image("team/tools", name)
        store.base = str(Digest.from_bytes(base_layer))
    finally:
        await registry.close()
    return store


def set_times(store: Store) -> None:
    """Push times: each tag's link and its manifest's revision link."""
    pushed: dict[tuple[str, str], float] = {}
    for i in range(60):
        pushed["team/app", f"ci-{i:03d}"] = 1 + i
        pushed["team/web", f"w-{i:02d}"] = 0.5 + i
        pushed["team/tools", f"t-{i:02d}"] = 0.1 + i
    pushed |= {
        ("team/app", "latest"): 1,
        ("team/app", "stable-1"): 200,
        ("team/app", "1.0.0-rc1"): 90,
        ("team/app", "nightly"): 0.5,
        ("team/app", "multi-old"): 80,
        ("team/app", "multi"): 0.25,
        ("team/web", "w-alias"): 50,
    }
    for i in range(5):
        pushed["team/app", f"v1.0.{i}"] = 100 + i
    for repo, tags in store.tags.items():
        for tag_name, name in tags.items():
            days = pushed.get((repo, tag_name), 30)  # signature tags: 30 days
            store.age(store.link(repo, "tags", tag_name, "current"), days)
            store.age(store.revision(repo, name), days)
    for name in ("sbom-app-ci-040", "sbom-app-v1.0.0", "old-child-0", "old-child-1"):
        store.age(store.revision("team/app", name), 80)
    store.age(store.revision("team/app", "new-child"), 0.25)
    store.age(store.revision("team/web", "web-untagged"), 40)
    store.age(store.revision("team/tools", "tools-untagged-old"), 3)
    store.age(store.revision("team/tools", "tools-untagged-new"), 2 / 24)
    store.age(store.revision("team/tools", "tools-untagged-pulled"), 3)


async def set_pulls(store: Store, config_path: Path) -> None:
    """Pull times in the metadata index, as the servers record them (indexed from the layout
    first, as a server's verification would)."""
    from dockyard.config import load_config
    from dockyard.oci.digest import Digest
    from dockyard.registry.configured import open_store

    registry = open_store(load_config(str(config_path), {}))
    assert registry.index is not None
    try:
        await registry.index.reindex(registry.storage)
        now = time.time()
        for repo, name, days in [
            ("team/web", "web-10", 2),
            ("team/web", "web-20", 2),
            ("team/web", "web-30", 29),
            ("team/web", "web-40", 45),  # too long ago
            ("team/tools", "tools-untagged-pulled", 1 / 24),
        ]:
            await registry.index.set_pulled(
                repo, Digest.parse(store.digest(name)), now - days * DAY
            )
    finally:
        await registry.close()


def verdicts(report: dict[str, Any], repo: str) -> dict[str, dict[str, Any]]:
    run = next(r for r in report["repositories"] if r["repository"] == repo)
    return {v["tag"]: v for v in run["tags"]} | {v["digest"]: v for v in run["manifests"]}


@pytest.mark.slow
@pytest.mark.filesystem
def test_retention_on_200_tags_across_three_repositories(
    tmp_path: Path, start_server: ServerFactory
) -> None:
    root = tmp_path / "data"
    store = asyncio.run(build(root))
    assert sum(len(t) for t in store.tags.values()) == 194
    set_times(store)
    config_path = tmp_path / "config.yml"
    write_config(
        config_path,
        root,
        5000,
        policies=POLICIES,
        notifications={"endpoints": [{"name": "audit", "url": "http://127.0.0.1:9/hook"}]},
        # no touch interval: `gc --grace 1ms` may collect what was written a moment ago
        storage={"maintenance": {"gc": {"grace": "0s"}}},
    )
    asyncio.run(set_pulls(store, config_path))
    # web-50 was pulled 3 days ago through another instance: the index here does not know,
    # its revision link's stamp does
    store.age(store.revision("team/web", "web-50"), 3)
    d = store.digest

    # -- what each rule decides ---------------------------------------------------------------
    dry = dockyard("retention", str(config_path), "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    report = json.loads(dry.stdout)
    assert report["dry_run"] is True
    app, web, tools = (verdicts(report, r) for r in ("team/app", "team/web", "team/tools"))

    deleted_app = {f"ci-{i:03d}" for i in range(2, 60)} | {
        "1.0.0-rc1",
        "multi-old",
        f"sha256-{d('app-ci-050')[7:]}.sig",
    }
    assert {t for t, v in app.items() if v.get("tag") and v["action"] == "delete"} == deleted_app
    assert app["ci-002"]["rules"] == ["keeptags", "keeplatest 5"]
    assert app["ci-002"]["reason"] == (
        "no rule keeps it: matches no keeptags; not among the 5 most recently pushed (keeplatest 5)"
    )
    assert app["1.0.0-rc1"]["rules"] == ["keeptags", "keeplatest 5"]
    for kept, rules in {
        "multi": ["keeplatest 5"],
        "nightly": ["keeplatest 5"],
        "ci-000": ["keeplatest 5"],
        "ci-001": ["keeplatest 5"],
        "latest": ["keeptags latest", "keeplatest 5"],
        "v1.0.3": [f"keeptags {RELEASE}"],
        "stable-1": ["immutabletags stable-.*"],
        f"sha256-{d('app-ci-001')[7:]}.sig": [f"attached to kept {d('app-ci-001')}"],
    }.items():
        assert app[kept]["action"] == "keep" and app[kept]["rules"] == rules, kept
    assert app[f"sha256-{d('app-ci-050')[7:]}.sig"]["reason"] == (
        f"attached to {d('app-ci-050')}, which no rule keeps"
    )
    gone_app = {f"app-ci-{i:03d}" for i in range(2, 60)} - {"app-ci-030"} | {
        "app-1.0.0-rc1",
        "app-multi-old",
        "old-child-0",
        "old-child-1",
        "sig-app-ci-050",
        "sbom-app-ci-040",
    }
    manifests_app = {k: v for k, v in app.items() if "tag" not in v}
    assert {k for k, v in manifests_app.items() if v["action"] == "delete"} == {
        d(n) for n in gone_app
    }
    assert app[d("app-ci-030")]["reason"] == f"child of kept index {d('app-multi')}"
    assert app[d("old-child-0")]["reason"] == f"child of deleted index {d('app-multi-old')}"
    assert app[d("sbom-app-ci-040")]["reason"] == f"referrer of deleted {d('app-ci-040')}"
    assert app[d("sbom-app-v1.0.0")]["reason"] == f"referrer of kept {d('app-v1.0.0')}"

    pulled_within = {"w-10", "w-20", "w-30"}
    deleted_web = {f"w-{i:02d}" for i in range(7, 60)} - pulled_within - {"w-50"} | {"w-alias"}
    assert {t for t, v in web.items() if v.get("tag") and v["action"] == "delete"} == deleted_web
    assert web["w-40"]["reason"] == (
        "no rule keeps it: pushed 40d ago (keeppushedwithin 7d); pulled 45d ago "
        "(keeppulledwithin 30d)"
    )
    assert web["w-06"]["rules"] == ["keeppushedwithin 7d"]
    assert web["w-30"]["rules"] == ["keeppulledwithin 30d"]
    assert web["w-50"] == {
        "tag": "w-50",
        "digest": d("web-50"),
        "action": "keep",
        "rules": ["keeppushedwithin 7d", "keeppulledwithin 30d"],
        "reason": "kept on a second look: kept by keeppulledwithin 30d",
        "spared": True,
    }
    assert web[d("web-03")]["reason"] == "tagged w-03"  # w-alias goes, its manifest stays
    assert web[d("web-untagged")]["reason"] == "untagged before this run (no untaggedafter)"

    deleted_tools = {f"t-{i:02d}" for i in range(10, 60)}
    assert {t for t, v in tools.items() if v.get("tag") and v["action"] == "delete"} == (
        deleted_tools
    )
    assert tools[d("tools-untagged-old")]["action"] == "delete"
    assert tools[d("tools-untagged-old")]["reason"] == (
        "untagged, last used 3d ago (untaggedafter 1d)"
    )
    assert tools[d("tools-untagged-pulled")]["reason"] == (
        "untagged, last used 1h ago, within untaggedafter 1d"
    )
    assert tools[d("tools-untagged-new")]["action"] == "keep"

    # -- the first run only reports ---------------------------------------------------------
    links_before = sorted((root / V2 / "repositories").rglob("link"))
    first = dockyard("retention", str(config_path))
    assert first.returncode == 4, first.stderr
    assert first.stdout.count("only reported, nothing deleted: first run of the policy") == 3
    assert sorted((root / V2 / "repositories").rglob("link")) == links_before

    # -- confirmed: exactly those go ------------------------------------------------------------
    confirmed = dockyard("retention", str(config_path), "--confirm")
    assert confirmed.returncode == 0, confirmed.stderr
    out = confirmed.stdout
    assert (
        f"team/app: policy team/app; deleted {len(deleted_app)} of 73 tags and "
        f"{len(gone_app)} of" in out
    )
    assert f"  deleted tag team/app:ci-017 ({d('app-ci-017')}): no rule keeps it: " in out
    assert (
        f"  deleted manifest team/app@{d('sbom-app-ci-040')}: referrer of deleted "
        f"{d('app-ci-040')}" in out
    )
    assert "spared tag team/web:w-50" in out
    deleted_tags = set(re.findall(r"^  deleted tag (\S+) \(", out, re.MULTILINE))
    expected = {f"team/app:{t}" for t in deleted_app} | {f"team/web:{t}" for t in deleted_web}
    expected |= {f"team/tools:{t}" for t in deleted_tools}
    assert deleted_tags == expected
    gone = {("team/app", n) for n in gone_app}
    gone |= {("team/web", f"web-{t[2:]}") for t in deleted_web if t != "w-alias"}
    gone |= {("team/tools", f"tools-{t[2:]}") for t in deleted_tools}
    gone.add(("team/tools", "tools-untagged-old"))
    deleted_manifests = set(re.findall(r"^  deleted manifest (\S+)@(\S+):", out, re.MULTILINE))
    assert deleted_manifests == {(repo, d(name)) for repo, name in gone}
    for repo, tags in store.tags.items():
        left = set(os.listdir(root / V2 / "repositories" / repo / "_manifests" / "tags"))
        assert {f"{repo}:{t}" for t in set(tags) - left} == {
            t for t in expected if t.startswith(repo + ":")
        }
    for name, image in store.images.items():
        kept = (image.repository, name) not in gone
        assert store.revision(image.repository, name).exists() == kept, name
    # an audit line and a delete event per deletion
    audit = [line for line in confirmed.stderr.splitlines() if "logger=dockyard.audit" in line]
    assert len(audit) == len(expected) + len(gone)
    assert any("tag=ci-017" in line and "no rule keeps it" in line for line in audit)
    outbox = root / "dockyard" / "events" / "outbox.jsonl"
    events = [json.loads(line) for line in outbox.read_text().splitlines()]
    assert {e["action"] for e in events} == {"delete"}
    assert {
        f"{e['target']['repository']}:{e['target']['tag']}" for e in events if "tag" in e["target"]
    } == expected
    assert {
        (e["target"]["repository"], e["target"]["digest"])
        for e in events
        if "digest" in e["target"]
    } == {(repo, d(name)) for repo, name in gone}
    assert all(e["actor"] == {"name": "dockyard retention"} for e in events)
    # a policy confirmed once applies from then on: nothing more to do
    again = dockyard("retention", str(config_path))
    assert again.returncode == 0, again.stderr
    assert "deleted 0 tags and 0 manifests" in again.stdout

    # -- garbage collection reclaims their unique blobs ------------------------------------------
    collected = dockyard("gc", str(config_path), "--grace", "1ms")
    assert collected.returncode == 0, collected.stderr
    for name, image in store.images.items():
        kept = (image.repository, name) not in gone
        for blob in image.unique:
            assert store.blob_exists(blob) == kept, (name, blob)
    assert store.blob_exists(store.base)

    # -- every kept tag pulls ---------------------------------------------------------------------
    server = start_server(root=root)
    accept = {"Accept": f"{OCI_MANIFEST}, {OCI_INDEX}"}
    for repo, tags in store.tags.items():
        for tag_name, name in tags.items():
            r = server.session.get(server.v2(f"{repo}/manifests/{tag_name}"), headers=accept)
            if f"{repo}:{tag_name}" in expected:
                assert r.status_code == 404, (repo, tag_name)
                continue
            assert r.status_code == 200, (repo, tag_name, r.text)
            assert r.headers["Docker-Content-Digest"] == d(name)
            body = r.json()
            for blob in [body.get("config"), *body.get("layers", [])]:
                if blob is not None:
                    head = server.session.head(server.v2(f"{repo}/blobs/{blob['digest']}"))
                    assert head.status_code == 200, (repo, tag_name, blob)


@pytest.mark.filesystem
def test_the_share_threshold_stops_a_run_that_would_delete_too_much(tmp_path: Path) -> None:
    """A confirmed policy keeps tags pushed within a week; pushes stop for ten days (a holiday,
    a broken CI) and the next run would delete nearly everything: it only reports."""
    root = tmp_path / "data"
    store = asyncio.run(build_small(root))
    policies = [
        {"repositories": ["team/*"], "retention": {"keeppushedwithin": "7d", "maxshare": 0.5}}
    ]
    config_path = tmp_path / "config.yml"
    write_config(config_path, root, 5000, policies=policies)
    asyncio.run(confirm_policy(config_path))
    for tag_name, name in store.tags["team/app"].items():
        if tag_name != "t-0":
            store.age(store.link("team/app", "tags", tag_name, "current"), 10)
            store.age(store.revision("team/app", name), 10)
    result = dockyard("retention", str(config_path))
    assert result.returncode == 4, result.stderr
    assert (
        "only reported, nothing deleted: it would delete 9 of 10 tags (90%), more than "
        "maxshare 50%: confirm with dockyard retention --confirm"
    ) in result.stdout
    assert "would delete tag team/app:t-9" in result.stdout
    assert len(os.listdir(root / V2 / "repositories/team/app/_manifests/tags")) == 10
    assert "logger=dockyard.audit" not in result.stderr


async def build_small(root: Path) -> Store:
    from dockyard.oci.digest import Digest
    from dockyard.registry.repository import Registry
    from dockyard.storage.filesystem import FilesystemDriver
    from dockyard.storage.store import Store as Storage

    registry = Registry(Storage(FilesystemDriver(str(root))), secret="s", delete_enabled=True)
    store = Store(root)
    repo = registry.repository("team/app")
    try:
        for i in range(10):
            config = json.dumps({"n": i}).encode()
            digest = Digest.from_bytes(config)
            await registry.blobs.put(digest, config)
            await repo.blobs.link(digest)
            body = {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": str(digest),
                    "size": len(config),
                },
                "layers": [],
            }
            pushed = await repo.manifests.put(
                json.dumps(body).encode(), OCI_MANIFEST, None, [f"t-{i}"]
            )
            store.images[f"n{i}"] = Image("team/app", str(pushed.digest))
            store.tags.setdefault("team/app", {})[f"t-{i}"] = f"n{i}"
    finally:
        await registry.close()
    return store


async def confirm_policy(config_path: Path) -> None:
    """As a `dockyard retention --confirm` run does when the policy is set up."""
    from dockyard.config import load_config
    from dockyard.registry.configured import open_store
    from dockyard.registry.retention import RetentionPolicy
    from dockyard.registry.retention_run import record_confirmation

    config = load_config(str(config_path), {})
    policy = RetentionPolicy.from_config(config.policies[0])
    assert policy is not None
    registry = open_store(config)
    try:
        await record_confirmation(registry.storage, policy, "test")
    finally:
        await registry.close()
