"""Storage: the driver interface (``driver``: primitives and optional capabilities), one module
per backend, and ``store.Store``, which builds everything the registry model uses on top of a
driver. ``registry.configured.open_store`` assembles them from the configuration."""

from __future__ import annotations

import os

from dockyard.config import Config
from dockyard.storage.driver import StorageDriver


def build_driver(config: Config) -> StorageDriver:
    """The driver the configuration names (``validate`` guarantees one Dockyard supports).
    Nothing is connected or started until it is first used."""
    storage = config.storage
    if storage.s3 is not None:
        from dockyard.storage.s3 import S3Driver  # botocore loads only when used

        expiry = 0.0 if storage.redirect.disable else storage.redirect.expiry
        return S3Driver(storage.s3, redirect_expiry=expiry)
    from dockyard.storage.filesystem import FilesystemDriver

    fs = storage.filesystem
    assert fs is not None
    return FilesystemDriver(
        os.path.abspath(fs.rootdirectory), max_threads=fs.maxthreads, fsync=fs.fsync
    )
