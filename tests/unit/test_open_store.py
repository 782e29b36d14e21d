"""``open_store``: the one place the registry is built from the configuration (the server,
the maintenance commands and the schedules all use it)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from dockyard.config import default_raw_config, validate
from dockyard.errors import ConfigError
from dockyard.registry.cache import NoCache, RedisCache
from dockyard.registry.configured import open_store
from dockyard.registry.upload_locks import FileUploadLocks, NoUploadLocks, RedisUploadLocks
from dockyard.server import check_storage
from dockyard.storage.driver import ExclusiveCreate, NoOverwriteMove, Touch


def config_with(**storage: Any) -> Any:
    raw = default_raw_config()
    raw["storage"].update(storage)
    return raw


def test_filesystem(tmp_path: Path) -> None:
    raw = config_with(delete={"enabled": True})
    raw["storage"]["filesystem"]["rootdirectory"] = str(tmp_path)
    raw["storage"]["maintenance"] = {"gc": {"grace": "4h"}}
    raw["http"]["limits"] = {"uploadsperrepository": 7}
    config = validate(raw)
    registry = open_store(config, secret="s")
    assert registry.storage.name == "filesystem"
    assert {ExclusiveCreate, NoOverwriteMove, Touch} <= registry.storage.capabilities
    assert registry.delete_enabled and registry.max_upload_sessions == 7
    assert registry.sparse_manifests is False  # validation.manifests.sparse, off by default
    assert registry.blobs.touch_interval == config.storage.maintenance.gc.touch_interval == 3600
    assert isinstance(registry.blobs.cache, NoCache)
    assert isinstance(registry.upload_locks, FileUploadLocks)

    async def use() -> None:
        await registry.check_storage()
        await registry.close()

    asyncio.run(use())


@pytest.mark.parametrize("redis", [False, True])
def test_s3(redis: bool) -> None:
    raw = default_raw_config()
    raw["storage"] = {"s3": {"bucket": "b", "regionendpoint": "http://127.0.0.1:9"}}
    if redis:
        raw["storage"]["cache"] = {"blobdescriptor": "redis"}
        raw["redis"] = {"addr": "127.0.0.1:6379"}
    raw["validation"] = {"manifests": {"sparse": True}}
    registry = open_store(validate(raw))  # nothing connects before first use
    assert registry.storage.name == "s3"
    assert registry.sparse_manifests is True
    assert isinstance(registry.blobs.cache, RedisCache if redis else NoCache)
    assert isinstance(registry.upload_locks, RedisUploadLocks if redis else NoUploadLocks)
    asyncio.run(registry.close())


def test_a_driver_without_what_the_registry_needs_is_refused_before_serving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = default_raw_config()
    raw["storage"]["filesystem"]["rootdirectory"] = str(tmp_path)
    config = validate(raw)
    check_storage(config)  # the filesystem driver has everything

    class Minimal:
        name = "minimal"

    import dockyard.registry.configured as configured
    import dockyard.server as server

    monkeypatch.setattr(configured, "build_driver", lambda config: Minimal())
    monkeypatch.setattr(server, "build_driver", lambda config: Minimal())
    message = "the minimal storage driver lacks exclusive create, no-overwrite move, touch"
    with pytest.raises(ConfigError, match=message):
        open_store(config)
    with pytest.raises(ConfigError, match=message):
        check_storage(config)
