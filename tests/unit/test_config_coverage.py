"""No setting is silently ignored: every key of the configuration model is either read by the
code or declared in ``config.NOT_ACTED_ON`` (which warns about it at start-up when it is set).

"Read by the code" is a text-level check on the source outside the configuration modules: the
key's name appears as an attribute (``.maxidle``), or as a string constant (``["maxidle"]``,
``getattr(x, "maxidle")``). Coarse (a name read anywhere counts), but a newly modelled key
nobody reads fails here."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from dockyard.config import (
    ACCEPTED_WITHOUT_EFFECT,
    NOT_ACTED_ON,
    Config,
    _section_model,
    load_config,
)

SOURCE = Path(__file__).resolve().parents[2] / "src" / "dockyard"
#: where the model is declared, validated and warned about: reading a key there is not using it
#: (proxyconfig.py's properties, which the cache uses, do count)
CONFIG_MODULES = {"config.py", "config_base.py"}


def _collection_item(annotation: Any) -> Any:
    """``tuple[X, ...]`` / ``list[X]`` -> X."""
    from typing import get_args

    return next((a for a in get_args(annotation) if a is not Ellipsis), None)


def model_keys(model: type[BaseModel], prefix: str = "") -> Iterator[str]:
    """Every dotted key of the model, recursively through its Sections (and lists of them)."""
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        yield key
        sub = _section_model(field.annotation)
        if sub is None:
            item = _collection_item(field.annotation)
            sub = _section_model(item) if item is not None else None
        if sub is not None:
            yield from model_keys(sub, f"{key}.")


def names_read() -> set[str]:
    """Attribute names and string constants used in the source outside the config modules."""
    found: set[str] = set()
    for path in SOURCE.rglob("*.py"):
        if path.parent == SOURCE and path.name in CONFIG_MODULES:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute):
                found.add(node.attr)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                found.add(node.value)
    return found


def _declared(key: str) -> bool:
    """Listed, under a listed key, or a section holding listed keys (``http.debug.prometheus``)."""
    return any(
        key == k or key.startswith(k + ".") or k.startswith(key + ".")
        for k in (*NOT_ACTED_ON, *ACCEPTED_WITHOUT_EFFECT)
    )


def test_the_walk_reaches_nested_sections() -> None:
    keys = set(model_keys(Config))
    assert {
        "redis.pool.maxidle",
        "http.debug.prometheus.path",
        "proxy.upstreams.tagttl",
        "auth.token.server.access.repository",
        "storage.s3.bucket",
    } <= keys


def test_every_modelled_key_is_read_or_declared_not_acted_on() -> None:
    read = names_read()
    # every segment must be read: ``http.debug.prometheus`` is not used because ``.enabled``
    # is read somewhere else
    silent = [
        key for key in model_keys(Config) if not set(key.split(".")) <= read and not _declared(key)
    ]
    assert silent == [], (
        "modelled keys nobody reads: act on them, or add them to config.NOT_ACTED_ON"
    )


def test_not_acted_on_names_real_keys_with_reasons() -> None:
    keys = set(model_keys(Config))
    for key, reason in NOT_ACTED_ON.items():
        assert key in keys, key
        assert reason.strip(), key


@pytest.mark.parametrize("key", sorted(NOT_ACTED_ON))
def test_each_not_acted_on_key_is_warned_about_when_set(
    key: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    *parents, leaf = key.split(".")
    model: type[BaseModel] = Config
    for part in parents:
        sub = _section_model(model.model_fields[part].annotation)
        assert sub is not None
        model = sub
    field = model.model_fields[leaf]
    value = _non_default(field.get_default(call_default_factory=True))
    raw: dict[str, Any] = {
        "version": "0.1",
        "storage": {"filesystem": {"rootdirectory": str(tmp_path)}},
    }
    if parents[:2] == ["auth", "token"]:  # what token authentication requires anyway
        raw["auth"] = {
            "token": {"realm": "https://t/", "service": "s", "issuer": "i", "jwks": "/j"}
        }
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(raw))
    load_config(str(path), {})
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(w.startswith(f"{key} ") and NOT_ACTED_ON[key] in w for w in warnings), warnings


def _non_default(default: Any) -> Any:
    if isinstance(default, bool):
        return not default
    if isinstance(default, int | float):
        return default + 1
    if isinstance(default, str):
        return "127.0.0.1:5001" if not default else default + "x"
    if isinstance(default, list | tuple):
        return ["^https://example\\.com/"]
    if isinstance(default, dict):
        return {"storagedriver": {"enabled": True}}
    raise AssertionError(f"no non-default value for {default!r}")


def test_defaults_are_not_warned_about(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "config.yml"
    path.write_text(
        "version: 0.1\n"
        f"storage: {{filesystem: {{rootdirectory: {tmp_path}}}}}\n"
        "redis: {pool: {maxidle: 16, idletimeout: 300s}}\n"
        "http: {debug: {addr: ''}}\n"
    )
    load_config(str(path), {})
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == []


def _write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.yml"
    path.write_text(f"version: 0.1\nstorage: {{filesystem: {{rootdirectory: {tmp_path}}}}}\n{text}")
    return str(path)


def test_check_config_fails_on_any_warning(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from dockyard.cli import main

    path = _write(tmp_path, "redis: {pool: {maxidle: 3}}\nhttp: {frob: 1}\nreporting: {a: 1}\n")
    result = CliRunner().invoke(main, ["check-config", path], env={})
    assert result.exit_code == 1
    assert "redis.pool.maxidle is not applied" in result.output
    assert "unknown configuration key http.frob" in result.output
    assert "reporting is accepted but has no effect yet" in result.output


def test_check_config_passes_a_clean_configuration(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from dockyard.cli import main

    result = CliRunner().invoke(main, ["check-config", _write(tmp_path, "")], env={})
    assert result.exit_code == 0, result.output
    bad = CliRunner().invoke(main, ["check-config", str(tmp_path / "missing.yml")], env={})
    assert bad.exit_code == 2


def test_serve_strict_refuses_to_start_on_a_warning(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from dockyard.cli import main

    path = _write(tmp_path, "redis: {pool: {maxidle: 3}}\n")
    result = CliRunner().invoke(main, ["serve", "--strict", path], env={})
    assert result.exit_code == 2
    assert "redis.pool.maxidle is not applied" in result.output
