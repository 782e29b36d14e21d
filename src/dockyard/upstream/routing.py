"""Which repository names are caches of which upstream, and which are local.

Precedence, first match wins (README, "Pull-through cache"):

1. **An upstream's prefix**: ``docker.io/alpine`` goes to the upstream mounted at ``docker.io``
   (the longest prefix, if one is inside another's namespace: start-up refuses that anyway).
2. **containerd's** ``ns=`` **query parameter** naming an upstream's namespace (containerd adds
   it when a ``hosts.toml`` mirror is configured: ``/v2/library/alpine/manifests/3?ns=docker.io``).
   A value no upstream claims is ignored: the rules below decide.
3. **A local repository pattern** (``proxy.local``).
4. **The default upstream** (``default: true``, or registry:2's ``proxy.remoteurl``) takes every
   other name: Docker's ``registry-mirrors`` asks for ``/v2/library/alpine/...``.
5. **Local**: with no default upstream every other name is an ordinary repository -- unless
   ``proxy.local`` lists patterns, in which case a name matching none is unknown.

A proxied name is cached under its *canonical* local name, ``<prefix>/<remote name>``, however it
was asked for, so ``docker.io/alpine``, ``library/alpine?ns=docker.io`` and a default route share
one cache; Docker Hub's one-word names get ``library/``.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from dockyard.errors import ErrorCode, RegistryError
from dockyard.proxyconfig import ProxyConfig, UpstreamConfig


@dataclass(frozen=True, slots=True)
class Route:
    """A proxied name: the upstream, the name there, and the repository that caches it here."""

    upstream: UpstreamConfig
    remote_name: str
    local_name: str


class Router:
    def __init__(self, proxy: ProxyConfig) -> None:
        self.upstreams = proxy.all_upstreams()
        self._prefixed = sorted(
            (u for u in self.upstreams if u.prefix), key=lambda u: len(u.prefix), reverse=True
        )
        self._by_ns = {ns: u for u in self.upstreams for ns in u.ns_values}
        self._default = next((u for u in self.upstreams if u.default), None)
        self._local = proxy.local

    @property
    def enabled(self) -> bool:
        return bool(self.upstreams)

    def route(self, name: str, ns: str | None = None) -> Route | None:
        """The route of a proxied name; None for a local repository. NAME_UNKNOWN for a name
        that is neither (only when ``proxy.local`` restricts local names)."""
        for upstream in self._prefixed:
            if name.startswith(upstream.prefix + "/"):
                return _route(upstream, name[len(upstream.prefix) + 1 :])
        if ns:
            upstream = self._by_ns.get(ns)
            if upstream is not None:
                return _route(upstream, name)
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in self._local):
            return None
        if self._default is not None:
            return _route(self._default, name)
        if self._local:
            raise RegistryError(
                ErrorCode.NAME_UNKNOWN,
                "no upstream prefix and no local repository pattern (proxy.local) takes this name",
                {"name": name},
            )
        return None

    def upstream_of(self, local_name: str) -> UpstreamConfig | None:
        """The upstream whose cache ``local_name`` (a stored repository) belongs to."""
        route = self.route(local_name)
        return route.upstream if route is not None else None


def _route(upstream: UpstreamConfig, name: str) -> Route:
    remote = name
    if upstream.adds_library and "/" not in remote and not upstream.remoteprefix:
        remote = f"library/{remote}"
    local = f"{upstream.prefix}/{remote}" if upstream.prefix else remote
    if upstream.remoteprefix:
        remote = f"{upstream.remoteprefix}/{remote}"
    return Route(upstream=upstream, remote_name=remote, local_name=local)
