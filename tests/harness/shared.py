"""Daemons shared by every process of a test session (pytest-xdist runs several).

The expensive ones (Ceph RGW: a monitor, an OSD and radosgw, ~12 s and ~750 MB) are started
once per session, by whichever worker first needs one, and used by all: the first caller takes
a lock file in the session's shared directory, starts the daemon and writes how to reach it
(and how to stop it) into a state file; later callers, in any worker, read the state. The
session's last act (``stop_all``, from the controlling process once every worker is done) stops
everything that was started. Without xdist the one process plays both parts.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

#: the environment variable through which workers learn the shared directory
SHARED_DIR_ENV = "DOCKYARD_TEST_SHARED_DIR"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def shared_dir() -> Path:
    """The session's shared directory (made by ``plugin.pytest_configure``)."""
    return Path(os.environ[SHARED_DIR_ENV])


def shared_daemon(name: str, start: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """The state of the session's daemon ``name``, starting it first if no process has.

    ``start(directory)`` starts it with its files in ``directory`` and returns its state: any
    JSON the callers need, plus how to stop it — ``"stop_command"`` (argv run at the end) and/or
    ``"pids"`` (sent SIGTERM, then SIGKILL). If ``start`` raises, every later caller gets the
    same failure (as a RuntimeError) instead of trying again."""
    root = shared_dir()
    state_path = root / f"{name}.json"
    with _locked(root / f"{name}.lock"):
        if state_path.exists():
            state: dict[str, Any] = json.loads(state_path.read_text())
        else:
            directory = root / name
            directory.mkdir(exist_ok=True)
            try:
                state = start(directory)
            except pytest.skip.Exception as exc:  # not installed here: every caller skips
                state = {"skipped": str(exc.msg)}
            except Exception as exc:
                state = {"failed": f"{type(exc).__name__}: {exc}"}
            state_path.write_text(json.dumps(state))
    if "skipped" in state:
        pytest.skip(state["skipped"])
    if "failed" in state:
        raise RuntimeError(f"{name} could not be started: {state['failed']}")
    return state


def stop_all(root: Path) -> None:
    """Stop every daemon started in the session whose shared directory is ``root``."""
    for state_path in sorted(root.glob("*.json")):
        state = json.loads(state_path.read_text())
        if state.get("stop_command"):
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run(
                    state["stop_command"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    timeout=60,
                    check=False,
                )
        for pid in state.get("pids", []):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        state_path.unlink()
