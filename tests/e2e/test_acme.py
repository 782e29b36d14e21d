"""Let's Encrypt, tested against Let's Encrypt's own test CA (Debian's pebble) on loopback:
Dockyard obtains a certificate at start-up over ACME (HTTP-01), serves it, keeps it in the
cache file, and renews it while serving, without a restart."""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from cryptography import x509

from harness import ServerFactory, free_port, wait_for_port
from harness.certs import server_certificate

PEBBLE = shutil.which("pebble")


class Pebble:
    def __init__(self, work: Path, challenge_port: int) -> None:
        ca, cert = server_certificate(work / "pki")
        self.ca = ca.path
        self.port, self.management = free_port(), free_port()
        config = work / "pebble.json"
        config.write_text(
            json.dumps(
                {
                    "pebble": {
                        "listenAddress": f"127.0.0.1:{self.port}",
                        "managementListenAddress": f"127.0.0.1:{self.management}",
                        "certificate": str(cert.cert),
                        "privateKey": str(cert.key),
                        "httpPort": challenge_port,
                        "tlsPort": free_port(),
                        "ocspResponderURL": "",
                        "externalAccountBindingRequired": False,
                    }
                }
            )
        )
        self.log = open(work / "pebble.log", "wb")  # noqa: SIM115 - closed in stop()
        assert PEBBLE is not None
        self.proc = subprocess.Popen(
            [PEBBLE, "-config", str(config)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={"PEBBLE_VA_NOSLEEP": "1"},
        )
        wait_for_port(self.port)

    @property
    def directory(self) -> str:
        return f"https://127.0.0.1:{self.port}/dir"

    def issuing_root(self, path: Path) -> Path:
        """The root pebble signs certificates with (random per run)."""
        pem = requests.get(
            f"https://127.0.0.1:{self.management}/roots/0", verify=str(self.ca)
        ).content
        path.write_bytes(pem)
        return path

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.log.close()


@pytest.fixture
def pebble(tmp_path: Path) -> Iterator[Pebble]:
    if PEBBLE is None:
        pytest.skip("pebble (Let's Encrypt's test CA) is not installed")
    p = Pebble(tmp_path, free_port())
    yield p
    p.stop()


def served_certificate(port: int) -> x509.Certificate:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection(("127.0.0.1", port)) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def letsencrypt(
    tmp_path: Path, pebble: Pebble, challenge_port: int, **extra: object
) -> dict[str, object]:
    return {
        "tls": {
            "letsencrypt": {
                "cachefile": str(tmp_path / "le" / "cache.pem"),
                "email": "admin@example.com",
                "hosts": ["localhost"],
                "directoryurl": pebble.directory,
                "cafile": str(pebble.ca),
                "challengeaddr": f":{challenge_port}",
                **extra,
            }
        }
    }


def test_certificate_obtained_served_and_renewed(
    start_server: ServerFactory, tmp_path: Path, pebble: Pebble
) -> None:
    challenge_port = json.loads((tmp_path / "pebble.json").read_text())["pebble"]["httpPort"]
    s = start_server(
        workers=2,
        http=letsencrypt(
            tmp_path, pebble, challenge_port, renewbefore="87600h", checkinterval="2s"
        ),
    )
    root = pebble.issuing_root(tmp_path / "pebble-root.pem")
    # served, and trusted through pebble's root, for the configured host name
    r = requests.get(f"https://localhost:{s.port}/v2/", verify=str(root))
    assert r.status_code == 200
    first = served_certificate(s.port)
    names = first.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    cache = tmp_path / "le" / "cache.pem"
    assert cache.stat().st_mode & 0o777 == 0o600
    assert b"PRIVATE KEY" in cache.read_bytes()
    assert (
        x509.load_pem_x509_certificates(cache.read_bytes())[0].serial_number == first.serial_number
    )
    # the challenge port redirects everything else to HTTPS
    r = requests.get(f"http://localhost:{challenge_port}/v2/x", allow_redirects=False)
    assert r.status_code == 301 and r.headers["Location"] == f"https://localhost:{s.port}/v2/x"
    # renewal (forced by renewbefore > validity): a new certificate is served, same processes
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        if served_certificate(s.port).serial_number != first.serial_number:
            break
        time.sleep(1)
    else:
        pytest.fail(f"certificate not renewed:\n{s.log()[-3000:]}")
    assert s.proc.poll() is None
    assert requests.get(f"https://localhost:{s.port}/v2/", verify=str(root)).status_code == 200
    assert "certificate reloaded" in s.log()


def test_cached_certificate_is_reused(
    start_server: ServerFactory, tmp_path: Path, pebble: Pebble
) -> None:
    challenge_port = json.loads((tmp_path / "pebble.json").read_text())["pebble"]["httpPort"]
    overrides = letsencrypt(tmp_path, pebble, challenge_port)
    s = start_server(http=overrides)
    first = served_certificate(s.port).serial_number
    s.stop()
    s2 = start_server(http=overrides)
    assert served_certificate(s2.port).serial_number == first
    assert s2.log().count("certificate obtained") == 0


def test_unreachable_acme_server_fails_start_up(
    start_server: ServerFactory, tmp_path: Path, pebble: Pebble
) -> None:
    overrides = letsencrypt(
        tmp_path, pebble, free_port(), directoryurl=f"https://127.0.0.1:{free_port()}/dir"
    )
    with pytest.raises(RuntimeError) as err:
        start_server(http=overrides)
    assert "http.tls.letsencrypt: could not obtain a certificate" in str(err.value)
