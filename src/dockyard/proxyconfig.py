"""The ``proxy:`` section: registry:2's pull-through cache keys, and Dockyard's upstreams.

registry:2 (and distribution 3) know one upstream per instance::

    proxy:
      remoteurl: https://registry-1.docker.io
      username: ...          # REGISTRY_PROXY_USERNAME
      password: ...          # REGISTRY_PROXY_PASSWORD
      ttl: 168h              # distribution 3: expiry of cached content, 0 = never

which makes every repository of the instance a cache of that upstream. Dockyard keeps that
meaning, and adds several upstreams, each mounted at a namespace prefix, beside local
repositories that accept pushes (``proxy.upstreams``, ``proxy.local``). The routing rules are in
:mod:`dockyard.upstream.routing` and the README's "Pull-through cache" section.

Kept apart from config.py so that the server's parent process, which validates the whole
configuration, does not grow with the cache's settings; nothing here imports aiohttp.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any
from urllib.parse import urlsplit

from pydantic import SecretStr, field_validator, model_validator

# Section and Duration live in config.py, which imports this module at its end (they are
# defined by then); importing them lazily here would hide the field types from pydantic.
from dockyard.config_base import Duration, Section
from dockyard.errors import ConfigError

#: distribution 3's default ``proxy.ttl``
DEFAULT_TTL = 168 * 3600.0
#: hosts of Docker Hub's registry, where one-word names are official images under ``library/``
DOCKER_HUB_HOSTS = frozenset({"registry-1.docker.io", "index.docker.io", "docker.io"})

_PREFIX = re.compile(r"[a-z0-9]+(?:[._:-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*")
_PATTERN = re.compile(r"[a-z0-9._/*?\[\]-]+")


def _check_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r} is not an http:// or https:// URL")
    if parts.username or parts.password:
        raise ValueError("put credentials in username/password, not in the URL")
    if parts.query or parts.fragment:
        raise ValueError("must not have a query or a fragment")
    return url.rstrip("/")


class UpstreamConfig(Section):
    """One upstream registry, mounted at ``prefix`` on this one."""

    #: where it is mounted: ``docker.io`` serves ``docker.io/library/alpine``; "" only for the
    #: registry:2-style upstream (``proxy.remoteurl``), which takes every name
    prefix: str = ""
    remoteurl: str
    #: a namespace on the upstream: prefix ``team`` with remoteprefix ``acme`` maps
    #: ``team/app`` to the upstream's ``acme/app``
    remoteprefix: str = ""
    username: str = ""
    password: SecretStr = SecretStr("")
    #: environment variables holding the credentials (read at start-up; never logged)
    usernameenv: str = ""
    passwordenv: str = ""
    #: cached content expires this long after it was fetched (0: never)
    ttl: Duration = DEFAULT_TTL
    #: a tag confirmed with the upstream within this long is served without asking again
    #: (0, registry:2's behaviour: every by-tag request asks the upstream)
    tagttl: Duration = 0.0
    #: un-prefixed names nobody else takes go here (Docker's ``/v2/library/alpine``)
    default: bool = False
    #: values of containerd's ``ns=`` query parameter routed here (default: the prefix, when
    #: it is a host name, and the upstream's host)
    namespaces: tuple[str, ...] = ()
    #: one-word names are ``library/<name>`` upstream (default: on for Docker Hub's hosts)
    library: bool | None = None
    #: other hosts whose token realms may receive the credentials (the upstream's own host
    #: and its domain always may)
    realms: tuple[str, ...] = ()
    #: connecting to and waiting for the upstream (per read), before it counts as down
    timeout: Duration = 30.0

    @field_validator("remoteurl")
    @classmethod
    def _url(cls, url: str) -> str:
        return _check_url(url)

    @field_validator("prefix", "remoteprefix")
    @classmethod
    def _prefix(cls, prefix: str) -> str:
        prefix = prefix.strip("/")
        if prefix and not _PREFIX.fullmatch(prefix):
            raise ValueError(f"{prefix!r} is not a repository name prefix")
        return prefix

    @field_validator("ttl", "tagttl", "timeout")
    @classmethod
    def _not_negative(cls, seconds: float) -> float:
        if seconds < 0:
            raise ValueError("must not be negative")
        return seconds

    @property
    def host(self) -> str:
        return urlsplit(self.remoteurl).netloc

    @property
    def hostname(self) -> str:
        return urlsplit(self.remoteurl).hostname or ""

    @property
    def name(self) -> str:
        """How logs, the CLI and errors call it."""
        return self.prefix or self.host

    @property
    def is_docker_hub(self) -> bool:
        return self.hostname in DOCKER_HUB_HOSTS

    @property
    def adds_library(self) -> bool:
        return self.is_docker_hub if self.library is None else self.library

    @property
    def ns_values(self) -> frozenset[str]:
        if self.namespaces:
            return frozenset(self.namespaces)
        values = {self.host}
        if self.is_docker_hub:
            values.add("docker.io")
        first = self.prefix.split("/", 1)[0]
        if first and ("." in first or ":" in first) and "/" not in self.prefix:
            values.add(first)
        return frozenset(values)

    def credentials(self, environ: dict[str, str]) -> tuple[str, str] | None:
        """(username, password) from the config or the environment; None for anonymous."""
        user = environ.get(self.usernameenv, "") if self.usernameenv else self.username
        password = (
            environ.get(self.passwordenv, "")
            if self.passwordenv
            else self.password.get_secret_value()
        )
        return (user, password) if user or password else None


class ProxyConfig(Section):
    """``proxy``: registry:2's keys (one upstream for every name) and Dockyard's upstreams."""

    remoteurl: str = ""
    username: str = ""
    password: SecretStr = SecretStr("")
    ttl: Duration = DEFAULT_TTL
    tagttl: Duration = 0.0
    upstreams: tuple[UpstreamConfig, ...] = ()
    #: names local repositories may have (glob patterns; ``*`` matches across ``/``); needed
    #: beside a default upstream, which would otherwise take every name
    local: tuple[str, ...] = ()

    @field_validator("remoteurl")
    @classmethod
    def _url(cls, url: str) -> str:
        return _check_url(url) if url else url

    @field_validator("local")
    @classmethod
    def _patterns(cls, patterns: tuple[str, ...]) -> tuple[str, ...]:
        for pattern in patterns:
            if not _PATTERN.fullmatch(pattern):
                raise ValueError(f"{pattern!r} is not a repository name pattern")
        return patterns

    @model_validator(mode="before")
    @classmethod
    def _none_is_empty(cls, data: Any) -> Any:
        # ``proxy:`` with nothing under it, as docker-compose templates leave it
        return {} if data is None else data

    @property
    def enabled(self) -> bool:
        return bool(self.remoteurl or self.upstreams)

    def all_upstreams(self) -> tuple[UpstreamConfig, ...]:
        """Every upstream; registry:2's ``remoteurl`` is the default one, with no prefix."""
        if not self.remoteurl:
            return self.upstreams
        classic = UpstreamConfig(
            remoteurl=self.remoteurl,
            username=self.username,
            password=self.password,
            ttl=self.ttl,
            tagttl=self.tagttl,
            default=True,
        )
        return (classic, *self.upstreams)


