"""Run the registry: bind once, then serve from one or more worker processes.

The listening socket is bound by the parent before any worker starts, so a busy port or a bad
address fails at start-up. Workers are forked and share it; the parent supervises them, restarts
one that dies, and on SIGTERM (or SIGINT) forwards the signal so every worker stops accepting,
finishes its in-flight requests (up to ``http.draintimeout``, default 60 s) and exits.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from dockyard.auth.setup import prepare as prepare_auth
from dockyard.config import Config, HTTPConfig, parse_addr
from dockyard.errors import ConfigError
from dockyard.maintenance import wanted as maintenance_wanted
from dockyard.registry.configured import checked_store
from dockyard.shared import Shared
from dockyard.storage import build_driver

log = logging.getLogger("dockyard.server")


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


def bind(http: HTTPConfig, key: str = "http.addr") -> socket.socket:
    """Bind the socket, or raise ConfigError (naming ``key``) saying why not.

    It is bound here (the port is ours, or start-up fails) but not listened on: each worker
    listens once it can serve, so until then clients are refused rather than queued behind a
    worker that is still starting (and could be stopped before it ever accepts them)."""
    try:
        if http.net == "unix":
            with contextlib.suppress(FileNotFoundError):
                os.unlink(http.addr)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(http.addr)
            return sock
        host, port = parse_addr(http.addr, key)
        dual_stack = host == "" and socket.has_dualstack_ipv6()
        family = socket.AF_INET6 if dual_stack or ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if dual_stack:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(("::" if dual_stack else host or "0.0.0.0", port))
        except OSError:
            sock.close()
            raise
        return sock
    except OSError as exc:
        raise ConfigError(key, f"cannot listen on {http.addr}: {exc.strerror}") from None


def check_storage(config: Config) -> None:
    """ConfigError if the driver lacks what the registry needs (workers would fail in
    ``open_store``) or the filesystem root cannot be written."""
    # Builds the driver only to look at it: nothing is connected or started before first use.
    checked_store(build_driver(config))
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

    def __init__(self, roles: list[Role], addr: str, metrics_dir: str | None = None) -> None:
        self.roles = roles
        self.addr = addr
        self.metrics_dir = metrics_dir
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
            if self.metrics_dir is not None:
                forget_dead_worker(self.metrics_dir, pid)
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


def _worker_role(
    config: Config,
    secret: str,
    sock: socket.socket,
    shared: Shared,
    index: int,
    debug_sock: socket.socket | None = None,
) -> Role:
    """Worker number ``index``; the first also runs the maintenance schedules and serves the
    debug address (``debug_sock``)."""
    with_maintenance = index == 0 and maintenance_wanted(config)

    def run() -> None:
        from dockyard.worker import run_worker  # after the fork: the parent never loads aiohttp

        run_worker(
            config,
            secret,
            sock,
            shared,
            index,
            with_maintenance=with_maintenance,
            debug_sock=debug_sock if index == 0 else None,
        )

    return Role("worker", run)


def serve(config: Config, workers: int) -> int:
    """Validate what can only be checked at start-up, bind, then serve. Returns an exit code.

    The parent process binds, makes the tables the workers share (login failures, connections
    per address) and supervises, nothing else, so it stays small; the workers load the HTTP
    stack after the fork. The first worker also runs the maintenance schedules (upload purging,
    scheduled garbage collection), so they need no process of their own."""
    check_storage(config)
    prepare_auth(config)
    tls = config.http.tls
    if tls.enabled and not tls.letsencrypt.enabled:
        from dockyard.tls import server_context

        server_context(tls)  # the certificate, key and client CAs load, or start-up fails
    manager = challenge_sock = None
    https_port = 0
    if tls.letsencrypt.enabled:
        from dockyard.acme import CertificateManager
        from dockyard.worker import obtain_certificate

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
    debug_sock = None
    if config.http.debug.addr:
        debug_sock = bind(HTTPConfig(addr=config.http.debug.addr), key="http.debug.addr")
    secret = resolve_secret(config)
    # Made before the fork, so every worker counts in the same memory.
    shared = Shared.create(config, workers)
    roles = [
        _worker_role(config, secret, sock, shared, index, debug_sock) for index in range(workers)
    ]
    if manager is not None and challenge_sock is not None:
        from dockyard.worker import run_certificate_manager

        roles.append(
            Role(
                "certificate manager",
                lambda: run_certificate_manager(manager, challenge_sock, https_port),
            )
        )
    sys.stdout.flush()
    if len(roles) == 1:
        roles[0].run()
        return 0
    with metrics_directory(config, workers) as directory:
        return Supervisor(roles, config.http.addr, directory).run()


@contextlib.contextmanager
def metrics_directory(config: Config, workers: int) -> Iterator[str | None]:
    """With several workers and metrics on, a directory of this instance's own where each
    worker writes its values (prometheus-client's multiprocess mode) for the debug server to
    sum; removed when the server stops. Set in the environment before any worker starts
    (prometheus-client reads it on import, after the fork)."""
    from dockyard import metrics

    debug = config.http.debug
    if workers < 2 or not (debug.addr and debug.prometheus.enabled):
        yield None
        return
    directory = tempfile.mkdtemp(prefix="dockyard-metrics-")
    os.environ[metrics.MULTIPROC_ENV] = directory
    try:
        yield directory
    finally:
        os.environ.pop(metrics.MULTIPROC_ENV, None)
        shutil.rmtree(directory, ignore_errors=True)


def forget_dead_worker(directory: str, pid: int) -> None:
    """A dead worker's live gauges (requests in flight) no longer count; its counters do.
    (prometheus-client's ``mark_process_dead``, without importing it into the parent.)"""
    for path in glob.glob(os.path.join(directory, f"gauge_live*_{pid}.db")):
        with contextlib.suppress(OSError):
            os.remove(path)
