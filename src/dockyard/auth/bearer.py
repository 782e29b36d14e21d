"""Bearer tokens on the registry side (registry:2's ``auth.token``): verified JWTs, whose
``access`` claim says what the caller may do. Loaded only when token auth is configured."""

from __future__ import annotations

import logging

from aiohttp import web

from dockyard.auth.access import Identity, Need, Policy, TokenGrants, scope_for
from dockyard.auth.middleware import TOKEN_PATH, unauthorized
from dockyard.auth.tokens import TokenInvalid, TokenVerifier
from dockyard.http.request import client_address, url_for

log = logging.getLogger("dockyard.auth")


class BearerAuthenticator:
    """registry:2's ``auth.token``: JWTs from a token server (external, or Dockyard's own)."""

    def __init__(
        self, verifier: TokenVerifier, realm: str, service: str, policy: Policy | None
    ) -> None:
        self.verifier = verifier
        self.realm = realm
        self.service = service
        self.policy = policy

    def challenge(
        self, request: web.Request, need: Need, name: str | None, error: str | None = None
    ) -> str:
        realm = self.realm or url_for(request, TOKEN_PATH)
        parts = [f'realm="{realm}"', f'service="{self.service}"']
        scope = scope_for(need, name)
        if scope is not None:
            parts.append(f'scope="{scope}"')
        if error:
            parts.append(f'error="{error}"')
        return "Bearer " + ",".join(parts)

    async def identify(self, request: web.Request, need: Need, name: str | None) -> Identity:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise unauthorized(self.challenge(request, need, name))
        try:
            verified = self.verifier.verify(token.strip())
        except TokenInvalid as exc:
            log.info(
                "token refused: %s", exc, extra={"fields": {"remote": client_address(request)}}
            )
            raise unauthorized(
                self.challenge(request, need, name, "invalid_token"), "invalid token"
            ) from None
        return Identity(
            user=verified.subject,
            grants=TokenGrants(verified.access, verified.subject, self.policy),
        )
