"""The filesystem driver: the shared contract (tests/driver_contract.py) and what only a local
filesystem has. Teardown checks nothing was left behind."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from dockyard.storage.filesystem import FilesystemDriver
from driver_contract import DriverContract, run


class TestFilesystemDriver(DriverContract):
    @pytest.fixture
    def driver(self, tmp_path: Path) -> Iterator[FilesystemDriver]:
        d = FilesystemDriver(str(tmp_path / "root"), max_threads=8)
        yield d
        run(d.close())
        # No temporary files may be left behind by atomic writes.
        leftovers = [p for p in (tmp_path / "root").rglob("*") if ".tmp-" in p.name]
        assert not leftovers

    def test_local_path(self, driver: FilesystemDriver, tmp_path: Path) -> None:
        run(driver.write("/x/y", b"1"))
        path = driver.local_path("/x/y")
        assert path == str(tmp_path / "root" / "x" / "y")
        assert Path(path).read_bytes() == b"1"
