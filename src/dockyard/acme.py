"""Let's Encrypt (any ACME server, RFC 8555) for ``http.tls.letsencrypt``.

registry:2 obtains its certificate over ACME at start-up and keeps it in ``cachefile``; so does
Dockyard, and it renews the certificate ``renewbefore`` its expiry (default 30 days) without a
restart: workers reload the cache file when it changes.

Challenges are answered with HTTP-01 on ``challengeaddr`` (default ``:80``, where the CA
connects); that listener redirects everything else to HTTPS. (registry:2's TLS-ALPN-01 would
need choosing the certificate by the client's ALPN offer, which Python's ssl cannot do.)

Files: ``cachefile`` holds the certificate's private key and chain in one PEM (what
``SSLContext.load_cert_chain`` reads); the ACME account key lives beside it in
``<cachefile>.account-key``. Both are written atomically with mode 0600.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import os
import ssl
import tempfile
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from dockyard.config import LetsEncryptConfig
from dockyard.http.responses import SERVER_HEADER

log = logging.getLogger("dockyard.acme")

CHALLENGE_PREFIX = "/.well-known/acme-challenge/"
POLL_SECONDS = 1.0
POLL_ATTEMPTS = 120


class AcmeError(Exception):
    pass


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _write_private(path: str, data: bytes) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".acme-")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_or_create_key(path: str) -> ec.EllipticCurvePrivateKey:
    if os.path.exists(path):
        with open(path, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise AcmeError(f"{path} is not an EC key")
        return key
    key = ec.generate_private_key(ec.SECP256R1())
    _write_private(path, _pem_key(key))
    return key


class Account:
    """An ACME account key (P-256, ES256) and the JWS it signs requests with."""

    def __init__(self, key: ec.EllipticCurvePrivateKey) -> None:
        self.key = key
        numbers = key.public_key().public_numbers()
        self.jwk = {
            "crv": "P-256",
            "kty": "EC",
            "x": b64url(numbers.x.to_bytes(32, "big")),
            "y": b64url(numbers.y.to_bytes(32, "big")),
        }
        canonical = json.dumps(self.jwk, sort_keys=True, separators=(",", ":")).encode()
        self.thumbprint = b64url(hashlib.sha256(canonical).digest())
        self.url: str | None = None

    def sign(self, url: str, nonce: str, payload: Any | None) -> dict[str, str]:
        protected: dict[str, Any] = {"alg": "ES256", "nonce": nonce, "url": url}
        if self.url is None:
            protected["jwk"] = self.jwk
        else:
            protected["kid"] = self.url
        encoded_protected = b64url(json.dumps(protected).encode())
        encoded_payload = "" if payload is None else b64url(json.dumps(payload).encode())
        der = self.key.sign(
            f"{encoded_protected}.{encoded_payload}".encode(), ec.ECDSA(hashes.SHA256())
        )
        r, s = decode_dss_signature(der)
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
        return {
            "protected": encoded_protected,
            "payload": encoded_payload,
            "signature": b64url(signature),
        }

    def key_authorization(self, token: str) -> str:
        return f"{token}.{self.thumbprint}"


class AcmeClient:
    def __init__(
        self, session: aiohttp.ClientSession, directory_url: str, account: Account
    ) -> None:
        self.session = session
        self.directory_url = directory_url
        self.account = account
        self.directory: dict[str, Any] = {}
        self._nonce: str | None = None

    async def _new_nonce(self) -> str:
        async with self.session.head(self.directory["newNonce"]) as r:
            return r.headers["Replay-Nonce"]

    async def post(
        self, url: str, payload: Any | None, *, retries: int = 3
    ) -> tuple[int, Mapping[str, str], bytes]:
        """A signed POST (``payload`` None: POST-as-GET); retries on badNonce."""
        for _ in range(retries):
            nonce = self._nonce or await self._new_nonce()
            self._nonce = None
            body = json.dumps(self.account.sign(url, nonce, payload))
            async with self.session.post(
                url, data=body, headers={"Content-Type": "application/jose+json"}
            ) as r:
                self._nonce = r.headers.get("Replay-Nonce")
                content = await r.read()
                if r.status >= 400:
                    problem = _problem(content)
                    if problem.get("type") == "urn:ietf:params:acme:error:badNonce":
                        continue
                    raise AcmeError(f"{url}: {r.status} {problem.get('detail', content[:200])}")
                return r.status, r.headers, content
        raise AcmeError(f"{url}: the server kept rejecting nonces")

    async def register(self, email: str) -> None:
        async with self.session.get(self.directory_url) as r:
            if r.status != 200:
                raise AcmeError(f"ACME directory {self.directory_url}: {r.status}")
            self.directory = await r.json(content_type=None)
        payload: dict[str, Any] = {"termsOfServiceAgreed": True}
        if email:
            payload["contact"] = [f"mailto:{email}"]
        _, headers, _ = await self.post(self.directory["newAccount"], payload)
        self.account.url = headers["Location"]

    async def _poll(self, url: str, done: tuple[str, ...]) -> dict[str, Any]:
        for _ in range(POLL_ATTEMPTS):
            _, _, content = await self.post(url, None)
            resource = json.loads(content)
            if resource.get("status") in done:
                return resource
            if resource.get("status") == "invalid":
                raise AcmeError(f"{url} became invalid: {json.dumps(resource)[:500]}")
            await asyncio.sleep(POLL_SECONDS)
        raise AcmeError(f"{url} did not complete in time")

    async def issue(self, hosts: list[str], challenges: dict[str, str]) -> tuple[bytes, bytes]:
        """Order a certificate for ``hosts``, answering HTTP-01 through ``challenges``
        (token -> key authorization, served by the challenge listener). Returns the PEM
        private key and the PEM chain."""
        _, headers, content = await self.post(
            self.directory["newOrder"],
            {"identifiers": [{"type": "dns", "value": h} for h in hosts]},
        )
        order_url = headers["Location"]
        order = json.loads(content)
        for authz_url in order["authorizations"]:
            _, _, content = await self.post(authz_url, None)
            authz = json.loads(content)
            if authz["status"] == "valid":
                continue
            challenge = next((c for c in authz["challenges"] if c["type"] == "http-01"), None)
            if challenge is None:
                raise AcmeError(f"{authz['identifier']['value']}: no http-01 challenge offered")
            challenges[challenge["token"]] = self.account.key_authorization(challenge["token"])
            try:
                await self.post(challenge["url"], {})
                await self._poll(authz_url, ("valid",))
            finally:
                challenges.pop(challenge["token"], None)
        key = ec.generate_private_key(ec.SECP256R1())
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .add_extension(
                x509.SubjectAlternativeName([x509.DNSName(h) for h in hosts]), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        await self.post(
            order["finalize"], {"csr": b64url(csr.public_bytes(serialization.Encoding.DER))}
        )
        order = await self._poll(order_url, ("valid",))
        _, _, chain = await self.post(order["certificate"], None)
        return _pem_key(key), chain


def _problem(content: bytes) -> dict[str, Any]:
    try:
        value = json.loads(content)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


class CertificateManager:
    """Keeps ``cachefile`` holding a valid certificate for the configured hosts."""

    def __init__(self, config: LetsEncryptConfig) -> None:
        self.config = config
        self.challenges: dict[str, str] = {}

    @property
    def account_key_path(self) -> str:
        return self.config.cachefile + ".account-key"

    def current(self) -> x509.Certificate | None:
        try:
            with open(self.config.cachefile, "rb") as f:
                certs = x509.load_pem_x509_certificates(f.read())
        except (OSError, ValueError):
            return None
        return certs[0] if certs else None

    def needs_certificate(self) -> bool:
        cert = self.current()
        if cert is None:
            return True
        renew_at = cert.not_valid_after_utc - timedelta(seconds=self.config.renewbefore)
        if datetime.now(UTC) >= renew_at:
            return True
        try:
            names = set(
                cert.extensions.get_extension_for_class(
                    x509.SubjectAlternativeName
                ).value.get_values_for_type(x509.DNSName)
            )
        except x509.ExtensionNotFound:
            names = set()
        return not set(self.config.hosts) <= names

    def _ssl(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        if self.config.cafile:
            ctx.load_verify_locations(cafile=self.config.cafile)
        return ctx

    async def obtain(self) -> None:
        account = Account(load_or_create_key(self.account_key_path))
        connector = aiohttp.TCPConnector(ssl=self._ssl())
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            client = AcmeClient(session, self.config.directoryurl, account)
            await client.register(self.config.email)
            key, chain = await client.issue(list(self.config.hosts), self.challenges)
        _write_private(self.config.cachefile, key + chain)
        cert = self.current()
        log.info(
            "certificate obtained",
            extra={
                "fields": {
                    "hosts": ",".join(self.config.hosts),
                    "expires": cert.not_valid_after_utc.isoformat() if cert else "?",
                }
            },
        )

    async def renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.checkinterval)
            if not self.needs_certificate():
                continue
            try:
                await self.obtain()
            except (AcmeError, aiohttp.ClientError, OSError, KeyError, ValueError) as exc:
                log.error("certificate renewal failed (will retry): %s", exc)

    # -- the HTTP-01 listener -------------------------------------------------------------------

    def challenge_app(self, https_port: int) -> web.Application:
        """Answers HTTP-01 challenges; anything else is redirected to the registry's HTTPS
        port."""
        port = "" if https_port == 443 else f":{https_port}"

        async def answer(request: web.Request) -> web.StreamResponse:
            token = request.path[len(CHALLENGE_PREFIX) :]
            if request.path.startswith(CHALLENGE_PREFIX) and token in self.challenges:
                return web.Response(text=self.challenges[token], content_type="text/plain")
            host = request.url.host or self.config.hosts[0]
            raise web.HTTPMovedPermanently(f"https://{host}{port}{request.path_qs}")

        async def neutral_server_header(_: web.Request, response: web.StreamResponse) -> None:
            response.headers[SERVER_HEADER[0]] = SERVER_HEADER[1]

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", answer)
        app.on_response_prepare.append(neutral_server_header)
        return app
