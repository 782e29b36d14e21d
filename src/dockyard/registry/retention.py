"""Retention policies (``policies[].retention``): which of a repository's tags and manifests
go. This module is the planner and nothing else: a pure function from a repository's snapshot
(its tags and manifests with push and pull times, ``registry.records``), its policy and the
time to a plan saying what goes and what stays, each with the rule that decided it.
``registry.retention_run`` reads snapshots and applies plans to a store.

The rules, in the order they are asked about a tag:

1. A tag matching one of the policy's ``immutabletags`` is kept: retention never deletes what a
   client could not.
2. A tag matching one of ``keeptags`` (the whole tag, ``re.fullmatch``) is kept.
3. A tag named after a manifest of the repository (``sha256-<hex>``, or with a suffix:
   ``.sig``, ``.att``, ``.sbom``: cosign's signatures and attestations, and the OCI referrers
   tag schema) is attached to that manifest: it stays when the manifest stays and goes when it
   goes, and the other rules do not count it.
4. Any other tag is kept by ``keeplatest`` (it is among the N most recently pushed tags, which
   is also the floor: a repository never keeps fewer), ``keeppushedwithin`` or
   ``keeppulledwithin``. When the policy sets none of these nor ``keeptags``, every tag is kept
   (a policy of ``untaggedafter`` alone).

Then the manifests. Kept: those a kept tag points to, the children of a kept index, the
referrers (``subject``) of a kept manifest, and untagged manifests that were not reachable from
any tag before this run, unless ``untaggedafter`` is set and they were neither pushed nor pulled
within it. Everything else goes: the manifests of deleted tags, with the index children and
referrers that only they kept. A manifest this run leaves unreachable goes whatever
``untaggedafter`` says: the tag deletion that unreferenced it was the decision.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from dockyard.config import PolicyConfig
from dockyard.oci.digest import SUPPORTED_ALGORITHMS, Digest
from dockyard.registry.records import ManifestRecord, RepositorySnapshot, TagRecord

#: a tag named after a manifest (rule 3 above)
_ATTACHED_TAG = re.compile(r"(sha256|sha512)-([0-9a-f]+)(?:\..+)?")

#: how a manifest hangs on another: an index's child, or a referrer of its subject
CHILD = "child"
REFERRER = "referrer"


def format_period(seconds: float) -> str:
    """``604800`` -> ``7d``: a configured period as it was most likely written."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def format_age(seconds: float) -> str:
    """An age, rounded down to its largest unit (``12d``, ``5h``, ``40m``, ``3s``)."""
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


