"""Run the registry: bind once, then serve from one or more worker processes.

The listening socket is bound by the parent before any worker starts, so a busy port or a bad
address fails at start-up. Workers are forked and share it; the parent supervises them, restarts
one that dies, and on SIGTERM (or SIGINT) forwards the signal so every worker stops accepting,
finishes its in-flight requests (up to ``http.draintimeout``, default 60 s) and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import socket
import sys
import time

from aiohttp import web

from dockyard.app import INFLIGHT_KEY, build_app
from dockyard.auth.setup import prepare as prepare_auth
from dockyard.config import Config, HTTPConfig
from dockyard.errors import ConfigError
from dockyard.logs import ACCESS_LOGGER, AccessLogger

log = logging.getLogger("dockyard.server")

DEFAULT_DRAIN_SECONDS = 60.0


def resolve_secret(config: Config) -> str:
    if config.http.secret:
        return config.http.secret
    log.warning(
        "No HTTP secret provided - generated random secret. This may cause problems with "
        "uploads if multiple registries are behind a load-balancer. To provide a shared "
        "secret, fill in http.secret in the configuration file or set the "
        "REGISTRY_HTTP_SECRET environment variable."
    )
    return secrets.token_urlsafe(32)


def parse_addr(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError("http.addr", f"{addr!r} is not host:port (e.g. :5000 or 0.0.0.0:5000)")
    return host.strip("[]"), int(port)


def bind(http: HTTPConfig) -> socket.socket:
    """Bind the listening socket, or raise ConfigError saying why not."""
    try:
        if http.net == "unix":
            with contextlib.suppress(FileNotFoundError):
                os.unlink(http.addr)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(http.addr)
            sock.listen(1024)
            return sock
        host, port = parse_addr(http.addr)
        if host == "" and socket.has_dualstack_ipv6():
            return socket.create_server(
                ("::", port), family=socket.AF_INET6, dualstack_ipv6=True, backlog=1024
            )
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        return socket.create_server((host or "0.0.0.0", port), family=family, backlog=1024)
    except OSError as exc:
        raise ConfigError("http.addr", f"cannot listen on {http.addr}: {exc.strerror}") from None


def check_storage(config: Config) -> None:
    fs = config.storage.filesystem
    if fs is None:
        return
    root = os.path.abspath(fs.rootdirectory)
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            "storage.filesystem.rootdirectory", f"cannot create {root}: {exc.strerror}"
        ) from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise ConfigError("storage.filesystem.rootdirectory", f"{root} is not writable")


def _new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


async def _serve(config: Config, secret: str, sock: socket.socket) -> None:
    app = build_app(config, secret)
    drain = config.http.draintimeout or DEFAULT_DRAIN_SECONDS
    runner = web.AppRunner(
        app,
        handle_signals=False,
        access_log_class=AccessLogger,
        access_log=logging.getLogger(ACCESS_LOGGER),
        shutdown_timeout=drain,
    )
    await runner.setup()
    site = web.SockSite(runner, sock)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("serving", extra={"fields": {"addr": config.http.addr, "pid": os.getpid()}})
    await stop.wait()
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


def run_worker(config: Config, secret: str, sock: socket.socket) -> None:
    loop = _new_event_loop()
    try:
        loop.run_until_complete(_serve(config, secret, sock))
    finally:
        loop.close()


class Supervisor:
    """Forks the workers and keeps that many running until told to stop."""

    #: a worker that dies sooner than this after starting counts towards a crash loop
    MIN_UPTIME = 5.0
    MAX_QUICK_DEATHS = 5

    def __init__(self, config: Config, secret: str, sock: socket.socket, workers: int) -> None:
        self.config = config
        self.secret = secret
        self.sock = sock
        self.workers = workers
        self.children: dict[int, float] = {}
        self.stopping = False
        self.quick_deaths = 0

    def spawn(self) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            code = 0
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                run_worker(self.config, self.secret, self.sock)
            except BaseException:
                log.exception("worker failed")
                code = 1
            finally:
                logging.shutdown()
                os._exit(code)
        self.children[pid] = time.monotonic()

    def _stop(self, signum: int, _frame: object) -> None:
        self.stopping = True
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        for _ in range(self.workers):
            self.spawn()
        log.info(
            "started workers",
            extra={"fields": {"workers": self.workers, "addr": self.config.http.addr}},
        )
        while self.children:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            started = self.children.pop(pid, None)
            if started is None or self.stopping:
                continue
            code = os.waitstatus_to_exitcode(status)
            log.error("worker exited unexpectedly", extra={"fields": {"pid": pid, "code": code}})
            if time.monotonic() - started < self.MIN_UPTIME:
                self.quick_deaths += 1
                if self.quick_deaths >= self.MAX_QUICK_DEATHS:
                    log.error("workers keep dying; giving up")
                    self._stop(signal.SIGTERM, None)
                    continue
                time.sleep(1.0)
            self.spawn()
        return 1 if self.quick_deaths >= self.MAX_QUICK_DEATHS else 0


def serve(config: Config, workers: int) -> int:
    """Validate what can only be checked at start-up, bind, then serve. Returns an exit code."""
    check_storage(config)
    prepare_auth(config)
    sock = bind(config.http)
    secret = resolve_secret(config)
    sys.stdout.flush()
    if workers <= 1:
        run_worker(config, secret, sock)
        return 0
    return Supervisor(config, secret, sock, workers).run()
