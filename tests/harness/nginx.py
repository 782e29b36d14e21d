"""nginx in the foreground with a shipped site templated for the test."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from harness.net import wait_for_port


def sub_exactly(text: str, pattern: str, replacement: str, count: int, source: Path) -> str:
    """Replace ``pattern`` (a regex matching whole lines' content) exactly ``count`` times: if
    the shipped file ``source`` changes shape, the template fails loudly instead of testing
    something else."""
    new, n = re.subn(pattern, replacement, text, flags=re.MULTILINE)
    assert n == count, f"expected {count} match(es) of {pattern!r} in {source}, found {n}"
    return new


def write_nginx_conf(prefix: Path, site: str, access_format: str | None = None) -> Path:
    """A minimal nginx.conf around the site: foreground, everything under ``prefix``; the
    access log in nginx's default format, or in ``access_format``."""
    for temp in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (prefix / "temp" / temp).mkdir(parents=True, exist_ok=True)
    (prefix / "site.conf").write_text(site)
    access_log = f"access_log {prefix}/access.log"
    if access_format is not None:
        access_log = f"log_format custom '{access_format}';\n    {access_log} custom"
    conf = prefix / "nginx.conf"
    conf.write_text(
        f"""\
daemon off;
master_process on;
worker_processes 2;
user root;  # pytest's temp directories are private to root
pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;
events {{ worker_connections 1024; }}
http {{
    {access_log};
    client_body_temp_path {prefix}/temp/client_body;
    proxy_temp_path {prefix}/temp/proxy;
    fastcgi_temp_path {prefix}/temp/fastcgi;
    uwsgi_temp_path {prefix}/temp/uwsgi;
    scgi_temp_path {prefix}/temp/scgi;
    include {prefix}/site.conf;
}}
"""
    )
    return conf


def nginx_test(binary: str, prefix: Path, conf: Path) -> subprocess.CompletedProcess[str]:
    """``nginx -t`` on ``conf``: nginx checks the configuration and exits."""
    return subprocess.run(
        [binary, "-t", "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")],
        capture_output=True,
        text=True,
        timeout=30,
    )


@dataclass
class NginxProcess:
    """nginx started by ``run_nginx``, everything under ``prefix``."""

    prefix: Path
    proc: subprocess.Popen[bytes]

    def error_log(self) -> str:
        path = self.prefix / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def assert_clean_error_log(self) -> None:
        """nginx logged nothing critical, and no error about an upstream (Dockyard)."""
        bad = [
            line
            for line in self.error_log().splitlines()
            if re.search(r"\[(crit|alert|emerg)\]", line)
            or ("[error]" in line and "upstream" in line)
        ]
        assert not bad, "\n".join(bad)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # fast shutdown, workers exit with the master
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: master + workers
                self.proc.wait()


def run_nginx(
    binary: str, prefix: Path, conf: Path, ports: Iterable[int]
) -> subprocess.Popen[bytes]:
    """nginx with ``conf``, in the foreground and in a session of its own, its output in
    ``prefix/nginx.out``; returns once it listens on every one of ``ports``, or stops it and
    raises with its output and error log."""
    with open(prefix / "nginx.out", "ab") as out:
        proc = subprocess.Popen(
            [binary, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        for port in ports:
            wait_for_port(port, proc)
    except Exception:
        nginx = NginxProcess(prefix, proc)
        nginx.stop()
        said = (prefix / "nginx.out").read_text(errors="replace")
        raise RuntimeError(f"nginx did not start:\n{said}\n{nginx.error_log()}") from None
    return proc
