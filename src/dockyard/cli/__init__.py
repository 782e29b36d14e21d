"""The ``dockyard`` command: ``serve`` and ``check-config`` here; the rest register themselves
from their modules: ``user`` (users.py), ``gc``, ``du``, ``fsck``, ``purge-uploads`` and
``rm`` (maintenance.py), ``healthcheck`` (health.py), ``retention`` (retention.py), ``reindex``
(index.py), ``events`` (events.py), ``proxy`` (proxy.py), and the remote-only ``repos``,
``tags`` and ``api`` (remote_commands.py; ``--url`` is remote.py), each module imported only
when one of its commands runs (:data:`COMMAND_MODULES`)."""

from __future__ import annotations

import importlib
import os
import sys

import click

from dockyard import __version__
from dockyard.config import Config, collected_warnings, load_config
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


def load_strict(config_path: str | None) -> tuple[Config, list[str]]:
    """As :func:`load`, with the configuration's warnings returned instead of logged."""
    with collected_warnings() as warnings:
        config = load(config_path)
    return config, warnings


#: the modules that define each subcommand, imported when that command runs (or for the
#: command list): a command pays for its own imports only. ``dockyard healthcheck`` runs every
#: few seconds in a container and ``dockyard gc`` on a small store takes less than importing
#: every command took (aiohttp and the event outbox among them: 0.35 s of 0.7).
COMMAND_MODULES = {
    "gc": "maintenance",
    "du": "maintenance",
    "fsck": "maintenance",
    "purge-uploads": "maintenance",
    "rm": "maintenance",
    "healthcheck": "health",
    "retention": "retention",
    "reindex": "index",
    "events": "events",
    "proxy": "proxy",
    "repos": "remote_commands",
    "tags": "remote_commands",
    "api": "remote_commands",
    "user": "users",
}


class LazyGroup(click.Group):
    """The ``dockyard`` group: a subcommand's module is imported when it is asked for."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(COMMAND_MODULES))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        module = COMMAND_MODULES.get(cmd_name)
        if module is not None and cmd_name not in self.commands:
            # the module registers its commands on ``main`` as it is imported
            importlib.import_module(f"dockyard.cli.{module}")
        return super().get_command(ctx, cmd_name)


@click.group(cls=LazyGroup)
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
@click.option(
    "--strict",
    is_flag=True,
    help="Refuse to start on any configuration warning (as check-config does).",
)
def serve(config_path: str | None, workers: int, strict: bool) -> None:
    """Serve the registry. CONFIG is a registry:2 config.yml; REGISTRY_* variables override it.
    Without one: filesystem storage in ./data on port 5000, no authentication."""
    if strict:
        config, warnings = load_strict(config_path)
        if warnings:
            for warning in warnings:
                click.echo(f"dockyard: configuration error (--strict): {warning}", err=True)
            sys.exit(2)
    else:
        config = load(config_path)
    configure(config.log)
    from dockyard.server import serve as run

    try:
        code = run(config, workers)
    except ConfigError as exc:
        click.echo(f"dockyard: {exc}", err=True)
        sys.exit(2)
    sys.exit(code)


@main.command("check-config")
@click.argument("config_path", required=False, metavar="[CONFIG]")
def check_config(config_path: str | None) -> None:
    """Load CONFIG (and the REGISTRY_* variables) as serve would, and report every problem:
    exit 2 on an error, 1 on any warning (unknown keys, keys Dockyard does not act on,
    sections accepted without effect), 0 when the configuration is clean."""
    _, warnings = load_strict(config_path)
    for warning in warnings:
        click.echo(f"warning: {warning}")
    if warnings:
        click.echo(f"dockyard: {len(warnings)} configuration warning(s)", err=True)
        sys.exit(1)
    click.echo("configuration OK")


if __name__ == "__main__":  # pragma: no cover
    main()