def check_proxy(proxy: ProxyConfig) -> None:
    """ConfigError for a configuration whose routing would be ambiguous."""
    upstreams = proxy.all_upstreams()
    defaults = [u for u in upstreams if u.default]
    if len(defaults) > 1:
        raise ConfigError("proxy.upstreams", "at most one upstream can be the default")
    prefixes: dict[str, int] = {}
    for i, upstream in enumerate(proxy.upstreams):
        key = f"proxy.upstreams.{i}"
        if not upstream.prefix:
            raise ConfigError(f"{key}.prefix", "required (proxy.remoteurl is the unprefixed one)")
        for other in prefixes:
            if _nested(other, upstream.prefix):
                raise ConfigError(
                    f"{key}.prefix",
                    f"{upstream.prefix!r} overlaps the prefix {other!r} of another upstream",
                )
        prefixes[upstream.prefix] = i
        if upstream.usernameenv and upstream.username:
            raise ConfigError(f"{key}.usernameenv", "set either username or usernameenv")
        if upstream.passwordenv and upstream.password.get_secret_value():
            raise ConfigError(f"{key}.passwordenv", "set either password or passwordenv")
    ns_owner: dict[str, str] = {}
    for upstream in upstreams:
        for ns in upstream.ns_values:
            if ns in ns_owner and ns_owner[ns] != upstream.name:
                raise ConfigError(
                    "proxy.upstreams",
                    f"the namespace {ns!r} (containerd's ns=) would go to both "
                    f"{ns_owner[ns]!r} and {upstream.name!r}; set namespaces on one of them",
                )
            ns_owner[ns] = upstream.name
    for j, pattern in enumerate(proxy.local):
        for prefix in prefixes:
            if pattern_overlaps_prefix(pattern, prefix):
                raise ConfigError(
                    f"proxy.local.{j}",
                    f"the local pattern {pattern!r} can match names under the upstream "
                    f"prefix {prefix + '/'!r}: a name must belong to one or the other",
                )
    if proxy.remoteurl and proxy.local and not defaults:
        raise ConfigError("proxy.local", "has no effect without a default upstream")


def _nested(a: str, b: str) -> bool:
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def pattern_overlaps_prefix(pattern: str, prefix: str) -> bool:
    """Whether some name under ``prefix/`` could match ``pattern`` (fnmatch rules, where
    ``*`` also matches ``/``). Compares the pattern's literal start with the prefix: exact
    where the pattern is literal, cautious (overlap) where a wildcard could reach the prefix."""
    under = prefix + "/"
    wild = min((i for i, c in enumerate(pattern) if c in "*?["), default=None)
    if wild is None:
        return pattern.startswith(under)
    literal = pattern[:wild]
    return literal.startswith(under) or under.startswith(literal)


def is_ip_or_local(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True
