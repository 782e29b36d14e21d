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
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from dockyard import maintenance
from dockyard.acme import AcmeError, CertificateManager
from dockyard.api.base import REGISTRY_KEY
from dockyard.app import INFLIGHT_KEY, build_app, build_driver
from dockyard.auth.setup import prepare as prepare_auth
from dockyard.config import Config, HTTPConfig
from dockyard.errors import ConfigError
from dockyard.logs import ACCESS_LOGGER, AccessLogger
from dockyard.tls import server_context, watch_certificate

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


def parse_addr(addr: str, key: str = "http.addr") -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(key, f"{addr!r} is not host:port (e.g. :5000 or 0.0.0.0:5000)")
    return host.strip("[]"), int(port)


def bind(http: HTTPConfig, key: str = "http.addr") -> socket.socket:
    """Bind the listening socket, or raise ConfigError (naming ``key``) saying why not."""
    try:
        if http.net == "unix":
            with contextlib.suppress(FileNotFoundError):
                os.unlink(http.addr)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(http.addr)
            sock.listen(1024)
            return sock
        host, port = parse_addr(http.addr, key)
        if host == "" and socket.has_dualstack_ipv6():
            return socket.create_server(
                ("::", port), family=socket.AF_INET6, dualstack_ipv6=True, backlog=1024
            )
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        return socket.create_server((host or "0.0.0.0", port), family=family, backlog=1024)
    except OSError as exc:
        raise ConfigError(key, f"cannot listen on {http.addr}: {exc.strerror}") from None


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


async def _serve(
    config: Config, secret: str, sock: socket.socket, *, with_maintenance: bool = False
) -> None:
    app = build_app(config, secret)
    drain = config.http.draintimeout or DEFAULT_DRAIN_SECONDS
    runner = web.AppRunner(
        app,
        handle_signals=False,
        access_log_class=AccessLogger,
        access_log=logging.getLogger(ACCESS_LOGGER),
        shutdown_timeout=drain,
    )
    letsencrypt = config.http.tls.letsencrypt
    ssl_context = server_context(
        config.http.tls, certificate=letsencrypt.cachefile if letsencrypt.enabled else None
    )
    await runner.setup()
    site = web.SockSite(runner, sock, ssl_context=ssl_context)
    await site.start()
    background = []
    if ssl_context is not None and letsencrypt.enabled:
        background.append(
            asyncio.create_task(watch_certificate(ssl_context, letsencrypt.cachefile))
        )
    if with_maintenance:
        background.append(asyncio.create_task(maintenance.run(config, app[REGISTRY_KEY].driver)))
    log.info(
        "serving",
        extra={
            "fields": {"addr": config.http.addr, "pid": os.getpid(), "tls": ssl_context is not None}
        },
    )
    await _until_signalled()
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


def _run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    loop = _new_event_loop()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


def run_worker(
    config: Config, secret: str, sock: socket.socket, *, with_maintenance: bool = False
) -> None:
    _run(lambda: _serve(config, secret, sock, with_maintenance=with_maintenance))


async def _maintain(config: Config) -> None:
    driver = build_driver(config)
    task = asyncio.create_task(maintenance.run(config, driver))
    try:
        await _until_signalled()
    finally:
        await _cancel(task)
        driver.close()


async def _answer_challenges(
    manager: CertificateManager, sock: socket.socket, https_port: int, work: Awaitable[None]
) -> None:
    """Serve HTTP-01 challenges (and redirect to HTTPS) on ``sock`` while ``work`` runs."""
    runner = web.AppRunner(manager.challenge_app(https_port), handle_signals=False, access_log=None)
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


def obtain_certificate(manager: CertificateManager, sock: socket.socket, https_port: int) -> None:
    """Start-up: get a certificate before any worker serves TLS (registry:2 does the same)."""
    try:
        asyncio.run(_answer_challenges(manager, sock, https_port, manager.obtain()))
    except (AcmeError, aiohttp.ClientError, OSError, KeyError, ValueError) as exc:
        raise ConfigError(
            "http.tls.letsencrypt",
            f"could not obtain a certificate from {manager.config.directoryurl}: {exc}",
        ) from None


