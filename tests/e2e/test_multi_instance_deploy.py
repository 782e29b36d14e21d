"""deploy/multi-instance: several Dockyard instances on S3 with a shared Redis, behind nginx.

1. ``docker-compose config`` accepts the compose file with its required variables set, names
   them when they are missing, and the services agree with each other: identical instances
   (same secret, bucket, Redis), the bucket the one-shot service creates is the one they use,
   the S3 keys are MinIO's, and nginx's upstreams are exactly the instances.
2. The shared config.yml, with one instance's environment from the compose file applied, is a
   valid Dockyard configuration (Dockyard's own loader, no warnings) selecting the s3 driver
   and the Redis blob descriptor cache; the driver and cache it describes can be built.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from dockyard.config import Config, load_config
from dockyard.errors import ConfigError
from dockyard.registry.cache import RedisCache
from dockyard.registry.configured import open_store
from dockyard.storage import build_driver
from dockyard.storage.s3 import S3Driver

REPO_ROOT = Path(__file__).resolve().parents[2]
FOLDER = REPO_ROOT / "deploy" / "multi-instance"
COMPOSE = FOLDER / "docker-compose.yml"
CONFIG = FOLDER / "config.yml"
NGINX = FOLDER / "nginx.conf"

INSTANCES = ("dockyard1", "dockyard2")
#: what the compose file requires to be set
REQUIRED = ("REGISTRY_HTTP_SECRET", "S3_SECRET_KEY")

_SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")
_PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


def _variables() -> dict[str, str]:
    return {"REGISTRY_HTTP_SECRET": os.urandom(16).hex(), "S3_SECRET_KEY": os.urandom(20).hex()}


def _clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without what would change docker-compose's answer."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in _PROXY_VARS}
    env = {k: v for k, v in env.items() if not k.startswith(("DOCKER_", "COMPOSE_"))}
    env = {k: v for k, v in env.items() if k not in REQUIRED and not k.startswith("S3_")}
    env["PATH"] = os.pathsep.join([env.get("PATH", ""), *_SBIN])
    return {**env, **extra}


def _output(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


# -- the compose file read without docker-compose --------------------------------------------------

_VARIABLE = re.compile(r"\$(?:\$|\{(?P<name>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\})")


def interpolate(text: str, variables: dict[str, str]) -> str:
    """Compose's ``${NAME}``, ``${NAME:-default}``, ``${NAME-default}``, ``${NAME:?error}``,
    ``${NAME?error}`` and ``$$``."""

    def substitute(match: re.Match[str]) -> str:
        if match[0] == "$$":
            return "$"
        name, op, arg = match["name"], match["op"], match["arg"]
        value = variables.get(name)
        unset = value is None or (value == "" and op is not None and op.startswith(":"))
        if not unset:
            return value or ""
        if op is not None and op.endswith("?"):
            raise KeyError(f"{name}: {arg}")
        return arg if op is not None else ""

    return _VARIABLE.sub(substitute, text)


def compose_services(variables: dict[str, str]) -> dict[str, Any]:
    """The compose file's services, interpolated and with YAML anchors resolved."""
    data = yaml.safe_load(COMPOSE.read_text())
    services: dict[str, Any] = data["services"]

    def walk(value: Any) -> Any:
        if isinstance(value, str):
            return interpolate(value, variables)
        if isinstance(value, list):
            return [walk(v) for v in value]
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        return value

    return {name: walk(service) for name, service in services.items()}


def instance_environment(variables: dict[str, str], name: str = INSTANCES[0]) -> dict[str, str]:
    env = compose_services(variables)[name]["environment"]
    assert isinstance(env, dict), "the instances' environment is written as a mapping"
    return {k: str(v) for k, v in env.items()}


def nginx_upstreams() -> list[str]:
    assert NGINX.exists(), f"the compose file mounts {NGINX}, which is missing"
    return re.findall(r"^\s*server\s+([\w.-]+):5000\b", NGINX.read_text(), re.MULTILINE)


# -- 1. docker-compose config ----------------------------------------------------------------------


