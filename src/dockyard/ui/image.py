"""What the UI shows of a manifest and its image config, read from pushed JSON of any shape:
every field is checked for its type and anything else is left out, so a hostile manifest can
make a page say less, never fail. Strings stay as pushed (escaping is the template's)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from dockyard.oci import mediatypes as mt
from dockyard.oci.manifest import JSONTooDeep, load_json

#: the largest image config the UI reads (real ones are a few KiB; history makes them grow)
MAX_CONFIG_BYTES = 4 * 1024 * 1024
#: at most this many entries of any pushed list or map are shown
MAX_ITEMS = 1000


@dataclass
class Entry:
    """A descriptor as a page shows it."""

    media_type: str
    digest: str
    size: int | None
    platform: dict[str, Any] | None = None
    artifact_type: str = ""
    annotations: dict[str, str] = field(default_factory=dict)


@dataclass
class ManifestView:
    media_type: str
    is_index: bool
    config: Entry | None = None
    layers: list[Entry] = field(default_factory=list)
    manifests: list[Entry] = field(default_factory=list)
    subject: Entry | None = None
    artifact_type: str = ""
    annotations: dict[str, str] = field(default_factory=dict)
    #: the manifest could not be read as JSON (shown raw-size only)
    unreadable: bool = False


@dataclass
class HistoryStep:
    created_by: str
    created: str
    comment: str
    empty_layer: bool
    #: the layer this step made (None for a step without one)
    layer: Entry | None = None


@dataclass
class ConfigView:
    os: str = ""
    architecture: str = ""
    variant: str = ""
    created: str = ""
    author: str = ""
    user: str = ""
    working_dir: str = ""
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    env: list[str] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    exposed_ports: list[str] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)
    stop_signal: str = ""
    history: list[HistoryStep] = field(default_factory=list)
    unreadable: bool = False

    def fields(self) -> dict[str, str]:
        """The config as comparable text, one value per field."""
        return {
            "platform": "/".join(p for p in (self.os, self.architecture, self.variant) if p),
            "user": self.user,
            "working dir": self.working_dir,
            "entrypoint": json.dumps(self.entrypoint),
            "cmd": json.dumps(self.cmd),
            "exposed ports": ", ".join(self.exposed_ports),
            "volumes": ", ".join(self.volumes),
            "stop signal": self.stop_signal,
            **{f"env {e.partition('=')[0]}": e.partition("=")[2] for e in self.env},
            **{f"label {k}": v for k, v in self.labels.items()},
        }


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        return []
    return [v for v in value[:MAX_ITEMS] if isinstance(v, str)]


def _string_map(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        return {}
    out: dict[str, str] = {}
    for k, v in value.items():
        if len(out) >= MAX_ITEMS:
            break
        if isinstance(k, str) and isinstance(v, str):
            out[k] = v
    return out


def _keys(value: Any) -> list[str]:
    if not isinstance(value, dict):
        return []
    return sorted(k for k in list(value)[:MAX_ITEMS] if isinstance(k, str))


def _entry(value: Any) -> Entry | None:
    if not isinstance(value, dict):
        return None
    platform = value.get("platform")
    return Entry(
        media_type=_str(value.get("mediaType")),
        digest=_str(value.get("digest")),
        size=_int(value.get("size")),
        platform=platform if isinstance(platform, dict) else None,
        artifact_type=_str(value.get("artifactType")),
        annotations=_string_map(value.get("annotations")),
    )


def _entries(value: Any) -> list[Entry]:
    if not isinstance(value, list):
        return []
    return [e for e in (_entry(v) for v in value[:MAX_ITEMS]) if e is not None]


def _document(body: bytes) -> dict[str, Any] | None:
    try:
        doc = load_json(body)
    except (ValueError, JSONTooDeep, RecursionError, UnicodeDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


def describe_manifest(body: bytes, media_type: str) -> ManifestView:
    doc = _document(body)
    if doc is None:
        return ManifestView(media_type=media_type, is_index=False, unreadable=True)
    kind = _str(doc.get("mediaType")) or media_type
    is_index = kind in mt.INDEX_MANIFESTS or (
        "manifests" in doc and "layers" not in doc and "config" not in doc
    )
    return ManifestView(
        media_type=kind,
        is_index=is_index,
        config=_entry(doc.get("config")),
        layers=_entries(doc.get("layers")),
        manifests=_entries(doc.get("manifests")),
        subject=_entry(doc.get("subject")),
        artifact_type=_str(doc.get("artifactType")),
        annotations=_string_map(doc.get("annotations")),
    )


def describe_config(body: bytes, layers: list[Entry]) -> ConfigView:
    """The image config; each history step that made a layer is paired with it, in order (as
    docker history does: steps marked ``empty_layer`` made none)."""
    doc = _document(body)
    if doc is None:
        return ConfigView(unreadable=True)
    inner = doc.get("config")
    run = inner if isinstance(inner, dict) else {}
    view = ConfigView(
        os=_str(doc.get("os")),
        architecture=_str(doc.get("architecture")),
        variant=_str(doc.get("variant")),
        created=_str(doc.get("created")),
        author=_str(doc.get("author")),
        user=_str(run.get("User")),
        working_dir=_str(run.get("WorkingDir")),
        entrypoint=_strings(run.get("Entrypoint")),
        cmd=_strings(run.get("Cmd")),
        env=_strings(run.get("Env")),
        labels=_string_map(run.get("Labels")),
        exposed_ports=_keys(run.get("ExposedPorts")),
        volumes=_keys(run.get("Volumes")),
        stop_signal=_str(run.get("StopSignal")),
    )
    history = doc.get("history")
    remaining = iter(layers)
    if isinstance(history, list):
        for step in history[:MAX_ITEMS]:
            if not isinstance(step, dict):
                continue
            empty = step.get("empty_layer") is True
            view.history.append(
                HistoryStep(
                    created_by=_str(step.get("created_by")),
                    created=_str(step.get("created")),
                    comment=_str(step.get("comment")),
                    empty_layer=empty,
                    layer=None if empty else next(remaining, None),
                )
            )
    return view


@dataclass
class Comparison:
    """Two images side by side: their layers (the same, only in one) and the config fields
    whose values differ."""

    layers: list[tuple[Entry | None, Entry | None]]
    shared_layers: int
    fields: list[tuple[str, str, str]]


def compare(
    a: ManifestView, b: ManifestView, config_a: ConfigView, config_b: ConfigView
) -> Comparison:
    """Layers are lined up by position: a layer changed in a rebuild shows beside the one it
    replaced; the same digest in both is shared."""
    rows: list[tuple[Entry | None, Entry | None]] = []
    for i in range(max(len(a.layers), len(b.layers))):
        rows.append(
            (a.layers[i] if i < len(a.layers) else None, b.layers[i] if i < len(b.layers) else None)
        )
    shared = len({e.digest for e in a.layers} & {e.digest for e in b.layers})
    fa, fb = config_a.fields(), config_b.fields()
    fields = [
        (name, fa.get(name, ""), fb.get(name, ""))
        for name in sorted(set(fa) | set(fb))
        if fa.get(name, "") != fb.get(name, "")
    ]
    return Comparison(rows, shared, fields)
