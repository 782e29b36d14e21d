"""Storage drivers: one small interface (``driver.StorageDriver``), one module per backend."""

from __future__ import annotations

import os

from dockyard.config import Config
from dockyard.storage.filesystem import FilesystemDriver


def build_driver(config: Config) -> FilesystemDriver:
    """The driver the configuration names (``validate`` guarantees one Dockyard supports)."""
    fs = config.storage.filesystem
    assert fs is not None
    return FilesystemDriver(
        os.path.abspath(fs.rootdirectory), max_threads=fs.maxthreads, fsync=fs.fsync
    )
