"""TLS for the registry port, with registry:2's keys: ``http.tls.certificate``, ``key``,
``clientcas`` (mutual TLS: a client certificate signed by one of them is required) and
``minimumtls`` (default tls1.2, as registry:2). Problems with the files fail at start-up."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl

from dockyard.config import TLSConfig
from dockyard.errors import ConfigError

log = logging.getLogger("dockyard.tls")

_VERSIONS = {
    "tls1.0": ssl.TLSVersion.TLSv1,
    "tls1.1": ssl.TLSVersion.TLSv1_1,
    "tls1.2": ssl.TLSVersion.TLSv1_2,
    "tls1.3": ssl.TLSVersion.TLSv1_3,
}


def _load_chain(ctx: ssl.SSLContext, certificate: str, key: str | None, where: str) -> None:
    for path, name in ((certificate, f"{where}certificate"), (key, f"{where}key")):
        if path and not os.access(path, os.R_OK):
            raise ConfigError(name, f"cannot read {path}")
    try:
        ctx.load_cert_chain(certificate, key or None)
    except ssl.SSLError as exc:
        reason = exc.reason or str(exc)
        if "KEY_VALUES_MISMATCH" in reason.upper():
            raise ConfigError(f"{where}key", f"{key} does not match {certificate}") from None
        raise ConfigError(
            f"{where}certificate", f"cannot load the certificate and key: {reason}"
        ) from None


def server_context(tls: TLSConfig, certificate: str | None = None) -> ssl.SSLContext | None:
    """The SSL context for the registry port; None without TLS. ``certificate`` is a PEM
    holding the key and chain together (the Let's Encrypt cache file)."""
    if not tls.enabled:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _VERSIONS[tls.minimumtls or "tls1.2"]
    ctx.set_alpn_protocols(["http/1.1"])
    if certificate is not None:
        _load_chain(ctx, certificate, None, "http.tls.letsencrypt.")
    else:
        _load_chain(ctx, tls.certificate, tls.key, "http.tls.")
    if tls.clientcas:
        for path in tls.clientcas:
            try:
                ctx.load_verify_locations(cafile=path)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError("http.tls.clientcas", f"cannot load {path}: {exc}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


async def watch_certificate(ctx: ssl.SSLContext, path: str, interval: float = 5.0) -> None:
    """Reload ``path`` into the live context whenever it changes, so a renewed certificate is
    served to new connections without a restart."""

    def stamp() -> tuple[int, int] | None:
        with contextlib.suppress(OSError):
            st = os.stat(path)
            return st.st_mtime_ns, st.st_size
        return None

    seen = stamp()
    while True:
        await asyncio.sleep(interval)
        now = stamp()
        if now is None or now == seen:
            continue
        try:
            ctx.load_cert_chain(path)
        except (OSError, ssl.SSLError) as exc:
            log.error("renewed certificate not loaded: %s", exc)
            continue
        seen = now
        log.info("certificate reloaded", extra={"fields": {"path": path}})
