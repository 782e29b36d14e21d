"""What runs inside a child process: a worker serving the registry port, or the certificate
manager. Imported only after the fork, so the supervising parent stays small (it never loads
aiohttp)."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import resource
import signal
import socket
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from dockyard import maintenance, metrics
from dockyard.api.accesslog import ACCESS_LOGGER, AccessLogger
from dockyard.api.admission import AdmissionSite
from dockyard.api.base import REGISTRY_KEY
from dockyard.api.health import HEALTH_KEY
from dockyard.api.middleware import UNREAD_BODY_DRAIN_SECONDS
from dockyard.api.protocol import RegistryRunner
from dockyard.app import INFLIGHT_KEY, build_app
from dockyard.clientaddress import TrustedProxies
from dockyard.config import Config
from dockyard.connections import ConnectionLimiter
from dockyard.errors import ConfigError
from dockyard.registry.repository import Registry
from dockyard.shared import Shared
from dockyard.tls import server_context, watch_certificate

if TYPE_CHECKING:
    from dockyard.acme import CertificateManager

log = logging.getLogger("dockyard.server")

DEFAULT_DRAIN_SECONDS = 60.0


def _new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


async def _cancel(*tasks: asyncio.Task[Any]) -> None:
    """Cancel background tasks and wait until they have finished unwinding."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def _site(
    config: Config,
    runner: web.AppRunner,
    sock: socket.socket,
    ssl_context: Any,
    shared: Shared,
    worker: int,
) -> web.BaseSite:
    """The listening site; with a limit on connections per address, one that admits each
    connection first (counted in this worker's column of the shared table)."""
    table = shared.connections
    if table is None or sock.family == socket.AF_UNIX:
        return web.SockSite(runner, sock, ssl_context=ssl_context)
    # Whatever a previous process in this worker's place counted died with it.
    table.reset_worker(worker)
    limiter = ConnectionLimiter(
        table,
        worker,
        config.http.limits.connectionsperaddress,
        TrustedProxies(config.http.trustedproxies),
    )
    return AdmissionSite(runner, sock, limiter, ssl_context=ssl_context)


async def serve_worker(
    config: Config,
    secret: str,
    sock: socket.socket,
    shared: Shared,
    worker: int,
    *,
    with_maintenance: bool = False,
    until: Awaitable[None] | None = None,
    debug_sock: socket.socket | None = None,
) -> None:
    """Serve on ``sock`` until SIGTERM/SIGINT (or until ``until`` completes: a server run in a
    thread of another program, such as the test harness, has no signals of its own), then
    finish in-flight requests and return. Worker 0 also serves the debug server
    (``http.debug.addr``) on ``debug_sock``, or on a socket it binds when given none."""
    app = build_app(config, secret, shared)
    drain = config.http.draintimeout or DEFAULT_DRAIN_SECONDS
    max_header_bytes = config.http.limits.maxheaderbytes
    runner = RegistryRunner(
        app,
        handle_signals=False,
        access_log_class=AccessLogger,
        access_log=logging.getLogger(ACCESS_LOGGER),
        shutdown_timeout=drain,
        # aiohttp's 8 KiB refused the large bearer tokens external token servers issue.
        max_line_size=max_header_bytes,
        max_field_size=max_header_bytes,
        # After answering without reading a body, aiohttp reads and discards it for this long
        # (10 s by default) before closing; errors drain less still (api.middleware._answer_error).
        lingering_time=UNREAD_BODY_DRAIN_SECONDS,
        # How much of a body aiohttp buffers before it stops reading the socket: its 64 KiB
        # paused and resumed the socket every 128 KiB of an upload (a large part of its CPU).
        # Bounds the memory a connection holds (about twice this), whatever the client sends.
        read_bufsize=REQUEST_READ_BUFFER,
    )
    letsencrypt = config.http.tls.letsencrypt
    ssl_context = server_context(
        config.http.tls, certificate=letsencrypt.cachefile if letsencrypt.enabled else None
    )
    await runner.setup()
    site = _site(config, runner, sock, ssl_context, shared, worker)
    await site.start()
    debug_runner = None
    if worker == 0 and config.http.debug.addr:
        debug_runner = await _start_debug_server(config, app, debug_sock)
    background = [asyncio.create_task(return_freed_memory())]
    if ssl_context is not None and letsencrypt.enabled:
        background.append(
            asyncio.create_task(watch_certificate(ssl_context, letsencrypt.cachefile))
        )
    if with_maintenance:
        background.append(asyncio.create_task(maintenance.run(config, app[REGISTRY_KEY])))
    registry = app[REGISTRY_KEY]
    if debug_runner is not None and registry.index is not None and metrics.active is not None:
        background.append(asyncio.create_task(_quota_gauges(registry)))
    if worker == 0 and registry.index is not None:
        # One worker per instance compares the index with the layout: soon after start (a
        # store registry:2 wrote is indexed at once) and every index.verifyinterval after.
        background.append(
            asyncio.create_task(
                registry.index.run_verifier(registry.storage, config.index.verifyinterval, 1.0)
            )
        )
    log.info(
        "serving",
        extra={
            "fields": {"addr": config.http.addr, "pid": os.getpid(), "tls": ssl_context is not None}
        },
    )
    await (until if until is not None else _until_signalled())
    await _cancel(*background)
    inflight = app[INFLIGHT_KEY]
    log.info(
        "stopping: finishing in-flight requests",
        extra={"fields": {"pid": os.getpid(), "in_flight": inflight.count}},
    )
    await site.stop()
    if not await inflight.drain(drain):
        log.warning(
            "drain timeout: cancelling requests still running",
            extra={"fields": {"pid": os.getpid(), "in_flight": inflight.count}},
        )
    await runner.cleanup()
    if debug_runner is not None:
        await debug_runner.cleanup()


