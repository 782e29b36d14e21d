"""Dockyard's built-in token server: the Docker token protocol, users from an htpasswd file,
access from the rules in the config.

Access tokens are short-lived JWTs carrying the granted ``access``. Refresh tokens (for
``offline_token=true`` / ``access_type=offline``, which ``docker login`` asks for) are JWTs too,
bound to the user's current password hash: changing the password revokes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import jwt

from dockyard.auth.access import Policy, Scope
from dockyard.auth.htpasswd import Htpasswd
from dockyard.auth.login import Login
from dockyard.auth.tokens import LEEWAY, TokenIssuer

REFRESH_AUDIENCE_SUFFIX = "#refresh"


class InvalidGrant(Exception):
    """A refresh token that is expired, forged or revoked."""


@dataclass(frozen=True)
class IssuedToken:
    token: str
    expires_in: int
    issued_at: int
    scopes: list[Scope]
    refresh_token: str | None = None

    def docker_response(self) -> dict[str, Any]:
        """The body of the token protocol's GET (and, with ``access_token``, OAuth2's POST)."""
        body: dict[str, Any] = {
            "token": self.token,
            "access_token": self.token,
            "expires_in": self.expires_in,
            "issued_at": datetime.fromtimestamp(self.issued_at, UTC)
            .isoformat()
            .replace("+00:00", "Z"),
            "scope": " ".join(str(s) for s in self.scopes),
        }
        if self.refresh_token:
            body["refresh_token"] = self.refresh_token
        return body


class TokenServer:
    def __init__(
        self,
        issuer: TokenIssuer,
        login: Login,
        policy: Policy,
        refresh_lifetime: float,
    ) -> None:
        self.issuer = issuer
        self.login = login
        self.users: Htpasswd = login.users
        self.policy = policy
        self.refresh_lifetime = refresh_lifetime

    @property
    def service(self) -> str:
        return self.issuer.service

    def issue(
        self, user: str | None, requested: list[Scope], *, offline: bool = False
    ) -> IssuedToken:
        granted = [g for g in (self.policy.grant(user, s) for s in requested) if g is not None]
        token, expires_in, issued_at = self.issuer.issue(user, granted)
        refresh = self._refresh_token(user) if offline and user is not None else None
        return IssuedToken(token, expires_in, issued_at, granted, refresh)

    def _refresh_token(self, user: str) -> str:
        token, _, _ = self.issuer.issue(
            user,
            [],
            lifetime=self.refresh_lifetime,
            extra={
                "aud": self.service + REFRESH_AUDIENCE_SUFFIX,
                "pwd": self.users.fingerprint(user),
            },
        )
        return token

    def redeem(self, refresh_token: str) -> str:
        """The user a refresh token was issued to, if it is still good."""
        try:
            claims = jwt.decode(
                refresh_token,
                key=self.issuer.key.public_key(),
                algorithms=[self.issuer.algorithm],
                audience=self.service + REFRESH_AUDIENCE_SUFFIX,
                issuer=self.issuer.issuer,
                leeway=LEEWAY,
                options={"require": ["exp", "sub", "aud"]},
            )
        except jwt.InvalidTokenError as exc:
            raise InvalidGrant(str(exc)) from None
        except RecursionError:  # deeply nested JSON: PyJWT < 2.14 lets it escape (CVE-2026-102265)
            raise InvalidGrant("JSON nested too deeply") from None
        user = claims["sub"]
        current = self.users.fingerprint(user)
        if current is None or claims.get("pwd") != current:
            raise InvalidGrant("the user or their password changed")
        return user
