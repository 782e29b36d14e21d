"""Build the configured authentication (once per worker) and check its files at start-up."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from dockyard.auth.access import Policy, Rule
from dockyard.auth.htpasswd import Htpasswd
from dockyard.auth.login import Login
from dockyard.auth.middleware import BasicAuthenticator, BearerAuthenticator, auth_middleware
from dockyard.auth.throttle import FailureThrottle
from dockyard.auth.tokens import TokenIssuer, TokenVerifier, load_or_create_signing_key
from dockyard.auth.tokenserver import TokenServer
from dockyard.config import Config, TokenServerConfig
from dockyard.errors import ConfigError

DEFAULT_ISSUER = "dockyard"
DEFAULT_SERVICE = "dockyard"


@dataclass
class Auth:
    middleware: web.Middleware
    token_server: TokenServer | None = None


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


def prepare(config: Config) -> None:
    """Start-up checks, in the parent before workers fork: htpasswd files parse (bcrypt only),
    token keys load, and the built-in server's signing key exists (generated once here, so
    every worker signs with the same key)."""
    build_auth(config)


def build_auth(config: Config) -> Auth | None:
    auth = config.auth
    prefix = config.http.prefix
    throttle = FailureThrottle()
    if auth.htpasswd is not None:
        users = Htpasswd(
            auth.htpasswd.path, auth.htpasswd.cachettl, config_key="auth.htpasswd.path"
        )
        authenticator = BasicAuthenticator(auth.htpasswd.realm, Login(users, throttle))
        return Auth(auth_middleware(authenticator, prefix))
    token = auth.token
    if token is None:
        return None
    issuer_name = token.issuer or DEFAULT_ISSUER
    service = token.service or DEFAULT_SERVICE
    server = None
    own_keys: dict[str, Any] = {}
    policy = None
    if token.server is not None:
        key = load_or_create_signing_key(signing_key_path(config, token.server))
        issuer = TokenIssuer(
            key, issuer=issuer_name, service=service, expiration=token.server.expiration
        )
        users = Htpasswd(
            token.server.htpasswd, token.server.cachettl, config_key="auth.token.server.htpasswd"
        )
        policy = policy_of(token.server)
        server = TokenServer(issuer, Login(users, throttle), policy, token.server.refreshexpiration)
        own_keys[issuer.kid] = key.public_key()
    verifier = TokenVerifier.from_files(
        issuer=issuer_name,
        service=service,
        rootcertbundle=token.rootcertbundle,
        jwks=token.jwks,
        extra_keys=own_keys,
    )
    authenticator = BearerAuthenticator(verifier, token.realm, service, policy)
    return Auth(auth_middleware(authenticator, prefix), server)