async def _quota_gauges(registry: Registry, every: float = 5.0) -> None:
    """The quotas' usage for the debug server's scrapes, read from the index every ``every``
    seconds (a scrape never waits on the index)."""
    from dockyard.registry.quotas import QuotaGauges, Quotas

    gauges = QuotaGauges(registry.quotas or Quotas((), registry.index))
    assert metrics.active is not None
    metrics.active.set_scrape_collector("quotas", gauges)
    while True:
        try:
            await gauges.refresh()
        except Exception:  # the index unreachable for a moment: keep the last values
            log.exception("reading quota usage for the metrics failed")
        await asyncio.sleep(every)


async def _start_debug_server(
    config: Config, app: web.Application, sock: socket.socket | None
) -> web.AppRunner:
    """registry:2's debug listener: ``/debug/health`` with details, and the metrics."""
    from dockyard.api.metrics import debug_app
    from dockyard.app import metrics_wanted

    debug = config.http.debug
    collected = metrics.enable() if metrics_wanted(config) else None
    if collected is not None and config.notifications.active:
        from dockyard.events.metrics import EventsCollector
        from dockyard.events.outbox import Outbox, outbox_directory

        outbox = Outbox(outbox_directory(config))
        collected.set_scrape_collector(
            "events", EventsCollector(outbox, config.notifications.active)
        )
    runner = web.AppRunner(
        debug_app(
            collected,
            debug.prometheus.path,
            app[HEALTH_KEY],
        ),
        handle_signals=False,
        access_log=None,
    )
    await runner.setup()
    site: web.BaseSite
    if sock is None:  # in a test's process: aiohttp binds the address itself
        host, _, port = debug.addr.rpartition(":")
        site = web.TCPSite(runner, host.strip("[]") or None, int(port))
    else:
        # A duplicate: stopping the site closes it, and a restarted worker serves the original.
        site = web.SockSite(runner, sock.dup())
    await site.start()
    log.info("serving the debug server", extra={"fields": {"addr": debug.addr, "pid": os.getpid()}})
    return runner


def _run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    loop = _new_event_loop()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


