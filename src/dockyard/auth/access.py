"""What a request needs and what an identity may do.

Handlers declare their need with :func:`requires`; the auth middleware reads it. Scopes follow
the Docker token protocol (``repository:team/app:pull,push``, ``registry:catalog:*``); rules are
Dockyard's access control for the built-in token server: repository globs, users, groups,
actions, an optional anonymous rule, and admins.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, TypeVar

ACTIONS = ("pull", "push", "delete")

F = TypeVar("F", bound=Callable[..., Any])
_NEED_ATTR = "__dockyard_need__"


class Need(Enum):
    """What a handler requires of the caller, beyond being authenticated."""

    AUTHENTICATED = ()
    PULL = ("pull",)
    PUSH = ("pull", "push")  # registry:2 asks both for uploads and manifest pushes
    DELETE = ("delete",)
    CATALOG = ("*",)
    #: Dockyard's administration (the JSON API's admin routes): the scope ``dockyard:admin:*``
    #: (:data:`ADMIN_SCOPE`), not a repository action; the value only keeps members distinct
    ADMIN = ("admin",)

    @property
    def actions(self) -> tuple[str, ...]:
        return self.value


def requires(need: Need) -> Callable[[F], F]:
    def mark(handler: F) -> F:
        setattr(handler, _NEED_ATTR, need)
        return handler

    return mark


def need_of(handler: Any) -> Need | None:
    return getattr(handler, _NEED_ATTR, None)


@dataclass(frozen=True, slots=True)
class Scope:
    """One entry of the token protocol's ``scope``: ``type:name:action,action``."""

    type: str
    name: str
    actions: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.type}:{self.name}:{','.join(self.actions)}"

    def to_claim(self) -> dict[str, Any]:
        return {"type": self.type, "name": self.name, "actions": list(self.actions)}

    @classmethod
    def parse(cls, text: str) -> Scope | None:
        """None for text that is not a scope (ignored, as registry:2's token servers do)."""
        head, sep, actions = text.rpartition(":")
        if not sep:
            return None
        kind, sep, name = head.partition(":")
        if not sep or not kind or not name:
            return None
        kind = kind.split("(", 1)[0]  # "repository(plugin)" -> "repository"
        return cls(kind, name, tuple(a for a in actions.split(",") if a))


def parse_scopes(values: Iterable[str]) -> list[Scope]:
    """Scopes from repeated ``scope`` parameters, each possibly space-separated (OAuth2)."""
    out: list[Scope] = []
    for value in values:
        for part in value.split():
            scope = Scope.parse(part)
            if scope is not None:
                out.append(scope)
    return out


#: What makes a caller a Dockyard administrator: the built-in token server grants it to its
#: ``admins``; an external token server grants it to whom it chooses (its ``access`` claim
#: entry ``{"type": "dockyard", "name": "admin", "actions": ["*"]}``); with htpasswd the users
#: of ``auth.htpasswd.admins`` hold it.
ADMIN_SCOPE = Scope("dockyard", "admin", ("*",))


def is_admin_scope(scope: Scope) -> bool:
    return scope.type == ADMIN_SCOPE.type and scope.name == ADMIN_SCOPE.name


def scope_for(need: Need, name: str | None) -> Scope | None:
    if need is Need.CATALOG:
        return Scope("registry", "catalog", ("*",))
    if need is Need.ADMIN:
        return ADMIN_SCOPE
    if need is Need.AUTHENTICATED or name is None:
        return None
    return Scope("repository", name, need.actions)


# -- access rules (the built-in token server) ---------------------------------------------------


@dataclass(frozen=True)
class Rule:
    repository: str
    actions: frozenset[str]
    users: frozenset[str] = frozenset()
    groups: frozenset[str] = frozenset()
    anonymous: bool = False

    def applies_to(self, user: str | None, groups: frozenset[str]) -> bool:
        if self.anonymous:
            return True
        if user is None:
            return False
        return "*" in self.users or user in self.users or bool(self.groups & groups)

    def matches(self, repository: str) -> bool:
        return fnmatch.fnmatchcase(repository, self.repository)


