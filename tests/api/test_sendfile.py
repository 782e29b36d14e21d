"""Blob GETs go through sendfile, under uvloop and under asyncio's own loop."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import aiohttp
import pytest
import uvloop
from aiohttp import web

import dockyard.api.sendfile as sendfile_module
from dockyard.app import build_app
from dockyard.config import default_raw_config, validate
from harness import free_port


@pytest.mark.parametrize("loop_kind", ["uvloop", "asyncio"])
def test_blob_get_uses_sendfile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loop_kind: str
) -> None:
    sent: list[int] = []
    real = os.sendfile

    def counting(out_fd: int, in_fd: int, offset: int, count: int) -> int:
        n = real(out_fd, in_fd, offset, count)
        sent.append(n)
        return n

    monkeypatch.setattr(sendfile_module.os, "sendfile", counting)
    raw = default_raw_config()
    raw["storage"]["filesystem"]["rootdirectory"] = str(tmp_path)
    config = validate(raw)
    data = os.urandom(8 * 1024 * 1024 + 1)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()

    async def go() -> None:
        runner = web.AppRunner(build_app(config, "secret"))
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        base = f"http://127.0.0.1:{port}/v2/x/blobs"
        try:
            async with aiohttp.ClientSession() as http:
                async with http.post(f"{base}/uploads/", params={"digest": digest}, data=data) as r:
                    assert r.status == 201
                async with http.get(f"{base}/{digest}") as r:
                    assert r.status == 200
                    assert await r.read() == data
                async with http.get(f"{base}/{digest}", headers={"Range": "bytes=10-19"}) as r:
                    assert r.status == 206 and await r.read() == data[10:20]
                # keep-alive: the connection is still usable after a sendfile response
                async with http.get(f"http://127.0.0.1:{port}/v2/") as r:
                    assert r.status == 200
        finally:
            await runner.cleanup()

    if loop_kind == "uvloop":
        uvloop.run(go())
    else:
        asyncio.run(go())
    assert sum(sent) == len(data) + 10
