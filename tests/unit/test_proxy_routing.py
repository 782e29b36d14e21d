"""The cache's configuration, routing precedence and upstream-authentication rules."""

from __future__ import annotations

from typing import Any

import pytest

from dockyard.config import load_config, validate
from dockyard.errors import ConfigError, RegistryError
from dockyard.upstream.auth import TokenCache, parse_challenge, realm_may_get_credentials
from dockyard.upstream.routing import Router

HUB = "https://registry-1.docker.io"


def config(proxy: dict[str, Any]) -> Any:
    return validate(
        {"version": "0.1", "storage": {"filesystem": {"rootdirectory": "/tmp/x"}}, "proxy": proxy}
    )


def test_registry2_environment_variables() -> None:
    c = load_config(
        None,
        {
            "REGISTRY_PROXY_REMOTEURL": HUB,
            "REGISTRY_PROXY_USERNAME": "me",
            "REGISTRY_PROXY_PASSWORD": "pw",
            "REGISTRY_PROXY_TTL": "0",
        },
    )
    (upstream,) = c.proxy.all_upstreams()
    assert upstream.default and upstream.prefix == "" and upstream.ttl == 0
    assert upstream.credentials({}) == ("me", "pw")
    assert "pw" not in repr(c.proxy)
    assert config({"remoteurl": HUB}).proxy.ttl == 168 * 3600  # distribution 3's default


def test_credentials_from_the_environment() -> None:
    c = config(
        {
            "upstreams": [
                {
                    "prefix": "ghcr.io",
                    "remoteurl": "https://ghcr.io",
                    "usernameenv": "GHCR_USER",
                    "passwordenv": "GHCR_TOKEN",
                }
            ]
        }
    )
    (upstream,) = c.proxy.all_upstreams()
    assert upstream.credentials({"GHCR_USER": "bot", "GHCR_TOKEN": "t"}) == ("bot", "t")
    assert upstream.credentials({}) is None


