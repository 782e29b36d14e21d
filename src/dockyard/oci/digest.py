"""Content digests: ``algorithm:encoded``, as the OCI image spec defines them."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

from dockyard.errors import ErrorCode, RegistryError

# The grammar from the OCI image spec; only the algorithms below are accepted for content.
_DIGEST_GRAMMAR = re.compile(r"^[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+\Z")

_LOWER_HEX = re.compile(r"[0-9a-f]*")

#: algorithm -> length of its lowercase hex encoding
SUPPORTED_ALGORITHMS: dict[str, int] = {"sha256": 64, "sha512": 128}
CANONICAL_ALGORITHM = "sha256"


@dataclass(frozen=True, slots=True)
class Digest:
    algorithm: str
    hex: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

    @classmethod
    def parse(cls, text: str) -> Digest:
        """Parse and validate a digest string; raise DIGEST_INVALID (400) if it is not one this
        registry can hold."""
        if not isinstance(text, str) or not _DIGEST_GRAMMAR.match(text):
            raise RegistryError(ErrorCode.DIGEST_INVALID, "invalid digest", {"digest": str(text)})
        algorithm, encoded = text.split(":", 1)
        length = SUPPORTED_ALGORITHMS.get(algorithm)
        if length is None:
            raise RegistryError(
                ErrorCode.DIGEST_INVALID,
                f"unsupported digest algorithm {algorithm!r}",
                {"digest": text, "supported": sorted(SUPPORTED_ALGORITHMS)},
            )
        if len(encoded) != length or not _LOWER_HEX.fullmatch(encoded):
            raise RegistryError(
                ErrorCode.DIGEST_INVALID,
                f"{algorithm} digests are {length} lowercase hex characters",
                {"digest": text},
            )
        return cls(algorithm, encoded)

    @classmethod
    def from_bytes(cls, data: bytes, algorithm: str = CANONICAL_ALGORITHM) -> Digest:
        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())


def is_digest(text: str) -> bool:
    """True if ``text`` looks like a digest (contains ':'), as opposed to a tag."""
    return ":" in text


def new_hasher(algorithm: str) -> Any:
    """A hashlib object for a supported algorithm (OpenSSL's, so SHA-NI where the CPU has it)."""
    if algorithm not in SUPPORTED_ALGORITHMS:
        raise RegistryError(
            ErrorCode.DIGEST_INVALID,
            f"unsupported digest algorithm {algorithm!r}",
            {"supported": sorted(SUPPORTED_ALGORITHMS)},
        )
    return hashlib.new(algorithm)