def release_freed_memory_promptly() -> None:
    """Have glibc's malloc serve large blocks (upload buffers) from their own mappings, returned
    to the system when freed. By default glibc raises that threshold as it sees large blocks
    freed and then serves them from its heap, which it rarely shrinks: a worker that once held
    many connections' buffers kept the memory (hundreds of MiB after 400 stalled uploads). A
    fixed threshold keeps a worker's memory near what it holds now.

    The threshold sits above the blocks a request body passes through on its way (uvloop's
    reads of up to 256 KiB, aiohttp's joins of up to about twice ``REQUEST_READ_BUFFER``), and
    the heap keeps up to ``TRIM_THRESHOLD_BYTES`` free at its top: with both at glibc's 128 KiB,
    each of those blocks was a fresh mapping, and page faults and zeroing pages were most of an
    upload's CPU time (a 1 GiB PUT took 2.0-2.2 s with these values, 6.6-10.4 s with 128 KiB).
    Freed blocks in the middle of the heap are not returned by the trim threshold, though: 300
    stalled uploads left over 30 MiB behind. :func:`return_freed_memory` hands those back every
    ``TRIM_EVERY`` seconds."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def raise_open_file_limit() -> None:
    """Raise the soft limit on open files to the hard limit, as Go programs (registry:2) do at
    start: the soft limit is often 1,024, which a worker's client connections plus its pool of
    S3 connections (storage.s3.S3_POOL_CONNECTIONS) can exceed under load."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError):  # not permitted here: keep what was given
        pass


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        trim: Callable[[int], int] = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    return trim


async def return_freed_memory(every: float | None = None) -> None:
    """Give the free memory inside glibc's heaps back to the system (``malloc_trim``, which
    also releases free pages between blocks still in use), every ``every`` seconds: what
    connections that stalled or closed left behind. On a worker thread, not the event loop:
    with nothing to return it takes about 0.5 ms, but handing back a few hundred MiB of holes
    took 32 ms (a bare script with 375 MiB freed between live blocks), a stall no request
    should wait behind. ctypes lets go of the GIL for the call."""
    trim = _malloc_trim()
    if trim is None:
        return
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(TRIM_EVERY if every is None else every)
        await loop.run_in_executor(None, trim, 0)


#: bytes of a request body aiohttp buffers per connection before it pauses reading
REQUEST_READ_BUFFER = 256 * 1024
#: glibc's mallopt parameter numbers, and the values set (kept fixed: see above)
M_MMAP_THRESHOLD = -3
M_TRIM_THRESHOLD = -1
MMAP_THRESHOLD_BYTES = 1024 * 1024
TRIM_THRESHOLD_BYTES = 4 * 1024 * 1024
#: seconds between two returns of freed heap memory (return_freed_memory)
TRIM_EVERY = 1.0


def run_worker(
    config: Config,
    secret: str,
    sock: socket.socket,
    shared: Shared,
    worker: int = 0,
    *,
    with_maintenance: bool = False,
    debug_sock: socket.socket | None = None,
) -> None:
    """Serve as worker number ``worker`` (a restarted worker keeps the number of the one it
    replaces) with the tables every worker shares."""
    release_freed_memory_promptly()
    raise_open_file_limit()
    _run(
        lambda: serve_worker(
            config,
            secret,
            sock,
            shared,
            worker,
            with_maintenance=with_maintenance,
            debug_sock=debug_sock,
        )
    )


async def _answer_challenges(
    manager: CertificateManager, sock: socket.socket, https_port: int, work: Awaitable[None]
) -> None:
    """Serve HTTP-01 challenges (and redirect to HTTPS) on ``sock`` while ``work`` runs."""
    runner = RegistryRunner(
        manager.challenge_app(https_port), handle_signals=False, access_log=None
    )
    await runner.setup()
    # A duplicate: stopping the site closes its socket, and the original is served again later.
    await web.SockSite(runner, sock.dup()).start()
    try:
        await work
    finally:
        await runner.cleanup()


async def _renew(manager: CertificateManager, sock: socket.socket, https_port: int) -> None:
    renewal = asyncio.create_task(manager.renew_forever())
    try:
        await _answer_challenges(manager, sock, https_port, _until_signalled())
    finally:
        await _cancel(renewal)


def run_certificate_manager(
    manager: CertificateManager, sock: socket.socket, https_port: int
) -> None:
    _run(lambda: _renew(manager, sock, https_port))


def obtain_certificate(manager: CertificateManager, sock: socket.socket, https_port: int) -> None:
    """Start-up: get a certificate before any worker serves TLS (registry:2 does the same)."""
    from dockyard.acme import AcmeError

    try:
        asyncio.run(_answer_challenges(manager, sock, https_port, manager.obtain()))
    except (AcmeError, aiohttp.ClientError, OSError, KeyError, ValueError) as exc:
        raise ConfigError(
            "http.tls.letsencrypt",
            f"could not obtain a certificate from {manager.config.directoryurl}: {exc}",
        ) from None
