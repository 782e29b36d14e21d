"""The auth middleware: who is calling (Basic against htpasswd, or a Bearer token) and may they
do what the handler needs.

- no or bad credentials: 401 UNAUTHORIZED with a ``WWW-Authenticate`` challenge (Basic with the
  realm, or Bearer with realm, service and the scope the request needs);
- right credentials, missing right: 403 DENIED (a 401 would make clients retry in a loop);
- too many failures for this user from this address, or from this address for any user: 429
  TOOMANYREQUESTS with Retry-After (see auth.throttle).

Every ``/v2`` route requires at least an authenticated caller, including ``/v2/`` itself (so a
browser asks for a password) and unknown ``/v2`` paths; handlers declare more with
``access.requires``. Passwords and Authorization headers are never logged.
"""

from __future__ import annotations

import base64
import binascii
import logging
from typing import Protocol

from aiohttp import web

from dockyard import tracing
from dockyard.auth.access import (
    EVERYONE,
    BasicGrants,
    Identity,
    Need,
    need_of,
    scope_for,
)
from dockyard.auth.login import BadCredentials, Login
from dockyard.errors import ErrorCode, RegistryError
from dockyard.http.request import client_address
from dockyard.http.responses import Handler

log = logging.getLogger("dockyard.auth")

#: where the middleware leaves the caller's Identity on the request (here, not in auth.access,
#: so that the supervising parent, which reads access rules, never loads aiohttp)
IDENTITY = web.RequestKey("identity", Identity)

TOKEN_PATH = "/auth/token"


def parse_basic(header: str) -> tuple[str, str] | None:
    """(user, password) from ``Basic <base64>``; None when it is not well-formed."""
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic" or not value.strip():
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    user, sep, password = decoded.partition(":")
    if not sep or not user:
        return None
    return user, password


def unauthorized(
    challenge: str, message: str = "authentication required", detail: object = None
) -> RegistryError:
    return RegistryError(
        ErrorCode.UNAUTHORIZED, message, detail, headers={"WWW-Authenticate": challenge}
    )


class Authenticator(Protocol):
    async def identify(self, request: web.Request, need: Need, name: str | None) -> Identity:
        """The caller, or raise 401/429."""
        ...

    def challenge(
        self, request: web.Request, need: Need, name: str | None, error: str | None = None
    ) -> str: ...


class BasicAuthenticator:
    """registry:2's ``auth.htpasswd``: every user may do everything registry:2 allows; Dockyard's
    administration only the users of ``auth.htpasswd.admins``."""

    def __init__(self, realm: str, login: Login, admins: frozenset[str] = frozenset()) -> None:
        self.realm = realm
        self.login = login
        self.admins = admins

    def challenge(
        self, request: web.Request, need: Need, name: str | None, error: str | None = None
    ) -> str:
        return f'Basic realm="{self.realm}"'

    async def identify(self, request: web.Request, need: Need, name: str | None) -> Identity:
        header = request.headers.get("Authorization")
        if not header:
            raise unauthorized(self.challenge(request, need, name))
        credentials = parse_basic(header)
        if credentials is None:
            raise unauthorized(
                self.challenge(request, need, name), "malformed Authorization header"
            )
        user, password = credentials
        try:
            await self.login.check(user, password, client_address(request))
        except BadCredentials:
            log.info(
                "login failed", extra={"fields": {"user": user, "remote": client_address(request)}}
            )
            raise unauthorized(
                self.challenge(request, need, name), "incorrect username or password"
            ) from None
        return Identity(user=user, grants=BasicGrants(admin=user in self.admins))


def auth_middleware(authenticator: Authenticator, prefix: str) -> web.Middleware:
    v2 = prefix + "/v2"

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        need = need_of(request.match_info.handler)
        if need is None:
            if request.path != v2 and not request.path.startswith(v2 + "/"):
                return await handler(request)  # the token endpoint, health checks
            need = Need.AUTHENTICATED
        name = request.match_info.get("name")
        with tracing.span("auth", expected=(RegistryError,)):
            identity = await authenticator.identify(request, need, name)
        if not identity.allows(need, name):
            if identity.user is None:  # an anonymous token: ask for credentials
                raise unauthorized(
                    authenticator.challenge(request, need, name, "insufficient_scope")
                )
            # 403, not 401, so clients do not loop; the challenge still names the scope the
            # request needs, so a client holding a narrower token than the user is entitled to
            # (oras-py asks per challenge) can fetch a wider one.
            scope = scope_for(need, name)
            raise RegistryError(
                ErrorCode.DENIED,
                detail={"scope": str(scope)} if scope else None,
                headers={
                    "WWW-Authenticate": authenticator.challenge(
                        request, need, name, "insufficient_scope"
                    )
                },
            )
        request[IDENTITY] = identity
        return await handler(request)

    return middleware


def identity_of(request: web.Request) -> Identity:
    """Who the middleware let in; everyone when no auth is configured."""
    return request.get(IDENTITY, EVERYONE)