@dataclass(frozen=True)
class Policy:
    rules: tuple[Rule, ...] = ()
    groups: dict[str, frozenset[str]] = field(default_factory=dict)
    admins: frozenset[str] = frozenset()

    @property
    def has_anonymous(self) -> bool:
        """Whether any rule lets anonymous callers do something."""
        return any(rule.anonymous and rule.actions for rule in self.rules)

    def groups_of(self, user: str | None) -> frozenset[str]:
        if user is None:
            return frozenset()
        return frozenset(g for g, members in self.groups.items() if user in members)

    def allowed(self, user: str | None, repository: str) -> frozenset[str]:
        """Every action ``user`` (None: anonymous) may take on ``repository``."""
        if user is not None and user in self.admins:
            return frozenset(ACTIONS)
        groups = self.groups_of(user)
        granted: set[str] = set()
        for rule in self.rules:
            if rule.matches(repository) and rule.applies_to(user, groups):
                granted |= rule.actions
        return frozenset(ACTIONS) if "*" in granted else frozenset(granted & set(ACTIONS))

    def grant(self, user: str | None, scope: Scope) -> Scope | None:
        """The part of a requested scope this user gets; None when nothing is granted."""
        if scope.type == "registry" and scope.name == "catalog":
            # Listing is granted to any authenticated user; the catalog then shows only the
            # repositories the caller may pull.
            return scope if user is not None else None
        if is_admin_scope(scope):
            return ADMIN_SCOPE if user is not None and user in self.admins else None
        if scope.type != "repository":
            return None
        wanted = set(ACTIONS) if "*" in scope.actions else set(scope.actions)
        actions = wanted & self.allowed(user, scope.name)
        if not actions:
            return None
        return Scope(scope.type, scope.name, tuple(a for a in ACTIONS if a in actions))


# -- what an authenticated caller may do ----------------------------------------------------------


class Grants:
    """Everything: no auth configured (anyone may do anything, Dockyard's administration
    included, as registry:2 without auth lets anyone delete)."""

    def allows(self, scope: Scope) -> bool:
        return True

    def lists(self, repository: str) -> bool:
        """Whether the catalog shows ``repository`` to this caller."""
        return True


@dataclass(frozen=True)
class BasicGrants(Grants):
    """htpasswd: every user may push, pull and delete everything, as in registry:2; only the
    users of ``auth.htpasswd.admins`` hold :data:`ADMIN_SCOPE` (htpasswd has no other way to say
    who administers, and an empty list means nobody rather than everybody)."""

    admin: bool = False

    def allows(self, scope: Scope) -> bool:
        return self.admin if is_admin_scope(scope) else True


@dataclass(frozen=True)
class TokenGrants(Grants):
    """What a bearer token's ``access`` claim grants. With the built-in token server's policy,
    the catalog shows only what the policy lets the token's subject pull."""

    granted: tuple[Scope, ...]
    subject: str | None = None
    policy: Policy | None = None

    def allows(self, scope: Scope) -> bool:
        have: set[str] = set()
        for g in self.granted:
            if g.type == scope.type and g.name == scope.name:
                have |= set(g.actions)
        return "*" in have or set(scope.actions) <= have

    def lists(self, repository: str) -> bool:
        if self.policy is None:
            return True
        return "pull" in self.policy.allowed(self.subject, repository)


@dataclass(frozen=True)
class PolicyGrants(Grants):
    """What the built-in token server's policy grants ``user`` (None: anonymous) now. The web
    UI's sessions hold no token: they are checked against the policy at every request, so a
    rule changed or a user removed takes effect at once."""

    user: str | None
    policy: Policy

    def allows(self, scope: Scope) -> bool:
        granted = self.policy.grant(self.user, scope)
        if granted is None:
            return False
        return "*" in granted.actions or set(scope.actions) <= set(granted.actions)

    def lists(self, repository: str) -> bool:
        return "pull" in self.policy.allowed(self.user, repository)


@dataclass(frozen=True)
class Identity:
    user: str | None
    grants: Grants

    def allows(self, need: Need, name: str | None) -> bool:
        scope = scope_for(need, name)
        return scope is None or self.grants.allows(scope)

    def may_pull(self, repository: str) -> bool:
        return self.grants.allows(Scope("repository", repository, ("pull",)))

    def may_delete(self, repository: str) -> bool:
        return self.grants.allows(Scope("repository", repository, ("delete",)))

    @property
    def is_admin(self) -> bool:
        """Whether the caller holds :data:`ADMIN_SCOPE` (a token must carry it: being one of
        the token server's ``admins`` is not enough for a token issued for something else)."""
        return self.grants.allows(ADMIN_SCOPE)

    def lists(self, repository: str) -> bool:
        return self.grants.lists(repository)


EVERYONE = Identity(user=None, grants=Grants())
