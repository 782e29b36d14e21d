from pathlib import Path

import pytest

from dockyard.config import (
    apply_env_overrides,
    default_raw_config,
    load_config,
    parse_duration,
    validate,
)
from dockyard.errors import ConfigError

CLASSIC = """
version: 0.1
log:
  fields:
    service: registry
storage:
  cache:
    blobdescriptor: inmemory
  filesystem:
    rootdirectory: /var/lib/registry
http:
  addr: :5000
  headers:
    X-Content-Type-Options: [nosniff]
"""


def write(tmp_path: Path, text: str) -> str:
    p = tmp_path / "config.yml"
    p.write_text(text)
    return str(p)


def test_classic_compose_environment(tmp_path: Path) -> None:
    env = {
        "REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY": "/data",
        "REGISTRY_HTTP_ADDR": "0.0.0.0:5000",
        "REGISTRY_HTTP_SECRET": "s3cr3t",
        "REGISTRY_STORAGE_DELETE_ENABLED": "true",
        "PATH": "/usr/bin",
    }
    config = load_config(write(tmp_path, CLASSIC), env)
    assert config.storage.filesystem is not None
    assert config.storage.filesystem.rootdirectory == "/data"
    assert config.http.addr == "0.0.0.0:5000"
    assert config.http.secret == "s3cr3t"
    assert config.storage.delete.enabled is True
    assert config.http.headers == {"X-Content-Type-Options": ["nosniff"]}
    assert config.log.fields == {"service": "registry"}


def test_overrides_are_case_insensitive_and_yaml_typed(tmp_path: Path) -> None:
    env = {
        "REGISTRY_LOG_LEVEL": "debug",
        "REGISTRY_HTTP_RELATIVEURLS": "true",
        "REGISTRY_STORAGE_FILESYSTEM_MAXTHREADS": "50",
        "REGISTRY_STORAGE_MAINTENANCE_UPLOADPURGING_AGE": "2h",
        "REGISTRY_HTTP_SECRET": "12345",  # YAML int, still a string secret
    }
    config = load_config(write(tmp_path, CLASSIC), env)
    assert config.log.level == "debug"
    assert config.http.relativeurls is True
    assert config.storage.filesystem and config.storage.filesystem.maxthreads == 50
    assert config.storage.maintenance.uploadpurging.age == 7200
    assert config.http.secret == "12345"


def test_bare_word_selects_a_section_and_sorted_order_applies(tmp_path: Path) -> None:
    # REGISTRY_STORAGE replaces the whole storage section; later (sorted) keys fill it again.
    raw = default_raw_config()
    apply_env_overrides(
        raw,
        {
            "REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY": "/x",
            "REGISTRY_STORAGE": "filesystem",
        },
    )
    assert raw["storage"] == {"filesystem": {"rootdirectory": "/x"}}
    raw = default_raw_config()
    apply_env_overrides(
        raw,
        {
            "REGISTRY_AUTH": "htpasswd",
            "REGISTRY_AUTH_HTPASSWD_PATH": "/auth/registry.password",
            "REGISTRY_AUTH_HTPASSWD_REALM": "Registry",
        },
    )
    assert raw["auth"] == {"htpasswd": {"path": "/auth/registry.password", "realm": "Registry"}}


def test_override_replaces_existing_key_case_insensitively() -> None:
    raw = {"version": "0.1", "storage": {"filesystem": {"rootDirectory": "/old"}}}
    apply_env_overrides(raw, {"REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY": "/new"})
    assert raw["storage"]["filesystem"] == {"rootdirectory": "/new"}


def test_list_items_by_index() -> None:
    raw = {"version": "0.1", "auth": {"x": {"hosts": ["a", "b"]}}}
    apply_env_overrides(raw, {"REGISTRY_AUTH_X_HOSTS_1": "c"})
    assert raw["auth"]["x"]["hosts"] == ["a", "c"]


