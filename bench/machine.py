"""The machine a run is on, for the report: CPU, memory, OS, the servers' and clients'
versions, the file systems, the load, and which code of Dockyard's the servers run."""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import subprocess
from pathlib import Path

from bench import ROOT


def first_line(args: list[str]) -> str:
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=20, check=False)
    except OSError:
        return "?"
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else "?"


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def _mem_total() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    return "?"


def _os_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    return platform.system()


def dockyard_version() -> str:
    from importlib.metadata import version

    rev = first_line(["git", "-C", str(ROOT), "describe", "--always", "--dirty"])
    return f"{version('dockyard')} (git {rev})"


def code_fingerprint() -> str:
    """What the servers run: the committed tree of src/ plus any uncommitted change to it."""
    repo = str(ROOT)
    tree = first_line(["git", "-C", repo, "rev-parse", "HEAD:src"])
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        diff = subprocess.run(
            ["git", "-C", repo, "diff", "HEAD", "--", "src"],
            capture_output=True,
            timeout=20,
            check=False,
        ).stdout
        return f"{tree} {hashlib.sha256(diff).hexdigest()}"
    return tree


def filesystem(path: Path) -> str:
    found = first_line(["findmnt", "-n", "-o", "FSTYPE,SOURCE", "--target", str(path)])
    return " on ".join(found.split())


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def machine_description(workdir: Path) -> dict[str, str]:
    wrk = first_line(["wrk", "--version"]).split(" [")[0]
    return {
        "CPU": f"{_cpu_model()}, {os.cpu_count()} cores",
        "memory": _mem_total(),
        "OS": f"{_os_name()}, kernel {platform.release()}",
        "Python": platform.python_version(),
        "registry:2": first_line(["docker-registry", "--version"]),
        "Dockyard": f"{dockyard_version()}, {os.cpu_count()} workers (the default)",
        "clients": ", ".join(
            [
                first_line(["curl", "--version"]).split(" (")[0],
                wrk.split(" Copyright")[0],
                first_line(["skopeo", "--version"]),
                "ab " + first_line(["ab", "-V"]).split("Version ")[-1].split(" ")[0].rstrip(","),
            ]
        ),
        "storage": f"{workdir} ({filesystem(workdir)})",
    }


def fstype(path: Path) -> str:
    """The file system type of the mount holding ``path`` (from /proc/mounts)."""
    best, fstype = "", "?"
    resolved = str(path.resolve())
    with contextlib.suppress(OSError), open("/proc/mounts") as f:
        for line in f:
            fields = line.split()
            mount = fields[1]
            inside = resolved == mount or resolved.startswith(mount.rstrip("/") + "/")
            if inside and len(mount) > len(best):
                best, fstype = mount, fields[2]
    return fstype