def test_compose_file_is_valid() -> None:
    compose = shutil.which(
        "docker-compose", path=os.pathsep.join([os.environ.get("PATH", ""), *_SBIN])
    )
    if compose is None:
        pytest.skip("docker-compose is not installed (Debian package docker-compose)")
    variables = _variables()

    def config(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [compose, "-f", str(COMPOSE), "config"], cwd=FOLDER, capture_output=True,
            text=True, env=env, timeout=60,
        )  # fmt: skip

    ok = config(_clean_env(**variables))
    assert ok.returncode == 0, _output(ok)
    services = yaml.safe_load(ok.stdout)["services"]
    assert set(services) == {*INSTANCES, "redis", "nginx", "minio", "createbucket"}, services

    # docker-compose resolves the file as this module reads it (the loader test relies on it).
    for name in INSTANCES:
        resolved = {k: str(v) for k, v in services[name]["environment"].items()}
        assert resolved == instance_environment(variables, name)

    # Identical instances, built from deploy/Dockerfile, mounting the shared config.
    first, second = (services[name] for name in INSTANCES)
    assert first == second
    assert first["build"]["context"] == str(REPO_ROOT)
    assert first["build"]["dockerfile"] == "deploy/Dockerfile"
    assert (REPO_ROOT / first["build"]["dockerfile"]).exists()
    assert f"{CONFIG}:/etc/docker/registry/config.yml:ro" in first["volumes"]
    env = first["environment"]
    assert env["REGISTRY_HTTP_SECRET"] == variables["REGISTRY_HTTP_SECRET"]
    assert env["REGISTRY_STORAGE_S3_SECRETKEY"] == variables["S3_SECRET_KEY"]
    assert set(first["depends_on"]) == {"redis", "createbucket"}
    assert first["depends_on"]["createbucket"]["condition"] == "service_completed_successfully"

    # The services they name are the ones that exist: Redis, the S3 endpoint and its keys, and
    # the bucket the one-shot service creates.
    assert env["REGISTRY_REDIS_ADDR"].rpartition(":")[0] in services
    endpoint = re.fullmatch(r"http://([\w-]+):(\d+)", env["REGISTRY_STORAGE_S3_REGIONENDPOINT"])
    assert endpoint is not None and endpoint[1] == "minio"
    minio = services["minio"]["environment"]
    assert minio["MINIO_ROOT_USER"] == env["REGISTRY_STORAGE_S3_ACCESSKEY"]
    assert minio["MINIO_ROOT_PASSWORD"] == env["REGISTRY_STORAGE_S3_SECRETKEY"]
    bucket = env["REGISTRY_STORAGE_S3_BUCKET"]
    create = services["createbucket"]
    assert create["command"][-1] == f"s3/{bucket}", create
    user, secret = minio["MINIO_ROOT_USER"], minio["MINIO_ROOT_PASSWORD"]
    expected = f"http://{user}:{secret}@minio:{endpoint[2]}"
    assert create["environment"]["MC_HOST_s3"] == expected
    assert create["depends_on"]["minio"]["condition"] == "service_healthy"

    # nginx mounts this folder's site and balances over exactly the instances.
    nginx = services["nginx"]
    assert f"{NGINX}:/etc/nginx/conf.d/default.conf:ro" in nginx["volumes"], nginx
    assert sorted(nginx_upstreams()) == sorted(INSTANCES)
    assert set(nginx["depends_on"]) == set(INSTANCES)
    assert re.search(r"^\s*listen\s+80;", NGINX.read_text(), re.MULTILINE)
    assert any(str(p).endswith(":80/tcp") or str(p).endswith(":80") for p in nginx["ports"])

    # Without the required variables: an error that names each.
    for missing in REQUIRED:
        env_without = _clean_env(**{k: v for k, v in variables.items() if k != missing})
        failed = config(env_without)
        assert failed.returncode != 0, _output(failed)
        assert missing in failed.stderr, _output(failed)


# -- 2. the shared config.yml, loaded as an instance loads it ------------------------------------


def test_instance_config_is_valid(caplog: pytest.LogCaptureFixture) -> None:
    variables = _variables()
    env = instance_environment(variables)
    assert instance_environment(variables, INSTANCES[1]) == env
    with caplog.at_level(logging.WARNING, logger="dockyard.config"):
        config: Config = load_config(str(CONFIG), env)
    assert not caplog.records, [r.getMessage() for r in caplog.records]

    assert config.storage.driver == "s3"
    s3 = config.storage.s3
    assert s3 is not None
    assert s3.bucket == env["REGISTRY_STORAGE_S3_BUCKET"]
    assert s3.regionendpoint == env["REGISTRY_STORAGE_S3_REGIONENDPOINT"]
    assert s3.accesskey == env["REGISTRY_STORAGE_S3_ACCESSKEY"]
    assert s3.secretkey == variables["S3_SECRET_KEY"]
    assert s3.chunksize >= 5 * 1024 * 1024
    assert config.storage.cache.blobdescriptor == "redis"
    assert config.redis.addr == env["REGISTRY_REDIS_ADDR"]
    assert config.http.secret == variables["REGISTRY_HTTP_SECRET"]
    assert config.http.addr == ":5000"  # where nginx's upstreams point
    # The example's S3 endpoint is only reachable inside the compose network.
    assert config.storage.redirect.disable is True
    assert config.storage.delete.enabled is True

    # What an instance builds from it (nothing connects before first use).
    driver = build_driver(config)
    assert isinstance(driver, S3Driver)
    assert driver.redirect_expiry == 0.0
    registry = open_store(config, secret=config.http.secret)
    assert registry.storage.name == "s3"
    assert isinstance(registry.blobs.cache, RedisCache)
    asyncio.run(registry.close())
    asyncio.run(driver.close())

    # Without the compose file's S3 settings the file alone is refused, naming the key.
    with pytest.raises(ConfigError, match="bucket"):
        load_config(str(CONFIG), {})


def test_interpolation_follows_compose() -> None:
    assert interpolate("${A:-x}/${B-y}/${C}/$$", {"A": "", "B": ""}) == "x///$"
    assert interpolate("${A:?need A}", {"A": "1"}) == "1"
    with pytest.raises(KeyError, match="need A"):
        interpolate("${A:?need A}", {"A": ""})
