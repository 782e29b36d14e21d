"""``dockyard user add|passwd|remove|list``."""

from __future__ import annotations

import asyncio
import stat
import subprocess
from pathlib import Path

from click.testing import CliRunner

from dockyard.auth.htpasswd import Htpasswd
from dockyard.cli import main


def verify(path: Path, user: str, password: str) -> bool:
    return asyncio.run(Htpasswd(str(path), config_key="k").verify(user, password))


def test_add_prompts_twice_and_never_prints_the_password(tmp_path: Path) -> None:
    path = tmp_path / "htpasswd"
    runner = CliRunner()
    result = runner.invoke(
        main, ["user", "add", "alice", "--file", str(path)], input="s3cret-pw\ns3cret-pw\n"
    )
    assert result.exit_code == 0, result.output
    assert "s3cret-pw" not in result.output
    assert result.output.count("assword") == 2  # asked twice
    assert verify(path, "alice", "s3cret-pw")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().startswith("alice:$2y$")
    # Apache's tool agrees
    assert (
        subprocess.run(
            ["htpasswd", "-vb", str(path), "alice", "s3cret-pw"], capture_output=True
        ).returncode
        == 0
    )


def test_mismatched_confirmation_is_asked_again(tmp_path: Path) -> None:
    path = tmp_path / "htpasswd"
    result = CliRunner().invoke(
        main, ["user", "add", "bob", "--file", str(path)], input="one\ntwo\nthree\nthree\n"
    )
    assert result.exit_code == 0
    assert verify(path, "bob", "three")


def test_stdin_passwd_remove_list(tmp_path: Path) -> None:
    path = tmp_path / "htpasswd"
    runner = CliRunner()
    for user in ("alice", "bob"):
        r = runner.invoke(
            main,
            ["user", "add", user, "--file", str(path), "--password-stdin"],
            input=f"{user}-pw\n",
        )
        assert r.exit_code == 0 and f"{user}-pw" not in r.output
    r = runner.invoke(
        main, ["user", "add", "bob", "--file", str(path), "--password-stdin"], input="x\n"
    )
    assert r.exit_code == 1 and "already exists" in r.output
    r = runner.invoke(
        main, ["user", "passwd", "bob", "--file", str(path), "--password-stdin"], input="new-pw\n"
    )
    assert r.exit_code == 0 and verify(path, "bob", "new-pw")
    r = runner.invoke(
        main, ["user", "passwd", "zed", "--file", str(path), "--password-stdin"], input="x\n"
    )
    assert r.exit_code == 1 and "no user" in r.output
    assert runner.invoke(main, ["user", "list", "--file", str(path)]).output == "alice\nbob\n"
    assert runner.invoke(main, ["user", "remove", "alice", "--file", str(path)]).exit_code == 0
    assert runner.invoke(main, ["user", "list", "--file", str(path)]).output == "bob\n"
    r = runner.invoke(
        main, ["user", "add", "x", "--file", str(path), "--password-stdin"], input="\n"
    )
    assert r.exit_code != 0


def test_file_defaults_to_the_configured_one(tmp_path: Path) -> None:
    path = tmp_path / "from-config"
    config = tmp_path / "config.yml"
    config.write_text(
        f"version: 0.1\nstorage: {{filesystem: {{}}}}\n"
        f"auth: {{htpasswd: {{realm: r, path: {path}}}}}\n"
    )
    r = CliRunner().invoke(
        main, ["user", "add", "carol", "--config", str(config), "--password-stdin"], input="pw\n"
    )
    assert r.exit_code == 0, r.output
    assert verify(path, "carol", "pw")
    r = CliRunner().invoke(main, ["user", "list"], env={"REGISTRY_CONFIGURATION_PATH": ""})
    assert r.exit_code != 0 and "--file" in r.output
