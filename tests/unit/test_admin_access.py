"""Who administers Dockyard (the JSON API's admin routes): the scope ``dockyard:admin:*``, granted
by the built-in token server to its ``admins``, carried by a token, or held by the users of
``auth.htpasswd.admins``."""

from __future__ import annotations

import pytest

from dockyard.auth.access import (
    ADMIN_SCOPE,
    EVERYONE,
    BasicGrants,
    Identity,
    Need,
    Policy,
    Scope,
    TokenGrants,
    scope_for,
)
from dockyard.config import load_config
from dockyard.errors import ConfigError


def test_the_admin_need_asks_for_the_admin_scope() -> None:
    assert scope_for(Need.ADMIN, "team/app") == ADMIN_SCOPE
    assert str(ADMIN_SCOPE) == "dockyard:admin:*"
    assert Scope.parse("dockyard:admin:*") == ADMIN_SCOPE
    assert len({need.value for need in Need}) == len(Need)  # no member is an alias of another


def test_the_token_server_grants_it_to_its_admins_only() -> None:
    policy = Policy(admins=frozenset({"alice"}))
    assert policy.grant("alice", ADMIN_SCOPE) == ADMIN_SCOPE
    assert policy.grant("alice", Scope("dockyard", "admin", ("pull",))) == ADMIN_SCOPE
    assert policy.grant("bob", ADMIN_SCOPE) is None
    assert policy.grant(None, ADMIN_SCOPE) is None
    assert policy.grant("alice", Scope("dockyard", "other", ("*",))) is None


def test_a_token_must_carry_it() -> None:
    policy = Policy(admins=frozenset({"alice"}))
    carried = TokenGrants((ADMIN_SCOPE,), "alice", policy)
    catalog_only = TokenGrants((Scope("registry", "catalog", ("*",)),), "alice", policy)
    assert Identity("alice", carried).is_admin
    assert Identity("alice", carried).allows(Need.ADMIN, None)
    assert not Identity("alice", catalog_only).is_admin  # an admin's token for something else
    external = TokenGrants((ADMIN_SCOPE,), "ops", None)  # another token server's say-so
    assert Identity("ops", external).is_admin


def test_htpasswd_users_listed_as_admins() -> None:
    admin = Identity("alice", BasicGrants(admin=True))
    user = Identity("bob", BasicGrants())
    assert admin.is_admin and not user.is_admin
    assert not user.allows(Need.ADMIN, None)
    # everything else stays as registry:2 has it: every user may do everything
    assert user.allows(Need.DELETE, "any/repo") and user.allows(Need.CATALOG, None)
    assert EVERYONE.is_admin  # no auth at all: anyone may do anything


def test_htpasswd_admins_configuration() -> None:
    base = {"REGISTRY_AUTH": "htpasswd", "REGISTRY_AUTH_HTPASSWD_PATH": "/auth/users"}
    config = load_config(None, environ={**base, "REGISTRY_AUTH_HTPASSWD_ADMINS": "alice, bob"})
    assert config.auth.htpasswd is not None
    assert config.auth.htpasswd.admins == ["alice", "bob"]
    assert load_config(None, environ=base).auth.htpasswd.admins == []  # type: ignore[union-attr]
    for bad in ('["a:b"]', '[""]', '[" a"]'):
        with pytest.raises(ConfigError, match=r"auth\.htpasswd\.admins"):
            load_config(None, environ={**base, "REGISTRY_AUTH_HTPASSWD_ADMINS": bad})