def test_unknown_env_and_keys_are_ignored(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = load_config(
        write(tmp_path, CLASSIC + "\nfrobnicate: 1\n"), {"REGISTRY_NOSUCH_THING": "1"}
    )
    assert config.http.addr == ":5000"
    assert "REGISTRY_NOSUCH_THING" in caplog.text
    assert "frobnicate" in caplog.text


def test_sparse_manifests_setting(tmp_path: Path) -> None:
    """Dockyard's ``validation.manifests.sparse``: off by default, on from the file or from
    REGISTRY_VALIDATION_MANIFESTS_SPARSE (which wins over the file, as every variable does)."""
    assert validate(default_raw_config()).validation.manifests.sparse is False
    on = CLASSIC + "validation:\n  manifests:\n    sparse: true\n"
    assert load_config(write(tmp_path, on), {}).validation.manifests.sparse is True
    env = {"REGISTRY_VALIDATION_MANIFESTS_SPARSE": "true"}
    assert load_config(write(tmp_path, CLASSIC), env).validation.manifests.sparse is True
    env = {"REGISTRY_VALIDATION_MANIFESTS_SPARSE": "false"}
    assert load_config(write(tmp_path, on), env).validation.manifests.sparse is False


@pytest.mark.parametrize(
    ("text", "env", "warned"),
    [
        (
            "validation: {manifests: {urls: {allow: ['^https://cdn\\.example\\.com/']}}}",
            {},
            "validation.manifests.urls.allow is not applied",
        ),
        (
            "validation: {manifests: {urls: {deny: ['^http://']}}}",
            {},
            "validation.manifests.urls.deny is not applied",
        ),
        (
            "",
            {"REGISTRY_VALIDATION_MANIFESTS_URLS_ALLOW": "['^https://']"},
            "validation.manifests.urls.allow is not applied",
        ),
        ("validation: {enabled: true}", {}, "validation.enabled is not applied"),
        (
            "validation: {manifests: {indexes: {platforms: none}}}",
            {},
            "validation.manifests.indexes is not applied",
        ),
        ("validation: {manifests: {frobnicate: 1}}", {}, "validation.manifests.frobnicate"),
    ],
)
def test_validation_keys_not_applied_are_warned_about(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    text: str,
    env: dict[str, str],
    warned: str,
) -> None:
    load_config(write(tmp_path, CLASSIC + text + "\n"), env)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(warned in w for w in warnings), warnings


@pytest.mark.parametrize(
    "text",
    [
        "validation: {disabled: true}",  # what Dockyard does anyway: no URL policy
        "validation: {enabled: false, disabled: false}",
        "validation: {manifests: {sparse: true}}",
        "validation: {}",
    ],
)
def test_validation_keys_applied_are_not_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, text: str
) -> None:
    config = load_config(write(tmp_path, CLASSIC + text + "\n"), {})
    assert config.validation.manifests.urls.allow == []
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == []


