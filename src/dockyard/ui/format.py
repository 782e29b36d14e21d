"""How the UI writes sizes, times, digests and pushed text (the templates call these as
``fmt.size(...)``). HTML escaping is Jinja2's, everywhere; these only make text readable."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from dockyard.config_base import format_size
from dockyard.registry.layer_listing import escape_unprintable


def size(n: int | None) -> str:
    return "—" if n is None else format_size(n)


def iso(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def ago(seconds: float | None, now: float | None = None) -> str:
    """``3 h ago``; ``never`` for None."""
    if seconds is None:
        return "never"
    delta = (now if now is not None else time.time()) - seconds
    if delta < 0:
        return "just now"
    for unit, length in (("d", 86400), ("h", 3600), ("min", 60)):
        if delta >= length:
            return f"{int(delta // length)} {unit} ago"
    return f"{int(delta)} s ago"


def short(digest: object) -> str:
    """``sha256:0123456789ab``: enough to tell digests apart on a page."""
    text = str(digest)
    algorithm, _, hexpart = text.partition(":")
    return f"{algorithm}:{hexpart[:12]}" if hexpart else text[:19]


def printable(text: str) -> str:
    """Pushed text with what a reader would take for something else made visible: control
    and format characters (ESC, right-to-left overrides) escaped (HTML escaping follows)."""
    return escape_unprintable(text)


def platform(value: object) -> str:
    """``linux/arm64/v8`` from an index entry's ``platform`` (pushed JSON: any shape)."""
    if not isinstance(value, dict):
        return "unknown"
    parts = [value.get("os"), value.get("architecture"), value.get("variant")]
    return "/".join(printable(str(p)) for p in parts if isinstance(p, str) and p) or "unknown"
