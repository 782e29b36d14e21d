"""The filesystem driver: the shared contract (tests/driver_contract.py) and what only a local
filesystem has. Teardown checks nothing was left behind."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from dockyard.storage.driver import (
    AtomicMove,
    DirectoryVersions,
    EmptyDirs,
    ExclusiveCreate,
    FastListings,
    FastRead,
    FastScan,
    FastWalk,
    FastWrite,
    Locks,
    NoOverwriteMove,
    Sendfile,
    Touch,
)
from dockyard.storage.filesystem import FilesystemDriver
from dockyard.storage.store import LocalRange, Store
from driver_contract import DriverContract, run


class TestFilesystemDriver(DriverContract):
    capabilities = frozenset(
        {
            ExclusiveCreate,
            NoOverwriteMove,
            Touch,
            AtomicMove,
            Locks,
            Sendfile,
            EmptyDirs,
            DirectoryVersions,
        }
    )
    fast_paths = frozenset({FastRead, FastWrite, FastWalk, FastListings, FastScan})

    @pytest.fixture
    def driver(self, tmp_path: Path) -> Iterator[FilesystemDriver]:
        d = FilesystemDriver(str(tmp_path / "root"), max_threads=8)
        yield d
        run(d.close())
        # No temporary files may be left behind by atomic writes.
        leftovers = [p for p in (tmp_path / "root").rglob("*") if ".tmp-" in p.name]
        assert not leftovers

    def test_local_file(self, store: Store, tmp_path: Path) -> None:
        """The file sendfile reads is the one at the path under the root directory."""

        async def go() -> LocalRange:
            await store.write("/x/y", b"1")
            opened = await store.open_range("/x/y", 0, 1)
            assert isinstance(opened, LocalRange)
            return opened

        opened = run(go())
        path = opened.file.name
        opened.close()
        assert path == str(tmp_path / "root" / "x" / "y")
        assert Path(path).read_bytes() == b"1"
