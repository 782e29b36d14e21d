"""The metadata index when registry:2 writes the same store: a store registry:2 wrote is indexed
when Dockyard starts on it, and what registry:2 changes while Dockyard runs reaches the index
at the next verification; ``dockyard reindex`` then gives the same content."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import pytest
import requests
import yaml

from dockyard.registry.index import MetadataIndex
from harness import Registry2Factory, ServerFactory, sha256
from harness.client import RegistryClient


class _Registry2Client(RegistryClient):
    """The harness's push helpers, aimed at registry:2."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.session = requests.Session()

    def push_blob(self, name: str, data: bytes) -> str:
        # registry:2 has no single-POST upload: POST, then PUT with the bytes.
        digest = sha256(data)
        r = self.session.post(self.v2(f"{name}/blobs/uploads/"))
        assert r.status_code == 202, r.text
        r = self.session.put(
            urljoin(self.url, r.headers["Location"]), params={"digest": digest}, data=data
        )
        assert r.status_code == 201, r.text
        return digest


def _read(path: Path, what: str, *args: Any) -> Any:
    async def read() -> Any:
        index = MetadataIndex(str(path))
        try:
            return await getattr(index, what)(*args)
        finally:
            await index.close()

    return asyncio.run(read())


def _tags(path: Path, name: str) -> dict[str, str]:
    return {t.tag: str(t.digest) for t in _read(path, "tags", name, None, 1000)}


def _wait_for(check: Any, timeout: float = 15.0) -> None:
    deadline = time.time() + timeout
    while not check():
        assert time.time() < deadline, "the index did not catch up"
        time.sleep(0.2)


@pytest.mark.slow
def test_the_index_follows_what_registry2_writes(
    start_registry2: Registry2Factory, start_server: ServerFactory, tmp_path: Path
) -> None:
    root = tmp_path / "store"
    registry2 = start_registry2(root=root)
    theirs = _Registry2Client(registry2.port)
    before = {
        "lib/app": {t: theirs.push_image("lib/app", t)[0] for t in ("1.0", "2.0")},
        "other": {"latest": theirs.push_image("other", "latest")[0]},
    }
    registry2.stop()

    # Started on a store registry:2 wrote: indexed by the first verification, soon after start.
    index_file = root / "dockyard" / "index" / "metadata.sqlite3"
    dockyard = start_server(root=root, workers=2, index={"verifyinterval": "1s"})
    _wait_for(lambda: index_file.exists() and {n: _tags(index_file, n) for n in before} == before)

    # registry:2 writes while Dockyard serves: a new tag, a moved tag, a deleted manifest.
    registry2 = start_registry2(root=root)
    theirs = _Registry2Client(registry2.port)
    new = theirs.push_image("lib/app", "3.0")[0]
    moved = theirs.push_image("lib/app", "1.0")[0]
    r = theirs.session.delete(theirs.v2(f"other/manifests/{before['other']['latest']}"))
    assert r.status_code == 202, r.text
    expected = {"1.0": moved, "2.0": before["lib/app"]["2.0"], "3.0": new}
    _wait_for(lambda: _tags(index_file, "lib/app") == expected)
    _wait_for(lambda: _tags(index_file, "other") == {})
    # and Dockyard's own pushes land beside them
    ours = dockyard.push_image("lib/app", "4.0")[0]
    assert _tags(index_file, "lib/app") == {**expected, "4.0": ours}
    registry2.stop()

    # `dockyard reindex` into a fresh file reproduces the server's index.
    config = tmp_path / "reindex.yml"
    fresh = tmp_path / "fresh"
    config.write_text(
        yaml.safe_dump(
            {
                "version": 0.1,
                "storage": {"filesystem": {"rootdirectory": str(root)}},
                "index": {"directory": str(fresh)},
            }
        )
    )
    done = subprocess.run(
        [sys.executable, "-m", "dockyard", "reindex", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ},
    )
    assert done.returncode == 0, done.stderr
    assert "indexed 2 repositories" in done.stdout
    served = _read(index_file, "contents")
    rebuilt = _read(fresh / "metadata.sqlite3", "contents")
    assert rebuilt["manifests"] == served["manifests"]
    assert rebuilt["blobs"] == served["blobs"]
    assert [t[:3] for t in rebuilt["tags"]] == [t[:3] for t in served["tags"]]
    assert "Traceback" not in dockyard.log()
