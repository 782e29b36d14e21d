"""Talking to one upstream registry: requests with its authentication, redirects followed by
hand (credentials never follow a redirect to another host), and its failures sorted into what
the cache does about them (:class:`UpstreamError`)."""

from __future__ import annotations

import asyncio
import base64
import email.utils
import logging
import os
import time
from collections.abc import Mapping
from urllib.parse import urlencode, urljoin, urlsplit

import aiohttp

from dockyard import metrics
from dockyard.proxyconfig import UpstreamConfig
from dockyard.upstream.auth import (
    Challenge,
    TokenCache,
    parse_challenge,
    realm_may_get_credentials,
)

log = logging.getLogger("dockyard.upstream")

MAX_REDIRECTS = 5
#: bytes aiohttp buffers per upstream response before it stops reading from the socket
READ_BUFFER = 256 * 1024
#: how long an upstream that answered 429 without Retry-After is left alone
DEFAULT_RETRY_AFTER = 10.0
MAX_RETRY_AFTER = 3600.0
#: a token endpoint's answer is small; anything bigger is refused
MAX_TOKEN_RESPONSE = 64 * 1024


class UpstreamError(Exception):
    """The upstream could not answer: ``kind`` is ``unavailable`` (unreachable, timed out,
    5xx), ``throttled`` (429; ``retry_after`` seconds), ``denied`` (401/403 after
    authenticating) or ``invalid`` (an answer that breaks the protocol)."""

    def __init__(self, upstream: str, kind: str, reason: str, retry_after: float = 0.0) -> None:
        super().__init__(f"upstream {upstream}: {reason}")
        self.upstream = upstream
        self.kind = kind
        self.reason = reason
        self.retry_after = retry_after


def _retry_after(value: str | None) -> float:
    if not value:
        return DEFAULT_RETRY_AFTER
    value = value.strip()
    if value.isdigit():
        return min(float(value), MAX_RETRY_AFTER)
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return DEFAULT_RETRY_AFTER
    return min(max(when - time.time(), 1.0), MAX_RETRY_AFTER)


