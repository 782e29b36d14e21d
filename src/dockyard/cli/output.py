"""How the commands write: for a person at a terminal, rich tables and progress bars (with totals
and the time left); for a pipe or a file, plain aligned text with nothing drawn, or JSON with
``--json``. Whether a stream is a terminal is its own ``isatty()``, nothing else, so what a
script reads never depends on the environment it runs in."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import click

from dockyard.config_base import format_size as format_size  # the commands' one formatter
from dockyard.registry.progress import NoProgress, Progress


def stdout_is_terminal() -> bool:
    return sys.stdout.isatty()


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2))


# -- tables ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    header: str
    #: numbers and sizes are right-aligned
    numeric: bool = False


def plain_table(columns: Sequence[Column], rows: Sequence[Sequence[str]]) -> str:
    """Aligned columns under a header line, two spaces apart, for pipes: ``cut``, ``awk`` and
    ``sort -k`` read it, and nothing in it depends on the terminal's width."""
    widths = [max([len(c.header), *(len(row[i]) for row in rows)]) for i, c in enumerate(columns)]

    def line(cells: Sequence[str]) -> str:
        parts = [
            cell.rjust(width) if column.numeric else cell.ljust(width)
            for column, cell, width in zip(columns, cells, widths, strict=True)
        ]
        return "  ".join(parts).rstrip()

    return "\n".join([line([c.header for c in columns]), *(line(row) for row in rows)])


def echo_table(columns: Sequence[Column], rows: Sequence[Sequence[str]]) -> None:
    """A rich table on a terminal, :func:`plain_table` otherwise."""
    if not stdout_is_terminal():
        click.echo(plain_table(columns, rows))
        return
    from rich.console import Console  # loaded only to draw: piped runs start faster
    from rich.table import Table

    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in columns:
        table.add_column(column.header, justify="right" if column.numeric else "left")
    for row in rows:
        table.add_row(*row)
    Console().print(table)


def echo_quotas(quotas: Sequence[tuple[str, int, int, int, int]]) -> None:
    """The quotas table of ``dockyard du`` (local or ``--url``), after a blank line: per
    quota (scope, bytes used as shown, bytes uploading, limit, bytes counted against the
    limit for USE%)."""
    if not quotas:
        return
    click.echo()
    echo_table(
        [
            Column("QUOTA"),
            Column("USED", numeric=True),
            Column("UPLOADING", numeric=True),
            Column("LIMIT", numeric=True),
            Column("USE%", numeric=True),
        ],
        [
            [
                scope,
                format_size(used),
                format_size(uploading),
                format_size(limit),
                f"{100 * counted / limit:.0f}%" if limit else "-",
            ]
            for scope, used, uploading, limit, counted in quotas
        ],
    )


def echo_list(header: str, items: Sequence[str]) -> None:
    """A one-column listing: a table under ``header`` on a terminal, one item a line (no
    header) when piped, for ``xargs`` and ``while read``."""
    if stdout_is_terminal():
        echo_table([Column(header)], [[item] for item in items])
        return
    for item in items:
        click.echo(item)


# -- progress ----------------------------------------------------------------------------------


class _Bars:
    """registry.progress.Progress drawn as rich progress bars, one per phase."""

    def __init__(self, bars: Any, label: str) -> None:
        self._bars = bars
        self._label = label
        self._tasks: dict[str, Any] = {}

    def _task(self, phase: str) -> Any:
        if phase not in self._tasks:
            self._tasks[phase] = self._bars.add_task(f"{self._label}: {phase}", total=None)
        return self._tasks[phase]

    def total(self, phase: str, steps: int) -> None:
        self._bars.update(self._task(phase), total=steps)

    def advance(self, phase: str, steps: int = 1) -> None:
        self._bars.advance(self._task(phase), steps)


@contextmanager
def progress_bars(label: str) -> Iterator[Progress]:
    """Progress bars on standard error when it is a terminal (the count, the total, the time
    spent and left); when it is not, nothing at all."""
    if not sys.stderr.isatty():
        yield NoProgress()
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.progress import (
        Progress as RichProgress,
    )

    with RichProgress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    ) as bars:
        yield _Bars(bars, label)
