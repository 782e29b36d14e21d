"""``dockyard reindex``: rebuild the metadata index (``registry.index``) from the layout."""

from __future__ import annotations

import click

from dockyard.cli import load, main
from dockyard.cli.maintenance import _run, config_argument, json_option
from dockyard.cli.output import echo_json
from dockyard.registry.repository import Registry


@main.command()
@config_argument
@click.option(
    "--verify",
    is_flag=True,
    help="Only refresh the repositories whose layout differs from the index (what the server "
    "does at start and every index.verifyinterval).",
)
@json_option
def reindex(config_path: str | None, verify: bool, as_json: bool) -> None:
    """Rebuild the metadata index (sorted tags, push and pull times, usage) from the store's
    registry:2 layout, for example after registry:2 or a restore from backup changed the
    store. Pull times, which only the index holds, are kept. Safe while the registry serves."""

    async def work(registry: Registry) -> list[str]:
        assert registry.index is not None
        if verify:
            return await registry.index.verify(registry.storage)
        return await registry.index.reindex(registry.storage)

    names = _run(load(config_path), work)
    if as_json:
        echo_json({"repositories": names, "verify": verify})
        return
    what = "refreshed" if verify else "indexed"
    click.echo(f"{what} {len(names)} repositories")