class UpstreamClient:
    def __init__(self, config: UpstreamConfig, environ: Mapping[str, str] | None = None) -> None:
        self.config = config
        self.name = config.name
        self._credentials = config.credentials(dict(os.environ if environ is None else environ))
        self._session: aiohttp.ClientSession | None = None
        self._challenge: Challenge | None = None
        self._tokens = TokenCache()
        self.throttled_until = 0.0
        #: the last failure and when, for ``dockyard proxy list`` and logs
        self.last_error: str = ""

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            timeout = aiohttp.ClientTimeout(
                total=None,
                sock_connect=self.config.timeout,
                sock_read=self.config.timeout,
            )
            self._session = aiohttp.ClientSession(
                timeout=timeout,
                auto_decompress=False,  # blobs are passed on byte for byte
                read_bufsize=READ_BUFFER,
                headers={"User-Agent": "dockyard-proxy"},
                trust_env=False,
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _fail(self, kind: str, reason: str, retry_after: float = 0.0) -> UpstreamError:
        self.last_error = reason
        if metrics.active is not None:
            metrics.active.proxy_upstream_errors.labels(kind).inc()
        return UpstreamError(self.name, kind, reason, retry_after)

    async def request(
        self,
        method: str,
        remote_name: str,
        path: str,
        headers: Mapping[str, str] | None = None,
        query: Mapping[str, str] | None = None,
    ) -> aiohttp.ClientResponse:
        """``method /v2/<remote_name>/<path>`` on the upstream, authenticated as it asks. The
        caller reads and releases the response (2xx, 3xx without Location, 404 and other 4xx
        come back as they are). UpstreamError for 429, 5xx, network failures, and a 401/403
        that authenticating did not cure."""
        remaining = self.throttled_until - time.monotonic()
        if remaining > 0:
            raise self._fail("throttled", "answered 429 Too Many Requests", remaining)
        url = f"{self.config.remoteurl}/v2/{remote_name}/{path}"
        if query:
            url += "?" + urlencode(query)
        scope = f"repository:{remote_name}:pull"
        for attempt in range(2):
            auth = await self._authorization(scope)
            response = await self._send(method, url, {**(headers or {}), **auth})
            if response.status != 401 or attempt == 1:
                break
            challenge = parse_challenge(response.headers.get("WWW-Authenticate", ""))
            response.release()
            if challenge is None:
                raise self._fail("denied", "answered 401 without a challenge Dockyard can answer")
            if self._challenge is not None and self._challenge.scheme == "bearer":
                p = self._challenge.params
                self._tokens.forget(p.get("realm", ""), p.get("service", ""), scope)
            self._challenge = challenge
        if response.status in (401, 403):
            response.release()
            raise self._fail("denied", f"refused access ({response.status})")
        if response.status == 429:
            wait = _retry_after(response.headers.get("Retry-After"))
            self.throttled_until = time.monotonic() + wait
            response.release()
            raise self._fail("throttled", "answered 429 Too Many Requests", wait)
        if response.status >= 500:
            response.release()
            raise self._fail("unavailable", f"answered {response.status}")
        self.last_error = ""
        return response

    async def read_body(self, response: aiohttp.ClientResponse, limit: int) -> bytes | None:
        """All of a response's body, or None if it is longer than ``limit`` bytes. (One
        ``content.read(n)`` returns what has arrived so far: a body that comes in several
        pieces would be taken for its first.) UpstreamError if it breaks off or stalls."""
        body = bytearray()
        try:
            while chunk := await response.content.read(limit + 1 - len(body)):
                body += chunk
                if len(body) > limit:
                    return None
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise self._fail("unavailable", f"{type(exc).__name__}: {exc}") from None
        return bytes(body)

    async def _send(self, method: str, url: str, headers: dict[str, str]) -> aiohttp.ClientResponse:
        """One request, following redirects here: blob downloads are often redirected to
        storage on another host, which must not receive the upstream's credentials."""
        session = self._get_session()
        origin = urlsplit(url).netloc
        for _ in range(MAX_REDIRECTS + 1):
            try:
                response = await session.request(
                    method, url, headers=headers, allow_redirects=False
                )
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                raise self._fail("unavailable", f"{type(exc).__name__}: {exc}") from None
            location = response.headers.get("Location")
            if response.status not in (301, 302, 303, 307, 308) or not location:
                return response
            response.release()
            url = urljoin(url, location)
            if urlsplit(url).netloc != origin:
                headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
            if response.status == 303:
                method = "GET"
        raise self._fail("invalid", f"more than {MAX_REDIRECTS} redirects")

    async def _authorization(self, scope: str) -> dict[str, str]:
        challenge = self._challenge
        if challenge is None:
            return {}
        if challenge.scheme == "basic":
            if self._credentials is None:
                return {}
            return {"Authorization": _basic(*self._credentials)}
        realm = challenge.params.get("realm", "")
        service = challenge.params.get("service", "")
        token = self._tokens.get(realm, service, scope)
        if token is None:
            token = await self._fetch_token(realm, service, scope)
        return {"Authorization": f"Bearer {token}"} if token else {}

    async def _fetch_token(self, realm: str, service: str, scope: str) -> str:
        if urlsplit(realm).scheme not in ("http", "https"):
            raise self._fail("denied", "its token realm is not an http(s) URL")
        query = {"scope": scope, **({"service": service} if service else {})}
        headers = {}
        if self._credentials is not None and realm_may_get_credentials(realm, self.config):
            headers["Authorization"] = _basic(*self._credentials)
            query["account"] = self._credentials[0]
        elif self._credentials is not None:
            log.warning(
                "upstream %s: token realm %s is not on the upstream's domain nor listed in "
                "realms: asking it for an anonymous token",
                self.name,
                urlsplit(realm).netloc,
            )
        url = realm + ("&" if "?" in realm else "?") + urlencode(query)
        try:
            async with self._get_session().get(
                url, headers=headers, allow_redirects=False
            ) as response:
                if response.status in (401, 403):
                    raise self._fail("denied", f"its token server refused ({response.status})")
                if response.status != 200:
                    raise self._fail("unavailable", f"its token server answered {response.status}")
                raw = await response.content.read(MAX_TOKEN_RESPONSE + 1)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise self._fail("unavailable", f"token server: {type(exc).__name__}") from None
        try:
            import json

            body = json.loads(raw) if len(raw) <= MAX_TOKEN_RESPONSE else None
            token = body.get("token") or body.get("access_token")
            expires_in = float(body.get("expires_in") or 60)
        except (ValueError, AttributeError, TypeError):
            raise self._fail("invalid", "its token server answered something else") from None
        if not isinstance(token, str) or not token:
            raise self._fail("invalid", "its token server sent no token")
        self._tokens.put(realm, service, scope, token, expires_in)
        return token

    async def ping(self) -> str:
        """``ok`` if ``/v2/`` answers (200, or 401 with a challenge), else why not."""
        try:
            response = await self._send("GET", f"{self.config.remoteurl}/v2/", {})
        except UpstreamError as exc:
            return exc.reason
        response.release()
        if response.status in (200, 401):
            return "ok"
        return f"answered {response.status}"


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


async def close_all(clients: dict[str, UpstreamClient]) -> None:
    await asyncio.gather(*(c.close() for c in clients.values()), return_exceptions=True)
