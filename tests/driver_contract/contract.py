"""The whole contract: every case, for every driver."""

from __future__ import annotations

from .capabilities import CapabilityCases
from .primitives import PrimitiveCases


class DriverContract(PrimitiveCases, CapabilityCases):
    """Shared cases; subclasses provide the ``driver`` fixture and declare what it has
    (``capabilities``, ``fast_paths``, ``exclusive_moves``)."""
