"""Storage drivers: one small interface (``driver.StorageDriver``), one module per backend."""

from __future__ import annotations

import os

from dockyard.config import Config
from dockyard.storage.driver import StorageDriver


def build_driver(config: Config) -> StorageDriver:
    """The driver the configuration names (``validate`` guarantees one Dockyard supports)."""
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
