"""Bearer tokens (JWT) as registry:2's ``auth.token`` verifies them, and the keys behind them.

Trusted keys come from ``rootcertbundle`` (certificates: a token names its key by ``kid`` —
libtrust's key ID, as docker_auth and registry:2's own tooling compute it — or carries an ``x5c``
chain that ends at one of them), from ``jwks`` (a JSON Web Key Set, keys by ``kid``), and from
the built-in token server's own signing key.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import jwt
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from dockyard.auth.access import Scope
from dockyard.errors import ConfigError

log = logging.getLogger("dockyard.auth")

ALGORITHMS = [
    "RS256",
    "RS384",
    "RS512",
    "ES256",
    "ES384",
    "ES512",
    "PS256",
    "PS384",
    "PS512",
    "EdDSA",
]
#: clock skew tolerated on exp/nbf/iat
LEEWAY = 60


def libtrust_kid(public_key: Any) -> str:
    """libtrust's key ID: base32 of the first 240 bits of SHA-256 of the DER public key, in
    twelve ':'-separated groups of four."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    encoded = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode().rstrip("=")
    return ":".join(encoded[i : i + 4] for i in range(0, len(encoded), 4))


class TokenInvalid(Exception):
    """The token cannot be trusted; the message says why (logged, not sent)."""


@dataclass(frozen=True)
class VerifiedToken:
    subject: str | None
    access: tuple[Scope, ...]


def _load_certificates(path: str, key: str) -> list[x509.Certificate]:
    try:
        with open(path, "rb") as f:
            certs = x509.load_pem_x509_certificates(f.read())
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise ConfigError(key, f"{path} holds no PEM certificates ({exc})") from None
    return certs


def _load_jwks(path: str, key: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            keyset = jwt.PyJWKSet.from_dict(json.load(f))
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror}") from None
    except (ValueError, jwt.PyJWKSetError) as exc:
        raise ConfigError(key, f"{path} is not a usable JWKS: {exc}") from None
    return {k.key_id: k.key for k in keyset.keys if k.key_id}


