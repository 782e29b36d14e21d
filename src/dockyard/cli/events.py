"""``dockyard events``: each notification endpoint's delivery status, backlog and last error,
read from the outbox on disk (the server need not run); ``--replay-from`` sends again every
event written since a time (the running server picks the request up within a poll interval,
a stopped one when it starts)."""

from __future__ import annotations

import sys
import time
from datetime import UTC, datetime
from typing import Any

import click

from dockyard.cli import load, main
from dockyard.cli.output import Column, echo_json, echo_table, format_size
from dockyard.config import parse_duration
from dockyard.events.outbox import Outbox, outbox_directory


def parse_time(value: str) -> float:
    """An RFC 3339 time (``2026-01-31T12:00:00Z``) or a duration ago (``2h``), in Unix
    seconds."""
    try:
        return time.time() - parse_duration(value)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is neither a time (2026-01-31T12:00:00Z) nor a duration (2h)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def event_time(timestamp: str) -> float:
    """An event's RFC 3339 timestamp (nanoseconds, which datetime cannot hold), in seconds."""
    head, _, fraction = timestamp.rstrip("Z").partition(".")
    seconds = datetime.fromisoformat(head).replace(tzinfo=UTC).timestamp()
    return seconds + (float("0." + fraction) if fraction else 0.0)


def first_offset_since(outbox: Outbox, since: float) -> tuple[int, int]:
    """The offset of the first event written at or after ``since`` still in the outbox, and
    how many events there are from it on."""
    offset, count = outbox.size(), 0
    for start, event in outbox.events(outbox.reclaimed()):
        try:
            when = event_time(event["timestamp"])
        except (KeyError, ValueError):
            continue
        if when >= since:
            if count == 0:
                offset = start
            count += 1
    return offset, count


@main.command()
@click.argument("config_path", required=False, metavar="[CONFIG]")
@click.option("--endpoint", "endpoint_name", help="Only this endpoint (its name).")
@click.option(
    "--replay-from",
    metavar="TIME",
    help="Deliver again every event written since TIME (RFC 3339, e.g. 2026-01-31T12:00:00Z, "
    "or a duration ago, e.g. 2h) that the outbox still holds.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (for scripts).")
def events(
    config_path: str | None, endpoint_name: str | None, replay_from: str | None, as_json: bool
) -> None:
    """Notification endpoints: delivered, backlog (events and bytes), failures, last error.

    Exit status: 2 for an unknown endpoint or a configuration without endpoints."""
    config = load(config_path)
    endpoints = [e for e in config.notifications.active if endpoint_name in (None, e.name)]
    if not endpoints:
        named = f" named {endpoint_name}" if endpoint_name else ""
        click.echo(f"dockyard: no enabled notification endpoint{named}", err=True)
        sys.exit(2)
    outbox = Outbox(outbox_directory(config))
    if replay_from is not None:
        offset, count = first_offset_since(outbox, parse_time(replay_from))
        for endpoint in endpoints:
            outbox.request_replay(endpoint.name, offset)
        names = ", ".join(e.name for e in endpoints)
        if as_json:
            echo_json({"endpoints": [e.name for e in endpoints], "events": count})
        else:
            click.echo(f"replay of {count} events requested for {names}")
        return
    size = outbox.size()
    rows: list[dict[str, Any]] = []
    for endpoint in endpoints:
        state = outbox.load_state(endpoint.name)
        rows.append(
            {
                "endpoint": endpoint.name,
                "url": endpoint.url,
                "delivered": state.delivered,
                "backlog": outbox.count_lines(state.offset, size),
                "backlog_bytes": max(size - state.offset, 0),
                "dropped": state.dropped,
                "failures": state.failures,
                "last_success": state.last_success_at,
                "last_error": state.last_error,
                "last_error_at": state.last_error_at,
                "replay_pending": outbox.replay_pending(endpoint.name),
            }
        )
    if as_json:
        echo_json({"outbox": outbox.directory, "endpoints": rows})
        return
    columns = [
        Column("ENDPOINT"),
        Column("DELIVERED", numeric=True),
        Column("BACKLOG", numeric=True),
        Column("SIZE", numeric=True),
        Column("DROPPED", numeric=True),
        Column("FAILURES", numeric=True),
        Column("LAST SUCCESS"),
        Column("LAST ERROR"),
    ]
    echo_table(
        columns,
        [
            [
                r["endpoint"],
                str(r["delivered"]),
                str(r["backlog"]),
                format_size(r["backlog_bytes"]),
                str(r["dropped"]),
                str(r["failures"]),
                r["last_success"] or "-",
                f"{r['last_error_at']} {r['last_error']}" if r["last_error"] else "-",
            ]
            for r in rows
        ],
    )
