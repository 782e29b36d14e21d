"""registry:2 (Debian's ``docker-registry``, distribution 2.8): the reference Dockyard is
compared with, on a directory or an S3 bucket."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import requests
import yaml

from harness.net import Loopback, free_port, wait_for_port

#: the registry:2 binary, or None when Debian's docker-registry is not installed
REGISTRY2 = shutil.which("docker-registry")


@dataclass(kw_only=True)
class Registry2(Loopback):
    """A running ``docker-registry serve`` (registry:2 v2.8) on ``port``, logging to
    ``log_path``, serving a directory (``root``) or an S3 bucket (``bucket``)."""

    port: int
    log_path: Path
    proc: subprocess.Popen[bytes]
    config_path: Path
    root: Path | None = None
    bucket: str | None = None

    def errors(self) -> list[str]:
        """Lines logged at level=error, other than the 404s tests ask for on purpose."""
        return [
            line
            for line in self.log().splitlines()
            if "level=error" in line and "http.response.status=404" not in line
        ]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def garbage_collect(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``docker-registry garbage-collect ARGS... CONFIG`` (e.g. ``--dry-run``) on this
        registry's store, run to the end (registry:2 wants itself stopped meanwhile)."""
        assert REGISTRY2 is not None
        return subprocess.run(
            [REGISTRY2, "garbage-collect", *args, str(self.config_path)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    @classmethod
    def start(
        cls,
        work: Path,
        *,
        root: Path | None = None,
        s3: dict[str, Any] | None = None,
        port: int | None = None,
        auth: dict[str, Any] | None = None,
        notifications: dict[str, Any] | None = None,
    ) -> Self:
        """registry:2 on the directory ``root`` or with ``s3`` as its ``storage.s3`` section
        (deletes enabled), started in ``work``; returns once ``/v2/`` answers (200, or 401 with
        ``auth``, its ``auth`` section: ``{"htpasswd": {"realm": ..., "path": ...}}``, whose
        file must hold bcrypt hashes, e.g. made by ``htpasswd -Bbn``);
        ``notifications``: its ``notifications`` section."""
        assert REGISTRY2 is not None, "docker-registry (registry:2) is not installed"
        assert (root is None) != (s3 is None), "a directory or a bucket"
        port = port or free_port()
        storage: dict[str, Any] = {"delete": {"enabled": True}}
        if s3 is not None:
            storage["s3"] = s3
        else:
            storage["filesystem"] = {"rootdirectory": str(root)}
        config = {
            "version": 0.1,
            "log": {"level": "info"},
            "storage": storage,
            "http": {"addr": f"127.0.0.1:{port}", "secret": "registry2-test-secret"},
        }
        if auth is not None:
            config["auth"] = auth
        if notifications is not None:
            config["notifications"] = notifications
        # registry:2's S3 driver fails on AWS_CA_BUNDLE (see ../shared/guide/s3.md).
        env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}
        fields: dict[str, Any] = {"root": root, "bucket": s3["bucket"] if s3 else None}
        return cls.launch(REGISTRY2, work, config, port, env=env, **fields)

    @classmethod
    def launch(
        cls,
        binary: str,
        work: Path,
        config: dict[str, Any],
        port: int,
        env: dict[str, str] | None = None,
        **fields: Any,
    ) -> Self:
        """Write ``config`` into ``work``, start ``binary serve`` on it and return once
        ``/v2/`` answers 200 (401 if ``config`` has an ``auth`` section)."""
        config_path = work / "config.yml"
        config_path.write_text(yaml.safe_dump(config))
        log_path = work / "registry2.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [binary, "serve", str(config_path)], stdout=log, stderr=subprocess.STDOUT, env=env
            )
        registry = cls(port=port, log_path=log_path, proc=proc, config_path=config_path, **fields)
        try:
            wait_for_port(port, proc)
        except Exception:
            registry.stop()
            raise RuntimeError(f"registry:2 did not start:\n{registry.log()}") from None
        expected = 401 if config.get("auth") else 200
        assert requests.get(f"{registry.url}/v2/", timeout=10).status_code == expected
        return registry
