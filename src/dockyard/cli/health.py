"""``dockyard healthcheck``: a module of its own, because a container runs it every few
seconds and it should import no more than loading the configuration takes."""

from __future__ import annotations

import sys

import click

from dockyard.cli import load, main


@main.command()
@click.argument("config_path", required=False, metavar="[CONFIG]")
@click.option("--timeout", default=5.0, show_default=True, help="Seconds to wait for an answer.")
def healthcheck(config_path: str | None, timeout: float) -> None:
    """Exit 0 if the registry configured in CONFIG answers /debug/health with 200 (for container
    healthchecks: it follows http.addr, http.prefix and TLS from the config and REGISTRY_*)."""
    import ssl
    import urllib.error
    import urllib.request

    from dockyard.config import parse_addr

    config = load(config_path)
    host, port = parse_addr(config.http.addr)
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    elif ":" in host:
        host = f"[{host}]"
    scheme = "https" if config.http.tls.enabled else "http"
    url = f"{scheme}://{host}:{port}{config.http.prefix}/debug/health"
    context = ssl._create_unverified_context() if scheme == "https" else None
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (urllib.error.URLError, OSError) as exc:
        click.echo(f"unhealthy: {url}: {exc}", err=True)
        sys.exit(1)
    if status != 200:
        click.echo(f"unhealthy: {url} answered {status}", err=True)
        sys.exit(1)
