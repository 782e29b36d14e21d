"""Authenticating to an upstream registry: HTTP Basic, or the bearer-token challenge flow.

An upstream answers 401 with ``WWW-Authenticate: Basic realm=...`` or
``Bearer realm="https://auth.example/token",service="registry.example",scope="..."``. For Basic,
the credentials go to the upstream itself. For Bearer, a token is asked of the realm
(``GET <realm>?service=...&scope=repository:<name>:pull``, with the credentials as Basic if there
are any) and sent as ``Authorization: Bearer``; it is cached until it expires.

Credentials are sent only to the upstream's own host, and to a token realm on the upstream's own
domain (``auth.docker.io`` for ``registry-1.docker.io``) or listed in the upstream's ``realms``;
any other realm is asked for an anonymous token. (distribution 3.1 has the same rule.)
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from dockyard.proxyconfig import UpstreamConfig, is_ip_or_local

#: a token is not used in its last seconds: a request under way must not outlive it
EXPIRY_MARGIN = 10.0
#: distribution's client: ``expires_in`` below 60 s counts as 60 s
MIN_TOKEN_SECONDS = 60.0

_PARAM = re.compile(r'([A-Za-z][A-Za-z0-9_-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))')


@dataclass(frozen=True, slots=True)
class Challenge:
    scheme: str  # "basic" or "bearer", lower case
    params: dict[str, str]


def parse_challenge(header: str) -> Challenge | None:
    """The first Basic or Bearer challenge of a ``WWW-Authenticate`` header."""
    header = header.strip()
    scheme, _, rest = header.partition(" ")
    scheme = scheme.lower()
    if scheme not in ("basic", "bearer"):
        return None
    params = {
        m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3)
        for m in _PARAM.finditer(rest)
    }
    params = {k: v.replace('\\"', '"') for k, v in params.items()}
    return Challenge(scheme, params)


def registrable_domain(host: str) -> str:
    """The host without its first label, when it has at least three (``auth.docker.io`` and
    ``registry-1.docker.io`` share ``docker.io``). Without the public-suffix list this is
    cautious: two-label hosts (``ghcr.io``) only match themselves and their subdomains."""
    labels = host.split(".")
    return ".".join(labels[1:]) if len(labels) >= 3 else host


def realm_may_get_credentials(realm: str, upstream: UpstreamConfig) -> bool:
    host = (urlsplit(realm).hostname or "").lower()
    if not host:
        return False
    own = upstream.hostname.lower()
    if host == own or host in (r.lower() for r in upstream.realms):
        return True
    if is_ip_or_local(host) or is_ip_or_local(own):
        return False
    domain = registrable_domain(own)
    return host == domain or host.endswith("." + domain)


class TokenCache:
    """Bearer tokens by (realm, service, scope), each until it expires."""

    def __init__(self) -> None:
        self._tokens: dict[tuple[str, str, str], tuple[str, float]] = {}

    def get(self, realm: str, service: str, scope: str) -> str | None:
        entry = self._tokens.get((realm, service, scope))
        if entry is None or entry[1] <= time.monotonic():
            return None
        return entry[0]

    def put(self, realm: str, service: str, scope: str, token: str, expires_in: float) -> None:
        lifetime = max(expires_in, MIN_TOKEN_SECONDS) - EXPIRY_MARGIN
        if len(self._tokens) > 10_000:  # one per repository pulled: bounded all the same
            self._tokens.clear()
        self._tokens[(realm, service, scope)] = (token, time.monotonic() + lifetime)

    def forget(self, realm: str, service: str, scope: str) -> None:
        self._tokens.pop((realm, service, scope), None)