def test_default_config() -> None:
    config = validate(default_raw_config())
    assert config.storage.filesystem and config.storage.filesystem.rootdirectory == "./data"
    assert config.http.addr == ":5000"
    assert config.storage.delete.enabled
    assert config.storage.maintenance.presence.interval == 15.0


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ("storage: {filesystem: {}}\n", "version", "missing"),
        ("version: 0.2\nstorage: {filesystem: {}}\n", "version", "unsupported"),
        ("version: 0.1\n", "storage", "no storage driver"),
        ("version: 0.1\nstorage: {filesystem: {}, s3: {}}\n", "storage", "exactly one"),
        ("version: 0.1\nstorage: {azure: {}}\n", "storage.azure", "does not support"),
        ("version: 0.1\nstorage: {s3: {region: us-east-1}}\n", "storage.s3.bucket", "required"),
        (
            "version: 0.1\nstorage: {s3: {bucket: b, chunksize: 1048576}}\n",
            "storage.s3.chunksize",
            "5242880",
        ),
        (
            "version: 0.1\nstorage: {s3: {bucket: b}, cache: {blobdescriptor: redis}}\n",
            "redis.addr",
            "required",
        ),
        (
            "version: 0.1\nstorage: {filesystem: {}, redirect: {expiry: 0s}}\n",
            "storage.redirect.expiry",
            "positive",
        ),
        (
            "version: 0.1\nstorage: {filesystem: {}}\nredis: {addr: nohost}\n",
            "redis.addr",
            "host:port",
        ),
        ("version: 0.1\nstorage: {floppy: {}}\n", "storage.floppy", "unknown storage driver"),
        (
            "version: 0.1\nstorage: {filesystem: {}}\nlog: {level: loud}\n",
            "log.level",
            "'error', 'warn', 'info' or 'debug'",
        ),
        (
            "version: 0.1\nstorage: {filesystem: {}, delete: {enabled: maybe}}\n",
            "storage.delete.enabled",
            "bool",
        ),
        (
            "version: 0.1\nstorage: {filesystem: {maxthreads: 3}}\n",
            "storage.filesystem.maxthreads",
            "25",
        ),
        (
            "version: 0.1\nstorage: {filesystem: {}, maintenance: {uploadpurging: {age: soon}}}\n",
            "storage.maintenance.uploadpurging.age",
            "duration",
        ),
        (
            "version: 0.1\nstorage: {filesystem: {}}\nhttp: {host: registry.example.com}\n",
            "http.host",
            "absolute URL",
        ),
        (
            "version: 0.1\nstorage: {filesystem: {}}\nauth: {silly: {realm: r}}\n",
            "auth.silly",
            "not supported",
        ),
        (
            "version: 0.1\nstorage: {filesystem: {}}\nauth: {ldap: {}}\n",
            "auth.ldap",
            "unknown auth provider",
        ),
        (
            "version: 0.1\nstorage: {filesystem: {}}\nauth: {htpasswd: {path: /x}, token: {}}\n",
            "auth",
            "only one",
        ),
        (
            "version: 0.1\nstorage: {filesystem: {}}\nauth: {htpasswd: {realm: r}}\n",
            "auth.htpasswd.path",
            "required",
        ),
        (
            "version: 0.1\nstorage: {filesystem: {}}\nauth: {token: {realm: r, service: s}}\n",
            "auth.token.issuer",
            "required",
        ),
        (
            "version: 0.1\nstorage: {filesystem: {}}\n"
            "auth: {token: {realm: r, service: s, issuer: i}}\n",
            "auth.token.rootcertbundle",
            "required",
        ),
        (
            "version: 0.1\nstorage: {filesystem: {}}\n"
            "auth: {token: {server: {htpasswd: /h, access: [{repository: x, actions: [fly]}]}}}\n",
            "auth.token.server.access.0.actions.0",
            "'pull', 'push', 'delete' or '*'",
        ),
        (
            "version: 0.1\nstorage: {filesystem: {}}\nhttp: {tls: {certificate: /c}}\n",
            "http.tls.key",
            "required",
        ),
        (
            "version: 0.1\nstorage: {filesystem: {}}\nhttp: {tls: {minimumtls: tls9}}\n",
            "http.tls.minimumtls",
            "'tls1.2' or 'tls1.3'",
        ),
        (
            "version: 0.1\nstorage: {filesystem: {}}\n"
            "http: {tls: {letsencrypt: {cachefile: /c}}}\n",
            "http.tls.letsencrypt.hosts",
            "required",
        ),
        (
            "version: 0.1\nstorage: {filesystem: {}, maintenance: {presence: {interval: 0s}}}\n",
            "storage.maintenance.presence.interval",
            "positive",
        ),
        (
            "version: 0.1\nstorage: {filesystem: {}}\nvalidation: {manifests: {sparse: maybe}}\n",
            "validation.manifests.sparse",
            "bool",
        ),
        (
            "version: 0.1\nstorage: {filesystem: {}}\n"
            "policies: [{repositories: [a/*], immutabletags: ['v(']}]\n",
            "policies.0.immutabletags",
            "not a regular expression",
        ),
        (
            "version: 0.1\nstorage: {filesystem: {}}\npolicies: [{immutabletags: [v1]}]\n",
            "policies.0.repositories",
            "required",
        ),
        ("- a\n- b\n", None, "mapping"),
        ("version: [\n", None, "YAML"),
    ],
)
def test_invalid_config_names_key_and_reason(
    tmp_path: Path, text: str, key: str | None, reason: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path, {})
    assert err.value.key == (key if key is not None else path)
    assert reason.lower() in err.value.reason.lower()


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(str(tmp_path / "nope.yml"), {})
    assert "cannot read" in err.value.reason


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("10s", 10),
        ("168h", 604800),
        ("1h30m", 5400),
        ("500ms", 0.5),
        ("0", 0),
        (30, 30),
    ],
)
def test_durations(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "10", "1x", "h", "10s5", True])
def test_bad_durations(text: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "warned"),
    [
        ("quotas: [{scope: 'a/*', limit: 1GiB, limt: 2GiB}]", "quotas[0].limt"),
        (
            "policies: [{repositories: ['*'], immutabletags: [x]}, "
            "{repositories: ['b'], imutabletags: [y]}]",
            "policies[1].imutabletags",
        ),
        (
            "notifications: {endpoints: [{name: a, url: 'http://x', timeuot: 1s}]}",
            "notifications.endpoints[0].timeuot",
        ),
    ],
)
def test_unknown_keys_in_list_entries_are_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, text: str, warned: str
) -> None:
    """A misspelt key in an entry of a list (a quota, a policy, an endpoint) is named, as
    everywhere else: never silently ignored."""
    load_config(write(tmp_path, CLASSIC + text + "\n"), {})
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(f"unknown configuration key {warned}" in w for w in warnings), warnings