@dataclass(frozen=True)
class Role:
    """One kind of child process: a worker, or the certificate manager."""

    name: str
    run: Callable[[], None]


class Supervisor:
    """Forks the children and keeps each one running until told to stop."""

    #: a child that dies sooner than this after starting counts towards a crash loop
    MIN_UPTIME = 5.0
    MAX_QUICK_DEATHS = 5

    def __init__(self, roles: list[Role], addr: str) -> None:
        self.roles = roles
        self.addr = addr
        self.children: dict[int, tuple[float, Role]] = {}
        self.stopping = False
        self.quick_deaths = 0

    def spawn(self, role: Role) -> None:
        pid = os.fork()
        if pid == 0:  # the child
            code = 0
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                role.run()
            except BaseException:
                log.exception("%s failed", role.name)
                code = 1
            finally:
                logging.shutdown()
                os._exit(code)
        self.children[pid] = (time.monotonic(), role)

    def _stop(self, signum: int, _frame: object) -> None:
        self.stopping = True
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        for role in self.roles:
            self.spawn(role)
        workers = sum(1 for r in self.roles if r.name == "worker")
        log.info("started workers", extra={"fields": {"workers": workers, "addr": self.addr}})
        while self.children:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            entry = self.children.pop(pid, None)
            if entry is None or self.stopping:
                continue
            started, role = entry
            code = os.waitstatus_to_exitcode(status)
            log.error(
                f"{role.name} exited unexpectedly", extra={"fields": {"pid": pid, "code": code}}
            )
            if time.monotonic() - started < self.MIN_UPTIME:
                self.quick_deaths += 1
                if self.quick_deaths >= self.MAX_QUICK_DEATHS:
                    log.error("children keep dying; giving up")
                    self._stop(signal.SIGTERM, None)
                    continue
                time.sleep(1.0)
            self.spawn(role)
        return 1 if self.quick_deaths >= self.MAX_QUICK_DEATHS else 0


def serve(config: Config, workers: int) -> int:
    """Validate what can only be checked at start-up, bind, then serve. Returns an exit code."""
    check_storage(config)
    prepare_auth(config)
    tls = config.http.tls
    if tls.enabled and not tls.letsencrypt.enabled:
        server_context(tls)  # the certificate, key and client CAs load, or start-up fails
    manager = challenge_sock = None
    if tls.letsencrypt.enabled:
        # The certificate comes first: a CA that cannot be reached fails start-up before the
        # registry port is bound.
        manager = CertificateManager(tls.letsencrypt)
        challenge_sock = bind(
            HTTPConfig(addr=tls.letsencrypt.challengeaddr), key="http.tls.letsencrypt.challengeaddr"
        )
        https_port = parse_addr(config.http.addr)[1]
        if manager.needs_certificate():
            obtain_certificate(manager, challenge_sock, https_port)
    sock = bind(config.http)
    secret = resolve_secret(config)
    roles = [Role("worker", lambda: run_worker(config, secret, sock))] * workers
    if manager is not None and challenge_sock is not None:
        roles.append(
            Role(
                "certificate manager",
                lambda: _run(lambda: _renew(manager, challenge_sock, https_port)),
            )
        )
    if maintenance.wanted(config):
        if len(roles) == 1:  # one worker: it runs the schedules itself, no extra process
            roles = [
                Role("worker", lambda: run_worker(config, secret, sock, with_maintenance=True))
            ]
        else:
            roles.append(Role("maintenance", lambda: _run(lambda: _maintain(config))))
    sys.stdout.flush()
    if len(roles) == 1:
        roles[0].run()
        return 0
    return Supervisor(roles, config.http.addr).run()
