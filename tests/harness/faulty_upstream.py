"""An upstream registry that misbehaves on demand: a small aiohttp server in front of a real one
(a Dockyard the test started), for the pull-through cache's fault tests.

It passes every request through to the real upstream, and counts what it sees per
``(method, path)``. A test can tell it to misbehave on the requests a :class:`Fault` matches:

- ``cut``: close the connection (a reset) after ``after`` bytes of the body;
- ``corrupt``: send the whole body, of the right length, with one byte flipped (at ``after``,
  by default in the middle);
- ``short``: send all but the last ``missing`` bytes of the body, then close the connection
  cleanly (fewer bytes than ``Content-Length`` said);
- ``status``: answer ``status`` (429, 500, 503...) with ``headers`` (``Retry-After``) instead;
- ``hang``: accept the request and never answer (with ``after``: stall after that many bytes
  of the body), until the fault is cleared or the server stops;
- ``delay``: pass the request through, ``seconds`` late (so that concurrent requests overlap);
- ``trickle``: send the whole body right, but in pieces of ``after`` bytes, ``seconds`` apart
  (as a slow network delivers it: a reader must not take the first piece for the whole).

It runs in a thread of the test process, on its own event loop, on loopback only.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from harness.net import Loopback, free_port, wait_for_port

#: response headers that describe one connection, not the content: never passed through
_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "server", "date"}
)


@dataclass
class Fault:
    """What to do instead of passing a request through, and to which requests."""

    kind: str  # cut, corrupt, short, status, hang, delay, trickle
    #: a regular expression searched in the request's path (``blobs/sha256:``)
    path: str = ""
    #: only requests with this method (GET, HEAD), or any
    method: str | None = None
    #: how many requests it affects (None: every matching one until cleared)
    times: int | None = None
    #: cut/hang: after this many body bytes; corrupt: the offset of the flipped byte
    after: int | None = None
    #: short: how many bytes are left out at the end
    missing: int = 1
    status: int = 500
    headers: dict[str, str] | None = None
    #: delay: how long each matching request waits before it is passed through; trickle: the
    #: pause between pieces
    seconds: float = 0.0
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        if self.times is not None and self.hits >= self.times:
            return False
        if self.method is not None and self.method != method:
            return False
        return re.search(self.path, path) is not None


class FaultyUpstream(Loopback):
    """The misbehaving front of ``target`` (a registry's base URL)."""

    def __init__(self, target: str, port: int | None = None) -> None:
        self.target = target.rstrip("/")
        self.port = port or free_port()
        self.faults: list[Fault] = []
        self.seen: collections.Counter[tuple[str, str]] = collections.Counter()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._release: asyncio.Event | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"faulty-{self.port}", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        if self._failure is not None:
            raise RuntimeError(f"faulty upstream did not start: {self._failure!r}")
        wait_for_port(self.port)

    # -- what tests call ---------------------------------------------------------------------
    def inject(self, kind: str, path: str = "", **options: Any) -> Fault:
        """Misbehave (``kind``, see the module) on requests whose path matches ``path``."""
        fault = Fault(kind, path, **options)
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear(self) -> None:
        """Behave again; hung requests are released (their connections closed)."""
        with self._lock:
            self.faults.clear()
        self._call(self._release_hung)

    def count(self, method: str, path: str = "") -> int:
        """Requests seen with ``method`` whose path matches ``path`` (a regular expression)."""
        with self._lock:
            return sum(n for (m, p), n in self.seen.items() if m == method and re.search(path, p))

    def counts(self, method: str | None = None) -> dict[str, int]:
        """Requests seen per path (of ``method``, or of any as ``METHOD path``)."""
        with self._lock:
            if method is None:
                return {f"{m} {p}": n for (m, p), n in self.seen.items()}
            return {p: n for (m, p), n in self.seen.items() if m == method}

    def reset_counts(self) -> None:
        with self._lock:
            self.seen.clear()

    def stop(self) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and self._thread.is_alive():
            loop.call_soon_threadsafe(stop.set)
            self._thread.join(30)

    # -- the server ----------------------------------------------------------------------------
    def _call(self, function: Any) -> None:
        if self._loop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(function)

    def _release_hung(self) -> None:
        assert self._release is not None
        self._release.set()
        self._release = asyncio.Event()

    def _fault_for(self, method: str, path: str) -> Fault | None:
        with self._lock:
            self.seen[(method, path)] += 1
            for fault in self.faults:
                if fault.matches(method, path):
                    fault.hits += 1
                    return fault
        return None

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:
            self._failure = exc
        finally:
            self._ready.set()
            loop.close()

    async def _serve(self) -> None:
        import aiohttp
        from aiohttp import web

        self._stop = asyncio.Event()
        self._release = asyncio.Event()
        session = aiohttp.ClientSession(auto_decompress=False, trust_env=False)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handler(session))
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port).start()
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            self._release_hung()
            await runner.cleanup()
            await session.close()

    def _handler(self, session: Any) -> Any:
        from aiohttp import web

        async def handle(request: web.Request) -> web.StreamResponse:
            fault = self._fault_for(request.method, request.path)
            if fault is not None and fault.kind == "delay":
                await asyncio.sleep(fault.seconds)
                fault = None
            kind = fault.kind if fault is not None else None
            if fault is not None and kind == "status":
                body = b'{"errors":[{"code":"UNAVAILABLE","message":"injected"}]}'
                return web.Response(
                    status=fault.status,
                    body=body if request.method != "HEAD" else None,
                    headers={"Content-Type": "application/json", **(fault.headers or {})},
                )
            if fault is not None and kind == "hang" and fault.after is None:
                await self._hang(request)
                return web.Response()  # to a connection that is gone
            headers = {k: v for k, v in request.headers.items() if k.lower() != "host"}
            async with session.request(
                request.method,
                self.target + request.path_qs,
                headers=headers,
                data=await request.read() if request.can_read_body else None,
                allow_redirects=False,
            ) as upstream:
                body = await upstream.read()
                out = web.StreamResponse(status=upstream.status)
                for name, value in upstream.headers.items():
                    if name.lower() not in _HOP_BY_HOP:
                        out.headers.add(name, value)
                if request.method == "HEAD" or fault is None or upstream.status != 200:
                    if request.method != "HEAD":
                        out.headers["Content-Length"] = str(len(body))
                    await out.prepare(request)
                    if request.method != "HEAD":
                        await out.write(body)
                    await out.write_eof()
                    return out
                out.headers["Content-Length"] = str(len(body))
                await out.prepare(request)
                await self._misbehave(request, out, fault, body)
                return out

        return handle

    async def _misbehave(self, request: Any, out: Any, fault: Fault, body: bytes) -> None:
        transport = request.transport
        if fault.kind == "corrupt":
            at = len(body) // 2 if fault.after is None else fault.after
            wrong = bytearray(body)
            wrong[at] ^= 0xFF
            await out.write(bytes(wrong))
            await out.write_eof()
        elif fault.kind == "cut":
            await out.write(body[: fault.after or 0])
            await asyncio.sleep(0.05)  # the bytes leave before the reset
            if transport is not None:
                transport.abort()
        elif fault.kind == "short":
            await out.write(body[: len(body) - fault.missing])
            await asyncio.sleep(0.05)
            if transport is not None:
                transport.close()
        elif fault.kind == "trickle":
            step = fault.after or 1
            for start in range(0, len(body), step):
                await out.write(body[start : start + step])
                await asyncio.sleep(fault.seconds)
            await out.write_eof()
        elif fault.kind == "hang":
            await out.write(body[: fault.after or 0])
            await self._hang(request)
        else:
            raise ValueError(f"unknown fault {fault.kind!r}")

    async def _hang(self, request: Any) -> None:
        """Until the fault is cleared or the server stops; then the connection is dropped."""
        assert self._release is not None
        await self._release.wait()
        if request.transport is not None:
            request.transport.abort()


@contextlib.contextmanager
def faulty_upstream(target: str) -> Iterator[FaultyUpstream]:
    upstream = FaultyUpstream(target)
    try:
        yield upstream
    finally:
        upstream.stop()
