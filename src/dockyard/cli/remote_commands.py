"""``dockyard repos``, ``dockyard tags`` and ``dockyard api``: a running registry's repositories,
tags and any JSON API route, through its JSON API (``--url``; see ``cli.remote``)."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qsl

import click

from dockyard.cli import main
from dockyard.cli.output import Column, echo_json, echo_table, format_size
from dockyard.cli.remote import (
    DEFAULT_TIMEOUT,
    RemoteError,
    client_from_options,
    fail,
    remote_options,
)

json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print the result as JSON (for scripts)."
)


def _need_url(url: str | None) -> str:
    if not url:
        raise click.UsageError("--url (or DOCKYARD_URL) is required: this asks a running registry")
    return url


def _when(value: str | None) -> str:
    """``2024-05-01T12:00:00Z`` -> ``2024-05-01 12:00``; ``-`` for never."""
    return value.replace("T", " ")[:16] if value else "-"


def _size(value: int | None) -> str:
    return format_size(value) if value is not None else "-"


@main.command()
@click.option("--query", "-q", metavar="TEXT", help="Only repositories whose name contains TEXT.")
@json_option
@remote_options
def repos(
    query: str | None,
    as_json: bool,
    url: str | None,
    username: str | None,
    password_stdin: bool,
) -> None:
    """The repositories of the registry at --url that you may pull, with their tags, manifests,
    size and latest push and pull (from its metadata index)."""
    client = client_from_options(_need_url(url), username, password_stdin)
    try:
        found = [
            r for page in client.pages("/repositories", {"q": query}) for r in page["repositories"]
        ]
    except RemoteError as exc:
        fail(exc)
    if as_json:
        echo_json(found)
        return
    echo_table(
        [
            Column("REPOSITORY"),
            Column("TAGS", numeric=True),
            Column("MANIFESTS", numeric=True),
            Column("SIZE", numeric=True),
            Column("PUSHED"),
            Column("PULLED"),
        ],
        [
            [
                r["name"],
                str(r["tags"]),
                str(r["manifests"]),
                _size(r["size"]),
                _when(r["pushed"]),
                _when(r["pulled"]),
            ]
            for r in found
        ],
    )


@main.command()
@click.argument("repository")
@json_option
@remote_options
def tags(
    repository: str,
    as_json: bool,
    url: str | None,
    username: str | None,
    password_stdin: bool,
) -> None:
    """The tags of REPOSITORY in the registry at --url, with digest, size, and when each was
    pushed and its manifest last pulled.

    Exit status: 3 when there is no such repository, 1 for any other refusal."""
    client = client_from_options(_need_url(url), username, password_stdin)
    try:
        found = [
            t for page in client.pages(f"/repositories/{repository}/-/tags") for t in page["tags"]
        ]
    except RemoteError as exc:
        fail(exc)
    if as_json:
        echo_json(found)
        return
    echo_table(
        [
            Column("TAG"),
            Column("DIGEST"),
            Column("SIZE", numeric=True),
            Column("PUSHED"),
            Column("PULLED"),
        ],
        [
            [t["tag"], t["digest"][:19], _size(t["size"]), _when(t["pushed"]), _when(t["pulled"])]
            for t in found
        ],
    )


@main.command("api")
@click.argument("method", type=click.Choice(["GET", "POST", "DELETE"], case_sensitive=False))
@click.argument("path")
@click.option("--data", "-d", metavar="JSON", help="The request body (JSON), for POST.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=1),
    default=DEFAULT_TIMEOUT,
    show_default=True,
    help="Seconds to wait for the answer (a retention run may take long).",
)
@remote_options
def api(
    method: str,
    path: str,
    data: str | None,
    timeout: float,
    url: str | None,
    username: str | None,
    password_stdin: bool,
) -> None:
    """Send METHOD PATH to the JSON API of the registry at --url and print the JSON answer.
    PATH is under /dockyard/api/v1 (``/repositories/team/app/-/tags?n=10``); the description
    of every route is ``dockyard api GET /openapi.json``.

    Exit status: 3 for 404, 1 for any other error answer."""
    body: Any = None
    if data is not None:
        try:
            body = json.loads(data)
        except ValueError as exc:
            raise click.BadParameter(f"not JSON: {exc}", param_hint="--data") from None
    path, _, query = path.partition("?")
    params = dict(parse_qsl(query, keep_blank_values=True)) if query else None
    client = client_from_options(_need_url(url), username, password_stdin, timeout=timeout)
    try:
        answer = client.request(method.upper(), path, params=params, body=body)
    except RemoteError as exc:
        fail(exc)
    echo_json(answer)