class TokenVerifier:
    def __init__(
        self,
        *,
        issuer: str,
        service: str,
        roots: list[x509.Certificate],
        keys: dict[str, Any],
    ) -> None:
        self.issuer = issuer
        self.service = service
        self.roots = roots
        self._root_der = {c.public_bytes(serialization.Encoding.DER) for c in roots}
        self.keys = dict(keys)
        for cert in roots:
            self.keys.setdefault(libtrust_kid(cert.public_key()), cert.public_key())

    @classmethod
    def from_files(
        cls,
        *,
        issuer: str,
        service: str,
        rootcertbundle: str,
        jwks: str,
        extra_keys: dict[str, Any] | None = None,
    ) -> TokenVerifier:
        roots = (
            _load_certificates(rootcertbundle, "auth.token.rootcertbundle")
            if (rootcertbundle)
            else []
        )
        keys = _load_jwks(jwks, "auth.token.jwks") if jwks else {}
        keys.update(extra_keys or {})
        if not roots and not keys:
            raise ConfigError(
                "auth.token.rootcertbundle",
                "no keys to verify tokens with (set rootcertbundle or jwks)",
            )
        return cls(issuer=issuer, service=service, roots=roots, keys=keys)

    def _key_for(self, header: dict[str, Any]) -> Any:
        chain = header.get("x5c")
        if chain:
            return self._verify_chain(chain)
        kid = header.get("kid")
        if kid is None:
            raise TokenInvalid("token names no key (no kid and no x5c)")
        key = self.keys.get(kid)
        if key is None:
            raise TokenInvalid(f"token signed by an unknown key {kid!r}")
        return key

    def _verify_chain(self, chain: list[str]) -> Any:
        """The leaf's public key, if the chain (leaf first) leads to a trusted root and every
        certificate on the way is currently valid."""
        try:
            certs = [x509.load_der_x509_certificate(base64.b64decode(c)) for c in chain]
        except (ValueError, TypeError) as exc:
            raise TokenInvalid(f"malformed x5c: {exc}") from None
        now = datetime.now(UTC)
        current, pool = certs[0], certs[1:]
        while True:
            if not current.not_valid_before_utc <= now <= current.not_valid_after_utc:
                raise TokenInvalid("a certificate in x5c is expired or not yet valid")
            if current.public_bytes(serialization.Encoding.DER) in self._root_der or any(
                _issued(current, root) for root in self.roots
            ):
                return certs[0].public_key()
            parent = next((c for c in pool if _issued(current, c)), None)
            if parent is None:
                raise TokenInvalid("x5c chain does not lead to a trusted root certificate")
            pool.remove(parent)
            current = parent

    def verify(self, token: str) -> VerifiedToken:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError as exc:
            raise TokenInvalid(f"malformed token: {exc}") from None
        except RecursionError:  # deeply nested JSON: PyJWT < 2.14 lets it escape (CVE-2026-102265)
            raise TokenInvalid("malformed token: JSON nested too deeply") from None
        if header.get("alg") not in ALGORITHMS:
            raise TokenInvalid(f"algorithm {header.get('alg')!r} is not accepted")
        key = self._key_for(header)
        try:
            claims = jwt.decode(
                token,
                key=key,
                algorithms=[header["alg"]],
                audience=self.service,
                issuer=self.issuer,
                leeway=LEEWAY,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.InvalidTokenError as exc:
            raise TokenInvalid(str(exc)) from None
        except RecursionError:
            raise TokenInvalid("malformed token: JSON nested too deeply") from None
        except (TypeError, ValueError) as exc:  # e.g. an ES256 header naming an RSA key
            raise TokenInvalid(f"token does not fit its key: {exc}") from None
        return VerifiedToken(
            subject=claims.get("sub") or None, access=_access_claim(claims.get("access"))
        )


def _issued(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _access_claim(value: Any) -> tuple[Scope, ...]:
    if not isinstance(value, list):
        return ()
    out = []
    for entry in value:
        if not isinstance(entry, dict):
            continue
        kind, name, actions = entry.get("type"), entry.get("name"), entry.get("actions")
        if isinstance(kind, str) and isinstance(name, str) and isinstance(actions, list):
            out.append(Scope(kind, name, tuple(a for a in actions if isinstance(a, str))))
    return tuple(out)


# -- the built-in server's signing key --------------------------------------------------------


def load_or_create_signing_key(path: str) -> Any:
    """The token server's private key; a P-256 key is generated (mode 0600) if the file does
    not exist yet. Called once at start-up, before workers fork, so they all share it."""
    if os.path.exists(path):
        try:
            with open(path, "rb") as f:
                key = serialization.load_pem_private_key(f.read(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError("auth.token.server.key", f"cannot load {path}: {exc}") from None
        return key
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
    except OSError as exc:
        raise ConfigError(
            "auth.token.server.key", f"cannot create {path}: {exc.strerror}"
        ) from None
    log.warning("generated a token signing key", extra={"fields": {"path": path}})
    return key


def algorithm_for(key: Any) -> str:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return {256: "ES256", 384: "ES384", 521: "ES512"}[key.curve.key_size]
    return "RS256"


class TokenIssuer:
    def __init__(self, key: Any, *, issuer: str, service: str, expiration: float) -> None:
        self.key = key
        self.kid = libtrust_kid(key.public_key())
        self.algorithm = algorithm_for(key)
        self.issuer = issuer
        self.service = service
        self.expiration = expiration

    def issue(
        self,
        subject: str | None,
        access: list[Scope],
        *,
        extra: dict[str, Any] | None = None,
        lifetime: float | None = None,
    ) -> tuple[str, int, int]:
        """(token, expires_in seconds, issued_at epoch seconds)."""
        now = int(time.time())
        lifetime = int(lifetime or self.expiration)
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": subject or "",
            "aud": self.service,
            "exp": now + lifetime,
            "nbf": now - 1,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": [s.to_claim() for s in access],
            **(extra or {}),
        }
        token = jwt.encode(claims, self.key, algorithm=self.algorithm, headers={"kid": self.kid})
        return token, lifetime, now
