"""What every configuration section is built from: the frozen :class:`Section` and Go-style
durations (``168h``, ``1h30m``), shared by config.py and the sections kept in modules of their
own (proxyconfig.py)."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


def parse_duration(value: Any) -> float:
    """A Go duration (``168h``, ``1h30m``, ``10s``) or a number of seconds, in seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 10s or 24h")
    if isinstance(value, int | float):
        return float(value)
    if not isinstance(value, str) or not value:
        raise ValueError("expected a duration such as 10s or 24h")
    text = value.strip()
    if text == "0":
        return 0.0
    pos, total = 0, 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    if pos != len(text) or pos == 0:
        raise ValueError(f"{value!r} is not a duration (use e.g. 10s, 30m, 168h)")
    return total


_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(?:([KMGTP])(i?)B?|B)?", re.IGNORECASE)


def parse_size(value: Any) -> int:
    """A size in bytes: a number, or a number with a unit: ``50GiB``, ``500MiB`` (binary),
    ``2GB``, ``10G`` (decimal, as ``df -H``)."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError("expected a size such as 50GiB or 500MB")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    match = _SIZE.fullmatch(value.strip())
    if match is None:
        raise ValueError(f"{value!r} is not a size (use e.g. 50GiB, 500MB or a number of bytes)")
    number, prefix, binary = match.groups()
    power = "kmgtp".index(prefix.lower()) + 1 if prefix else 0
    return int(float(number) * (1024 if binary else 1000) ** power)


def format_size(n: int) -> str:
    """``512 B``, ``1.5 KiB``, ... ``3.2 TiB``: binary units, one decimal above bytes (what
    :func:`parse_size` reads back). Every size Dockyard writes for people is this."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


class Section(BaseModel):
    """A config section: frozen; unknown keys are kept aside so they can be warned about."""

    model_config = ConfigDict(frozen=True, extra="allow", coerce_numbers_to_str=True)


#: a Go duration (``168h``, ``1h30m``) or a number of seconds, held as seconds
Duration = Annotated[float, BeforeValidator(parse_duration)]
#: a size (``50GiB``, ``500MB``) or a number of bytes, held as bytes
ByteSize = Annotated[int, BeforeValidator(parse_size)]
