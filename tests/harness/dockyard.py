"""Dockyard under test, on loopback, with its own storage and configuration.

Two ways to run it, with the same interface (``RegistryClient`` plus ``root``, ``config_path``,
``log()`` and ``stop()``):

- ``DockyardProcess``: ``dockyard serve`` in a process of its own, with N workers — for what
  only a real process shows (workers sharing a port, signals, restarts, memory, kill -9);
  ``restart()`` stops it and starts it again on the same configuration, data and port;
- ``InProcessDockyard``: the same serving code (``dockyard.worker.serve_worker``) in a thread
  of the test process, started in milliseconds — for everything else.

``DOCKYARD_TEST_S3`` (set by the harness for the API suite on S3) puts every server's storage in
an S3 bucket instead of a directory.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
import yaml

from harness.client import RegistryClient
from harness.net import free_port, wait_for_port


def dockyard_config(root: Path, port: int, **overrides: Any) -> dict[str, Any]:
    """The tests' default configuration (filesystem in ``root``, deletes on, a fixed secret)
    with ``overrides`` merged in (nested dictionaries merge; anything else replaces)."""
    config: dict[str, Any] = {
        "version": 0.1,
        "log": {"level": "info"},
        "storage": {"filesystem": {"rootdirectory": str(root)}, "delete": {"enabled": True}},
        "http": {"addr": f"127.0.0.1:{port}", "secret": "test-secret"},
    }
    s3 = os.environ.get("DOCKYARD_TEST_S3")
    if s3 and s3 != "moto" and not {"s3", "filesystem"} & set(overrides.get("storage", {})):
        # The API suite on S3 instead of a disk: DOCKYARD_TEST_S3 holds storage.s3 as JSON (each
        # data directory becomes its own prefix; blobs are served by Dockyard, not redirected).
        prefix = hashlib.sha256(str(root).encode()).hexdigest()[:16]
        config["storage"]["s3"] = {**json.loads(s3), "rootdirectory": f"/{prefix}"}
        config["storage"]["redirect"] = {"disable": True}
    merge(config, overrides)
    if "s3" in config["storage"]:  # another driver replaces the default filesystem one
        del config["storage"]["filesystem"]
        outbox = config.get("notifications", {}).get("outbox", {})
        if config.get("notifications", {}).get("endpoints") and not outbox.get("directory"):
            # the outbox's default on S3 is /var/lib/dockyard/events, one for every test
            outbox["directory"] = str(root / "events")
            config["notifications"]["outbox"] = outbox
        # likewise the metadata index's default, /var/lib/dockyard/index
        config.setdefault("index", {}).setdefault("directory", str(root / "index"))
    return config


def write_config(path: Path, root: Path, port: int, **overrides: Any) -> None:
    path.write_text(yaml.safe_dump(dockyard_config(root, port, **overrides)))


def merge(base: dict[str, Any], extra: dict[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge(base[key], value)
        else:
            base[key] = value


# -- in a process of its own -------------------------------------------------------------------


@dataclass(kw_only=True)
class DockyardProcess(RegistryClient):
    """A running ``dockyard serve`` subprocess."""

    port: int
    root: Path
    config_path: Path
    log_path: Path
    proc: subprocess.Popen[bytes]
    #: what started it (``restart`` runs it again)
    command: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    session: requests.Session = field(default_factory=requests.Session)
    scheme: str = "http"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.session.close()
        return self.proc.returncode

    def restart(self, sig: int = signal.SIGTERM) -> None:
        """Stop the server (with ``sig``) and start it again as it was started: the same
        command, configuration, data and port; return once the port accepts connections."""
        self.stop(sig)
        self.proc = self._spawn(self.command, self.env, self.log_path)
        self.session = requests.Session()
        try:
            wait_for_port(self.port, self.proc)
        except Exception:
            self.stop()
            raise RuntimeError(f"server did not start again:\n{self.log()}") from None

    @staticmethod
    def _spawn(command: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
        with open(log_path, "ab") as log:
            return subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env}
            )

    @classmethod
    def launch(
        cls,
        work: Path,
        *,
        root: Path | None = None,
        workers: int = 1,
        env: dict[str, str] | None = None,
        port: int | None = None,
        args: list[str] | None = None,
        **overrides: Any,
    ) -> DockyardProcess:
        """Write a config (test defaults merged with ``overrides``) into ``work`` and start
        ``dockyard serve`` on it; return once the port accepts connections."""
        root = root or work / "data"
        port = port or free_port()
        config_path = work / "config.yml"
        write_config(config_path, root, port, **overrides)
        log_path = work / "server.log"
        command = [sys.executable, "-m", "dockyard", "serve", str(config_path)]
        command += ["--workers", str(workers), *(args or [])]
        proc = cls._spawn(command, env or {}, log_path)
        server = cls(
            port=port,
            root=root,
            config_path=config_path,
            log_path=log_path,
            proc=proc,
            command=command,
            env=env or {},
            scheme="https" if overrides.get("http", {}).get("tls") else "http",
        )
        try:
            wait_for_port(port, proc)
        except Exception:
            server.stop()
            raise RuntimeError(f"server did not start:\n{server.log()}") from None
        return server


# -- in a thread of the test process -------------------------------------------------------------


class _ServerLogs(logging.Handler):
    """Sends each record to the log file of the in-process server whose thread emitted it. (A
    server logs from its event loop's thread; records of other threads — the tests' own, of
    unit tests running beside the server — are not its.)"""

    def __init__(self) -> None:
        super().__init__()
        self.by_thread: dict[int, logging.Handler] = {}

    def emit(self, record: logging.LogRecord) -> None:
        target = self.by_thread.get(record.thread)
        if target is not None:
            target.handle(record)


_ROUTER = _ServerLogs()
_ROUTER_LOCK = threading.Lock()


def _route_logs(thread: int, path: Path, config: Any) -> logging.Handler:
    from dockyard.logs import ACCESS_LOGGER, StructuredFormatter

    handler = logging.FileHandler(path)
    handler.setFormatter(StructuredFormatter(config.log.formatter, dict(config.log.fields)))
    handler.setLevel(config.log.level.upper().replace("WARN", "WARNING"))
    if config.log.accesslog.disabled:
        handler.addFilter(lambda record: record.name != ACCESS_LOGGER)
    with _ROUTER_LOCK:
        root = logging.getLogger()
        if _ROUTER not in root.handlers:
            root.addHandler(_ROUTER)
            logging.getLogger("dockyard").setLevel(logging.DEBUG)
        _ROUTER.by_thread[thread] = handler
    return handler


class InProcessDockyard(RegistryClient):
    """Dockyard serving from a thread of this process, on its own event loop: the production
    serving path (start-up checks, app, middleware, the listening site) without a process per
    server. One worker; no signals (``stop`` ends it the way SIGTERM would)."""

    def __init__(self, work: Path, root: Path, port: int, **overrides: Any) -> None:
        from dockyard.config import load_config

        self.port = port
        self.root = root
        self.session = requests.Session()
        self.scheme = "https" if overrides.get("http", {}).get("tls") else "http"
        self.config_path = work / "config.yml"
        self.log_path = work / "server.log"
        write_config(self.config_path, root, port, **overrides)
        self.config = load_config(str(self.config_path), environ={})
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._handler: logging.Handler | None = None
        self._thread = threading.Thread(target=self._run, name=f"dockyard-{port}", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        if self._failure is not None:
            raise RuntimeError(f"server did not start: {self._failure!r}") from self._failure
        wait_for_port(port)

    @classmethod
    def start(
        cls, work: Path, *, root: Path | None = None, port: int | None = None, **overrides: Any
    ) -> InProcessDockyard:
        return cls(work, root or work / "data", port or free_port(), **overrides)

    def _run(self) -> None:
        import uvloop

        loop = uvloop.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:  # reported by the thread that waits for start-up
            self._failure = exc
        finally:
            self._ready.set()
            loop.close()
            if self._handler is not None:
                _ROUTER.by_thread.pop(threading.get_ident(), None)
                self._handler.close()

    async def _serve(self) -> None:
        from dockyard import maintenance
        from dockyard.auth.setup import prepare
        from dockyard.server import bind, check_storage, resolve_secret
        from dockyard.shared import Shared
        from dockyard.worker import serve_worker

        config = self.config
        self._handler = _route_logs(threading.get_ident(), self.log_path, config)
        check_storage(config)
        prepare(config)
        sock = bind(config.http)
        self._stop = asyncio.Event()

        async def until() -> None:
            self._ready.set()
            assert self._stop is not None
            await self._stop.wait()

        await serve_worker(
            config,
            resolve_secret(config),
            sock,
            Shared.create(config, 1),
            0,
            with_maintenance=maintenance.wanted(config),
            until=until(),
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 30.0) -> int:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and self._thread.is_alive():
            loop.call_soon_threadsafe(stop.set)
            self._thread.join(timeout)
        self.session.close()
        return 0


def memory_kib(pid: int, field: str = "VmRSS") -> int:
    """A process's memory from /proc (``VmRSS`` now, ``VmHWM`` its peak), in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def add_user(path: Path, name: str, password: str) -> None:
    """``dockyard user add NAME --file PATH`` with the password on stdin, as an operator does."""
    command = [sys.executable, "-m", "dockyard", "user", "add", name, "--file", str(path)]
    added = subprocess.run(
        [*command, "--password-stdin"],
        input=password + "\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert added.returncode == 0, added.stdout + added.stderr


def run_command(
    *args: str, env: dict[str, str] | None = None, stdin: str | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """``dockyard ARGS...`` as an operator runs it (the module of this checkout), its output
    captured as text; ``env`` added to this process's environment."""
    return subprocess.run(
        [sys.executable, "-m", "dockyard", *args],
        input=stdin,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
