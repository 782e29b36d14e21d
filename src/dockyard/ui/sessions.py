"""The web UI's sessions: a signed cookie, no server-side state, so every worker and instance
sharing ``http.secret`` accepts it.

The cookie holds who signed in, the fingerprint of the password they used (a changed password
ends the session), a random session id (what CSRF tokens are bound to) and the expiry; it is
signed with HMAC-SHA256 under a key derived from ``http.secret``. It is ``HttpOnly``,
``SameSite=Strict``, scoped to the UI's path, and ``Secure`` whenever the browser reached us
over TLS (directly or through a trusted proxy that says so). Anonymous visitors get one too
(without a user) so that the sign-in form itself carries a CSRF token."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass

COOKIE = "dockyard_session"
#: the form field (and header) a state-changing request carries its CSRF token in
CSRF_FIELD = "csrf"

_VERSION = "v1"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class Session:
    #: random, per sign-in (a new one when the visitor signs in or out: no session fixation)
    sid: str
    expires: int
    user: str | None = None
    #: the password fingerprint at sign-in (auth.accounts.Accounts.fingerprint)
    fingerprint: str | None = None


class SessionCodec:
    def __init__(self, secret: str, lifetime: float) -> None:
        # Derived, not the secret itself: the upload state tokens are signed with http.secret
        # too, and neither kind of token may pass for the other.
        self._key = hmac.new(secret.encode(), b"dockyard ui session", hashlib.sha256).digest()
        self._csrf_key = hmac.new(secret.encode(), b"dockyard ui csrf", hashlib.sha256).digest()
        self.lifetime = lifetime

    def new(self, user: str | None = None, fingerprint: str | None = None) -> Session:
        return Session(
            sid=secrets.token_urlsafe(18),
            expires=int(time.time() + self.lifetime),
            user=user,
            fingerprint=fingerprint,
        )

    def encode(self, session: Session) -> str:
        payload = json.dumps(
            {"s": session.sid, "e": session.expires, "u": session.user, "f": session.fingerprint},
            separators=(",", ":"),
        ).encode()
        body = f"{_VERSION}.{_b64(payload)}"
        return f"{body}.{_b64(self._sign(body))}"

    def decode(self, value: str | None) -> Session | None:
        """The session the cookie holds; None when absent, forged, malformed or expired."""
        if not value or len(value) > 4096:
            return None
        version, _, rest = value.partition(".")
        payload_text, _, mac_text = rest.partition(".")
        if version != _VERSION or not payload_text or not mac_text:
            return None
        try:
            mac = _unb64(mac_text)
            if not hmac.compare_digest(mac, self._sign(f"{version}.{payload_text}")):
                return None
            data = json.loads(_unb64(payload_text))
            session = Session(
                sid=str(data["s"]),
                expires=int(data["e"]),
                user=data["u"] if isinstance(data["u"], str) else None,
                fingerprint=data["f"] if isinstance(data["f"], str) else None,
            )
        except (binascii.Error, ValueError, KeyError, TypeError):
            return None
        if session.expires < time.time():
            return None
        return session

    def csrf_token(self, session: Session) -> str:
        """The token every form of this session carries: bound to the session id, so a token
        from another session (or none) is refused."""
        return _b64(hmac.new(self._csrf_key, session.sid.encode(), hashlib.sha256).digest())

    def csrf_ok(self, session: Session | None, token: str | None) -> bool:
        if session is None or not token:
            return False
        return hmac.compare_digest(self.csrf_token(session), token)

    def _sign(self, body: str) -> bytes:
        return hmac.new(self._key, body.encode(), hashlib.sha256).digest()
