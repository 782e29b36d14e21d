"""Private Docker engines (dockerd, with their containerd) for end-to-end tests, each with its
own data, exec root, socket and client config under a short temporary directory.

One engine serves a whole test session (``harness.plugin.dockerd``): it trusts every registry on
loopback over plain HTTP (``--insecure-registry 127.0.0.0/8``), so a test can run a registry on
any free port; a test that needs its own client configuration (logins) asks the engine for one
with ``Dockerd.client``."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

_SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")
_PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


def find_dockerd() -> str | None:
    path = os.pathsep.join([os.environ.get("PATH", ""), *_SBIN])
    return shutil.which("dockerd", path=path)


@dataclass
class Dockerd:
    """A dockerd of the test's own: data, exec root, socket and client config in ``dir``."""

    dir: Path
    proc: subprocess.Popen[bytes]
    env: dict[str, str]
    log_path: Path

    @property
    def pidfile(self) -> Path:
        return self.dir / "docker.pid"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self, config_dir: Path) -> Dockerd:
        """The same engine, with the docker CLI's configuration (logins) in ``config_dir``."""
        config_dir.mkdir(parents=True, exist_ok=True)
        env = {**self.env, "DOCKER_CONFIG": str(config_dir)}
        return Dockerd(dir=self.dir, proc=self.proc, env=env, log_path=self.log_path)

    @property
    def containerd_address(self) -> str:
        """The socket of the containerd this engine runs (for ``ctr --address``)."""
        return str(self.dir / "exec" / "containerd" / "containerd.sock")

    def ctr(
        self, *args: str, check: bool = True, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        """containerd's own CLI against this engine's containerd (namespace ``dockyard-test``,
        apart from docker's ``moby``)."""
        result = subprocess.run(
            ["ctr", "--address", self.containerd_address, "--namespace", "dockyard-test", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"ctr {' '.join(args)} exited {result.returncode}\n"
                f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
            )
        return result

    def docker(
        self, *args: str, check: bool = True, timeout: float = 120.0, input: bytes | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run the docker CLI against this engine; on failure (with ``check``) the assertion
        message holds the command, its output and the tail of the engine's log."""
        result = subprocess.run(
            ["docker", *args],
            env=self.env,
            input=input.decode() if input is not None else None,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"docker {' '.join(args)} exited {result.returncode}\n"
                f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}\n"
                f"dockerd log (tail):\n{self.log()[-4000:]}"
            )
        return result

    def _leftovers(self) -> list[int]:
        """Processes (containerd, shims) whose command line names this engine's directory."""
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == self.proc.pid:
                continue
            with contextlib.suppress(OSError):
                if f"{self.dir}/".encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
        return pids

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM to the pid in the pidfile (not the launcher's pid), then make sure, by pid,
        that no containerd or shim of this engine is left, and remove its directory."""
        if self.proc.poll() is None:
            pid = self.proc.pid
            with contextlib.suppress(OSError, ValueError):
                pid = int(self.pidfile.read_text().strip())
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        deadline = time.monotonic() + 10
        while (pids := self._leftovers()) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.dir, ignore_errors=True)


def start_dockerd(
    insecure_registries: list[str] | None = None,
    timeout: float = 30.0,
    storage_driver: str = "vfs",
    registry_mirrors: list[str] | None = None,
) -> Dockerd:
    """Start dockerd per tests' guide (no iptables, no bridge) and wait until it answers.
    ``registry_mirrors`` (``http://127.0.0.1:PORT``): where it pulls Docker Hub images from
    (the engine asks them only for ``docker.io`` names)."""
    binary = find_dockerd()
    assert binary is not None, "dockerd is not installed"
    assert shutil.which("docker"), "dockerd is installed but the docker CLI is not"
    # Short paths: containerd's unix sockets live under the exec root (limit ~100 chars).
    d = Path(tempfile.mkdtemp(prefix="dk-", dir="/tmp"))
    (d / "cfg").mkdir()
    log_path = d / "dockerd.log"
    base_env = {k: v for k, v in os.environ.items() if k.lower() not in _PROXY_VARS}
    base_env = {k: v for k, v in base_env.items() if not k.startswith("DOCKER_")}
    base_env["PATH"] = os.pathsep.join([base_env.get("PATH", ""), *_SBIN])
    args = [
        binary,
        "--iptables=false",
        "--ip6tables=false",
        "--bridge=none",
        f"--storage-driver={storage_driver}",
        "--data-root", str(d / "data"),
        "--exec-root", str(d / "exec"),
        "--pidfile", str(d / "docker.pid"),
        "-H", f"unix://{d}/docker.sock",
    ]  # fmt: skip
    for registry in insecure_registries or []:
        args += ["--insecure-registry", registry]
    for mirror in registry_mirrors or []:
        args += ["--registry-mirror", mirror]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, env=base_env, start_new_session=True
        )
    client_env = {
        **base_env,
        "DOCKER_HOST": f"unix://{d}/docker.sock",
        "DOCKER_CONFIG": str(d / "cfg"),
        "DOCKER_CLI_HINTS": "false",
    }
    engine = Dockerd(dir=d, proc=proc, env=client_env, log_path=log_path)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            log_text = engine.log()
            shutil.rmtree(d, ignore_errors=True)
            raise RuntimeError(f"dockerd exited with {proc.returncode}:\n{log_text[-4000:]}")
        ready = engine.docker("version", "--format", "{{.Server.Version}}", check=False, timeout=10)
        if ready.returncode == 0:
            return engine
        if time.monotonic() > deadline:
            engine.stop()
            log_text = engine.log()
            shutil.rmtree(d, ignore_errors=True)
            raise TimeoutError(f"dockerd not ready after {timeout}s:\n{log_text[-4000:]}")
        time.sleep(0.1)
