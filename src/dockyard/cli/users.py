"""``dockyard user add|passwd|remove|list``: the users of an htpasswd file."""

from __future__ import annotations

import sys
from collections.abc import Callable

import click

from dockyard.cli import load, main
from dockyard.cli.output import echo_json, echo_list
from dockyard.users import UserFileError, list_users, remove_user, set_password


def _htpasswd_path(file: str | None, config_path: str | None) -> str:
    if file:
        return file
    config = load(config_path)
    if config.auth.htpasswd is not None:
        return config.auth.htpasswd.path
    if config.auth.token is not None and config.auth.token.server is not None:
        return config.auth.token.server.htpasswd
    raise click.UsageError("no --file given and the configuration names no htpasswd file")


def _read_password(password_stdin: bool) -> str:
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            raise click.UsageError("no password on standard input")
        return password
    return click.prompt("Password", hide_input=True, confirmation_prompt="Repeat password")


def _file_options(command: Callable[..., None]) -> Callable[..., None]:
    command = click.option(
        "--config",
        "config_path",
        metavar="CONFIG",
        help="Configuration naming the htpasswd file (default: REGISTRY_CONFIGURATION_PATH).",
    )(command)
    return click.option(
        "--file",
        "file",
        metavar="PATH",
        help="The htpasswd file (default: the one the configuration names).",
    )(command)


@main.group()
def user() -> None:
    """Manage the users of an htpasswd file (bcrypt, compatible with registry:2)."""


def _edit(action: Callable[[], None]) -> None:
    try:
        action()
    except UserFileError as exc:
        click.echo(f"dockyard: {exc}", err=True)
        sys.exit(1)


@user.command("add")
@click.argument("name")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
@_file_options
def user_add(name: str, password_stdin: bool, file: str | None, config_path: str | None) -> None:
    """Add user NAME."""
    path = _htpasswd_path(file, config_path)
    password = _read_password(password_stdin)
    _edit(lambda: set_password(path, name, password, create=True))
    click.echo(f"added {name} to {path}")


@user.command("passwd")
@click.argument("name")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
@_file_options
def user_passwd(name: str, password_stdin: bool, file: str | None, config_path: str | None) -> None:
    """Change the password of user NAME."""
    path = _htpasswd_path(file, config_path)
    password = _read_password(password_stdin)
    _edit(lambda: set_password(path, name, password, create=False))
    click.echo(f"changed the password of {name} in {path}")


@user.command("remove")
@click.argument("name")
@_file_options
def user_remove(name: str, file: str | None, config_path: str | None) -> None:
    """Remove user NAME."""
    path = _htpasswd_path(file, config_path)
    _edit(lambda: remove_user(path, name))
    click.echo(f"removed {name} from {path}")


@user.command("list")
@_file_options
@click.option("--json", "as_json", is_flag=True, help="Print the users as JSON (for scripts).")
def user_list(file: str | None, config_path: str | None, as_json: bool) -> None:
    """List the users: a table on a terminal, one name a line when piped."""
    path = _htpasswd_path(file, config_path)
    try:
        names = list_users(path)
    except UserFileError as exc:
        click.echo(f"dockyard: {exc}", err=True)
        sys.exit(1)
    if as_json:
        echo_json({"file": path, "users": [{"name": name} for name in names]})
    else:
        echo_list("USER", names)
