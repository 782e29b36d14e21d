"""The two servers under test, started with equivalent configurations.

Both are started in their own session (so a Ctrl-C in the terminal reaches only the benchmark,
which then stops them) and killed as a whole process group if they do not stop in time. Unlike
the test harness's ``Registry2`` and ``DockyardProcess`` they restart on the same storage (so
that VmHWM covers one workload), log to one file across restarts, and Dockyard runs with its
default worker count; ports, readiness and URLs come from ``harness.net``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench.procstat import process_tree
from harness.net import Loopback, free_port, wait_for_port

HTTP_SECRET = "dockyard-bench-shared-secret"
REALM = "dockyard-bench"


class BenchError(Exception):
    """A workload or a server failed; the message says what happened."""


# -- configuration ------------------------------------------------------------------------------


def server_config(
    root: Path, port: int, htpasswd: Path | None, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The one configuration both servers get (registry:2's ``config.yml`` keys)."""
    config: dict[str, Any] = {
        "version": 0.1,
        "log": {"level": "warn", "accesslog": {"disabled": True}},
        "storage": {
            "filesystem": {"rootdirectory": str(root)},
            "delete": {"enabled": True},
        },
        "http": {
            "addr": f"127.0.0.1:{port}",
            "secret": HTTP_SECRET,
            "draintimeout": "5s",
        },
    }
    if htpasswd is not None:
        config["auth"] = {"htpasswd": {"realm": REALM, "path": str(htpasswd)}}
    config.update(extra or {})
    return config


# -- the servers --------------------------------------------------------------------------------


@dataclass
class Server(Loopback):
    """One registry process (and its children) on loopback, restartable on the same storage."""

    name: str
    work: Path  # config, log
    root: Path  # storage
    htpasswd: Path | None = None
    authorization: str | None = None  # the header clients send (with htpasswd)
    extra_config: dict[str, Any] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    # subclasses
    def command(self, config_path: Path) -> list[str]:
        raise NotImplementedError

    @property
    def log_path(self) -> Path:
        return self.work / f"{self.slug}.log"

    @property
    def slug(self) -> str:
        return "registry2" if self.name == "registry:2" else self.name.lower()

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def start(self, timeout: float = 120.0) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        self.root.mkdir(parents=True, exist_ok=True)
        config_path = self.work / f"{self.slug}.yml"
        config_path.write_text(
            yaml.safe_dump(server_config(self.root, self.port, self.htpasswd, self.extra_config))
        )
        with open(self.log_path, "ab") as log:
            log.write(f"--- start {self.starts + 1} ---\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.command(config_path),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        STARTED.append(self.proc)
        self.starts += 1
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        assert self.proc is not None
        try:
            wait_for_port(self.port, self.proc, timeout, path="/v2/")
        except RuntimeError:
            raise BenchError(
                f"{self.name} exited with {self.proc.returncode} at start-up:\n" + self.log_tail()
            ) from None
        except TimeoutError:
            raise BenchError(
                f"{self.name} did not answer on {self.host} within {timeout:.0f}s"
            ) from None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 20.0) -> None:
        proc = self.proc
        if proc is None:
            return
        try:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout)
        finally:
            # Whatever is left of the group (workers of a parent that was killed, or anything
            # when this stop was itself interrupted) goes too.
            kill_group(proc)
            self.proc = None

    def restart(self) -> None:
        """A fresh process on the same storage: VmHWM then covers only what follows."""
        self.stop()
        self.start()

    def pids(self) -> list[int]:
        if self.proc is None:
            return []
        return process_tree(self.proc.pid)


#: every server process started, so that none outlives the harness
STARTED: list[subprocess.Popen[bytes]] = []


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)


def kill_all() -> None:
    """Last resort at exit: SIGKILL the process group of every server still running."""
    for proc in STARTED:
        if proc.returncode is None:
            kill_group(proc)


@dataclass
class Registry2(Server):
    binary: str = "docker-registry"

    def command(self, config_path: Path) -> list[str]:
        return [self.binary, "serve", str(config_path)]


@dataclass
class Dockyard(Server):
    def command(self, config_path: Path) -> list[str]:
        # No --workers: the default (the number of CPUs) is what is being measured.
        return [sys.executable, "-m", "dockyard", "serve", str(config_path)]


def require_binaries(names: dict[str, str]) -> list[str]:
    """The missing ones among ``{binary: Debian package}``, as messages."""
    return [
        f"{binary} (Debian package {package})"
        for binary, package in names.items()
        if shutil.which(binary) is None
    ]
