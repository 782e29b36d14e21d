"""Retention policies: the configuration, and the planner (``registry.retention.plan``), a pure
function of a repository's snapshot, its policy and the time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dockyard.config import ConfigError, PolicyConfig, load_config, validate
from dockyard.oci.digest import Digest
from dockyard.registry.records import ManifestRecord, RepositorySnapshot, TagRecord
from dockyard.registry.retention import (
    RetentionPlan,
    RetentionPolicies,
    RetentionPolicy,
    attached_subject,
    format_age,
    format_period,
    narrow,
    plan,
)

NOW = 1_800_000_000.0
DAY = 86400.0
RELEASE = r"^v?\d+\.\d+\.\d+$"


def digest(n: int) -> Digest:
    return Digest("sha256", f"{n:064x}")


class Repo:
    """A snapshot built by hand: ages in days before NOW."""

    def __init__(self) -> None:
        self.tags: dict[str, TagRecord] = {}
        self.manifests: dict[Digest, ManifestRecord] = {}

    def manifest(
        self,
        n: int,
        age: float = 0.0,
        *,
        pulled: float | None = None,
        subject: Digest | None = None,
        children: tuple[Digest, ...] = (),
    ) -> Digest:
        d = digest(n)
        self.manifests[d] = ManifestRecord(
            d,
            "application/vnd.oci.image.manifest.v1+json",
            100,
            NOW - age * DAY,
            None if pulled is None else NOW - pulled * DAY,
            subject,
            None,
            children,
        )
        return d

    def tag(self, name: str, target: Digest, age: float = 0.0) -> None:
        record = self.manifests.get(target)
        self.tags[name] = TagRecord(
            name, target, NOW - age * DAY, record.pulled if record else None
        )

    def image(self, name: str, n: int, age: float = 0.0, pulled: float | None = None) -> Digest:
        d = self.manifest(n, age, pulled=pulled)
        self.tag(name, d, age)
        return d

    def snapshot(self) -> RepositorySnapshot:
        return RepositorySnapshot(
            "team/app", sorted(self.tags.values(), key=lambda t: t.tag), dict(self.manifests)
        )


def policy(**rules: Any) -> RetentionPolicy:
    return RetentionPolicy(("team/*",), **rules)


def deleted(p: RetentionPlan) -> set[str]:
    return {v.tag for v in p.deleted_tags}


def gone(p: RetentionPlan) -> set[Digest]:
    return {v.digest for v in p.deleted_manifests}


def reason(p: RetentionPlan, what: str | Digest) -> str:
    """The reason given for a tag (by name) or a manifest (by digest)."""
    if isinstance(what, str):
        return next(v.reason for v in p.tags if v.tag == what)
    return next(v.reason for v in p.manifests if v.digest == what)


# -- configuration ----------------------------------------------------------------------------


def config_with(retention: Any, **policy_keys: Any) -> Any:
    return validate(
        {
            "version": "0.1",
            "storage": {"filesystem": {}},
            "policies": [{"repositories": ["team/*"], **policy_keys, "retention": retention}],
        }
    )


def test_retention_config_is_read_with_periods_in_days() -> None:
    r = (
        config_with(
            {
                "keeplatest": 10,
                "keeppushedwithin": "7d",
                "keeppulledwithin": "1d12h",
                "keeptags": [RELEASE, "latest"],
                "untaggedafter": "24h",
                "maxshare": 0.25,
            }
        )
        .policies[0]
        .retention
    )
    assert r.keeplatest == 10 and r.keeppushedwithin == 7 * DAY
    assert r.keeppulledwithin == 1.5 * DAY and r.untaggedafter == DAY
    assert r.keeptags == [RELEASE, "latest"] and r.maxshare == 0.25
    assert config_with({"untaggedafter": 3600}).policies[0].retention.maxshare == 0.5
    assert config_with(None).policies[0].retention is None


@pytest.mark.parametrize(
    ("retention", "key", "reason"),
    [
        ({}, "policies.0.retention", "no rule"),
        ({"keeplatest": 5, "keeppushedwithn": "7d"}, "policies.0.retention", "unknown key"),
        ({"maxshare": 0.3}, "policies.0.retention", "no rule"),
        ({"keeplatest": -1}, "policies.0.retention.keeplatest", "greater than or equal to 0"),
        ({"keeplatest": "many"}, "policies.0.retention.keeplatest", "integer"),
        ({"keeppushedwithin": "7x"}, "policies.0.retention.keeppushedwithin", "not a period"),
        ({"keeppulledwithin": "0d"}, "policies.0.retention.keeppulledwithin", "positive"),
        ({"untaggedafter": "-1h"}, "policies.0.retention.untaggedafter", "not a period"),
        ({"keeptags": ["v("]}, "policies.0.retention.keeptags", "not a regular expression"),
        ({"keeplatest": 1, "maxshare": 0}, "policies.0.retention.maxshare", "greater than 0"),
        ({"keeplatest": 1, "maxshare": 1.5}, "policies.0.retention.maxshare", "less than or"),
    ],
)
def test_invalid_retention_fails_at_start_with_key_and_reason(
    tmp_path: Path, retention: dict[str, Any], key: str, reason: str
) -> None:
    import yaml

    path = tmp_path / "config.yml"
    path.write_text(
        yaml.safe_dump(
            {
                "version": "0.1",
                "storage": {"filesystem": {"rootdirectory": str(tmp_path)}},
                "policies": [{"repositories": ["team/*"], "retention": retention}],
            }
        )
    )
    with pytest.raises(ConfigError) as err:
        load_config(str(path), {})
    assert err.value.key == key
    assert reason.lower() in err.value.reason.lower()


def test_policies_first_match_wins_and_one_without_retention_exempts() -> None:
    configs = [
        PolicyConfig(repositories=["team/frozen"], immutabletags=["v.*"]),
        PolicyConfig(repositories=["team/*"], retention={"keeplatest": 3}),
        PolicyConfig(repositories=["*"], retention={"keeplatest": 9}),
    ]
    policies = RetentionPolicies(configs)
    assert policies.of("team/frozen") is None
    team = policies.of("team/app/sub")  # * crosses /
    assert team is not None and team.keeplatest == 3
    other = policies.of("other")
    assert other is not None and other.keeplatest == 9
    assert [p.keeplatest for p in policies.all()] == [3, 9]
    assert not RetentionPolicies(configs[:1])


def test_policy_id_names_the_rules_and_repositories() -> None:
    a = RetentionPolicy(("team/*",), keeplatest=3)
    assert a.id == RetentionPolicy(("team/*",), keeplatest=3, immutabletags=("v.*",)).id
    assert a.id != RetentionPolicy(("team/*",), keeplatest=4).id
    assert a.id != RetentionPolicy(("team/*", "x"), keeplatest=3).id
    assert a.id != RetentionPolicy(("team/*",), keeplatest=3, maxshare=0.9).id
    assert len(a.id) == 16


def test_formats() -> None:
    assert format_period(7 * DAY) == "7d" and format_period(36 * 3600) == "36h"
    assert format_period(90) == "90s" and format_period(1.5) == "1.5s"
    assert format_age(3 * DAY + 5) == "3d" and format_age(7200) == "2h" and format_age(-3) == "0s"


# -- tag rules --------------------------------------------------------------------------------


def test_keeplatest_keeps_the_most_recently_pushed() -> None:
    repo = Repo()
    for i in range(10):
        repo.image(f"ci-{i}", i, age=i)
    p = plan(repo.snapshot(), policy(keeplatest=3), NOW)
    assert deleted(p) == {f"ci-{i}" for i in range(3, 10)}
    assert reason(p, "ci-0") == "kept by keeplatest 3"
    assert reason(p, "ci-3") == (
        "no rule keeps it: not among the 3 most recently pushed (keeplatest 3)"
    )
    assert p.tags[3].rules == ("keeplatest 3",)
    assert gone(p) == {digest(i) for i in range(3, 10)}
    assert p.share == 0.7 and p.over_share


def test_keeplatest_breaks_ties_by_name() -> None:
    repo = Repo()
    for name in ("b", "a", "c"):
        repo.image(name, ord(name), age=1)
    assert deleted(plan(repo.snapshot(), policy(keeplatest=2), NOW)) == {"c"}


def test_keeppushedwithin_and_keeppulledwithin() -> None:
    repo = Repo()
    repo.image("new", 1, age=2)
    repo.image("edge", 2, age=7)  # exactly 7 days: within
    repo.image("old-pulled", 3, age=40, pulled=10)
    repo.image("old-stale", 4, age=40, pulled=31)
    repo.image("old-never", 5, age=40)
    p = plan(repo.snapshot(), policy(keeppushedwithin=7 * DAY, keeppulledwithin=30 * DAY), NOW)
    assert deleted(p) == {"old-stale", "old-never"}
    assert reason(p, "old-pulled") == "kept by keeppulledwithin 30d"
    assert reason(p, "old-stale") == (
        "no rule keeps it: pushed 40d ago (keeppushedwithin 7d); pulled 31d ago "
        "(keeppulledwithin 30d)"
    )
    assert "never pulled (keeppulledwithin 30d)" in reason(p, "old-never")


def test_the_manifest_pull_counts_when_the_tag_record_has_none() -> None:
    repo = Repo()
    d = repo.manifest(1, age=50, pulled=1)
    repo.tags["x"] = TagRecord("x", d, NOW - 50 * DAY, None)  # the index left it out
    assert deleted(plan(repo.snapshot(), policy(keeppulledwithin=30 * DAY), NOW)) == set()


def test_keeptags_match_the_whole_tag() -> None:
    repo = Repo()
    for i, name in enumerate(["1.2.3", "v2.0.0", "1.2.3-rc1", "latest", "latest-dev", "x1.2.3"]):
        repo.image(name, i, age=100)
    p = plan(repo.snapshot(), policy(keeptags=(RELEASE, "latest")), NOW)
    assert deleted(p) == {"1.2.3-rc1", "latest-dev", "x1.2.3"}
    assert reason(p, "latest") == "kept by keeptags latest"
    assert reason(p, "1.2.3") == f"kept by keeptags {RELEASE}"
    assert reason(p, "x1.2.3") == "no rule keeps it: matches no keeptags"


def test_immutable_tags_are_always_kept() -> None:
    repo = Repo()
    repo.image("stable", 1, age=400)
    repo.image("other", 2, age=400)
    p = plan(repo.snapshot(), policy(keeptags=("x",), immutabletags=("stab.*",)), NOW)
    assert deleted(p) == {"other"}
    assert reason(p, "stable") == "kept by immutabletags stab.*"
    assert digest(1) not in gone(p)


def test_every_rule_that_keeps_a_tag_is_named() -> None:
    repo = Repo()
    repo.image("1.0.0", 1, age=1, pulled=0)
    p = plan(
        repo.snapshot(),
        policy(
            keeplatest=1,
            keeppushedwithin=7 * DAY,
            keeppulledwithin=DAY,
            keeptags=(RELEASE,),
        ),
        NOW,
    )
    assert p.tags[0].rules == (
        f"keeptags {RELEASE}",
        "keeplatest 1",
        "keeppushedwithin 7d",
        "keeppulledwithin 1d",
    )


def test_without_tag_rules_every_tag_stays_and_untagged_ones_expire() -> None:
    repo = Repo()
    repo.image("ancient", 1, age=1000)
    old = repo.manifest(2, age=3)
    fresh = repo.manifest(3, age=0.5)
    used = repo.manifest(4, age=10, pulled=0.1)  # pulled by digest lately
    p = plan(repo.snapshot(), policy(untaggedafter=DAY), NOW)
    assert deleted(p) == set() and reason(p, "ancient") == "kept by no tag rules"
    assert gone(p) == {old}
    assert reason(p, old) == "untagged, last used 3d ago (untaggedafter 1d)"
    assert reason(p, fresh) == "untagged, last used 12h ago, within untaggedafter 1d"
    assert used not in gone(p)


def test_untagged_manifests_stay_without_untaggedafter_unless_this_run_untags_them() -> None:
    repo = Repo()
    untagged_before = repo.manifest(1, age=500)
    repo.image("old", 2, age=500)
    repo.image("new", 3, age=0)
    p = plan(repo.snapshot(), policy(keeplatest=1), NOW)
    assert gone(p) == {digest(2)}
    assert reason(p, digest(2)) == "its tags are deleted: old"
    assert reason(p, untagged_before) == "untagged before this run (no untaggedafter)"


def test_a_manifest_another_kept_tag_points_to_stays() -> None:
    repo = Repo()
    d = repo.image("old", 1, age=30)
    repo.tag("new", d, age=0)
    p = plan(repo.snapshot(), policy(keeplatest=1), NOW)
    assert deleted(p) == {"old"} and gone(p) == set()
    assert reason(p, d) == "tagged new"


def test_dangling_tags_are_judged_like_others() -> None:
    repo = Repo()
    repo.tags["lost"] = TagRecord("lost", digest(99), NOW - 90 * DAY)
    repo.image("new", 1)
    p = plan(repo.snapshot(), policy(keeplatest=1), NOW)
    assert deleted(p) == {"lost"} and gone(p) == set() and p.order == ()


# -- indexes and referrers --------------------------------------------------------------------


def test_children_of_a_kept_index_stay_and_those_of_a_deleted_one_go() -> None:
    repo = Repo()
    amd, arm = repo.manifest(1, age=50), repo.manifest(2, age=50)
    kept_index = repo.manifest(3, age=0, children=(amd, arm))
    repo.tag("multi", kept_index)
    repo.tag("amd-only", amd, age=50)  # its own tag goes, the manifest stays for the index
    old_child = repo.manifest(4, age=50)
    old_index = repo.manifest(5, age=50, children=(old_child, amd))
    repo.tag("multi-old", old_index, age=50)
    p = plan(repo.snapshot(), policy(keeplatest=1), NOW)
    assert deleted(p) == {"amd-only", "multi-old"}
    assert gone(p) == {old_index, old_child}
    assert reason(p, amd) == f"child of kept index {kept_index}"
    assert reason(p, old_child) == f"child of deleted index {old_index}"
    assert p.order == (old_child, old_index)  # children first


def test_referrers_follow_their_subject_recursively() -> None:
    repo = Repo()
    kept, doomed = repo.image("new", 1, age=0), repo.image("old", 2, age=9)
    kept_sig = repo.manifest(10, age=9, subject=kept)
    sbom = repo.manifest(11, age=9, subject=doomed)
    sbom_sig = repo.manifest(12, age=9, subject=sbom)  # a signature of the SBOM
    p = plan(repo.snapshot(), policy(keeplatest=1), NOW)
    assert gone(p) == {doomed, sbom, sbom_sig}
    assert reason(p, kept_sig) == f"referrer of kept {kept}"
    assert reason(p, sbom) == f"referrer of deleted {doomed}"
    assert reason(p, sbom_sig) == f"referrer of deleted {sbom}"
    assert p.order == (sbom_sig, sbom, doomed)


def test_a_tagged_referrer_of_a_kept_manifest_stays() -> None:
    repo = Repo()
    kept = repo.image("new", 1, age=0)
    sig = repo.manifest(2, age=30, subject=kept)
    repo.tag("signature", sig, age=30)
    p = plan(repo.snapshot(), policy(keeplatest=1), NOW)
    assert deleted(p) == {"signature"} and gone(p) == set()
    assert reason(p, sig) == f"referrer of kept {kept}"


def test_attached_tags_go_with_their_manifest_and_do_not_count() -> None:
    repo = Repo()
    kept, doomed = repo.image("new", 1, age=5), repo.image("old", 2, age=9)
    for target, n in ((kept, 10), (doomed, 11)):
        sig = repo.manifest(n, age=0)  # cosign's tag-based signature: no subject field
        repo.tag(f"sha256-{target.hex}.sig", sig, age=0)
    p = plan(repo.snapshot(), policy(keeplatest=1), NOW)
    # the signatures are the newest tags, yet keeplatest 1 keeps "new", not one of them
    assert deleted(p) == {"old", f"sha256-{doomed.hex}.sig"}
    assert reason(p, f"sha256-{kept.hex}.sig") == f"kept: attached to kept {kept}"
    assert reason(p, f"sha256-{doomed.hex}.sig") == (f"attached to {doomed}, which no rule keeps")
    assert gone(p) == {doomed, digest(11)}
    # a tag named after a manifest the repository does not hold is an ordinary tag
    repo.tag(f"sha256-{digest(77).hex}", digest(1), age=0)
    assert f"sha256-{digest(77).hex}" not in deleted(
        plan(repo.snapshot(), policy(keeplatest=2), NOW)
    )


def test_the_deletion_order_puts_dependents_first() -> None:
    repo = Repo()
    repo.image("keep", 1)
    child = repo.manifest(2, age=9)
    index = repo.manifest(3, age=9, children=(child,))
    repo.tag("idx", index, age=9)
    child_sig = repo.manifest(4, age=9, subject=child)
    index_sig = repo.manifest(5, age=9, subject=index)
    p = plan(repo.snapshot(), policy(keeplatest=1), NOW)
    order = list(p.order)
    assert set(order) == {child, index, child_sig, index_sig}
    assert order.index(child_sig) < order.index(child) < order.index(index)
    assert order.index(index_sig) < order.index(index)


# -- the second look --------------------------------------------------------------------------


def test_narrow_deletes_only_what_both_plans_delete() -> None:
    repo = Repo()
    for i in range(6):
        repo.image(f"t{i}", i, age=i)
    first = plan(repo.snapshot(), policy(keeplatest=2), NOW)
    assert deleted(first) == {"t2", "t3", "t4", "t5"}
    later = Repo()
    later.manifests = dict(repo.manifests)
    later.tags = dict(repo.tags)
    later.tag("t3", digest(0), age=0)  # moved since
    del later.tags["t4"]  # deleted by a client since
    later.tag("pin", digest(5), age=0)  # t5's manifest tagged again
    second = plan(later.snapshot(), policy(keeplatest=3), NOW)
    p = narrow(first, second)
    assert deleted(p) == {"t2", "t5"}
    assert gone(p) == {digest(2)} and p.order == (digest(2),)
    assert reason(p, "t3") == f"kept on a second look: now points to {digest(0)}"
    assert reason(p, "t4") == "kept on a second look: no longer in the repository"
    assert reason(p, digest(5)) == "kept on a second look: tagged pin"
    # untagged by someone else meanwhile: no longer this run's to delete
    assert reason(p, digest(4)) == (
        "kept on a second look: untagged before this run (no untaggedafter)"
    )
    spared = {getattr(v, "tag", None) or v.digest for v in p.spared}
    assert spared == {"t3", "t4", digest(3), digest(4), digest(5)}


# -- properties -------------------------------------------------------------------------------

NAMES = st.sampled_from(["latest", "1.0.0", "v2.1.3", "1.0.0-rc1", "ci-1", "ci-2", "dev", "x"])


@st.composite
def repositories(draw: st.DrawFn) -> RepositorySnapshot:
    """Up to 12 manifests, each maybe an index of earlier ones or a referrer of an earlier one,
    and tags on them (some attached tags), all with random times."""
    repo = Repo()
    count = draw(st.integers(1, 12))
    made: list[Digest] = []
    for n in range(count):
        kind = draw(st.sampled_from(["image", "index", "referrer"])) if made else "image"
        children = (
            tuple(draw(st.sets(st.sampled_from(made), max_size=3))) if kind == "index" else ()
        )
        subject = draw(st.sampled_from(made)) if kind == "referrer" else None
        pulled = draw(st.one_of(st.none(), st.floats(0, 60)))
        made.append(
            repo.manifest(
                n,
                draw(st.floats(0, 60)),
                pulled=pulled,
                subject=subject,
                children=children,
            )
        )
    for i in range(draw(st.integers(0, 10))):
        name = f"{draw(NAMES)}-{i}" if draw(st.booleans()) else draw(NAMES)
        repo.tag(name, draw(st.sampled_from(made)), draw(st.floats(0, 60)))
    for target in draw(st.lists(st.sampled_from(made), max_size=2)):
        repo.tag(f"sha256-{target.hex}.sig", draw(st.sampled_from(made)), draw(st.floats(0, 60)))
    return repo.snapshot()


POLICIES = st.builds(
    policy,
    keeplatest=st.integers(0, 4),
    keeppushedwithin=st.one_of(st.none(), st.floats(1, 50).map(lambda d: d * DAY)),
    keeppulledwithin=st.one_of(st.none(), st.floats(1, 50).map(lambda d: d * DAY)),
    keeptags=st.sampled_from([(), (RELEASE,), ("latest", "dev")]),
    untaggedafter=st.one_of(st.none(), st.floats(0.5, 50).map(lambda d: d * DAY)),
    immutabletags=st.sampled_from([(), ("v.*",)]),
)


@settings(max_examples=150, deadline=None)
@given(repositories(), POLICIES)
def test_plans_never_break_the_promises(
    snapshot: RepositorySnapshot, rules: RetentionPolicy
) -> None:
    p = plan(snapshot, rules, NOW)
    kept_tags = {v.tag: v for v in p.kept_tags}
    kept = {v.digest for v in p.manifests if v.keep}
    doomed = {v.digest for v in p.manifests if not v.keep}
    assert {v.tag for v in p.tags} == {t.tag for t in snapshot.tags}
    assert {v.digest for v in p.manifests} == set(snapshot.manifests)
    for tag in snapshot.tags:
        # what keeptags and immutabletags match is never deleted
        if any(p_.fullmatch(tag.tag) for p_ in rules._keep + rules._immutable):
            assert tag.tag in kept_tags
        # a kept tag's manifest stays
        if tag.tag in kept_tags and tag.digest in snapshot.manifests:
            assert tag.digest in kept
    # never fewer tags than keeplatest (counting those not attached to a manifest)
    protected = rules._keep + rules._immutable
    ranked = [
        t
        for t in snapshot.tags
        if not rules.tag_rules
        or attached_subject(t.tag, snapshot.manifests) is None
        or any(p_.fullmatch(t.tag) for p_ in protected)
    ]
    assert len([t for t in ranked if t.tag in kept_tags]) >= min(rules.keeplatest, len(ranked))
    # without tag rules, no tag goes
    if not rules.tag_rules:
        assert not p.deleted_tags
    for record in snapshot.manifests.values():
        if record.digest in kept:
            # the children of a kept index and the referrers of a kept manifest stay
            assert all(c in kept for c in record.children if c in snapshot.manifests)
        if record.subject in kept:
            assert record.digest in kept
    # the order holds every deleted manifest once, each after what hangs on it
    assert sorted(p.order, key=str) == sorted(doomed, key=str)
    position = {d: i for i, d in enumerate(p.order)}
    for record in snapshot.manifests.values():
        if record.digest in doomed:
            for child in record.children:
                if child in doomed:
                    assert position[child] < position[record.digest]
            if record.subject in doomed:
                assert position[record.digest] < position[record.subject]
    # planning on the same view again changes nothing
    assert narrow(p, plan(snapshot, rules, NOW)) == p
