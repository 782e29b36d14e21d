"""Build the configured authentication (once per worker) and check its files at start-up.

``prepare`` runs in the supervising parent before the workers fork, so it loads nothing of the
HTTP stack; ``build_auth`` runs in each worker."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dockyard.auth.access import Policy, Rule
from dockyard.auth.accounts import OPEN, AccountKind, Accounts
from dockyard.auth.htpasswd import Htpasswd
from dockyard.config import Config, TokenServerConfig
from dockyard.errors import ConfigError

if TYPE_CHECKING:
    from aiohttp import web

    from dockyard.auth.throttle import FailureTable, LoginThrottle
    from dockyard.auth.tokenserver import TokenServer

DEFAULT_ISSUER = "dockyard"
DEFAULT_SERVICE = "dockyard"


@dataclass
class Auth:
    middleware: web.Middleware
    #: None when nothing logs in with a password here (tokens from another token server)
    throttle: LoginThrottle | None = None
    token_server: TokenServer | None = None
    #: who may sign in to the web UI, and what they may do
    accounts: Accounts = OPEN


def signing_key_path(config: Config, server: TokenServerConfig) -> str:
    if server.key:
        return server.key
    if config.storage.filesystem is None:
        raise ConfigError("auth.token.server.key", "required with this storage driver")
    root = os.path.abspath(config.storage.filesystem.rootdirectory)
    # Beside docker/registry/v2, where registry:2 never looks.
    return os.path.join(root, "dockyard", "token-signing-key.pem")


def policy_of(server: TokenServerConfig) -> Policy:
    return Policy(
        rules=tuple(
            Rule(
                repository=r.repository,
                actions=frozenset(r.actions),
                users=frozenset(r.users),
                groups=frozenset(r.groups),
                anonymous=r.anonymous,
            )
            for r in server.access
        ),
        groups={g: frozenset(members) for g, members in server.groups.items()},
        admins=frozenset(server.admins),
    )


def _token_keys(config: Config) -> tuple[Any, Any]:
    """(the verifier, the built-in server's signing key or None); generates the key on first
    start."""
    from dockyard.auth.tokens import TokenVerifier, libtrust_kid, load_or_create_signing_key

    token = config.auth.token
    assert token is not None
    key = None
    own: dict[str, Any] = {}
    if token.server is not None:
        key = load_or_create_signing_key(signing_key_path(config, token.server))
        own[libtrust_kid(key.public_key())] = key.public_key()
    verifier = TokenVerifier.from_files(
        issuer=token.issuer or DEFAULT_ISSUER,
        service=token.service or DEFAULT_SERVICE,
        rootcertbundle=token.rootcertbundle,
        jwks=token.jwks,
        extra_keys=own,
    )
    return verifier, key


def _users(path: str, cache_ttl: float, key: str) -> Htpasswd:
    return Htpasswd(path, cache_ttl, config_key=key)


def prepare(config: Config) -> None:
    """Start-up checks, in the parent before workers fork: htpasswd files parse (bcrypt only),
    token keys load, and the built-in server's signing key exists (generated once here, so
    every worker signs with the same key)."""
    auth = config.auth
    if auth.htpasswd is not None:
        _users(auth.htpasswd.path, auth.htpasswd.cachettl, "auth.htpasswd.path")
    if auth.token is not None:
        if auth.token.server is not None:
            server = auth.token.server
            _users(server.htpasswd, server.cachettl, "auth.token.server.htpasswd")
        _token_keys(config)


def build_throttle(config: Config, table: FailureTable | None) -> LoginThrottle:
    """The login throttle: in Redis when ``redis.addr`` is set (shared by every instance),
    else in ``table``, shared by this instance's workers (a table of its own without one)."""
    from dockyard.auth.throttle import FailureTable, LoginThrottle, redis_failures

    rules = config.http.limits.login
    redis = redis_failures(config.redis, rules) if config.redis.addr else None
    return LoginThrottle(rules, table if table is not None else FailureTable(), redis)


def build_auth(config: Config, failures: FailureTable | None = None) -> Auth | None:
    """The auth middleware; ``failures``: the login failure table the workers share."""
    from dockyard.auth.login import Login
    from dockyard.auth.middleware import BasicAuthenticator, auth_middleware

    auth = config.auth
    prefix = config.http.prefix
    if auth.htpasswd is not None:
        throttle = build_throttle(config, failures)
        users = _users(auth.htpasswd.path, auth.htpasswd.cachettl, "auth.htpasswd.path")
        login = Login(users, throttle)
        admins = frozenset(auth.htpasswd.admins)
        authenticator = BasicAuthenticator(auth.htpasswd.realm, login, admins)
        accounts = Accounts(AccountKind.HTPASSWD, login, admins)
        return Auth(auth_middleware(authenticator, prefix), throttle, accounts=accounts)
    token = auth.token
    if token is None:
        return None
    from dockyard.auth.bearer import BearerAuthenticator
    from dockyard.auth.tokens import TokenIssuer
    from dockyard.auth.tokenserver import TokenServer

    verifier, key = _token_keys(config)
    service = token.service or DEFAULT_SERVICE
    server = None
    policy = None
    throttle = None
    accounts = Accounts(AccountKind.EXTERNAL)
    if token.server is not None:
        throttle = build_throttle(config, failures)
        issuer = TokenIssuer(
            key,
            issuer=token.issuer or DEFAULT_ISSUER,
            service=service,
            expiration=token.server.expiration,
        )
        users = _users(token.server.htpasswd, token.server.cachettl, "auth.token.server.htpasswd")
        policy = policy_of(token.server)
        login = Login(users, throttle)
        server = TokenServer(issuer, login, policy, token.server.refreshexpiration)
        accounts = Accounts(AccountKind.TOKEN_SERVER, login, policy=policy)
    authenticator = BearerAuthenticator(verifier, token.realm, service, policy)
    return Auth(auth_middleware(authenticator, prefix), throttle, server, accounts)
