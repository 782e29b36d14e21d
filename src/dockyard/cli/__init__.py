"""The ``dockyard`` command: ``serve``, ``user ...``, ``gc``, ``du``, ``fsck``."""

from __future__ import annotations

import os
import sys

import click

from dockyard import __version__
from dockyard.config import Config, load_config
from dockyard.errors import ConfigError
from dockyard.logs import configure


def load(config_path: str | None) -> Config:
    """Config from the argument, else ``REGISTRY_CONFIGURATION_PATH`` (as registry:2 reads it),
    else the embedded default; a ConfigError ends the process with the key and the reason."""
    path = config_path or os.environ.get("REGISTRY_CONFIGURATION_PATH") or None
    try:
        return load_config(path)
    except ConfigError as exc:
        click.echo(f"dockyard: {exc}", err=True)
        sys.exit(2)


@click.group()
@click.version_option(__version__, prog_name="dockyard")
def main() -> None:
    """Dockyard: a private container image registry (OCI Distribution v1.1, registry:2 drop-in)."""


@main.command()
@click.argument("config_path", required=False, metavar="[CONFIG]")
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=lambda: os.cpu_count() or 1,
    show_default="number of CPUs",
    help="Worker processes serving the port.",
)
def serve(config_path: str | None, workers: int) -> None:
    """Serve the registry. CONFIG is a registry:2 config.yml; REGISTRY_* variables override it.
    Without one: filesystem storage in ./data on port 5000, no authentication."""
    config = load(config_path)
    configure(config.log)
    from dockyard.server import serve as run

    try:
        code = run(config, workers)
    except ConfigError as exc:
        click.echo(f"dockyard: {exc}", err=True)
        sys.exit(2)
    sys.exit(code)


# The subcommands register themselves on ``main``.
from dockyard.cli import events, maintenance, proxy, users  # noqa: E402,F401

if __name__ == "__main__":  # pragma: no cover
    main()