@pytest.mark.parametrize(
    ("proxy", "key"),
    [
        ({"remoteurl": "ftp://x"}, "proxy.remoteurl"),
        ({"remoteurl": "https://u:p@x"}, "proxy.remoteurl"),
        ({"upstreams": [{"remoteurl": HUB}]}, "proxy.upstreams.0.prefix"),
        (
            {
                "upstreams": [
                    {"prefix": "a", "remoteurl": HUB},
                    {"prefix": "a/b", "remoteurl": "https://quay.io"},
                ]
            },
            "proxy.upstreams.1.prefix",
        ),
        (
            {
                "upstreams": [{"prefix": "docker.io", "remoteurl": HUB, "default": True}],
                "local": ["*"],
            },
            "proxy.local.0",
        ),
        (
            {
                "upstreams": [{"prefix": "docker.io", "remoteurl": HUB}],
                "local": ["docker.io/team/*"],
            },
            "proxy.local.0",
        ),
        (
            {"remoteurl": HUB, "upstreams": [{"prefix": "d", "remoteurl": HUB, "default": True}]},
            "proxy.upstreams",
        ),
        (
            {
                "upstreams": [
                    {"prefix": "hub", "remoteurl": HUB},
                    {"prefix": "mirror", "remoteurl": "https://index.docker.io"},
                ]
            },
            "proxy.upstreams",  # both would take ns=docker.io
        ),
        ({"upstreams": [{"prefix": "x", "remoteurl": HUB, "ttl": "-1s"}]}, "proxy.upstreams.0.ttl"),
    ],
)
def test_ambiguous_or_invalid_configurations_fail_at_start(proxy: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        config(proxy)
    assert err.value.key == key


def test_local_patterns_that_cannot_reach_a_prefix_are_accepted() -> None:
    config(
        {
            "upstreams": [{"prefix": "docker.io", "remoteurl": HUB, "default": True}],
            "local": ["team-*", "dockerx/*", "docker.iox"],
        }
    )


def router() -> Router:
    return Router(
        config(
            {
                "upstreams": [
                    {"prefix": "docker.io", "remoteurl": HUB, "default": True},
                    {"prefix": "ghcr.io", "remoteurl": "https://ghcr.io"},
                    {
                        "prefix": "corp",
                        "remoteurl": "https://registry.corp.example",
                        "remoteprefix": "mirrored",
                    },
                ],
                "local": ["team-*/**", "team-*/*"],
            }
        ).proxy
    )


@pytest.mark.parametrize(
    ("name", "ns", "expected"),
    [
        # 1. an explicit prefix, with Docker Hub's library/ for one-word names
        ("docker.io/alpine", None, ("docker.io", "library/alpine", "docker.io/library/alpine")),
        (
            "docker.io/bitnami/redis",
            None,
            ("docker.io", "bitnami/redis", "docker.io/bitnami/redis"),
        ),
        ("ghcr.io/acme/tool", None, ("ghcr.io", "acme/tool", "ghcr.io/acme/tool")),
        ("ghcr.io/tool", None, ("ghcr.io", "tool", "ghcr.io/tool")),  # no library/ off the Hub
        ("corp/app", None, ("corp", "mirrored/app", "corp/app")),
        # ... even when ns= names another upstream
        ("ghcr.io/acme/tool", "docker.io", ("ghcr.io", "acme/tool", "ghcr.io/acme/tool")),
        # 2. containerd's ns=
        ("acme/tool", "ghcr.io", ("ghcr.io", "acme/tool", "ghcr.io/acme/tool")),
        (
            "library/alpine",
            "docker.io",
            ("docker.io", "library/alpine", "docker.io/library/alpine"),
        ),
        # 3. local patterns, before the default upstream (and an unknown ns= is ignored)
        ("team-a/app", None, None),
        ("team-a/app", "quay.io", None),
        # 4. the default upstream: Docker's registry-mirrors ask for /v2/library/alpine
        ("library/alpine", None, ("docker.io", "library/alpine", "docker.io/library/alpine")),
        ("alpine", None, ("docker.io", "library/alpine", "docker.io/library/alpine")),
    ],
)
def test_routing_precedence(name: str, ns: str | None, expected: tuple | None) -> None:
    route = router().route(name, ns)
    if expected is None:
        assert route is None
    else:
        assert route is not None
        assert (route.upstream.name, route.remote_name, route.local_name) == expected


def test_without_a_default_upstream_other_names_are_local_unless_patterns_say_otherwise() -> None:
    only_prefix = Router(
        config({"upstreams": [{"prefix": "ghcr.io", "remoteurl": "https://ghcr.io"}]}).proxy
    )
    assert only_prefix.route("team/app") is None
    restricted = Router(
        config(
            {
                "upstreams": [{"prefix": "ghcr.io", "remoteurl": "https://ghcr.io"}],
                "local": ["team/*"],
            }
        ).proxy
    )
    assert restricted.route("team/app") is None
    with pytest.raises(RegistryError) as err:
        restricted.route("other/app")
    assert err.value.code.name == "NAME_UNKNOWN"


def test_registry2_style_takes_every_name_as_is() -> None:
    r = Router(config({"remoteurl": "https://mirror.example:5000"}).proxy)
    route = r.route("team/app")
    assert route is not None and (route.remote_name, route.local_name) == ("team/app", "team/app")


def test_bearer_and_basic_challenges_are_parsed() -> None:
    c = parse_challenge(
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:samalba/my-app:pull,push"'
    )
    assert c is not None and c.scheme == "bearer"
    assert c.params == {
        "realm": "https://auth.docker.io/token",
        "service": "registry.docker.io",
        "scope": "repository:samalba/my-app:pull,push",
    }
    basic = parse_challenge('Basic realm="Registry Realm"')
    assert basic is not None and basic.scheme == "basic"
    assert parse_challenge("Negotiate abc") is None


@pytest.mark.parametrize(
    ("remoteurl", "realm", "allowed"),
    [
        (HUB, "https://auth.docker.io/token", True),
        ("https://ghcr.io", "https://ghcr.io/token", True),
        ("https://quay.io", "https://quay.io/v2/auth", True),
        (HUB, "https://evil.example/token", False),
        (HUB, "https://docker.io.evil.example/token", False),
        ("https://ghcr.io", "https://evil.io/token", False),  # two labels: only itself
        ("http://127.0.0.1:5000", "http://127.0.0.1:5001/token", True),  # same host
        ("http://127.0.0.1:5000", "http://127.0.0.2/token", False),
        ("https://registry.corp.example", "https://sso.corp.example/token", True),
    ],
)
def test_credentials_go_only_to_realms_of_the_upstreams_domain(
    remoteurl: str, realm: str, allowed: bool
) -> None:
    (upstream,) = config({"remoteurl": remoteurl}).proxy.all_upstreams()
    assert realm_may_get_credentials(realm, upstream) is allowed


def test_a_listed_realm_may_get_credentials() -> None:
    c = config({"upstreams": [{"prefix": "x", "remoteurl": HUB, "realms": ["login.example.com"]}]})
    (upstream,) = c.proxy.all_upstreams()
    assert realm_may_get_credentials("https://login.example.com/t", upstream)


def test_tokens_are_cached_until_they_expire(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr("dockyard.upstream.auth.time.monotonic", lambda: now[0])
    tokens = TokenCache()
    tokens.put("r", "s", "repository:a:pull", "T", expires_in=300)
    assert tokens.get("r", "s", "repository:a:pull") == "T"
    assert tokens.get("r", "s", "repository:b:pull") is None
    now[0] += 295
    assert tokens.get("r", "s", "repository:a:pull") is None  # not in its last seconds
    tokens.put("r", "s", "x", "short", expires_in=5)  # below 60 s counts as 60 s
    now[0] += 45
    assert tokens.get("r", "s", "x") == "short"
