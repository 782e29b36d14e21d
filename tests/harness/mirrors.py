"""Clients configured to pull through a mirror (a pull-through cache), as operators set them up:

- podman, skopeo, buildah (containers/image): ``registries.conf`` with ``[[registry.mirror]]``
  (``registries_conf``), and an isolated podman that reads it (``Podman``);
- containerd (``ctr``, Kubernetes nodes): a ``hosts.toml`` per registry host in a hosts
  directory (``containerd_hosts``); containerd adds ``?ns=<host>`` to what it asks a mirror;
- the Docker engine: ``start_dockerd(registry_mirrors=[...])`` (harness.docker), for Docker Hub
  names only.

Clients fall back to the registry itself when a mirror fails, silently: a test shows that the
mirror answered by counting the requests it logged (``access_log``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

_PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


def _toml(value: str) -> str:
    return json.dumps(value)  # a JSON string is a TOML basic string


def registries_conf(path: Path, mirrors: Mapping[str, str], insecure: bool = True) -> Path:
    """A ``registries.conf`` (v2 format) where each image name ``prefix`` (``registry.example``
    or ``registry.example/team``) is pulled from the mirror ``location`` (``127.0.0.1:PORT``
    or ``127.0.0.1:PORT/some/path``: the path replaces the prefix in the name). No search
    registries: every name must be fully qualified."""
    lines = ["unqualified-search-registries = []", ""]
    for prefix, location in mirrors.items():
        lines += [
            "[[registry]]",
            f"prefix = {_toml(prefix)}",
            f"location = {_toml(prefix)}",
            "",
            "[[registry.mirror]]",
            f"location = {_toml(location)}",
            f"insecure = {'true' if insecure else 'false'}",
            "",
        ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path


def containerd_hosts(directory: Path, mirrors: Mapping[str, str]) -> Path:
    """A containerd hosts directory (``config_path``, or ``ctr --hosts-dir``): for each
    registry host (``docker.io``, ``registry.example:5000``) a ``hosts.toml`` sending pulls and
    tag resolution to the mirror URL (``http://127.0.0.1:PORT``) before the host itself."""
    for host, mirror in mirrors.items():
        server = "https://registry-1.docker.io" if host == "docker.io" else f"https://{host}"
        folder = directory / host  # containerd also looks for host:port as it is
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "hosts.toml").write_text(
            f"server = {_toml(server)}\n\n"
            f"[host.{_toml(mirror)}]\n"
            '  capabilities = ["pull", "resolve"]\n'
        )
    return directory


@dataclass(frozen=True)
class Podman:
    """podman with its own storage (vfs), ``registries.conf`` and auth file under ``base``."""

    binary: str
    base: Path
    env: dict[str, str]

    @classmethod
    def create(cls, base: Path, registries: Path | None = None) -> Podman:
        """Skips the test if podman is not installed."""
        binary = shutil.which("podman")
        if binary is None:
            pytest.skip("podman is not installed")
        (base / "root").mkdir(parents=True, exist_ok=True)
        (base / "run").mkdir(exist_ok=True)
        storage = base / "storage.conf"
        storage.write_text(
            f'[storage]\ndriver = "vfs"\ngraphroot = "{base / "root"}"\n'
            f'runroot = "{base / "run"}"\n'
        )
        conf = base / "containers.conf"
        conf.write_text('[engine]\nevents_logger = "none"\n')
        (base / "auth.json").write_text('{"auths": {}}')  # podman pull wants it to exist
        env = {k: v for k, v in os.environ.items() if k.lower() not in _PROXY_VARS}
        env |= {
            "CONTAINERS_STORAGE_CONF": str(storage),
            "CONTAINERS_CONF": str(conf),
            "REGISTRY_AUTH_FILE": str(base / "auth.json"),
            "TMPDIR": str(base),
        }
        if registries is not None:
            env["CONTAINERS_REGISTRIES_CONF"] = str(registries)
        return cls(binary, base, env)

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [self.binary, *args], env=self.env, capture_output=True, text=True, timeout=120
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"podman {' '.join(args)} exited {result.returncode}\n"
                f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
            )
        return result

    def cleanup(self) -> None:
        self.run("rmi", "--all", "--force", check=False)


_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')


def access_log(log: str) -> list[dict[str, str]]:
    """The access-log lines of a Dockyard log (``method``, ``path`` with its query, ``status``,
    ``user_agent``, ...), in order."""
    entries = []
    for line in log.splitlines():
        fields = {k: v[1:-1] if v.startswith('"') else v for k, v in _FIELD.findall(line)}
        if "method" in fields and "path" in fields and "status" in fields:
            entries.append(fields)
    return entries
