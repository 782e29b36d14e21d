"""The commands' output: sizes, tables and progress, for a terminal and for a pipe."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from rich.console import Console
from rich.progress import MofNCompleteColumn, Progress, TextColumn

from dockyard.cli import main, output
from dockyard.cli.output import Column, format_size, plain_table
from dockyard.registry.progress import NoProgress
from dockyard.users import set_password


@pytest.mark.parametrize(
    ("size", "shown"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (5 * 1024**2, "5.0 MiB"),
        (3 * 1024**3 + 1024**3 // 2, "3.5 GiB"),
        (2 * 1024**4, "2.0 TiB"),
        (4096 * 1024**4, "4096.0 TiB"),
    ],
)
def test_format_size(size: int, shown: str) -> None:
    assert format_size(size) == shown


def test_plain_table_aligns_text_left_and_numbers_right() -> None:
    table = plain_table(
        [Column("NAME"), Column("COUNT", numeric=True)], [["a", "1"], ["longer/name", "12345"]]
    )
    assert table.splitlines() == [
        "NAME         COUNT",
        "a                1",
        "longer/name  12345",
    ]


def test_plain_table_without_rows_is_the_header() -> None:
    assert plain_table([Column("USER")], []) == "USER"


def test_progress_is_silent_when_stderr_is_not_a_terminal() -> None:
    with output.progress_bars("gc") as progress:
        assert isinstance(progress, NoProgress)


def test_progress_bars_show_each_phase_against_its_total() -> None:
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=80, color_system=None)
    with Progress(
        TextColumn("{task.description}"), MofNCompleteColumn(), console=console
    ) as rich_bars:
        bars = output._Bars(rich_bars, "fsck")
        bars.total("verify blobs", 3)
        for _ in range(3):
            bars.advance("verify blobs")
        bars.advance("check repositories")  # no total reported (yet): counted anyway
    last = screen.getvalue().rsplit("\x1b[2K", 1)[-1]  # the final frame
    assert re.search(r"fsck: verify blobs +3/3\n", last), last
    assert re.search(r"fsck: check repositories +1/\?\n", last), last


def _users_file(tmp_path: Path) -> Path:
    path = tmp_path / "htpasswd"
    for user in ("alice", "bob"):
        set_password(str(path), user, "pw", create=True)
    return path


def test_user_list_as_json(tmp_path: Path) -> None:
    path = _users_file(tmp_path)
    result = CliRunner().invoke(main, ["user", "list", "--file", str(path), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {
        "file": str(path),
        "users": [{"name": "alice"}, {"name": "bob"}],
    }


def test_user_list_on_a_terminal_is_a_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _users_file(tmp_path)
    monkeypatch.setattr(output, "stdout_is_terminal", lambda: True)
    result = CliRunner().invoke(main, ["user", "list", "--file", str(path)])
    assert result.exit_code == 0, result.output
    assert [line.strip() for line in result.output.splitlines()] == ["USER", "alice", "bob"]


#: what each command must not import to run: the server's HTTP stack and the event outbox
#: (0.35 s of start-up), which gc, du and healthcheck do not use
_SERVER_MODULES = ("aiohttp", "dockyard.events", "dockyard.server", "dockyard.app")
#: healthcheck (run every few seconds by a container) loads its configuration and nothing of
#: the registry
_REGISTRY_MODULES = ("dockyard.registry", "dockyard.storage")


@pytest.mark.parametrize(
    ("command", "code"),
    [(["gc", "--dry-run"], 0), (["du"], 0), (["fsck"], 0), (["healthcheck"], 1)],
)
def test_maintenance_commands_import_only_what_they_run(
    tmp_path: Path, command: list, code: int
) -> None:
    """Every subcommand's module used to be imported for any command: ``dockyard gc`` on a
    10k-blob store spent half its time importing (the GC benchmark's 10k row)."""
    import subprocess
    import sys

    config = tmp_path / "config.yml"
    config.write_text(
        f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {tmp_path}\n"
        "http:\n  addr: 127.0.0.1:1\n"  # nobody answers the healthcheck there: exit 1
    )
    script = (
        "import sys\n"
        "from dockyard.cli import main\n"
        "try:\n"
        f"    main({[*command, str(config)]!r}, standalone_mode=False)\n"
        "finally:\n"  # some commands end with sys.exit
        f"    print([m for m in {_SERVER_MODULES!r} if m in sys.modules])\n"
        f"    print([m for m in {_REGISTRY_MODULES!r} if m in sys.modules])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == code, done.stderr
    server_modules, registry_modules = done.stdout.strip().splitlines()[-2:]
    assert server_modules == "[]"
    if command == ["healthcheck"]:
        assert registry_modules == "[]"


def test_every_command_is_listed_and_runs_its_help() -> None:
    listed = main.list_commands(
        click_context := main.make_context("dockyard", ["--help"], resilient_parsing=True)
    )
    assert {"serve", "check-config", "gc", "rm", "user", "proxy", "events"} <= set(listed)
    for name in listed:
        assert main.get_command(click_context, name) is not None, name
        result = CliRunner().invoke(main, [name, "--help"])
        assert result.exit_code == 0, (name, result.output)
