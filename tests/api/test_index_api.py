"""The metadata index behind a running server: every push is in it when the response arrives,
on any worker (read-your-writes across the processes sharing the file), and pulls reach it in
batches without a write on the pull path."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from dockyard.oci.digest import Digest
from dockyard.registry.index import MetadataIndex
from dockyard.registry.records import RepositorySnapshot
from harness import ServerFactory
from harness.client import OCI_MANIFEST


def snapshot(path: Path, name: str) -> RepositorySnapshot:
    async def read() -> RepositorySnapshot:
        index = MetadataIndex(str(path / "metadata.sqlite3"))
        try:
            return await index.snapshot(name)
        finally:
            await index.close()

    return asyncio.run(read())


def test_pushes_are_indexed_before_the_response_and_pulls_soon_after(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    s = start_server(workers=2, index={"directory": str(tmp_path), "pullflush": "0.2s"})
    pushed = {}
    for i in range(6):  # the two workers take turns: each push is read from the file at once
        tag = f"t{i}"
        pushed[tag], _ = s.push_image("team/app", tag, [os.urandom(100)])
        snap = snapshot(tmp_path, "team/app")
        assert {t.tag: str(t.digest) for t in snap.tags} == pushed
    r = s.session.delete(s.v2("team/app/manifests/t0"))
    assert r.status_code == 202
    assert "t0" not in {t.tag for t in snapshot(tmp_path, "team/app").tags}

    before = time.time()
    r = s.session.get(s.v2("team/app/manifests/t1"), headers={"Accept": OCI_MANIFEST})
    assert r.ok
    assert s.session.head(s.v2(f"team/app/manifests/{pushed['t2']}")).ok
    deadline = time.time() + 10
    while time.time() < deadline:
        manifests = snapshot(tmp_path, "team/app").manifests
        pulls = {d: manifests[Digest.parse(pushed[d])].pulled for d in ("t1", "t2", "t3")}
        if pulls["t1"] is not None and pulls["t2"] is not None:
            break
        time.sleep(0.1)
    assert pulls["t1"] is not None and pulls["t1"] >= before - 1
    assert pulls["t2"] is not None and pulls["t2"] >= before - 1
    assert pulls["t3"] is None  # never pulled


def test_the_index_is_beside_the_store_by_default(start_server: ServerFactory) -> None:
    s = start_server()
    s.push_image("r", "a")
    if os.environ.get("DOCKYARD_TEST_S3"):  # the harness gives each S3 server a directory
        assert (s.root / "index" / "metadata.sqlite3").exists()
    else:  # <rootdirectory>/dockyard/index, where registry:2 never looks
        assert (s.root / "dockyard" / "index" / "metadata.sqlite3").exists()
