"""The web UI's readers of pushed JSON (dockyard.ui.image) and of cookies
(dockyard.ui.sessions), fuzzed: any input gives a view (perhaps saying less), never an
exception; and a session cookie is accepted only as it was signed."""

from __future__ import annotations

import json
import time
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from dockyard.ui import format as fmt
from dockyard.ui.image import ConfigView, compare, describe_config, describe_manifest
from dockyard.ui.sessions import SessionCodec
from harness.fuzz import fuzz

FUZZ = fuzz(150)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=30,
)

#: documents shaped like manifests and configs, with any value in any field
KEYS = [
    "mediaType", "config", "layers", "manifests", "subject", "artifactType", "annotations",
    "digest", "size", "platform", "os", "architecture", "variant", "history", "created_by",
    "empty_layer", "Env", "Labels", "Cmd", "Entrypoint", "ExposedPorts", "Volumes", "User",
    "WorkingDir",
]  # fmt: skip
shaped = st.recursive(
    json_values,
    lambda inner: (
        st.dictionaries(st.sampled_from(KEYS), inner, max_size=8) | st.lists(inner, max_size=4)
    ),
    max_leaves=40,
)


@FUZZ
@given(st.one_of(st.binary(max_size=300), shaped.map(lambda v: json.dumps(v).encode())))
def test_any_manifest_or_config_gives_a_view(body: bytes) -> None:
    view = describe_manifest(body, "application/vnd.oci.image.manifest.v1+json")
    config = describe_config(body, view.layers)
    assert isinstance(config.fields(), dict)
    result = compare(view, view, config, config)
    assert result.fields == []  # a thing compared with itself differs in nothing
    for entry in [*view.layers, *view.manifests]:
        fmt.platform(entry.platform)
    for step in config.history:
        assert isinstance(step.created_by, str)


def test_history_steps_are_paired_with_layers_skipping_empty_ones() -> None:
    manifest = {
        "layers": [{"digest": "sha256:" + "a" * 64, "size": 1}, {"digest": "sha256:" + "b" * 64}]
    }
    view = describe_manifest(json.dumps(manifest).encode(), "")
    config: dict[str, Any] = {
        "history": [
            {"created_by": "ADD rootfs"},
            {"created_by": "ENV A=1", "empty_layer": True},
            {"created_by": "RUN make"},
        ]
    }
    steps = describe_config(json.dumps(config).encode(), view.layers).history
    assert [s.layer.digest[-1] if s.layer else None for s in steps] == ["a", None, "b"]


def test_compare_names_the_fields_that_differ() -> None:
    a = ConfigView(env=["A=1", "B=2"], labels={"v": "1"}, cmd=["run"])
    b = ConfigView(env=["A=1", "B=3"], labels={"v": "1", "new": "x"}, cmd=["run"])
    empty = describe_manifest(b"{}", "")
    fields = compare(empty, empty, a, b).fields
    assert fields == [("env B", "2", "3"), ("label new", "", "x")]


@FUZZ
@given(st.text(max_size=300))
def test_any_cookie_is_a_session_or_none(value: str) -> None:
    assert SessionCodec("secret", 60).decode(value) is None


def test_a_session_is_accepted_only_as_signed_and_until_it_expires() -> None:
    codec = SessionCodec("secret", 60)
    session = codec.new("alice", "f1")
    value = codec.encode(session)
    assert codec.decode(value) == session
    assert SessionCodec("another secret", 60).decode(value) is None
    version, payload, mac = value.split(".")
    forged = json.loads(__import__("base64").urlsafe_b64decode(payload + "=="))
    forged["u"] = "admin"
    import base64

    tampered = base64.urlsafe_b64encode(json.dumps(forged).encode()).decode().rstrip("=")
    assert codec.decode(f"{version}.{tampered}.{mac}") is None
    expired = SessionCodec("secret", -1)
    assert expired.decode(expired.encode(expired.new("alice"))) is None
    # CSRF tokens are per session
    other = codec.new("alice", "f1")
    assert codec.csrf_ok(session, codec.csrf_token(session))
    assert not codec.csrf_ok(session, codec.csrf_token(other))
    assert not codec.csrf_ok(session, "")
    assert session.expires <= time.time() + 61


def test_printable_shows_control_and_bidi_characters() -> None:
    assert fmt.printable("a\x1b[31mb") == "a\\x1b[31mb"
    assert fmt.printable("x\u202ey") == "x\\u202ey"
    assert fmt.printable("plain text, ünïcode") == "plain text, ünïcode"
