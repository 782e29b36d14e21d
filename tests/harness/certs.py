"""Test certificates: a CA, and server or client certificates it signs (cryptography); an
external token server's signing key and the bearer tokens it issues."""

from __future__ import annotations

import datetime
import ipaddress
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass
class Issued:
    cert: Path
    key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(
    directory: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> Issued:
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return Issued(cert_path, key_path)


class CA:
    def __init__(self, directory: Path, name: str = "Dockyard Test CA") -> None:
        self.directory = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )
        self.issued = _write(directory, "ca", self.cert, self.key)

    @property
    def path(self) -> Path:
        return self.issued.cert

    def issue(
        self,
        stem: str,
        *,
        dns: tuple[str, ...] = (),
        ips: tuple[str, ...] = (),
        client: bool = False,
    ) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(stem))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]
                ),
                critical=False,
            )
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return _write(self.directory, stem, builder.sign(self.key, hashes.SHA256()), key)


def server_certificate(directory: Path) -> tuple[CA, Issued]:
    """A CA and a certificate for localhost / 127.0.0.1 signed by it."""
    ca = CA(directory)
    return ca, ca.issue("server", dns=["localhost"], ips=["127.0.0.1"])


# -- an external token server's signing key, and the tokens it issues -----------------------------

#: the issuer and audience the tests' external token server uses (``auth.token``'s keys)
TOKEN_ISSUER = "auth.example"
TOKEN_SERVICE = "registry.example"


def token_signer(directory: Path) -> tuple[ec.EllipticCurvePrivateKey, Path]:
    """An external token server's key, and a root bundle holding its self-signed certificate
    (for ``auth.token.rootcertbundle``)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name("token signer")
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    bundle = directory / "root.pem"
    bundle.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return key, bundle


def token_auth(bundle: Path) -> dict[str, Any]:
    """Dockyard's ``auth`` section trusting the tests' external token server."""
    return {
        "token": {
            "realm": f"https://{TOKEN_ISSUER}/token",
            "service": TOKEN_SERVICE,
            "issuer": TOKEN_ISSUER,
            "rootcertbundle": str(bundle),
        }
    }


def sign_token(
    key: Any,
    access: list[dict[str, Any]],
    *,
    algorithm: str = "ES256",
    headers: dict[str, Any] | None = None,
    **claims: Any,
) -> str:
    """A bearer token as the tests' external token server issues it: for ``bob``, valid for
    five minutes, granting ``access``; ``claims`` add or replace claims, ``headers`` replace the
    default ``kid`` header (libtrust's key id of ``key``)."""
    import jwt

    from dockyard.auth.tokens import libtrust_kid

    now = int(time.time())
    body = {
        "iss": TOKEN_ISSUER,
        "aud": TOKEN_SERVICE,
        "sub": "bob",
        "exp": now + 300,
        "nbf": now - 5,
        "iat": now,
        "access": access,
        **claims,
    }
    if headers is None:
        headers = {"kid": libtrust_kid(key.public_key())}
    return jwt.encode(body, key, algorithm=algorithm, headers=headers)