@dataclass(frozen=True)
class RetentionPolicy:
    """One policy's retention rules, ready to apply."""

    repositories: tuple[str, ...]
    keeplatest: int = 0
    keeppushedwithin: float | None = None
    keeppulledwithin: float | None = None
    keeptags: tuple[str, ...] = ()
    untaggedafter: float | None = None
    maxshare: float = 0.5
    #: the policy's immutable tags, which retention keeps as clients must
    immutabletags: tuple[str, ...] = ()
    _keep: tuple[re.Pattern[str], ...] = field(init=False, repr=False, compare=False)
    _immutable: tuple[re.Pattern[str], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_keep", tuple(re.compile(p) for p in self.keeptags))
        object.__setattr__(self, "_immutable", tuple(re.compile(p) for p in self.immutabletags))

    @classmethod
    def from_config(cls, config: PolicyConfig) -> RetentionPolicy | None:
        r = config.retention
        if r is None:
            return None
        return cls(
            repositories=tuple(config.repositories),
            keeplatest=r.keeplatest,
            keeppushedwithin=r.keeppushedwithin,
            keeppulledwithin=r.keeppulledwithin,
            keeptags=tuple(r.keeptags),
            untaggedafter=r.untaggedafter,
            maxshare=r.maxshare,
            immutabletags=tuple(config.immutabletags),
        )

    @property
    def id(self) -> str:
        """Names these rules for these repositories: changing either makes a new policy, whose
        first run only reports again. (Immutable tags are left out: they only keep more.)"""
        rules = {
            "repositories": list(self.repositories),
            "keeplatest": self.keeplatest,
            "keeppushedwithin": self.keeppushedwithin,
            "keeppulledwithin": self.keeppulledwithin,
            "keeptags": list(self.keeptags),
            "untaggedafter": self.untaggedafter,
            "maxshare": self.maxshare,
        }
        text = json.dumps(rules, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def label(self) -> str:
        return ", ".join(self.repositories)

    @property
    def tag_rules(self) -> bool:
        """Whether any rule decides about tags (else every tag is kept)."""
        return bool(
            self.keeplatest or self.keeppushedwithin or self.keeppulledwithin or self.keeptags
        )

    def matches(self, repository: str) -> bool:
        return any(fnmatch.fnmatchcase(repository, glob) for glob in self.repositories)

    def describe(self) -> dict[str, Any]:
        """The rules as configured (periods as ``7d``), for reports."""
        out: dict[str, Any] = {}
        if self.keeplatest:
            out["keeplatest"] = self.keeplatest
        for key in ("keeppushedwithin", "keeppulledwithin", "untaggedafter"):
            value = getattr(self, key)
            if value is not None:
                out[key] = format_period(value)
        if self.keeptags:
            out["keeptags"] = list(self.keeptags)
        out["maxshare"] = self.maxshare
        return out


class RetentionPolicies:
    """The configured policies in order; a repository's is the first whose globs match it (as
    ``registry.policies``), so a policy without ``retention`` exempts the repositories it
    claims from the retention of later ones."""

    def __init__(self, configs: Sequence[PolicyConfig]) -> None:
        self._claims = [(tuple(c.repositories), RetentionPolicy.from_config(c)) for c in configs]

    def of(self, repository: str) -> RetentionPolicy | None:
        for globs, policy in self._claims:
            if any(fnmatch.fnmatchcase(repository, glob) for glob in globs):
                return policy
        return None

    def all(self) -> list[RetentionPolicy]:
        return [policy for _, policy in self._claims if policy is not None]

    def __bool__(self) -> bool:
        return bool(self.all())


@dataclass(frozen=True, slots=True)
class TagVerdict:
    tag: str
    digest: Digest
    keep: bool
    #: kept: the rules that keep it; deleted: the rules that did not (none for an attached tag)
    rules: tuple[str, ...]
    reason: str
    #: planned for deletion, kept on a second look (the tag moved, or was used, since)
    spared: bool = False

    def to_json(self) -> dict[str, Any]:
        out = {
            "tag": self.tag,
            "digest": str(self.digest),
            "action": "keep" if self.keep else "delete",
            "rules": list(self.rules),
            "reason": self.reason,
        }
        if self.spared:
            out["spared"] = True
        return out


@dataclass(frozen=True, slots=True)
class ManifestVerdict:
    digest: Digest
    keep: bool
    reason: str
    spared: bool = False

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "digest": str(self.digest),
            "action": "keep" if self.keep else "delete",
            "reason": self.reason,
        }
        if self.spared:
            out["spared"] = True
        return out


@dataclass(frozen=True)
class RetentionPlan:
    repository: str
    policy: RetentionPolicy
    now: float
    #: every tag, sorted by name
    tags: tuple[TagVerdict, ...]
    #: every manifest, sorted by digest
    manifests: tuple[ManifestVerdict, ...]
    #: the manifests to delete, each after everything hanging on it that goes too (its
    #: referrers, an index's children): a run that stops half-way leaves the rest reachable
    #: from tags still to be deleted, so the next plan finds it again
    order: tuple[Digest, ...]

    @property
    def deleted_tags(self) -> list[TagVerdict]:
        return [v for v in self.tags if not v.keep]

    @property
    def kept_tags(self) -> list[TagVerdict]:
        return [v for v in self.tags if v.keep]

    @property
    def deleted_manifests(self) -> list[ManifestVerdict]:
        """In deletion order."""
        verdicts = {v.digest: v for v in self.manifests}
        return [verdicts[d] for d in self.order]

    @property
    def spared(self) -> list[TagVerdict | ManifestVerdict]:
        return [v for v in (*self.tags, *self.manifests) if v.spared]

    @property
    def empty(self) -> bool:
        """Nothing to delete."""
        return not self.order and all(v.keep for v in self.tags)

    @property
    def share(self) -> float:
        """The share of the repository's tags this plan deletes."""
        return len(self.deleted_tags) / len(self.tags) if self.tags else 0.0

    @property
    def over_share(self) -> bool:
        return self.share > self.policy.maxshare

    def to_json(self) -> dict[str, Any]:
        return {
            "repository": self.repository,
            "policy": list(self.policy.repositories),
            "policy_id": self.policy.id,
            "rules": self.policy.describe(),
            "share": round(self.share, 4),
            "tags": [v.to_json() for v in self.tags],
            "manifests": [v.to_json() for v in self.manifests],
            "order": [str(d) for d in self.order],
        }


# -- the planner -----------------------------------------------------------------------------


def _hangers(manifests: dict[Digest, ManifestRecord]) -> dict[Digest, list[tuple[Digest, str]]]:
    """digest -> the manifests hanging on it (its children if an index, its referrers), those
    the repository holds, sorted for a deterministic plan."""
    out: dict[Digest, list[tuple[Digest, str]]] = {}
    for record in manifests.values():
        for child in record.children:
            if child in manifests:
                out.setdefault(record.digest, []).append((child, CHILD))
        if record.subject is not None and record.subject in manifests:
            out.setdefault(record.subject, []).append((record.digest, REFERRER))
    for hanging in out.values():
        hanging.sort(key=lambda pair: (str(pair[0]), pair[1]))
    return out


def _grow(
    found: dict[Digest, str],
    seeds: Iterable[tuple[Digest, str]],
    hangers: dict[Digest, list[tuple[Digest, str]]],
    state: str,
    within: set[Digest] | None = None,
) -> None:
    """Add ``seeds`` (with why) to ``found`` and everything hanging on them, recursively (only
    members of ``within``, if given), each with the first reason it was reached by."""
    queue: deque[Digest] = deque()
    for digest, why in seeds:
        if digest not in found:
            found[digest] = why
            queue.append(digest)
    while queue:
        digest = queue.popleft()
        for hanging, relation in hangers.get(digest, ()):
            if hanging in found or (within is not None and hanging not in within):
                continue
            if relation == CHILD:
                found[hanging] = f"child of {state} index {digest}"
            else:
                found[hanging] = f"referrer of {state} {digest}"
            queue.append(hanging)


def _dependents_first(
    roots: Iterable[Digest], members: set[Digest], hangers: dict[Digest, list[tuple[Digest, str]]]
) -> list[Digest]:
    """``members`` in an order where everything hanging on a manifest comes before it (a
    post-order walk; content addressing makes the graph acyclic)."""
    order: list[Digest] = []
    seen: set[Digest] = set()
    for root in roots:
        if root in seen or root not in members:
            continue
        seen.add(root)
        stack: list[tuple[Digest, Iterator[tuple[Digest, str]]]] = [
            (root, iter(hangers.get(root, ())))
        ]
        while stack:
            digest, hanging = stack[-1]
            following = next(hanging, None)
            if following is None:
                stack.pop()
                order.append(digest)
            elif following[0] in members and following[0] not in seen:
                seen.add(following[0])
                stack.append((following[0], iter(hangers.get(following[0], ()))))
    return order


def attached_subject(tag: str, manifests: dict[Digest, ManifestRecord]) -> Digest | None:
    """The manifest a tag is named after (rule 3), if the repository holds it."""
    match = _ATTACHED_TAG.fullmatch(tag)
    if match is None or len(match.group(2)) != SUPPORTED_ALGORITHMS[match.group(1)]:
        return None
    digest = Digest(match.group(1), match.group(2))
    return digest if digest in manifests else None


def _pulled(tag: TagRecord, manifests: dict[Digest, ManifestRecord]) -> float | None:
    if tag.pulled is not None:
        return tag.pulled
    record = manifests.get(tag.digest)
    return record.pulled if record is not None else None


def _activity(record: ManifestRecord) -> float:
    return max(record.pushed, record.pulled or 0.0)


def _judge_tag(
    tag: TagRecord, rank: int | None, policy: RetentionPolicy, pulled: float | None, now: float
) -> TagVerdict:
    """Rules 2 and 4 (the immutable and attached tags are judged before)."""
    keeping: list[str] = []
    missed: list[tuple[str, str]] = []
    if not policy.tag_rules:
        keeping.append("no tag rules")
    matched = [p.pattern for p in policy._keep if p.fullmatch(tag.tag)]
    keeping.extend(f"keeptags {pattern}" for pattern in matched)
    if policy.keeptags and not matched:
        missed.append(("keeptags", "matches no keeptags"))
    if policy.keeplatest:
        rule = f"keeplatest {policy.keeplatest}"
        if rank is not None and rank < policy.keeplatest:
            keeping.append(rule)
        else:
            missed.append((rule, f"not among the {policy.keeplatest} most recently pushed"))
    if policy.keeppushedwithin is not None:
        rule = f"keeppushedwithin {format_period(policy.keeppushedwithin)}"
        if tag.pushed >= now - policy.keeppushedwithin:
            keeping.append(rule)
        else:
            missed.append((rule, f"pushed {format_age(now - tag.pushed)} ago"))
    if policy.keeppulledwithin is not None:
        rule = f"keeppulledwithin {format_period(policy.keeppulledwithin)}"
        if pulled is not None and pulled >= now - policy.keeppulledwithin:
            keeping.append(rule)
        else:
            last = "never pulled" if pulled is None else f"pulled {format_age(now - pulled)} ago"
            missed.append((rule, last))
    if keeping:
        return TagVerdict(
            tag.tag, tag.digest, True, tuple(keeping), "kept by " + ", ".join(keeping)
        )
    details = "; ".join(
        detail if rule == "keeptags" else f"{detail} ({rule})" for rule, detail in missed
    )
    return TagVerdict(
        tag.tag,
        tag.digest,
        False,
        tuple(rule for rule, _ in missed),
        f"no rule keeps it: {details}",
    )


def plan(snapshot: RepositorySnapshot, policy: RetentionPolicy, now: float) -> RetentionPlan:
    """What ``policy`` deletes of the repository ``snapshot`` shows, at time ``now``."""
    manifests = snapshot.manifests
    hangers = _hangers(manifests)
    reachable: dict[Digest, str] = {}
    _grow(reachable, ((t.digest, "") for t in snapshot.tags if t.digest in manifests), hangers, "")

    verdicts: dict[str, TagVerdict] = {}
    attached: dict[str, Digest] = {}
    ordinary: list[TagRecord] = []
    for tag in snapshot.tags:
        immutable = [p.pattern for p in policy._immutable if p.fullmatch(tag.tag)]
        subject = attached_subject(tag.tag, manifests) if policy.tag_rules else None
        if immutable:
            rules = tuple(f"immutabletags {pattern}" for pattern in immutable)
            verdicts[tag.tag] = TagVerdict(
                tag.tag, tag.digest, True, rules, "kept by " + ", ".join(rules)
            )
        elif subject is not None and not any(p.fullmatch(tag.tag) for p in policy._keep):
            attached[tag.tag] = subject
        else:
            ordinary.append(tag)
    # Immutable tags count in the ranking: "the N most recently pushed tags" means all of them.
    ranked = sorted(
        (t for t in snapshot.tags if t.tag not in attached), key=lambda t: (-t.pushed, t.tag)
    )
    rank = {t.tag: i for i, t in enumerate(ranked)}
    for tag in ordinary:
        verdicts[tag.tag] = _judge_tag(tag, rank[tag.tag], policy, _pulled(tag, manifests), now)

    kept: dict[Digest, str] = {}
    by_digest: dict[Digest, list[str]] = {}
    for verdict in verdicts.values():
        if verdict.keep and verdict.digest in manifests:
            by_digest.setdefault(verdict.digest, []).append(verdict.tag)
    _grow(
        kept,
        ((d, "tagged " + ", ".join(sorted(by_digest[d]))) for d in sorted(by_digest, key=str)),
        hangers,
        "kept",
    )
    untagged: list[tuple[Digest, str]] = []
    for digest in sorted((d for d in manifests if d not in reachable), key=str):
        record = manifests[digest]
        used = format_age(now - _activity(record))
        if policy.untaggedafter is None:
            untagged.append((digest, "untagged before this run (no untaggedafter)"))
        elif _activity(record) >= now - policy.untaggedafter:
            period = format_period(policy.untaggedafter)
            untagged.append(
                (digest, f"untagged, last used {used} ago, within untaggedafter {period}")
            )
    _grow(kept, untagged, hangers, "kept")

    # Attached tags follow their manifest; keeping one keeps what it points to, which may keep
    # the manifest another attached tag is named after.
    by_name = {t.tag: t for t in snapshot.tags}
    changed = True
    while changed:
        changed = False
        for tag in sorted(attached):
            subject = attached[tag]
            if subject not in kept:
                continue
            record = by_name[tag]
            rule = f"attached to kept {subject}"
            verdicts[tag] = TagVerdict(tag, record.digest, True, (rule,), f"kept: {rule}")
            del attached[tag]
            if record.digest in manifests:
                _grow(kept, [(record.digest, f"tagged {tag}")], hangers, "kept")
            changed = True
    for tag, subject in attached.items():
        verdicts[tag] = TagVerdict(
            tag, by_name[tag].digest, False, (), f"attached to {subject}, which no rule keeps"
        )

    deleted = {d for d in manifests if d not in kept}
    tags_gone: dict[Digest, list[str]] = {}
    for verdict in verdicts.values():
        if not verdict.keep and verdict.digest in deleted:
            tags_gone.setdefault(verdict.digest, []).append(verdict.tag)
    why_deleted: dict[Digest, str] = {}
    roots = sorted(tags_gone, key=str)
    _grow(
        why_deleted,
        ((d, "its tags are deleted: " + ", ".join(sorted(tags_gone[d]))) for d in roots),
        hangers,
        "deleted",
        within=deleted,
    )
    for digest in sorted(deleted - set(why_deleted), key=str):
        # Unreachable before this run (see the module docstring), so untaggedafter is set.
        used = format_age(now - _activity(manifests[digest]))
        period = format_period(policy.untaggedafter or 0.0)
        why_deleted[digest] = f"untagged, last used {used} ago (untaggedafter {period})"
    order = _dependents_first([*roots, *sorted(deleted, key=str)], deleted, hangers)

    manifest_verdicts = tuple(
        ManifestVerdict(d, d in kept, kept[d] if d in kept else why_deleted[d])
        for d in sorted(manifests, key=str)
    )
    return RetentionPlan(
        repository=snapshot.name,
        policy=policy,
        now=now,
        tags=tuple(verdicts[t] for t in sorted(verdicts)),
        manifests=manifest_verdicts,
        order=tuple(order),
    )


def narrow(first: RetentionPlan, second: RetentionPlan) -> RetentionPlan:
    """``first``, deleting only what ``second`` (planned on a fresher view of the repository)
    deletes too: a tag only if it still points where it did. What ``first`` alone would have
    deleted is kept and marked spared, with the reason of the second look."""
    again_tags = {v.tag: v for v in second.tags}
    again_manifests = {v.digest: v for v in second.manifests}
    tags = []
    for verdict in first.tags:
        other = again_tags.get(verdict.tag)
        if verdict.keep or (
            other is not None and not other.keep and other.digest == verdict.digest
        ):
            tags.append(verdict)
            continue
        if other is None:
            why = "no longer in the repository"
        elif other.digest != verdict.digest:
            why = f"now points to {other.digest}"
        else:
            why = other.reason
        tags.append(
            replace(verdict, keep=True, reason=f"kept on a second look: {why}", spared=True)
        )
    manifests = []
    for verdict in first.manifests:
        other_manifest = again_manifests.get(verdict.digest)
        if verdict.keep or (other_manifest is not None and not other_manifest.keep):
            manifests.append(verdict)
            continue
        why = "no longer in the repository" if other_manifest is None else other_manifest.reason
        manifests.append(
            replace(verdict, keep=True, reason=f"kept on a second look: {why}", spared=True)
        )
    still = {v.digest for v in manifests if not v.keep}
    return replace(
        first,
        tags=tuple(tags),
        manifests=tuple(manifests),
        order=tuple(d for d in first.order if d in still),
    )
