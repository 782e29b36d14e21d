"""How a walk over the whole store (garbage collection, fsck) tells its caller how far it is.

A walk goes through named phases (``mark``, ``sweep``, ...). For each it says how many steps
there will be as soon as it knows (the number of repositories or blobs to visit, counted from
listings before the phase starts), then advances one step at a time. The model only reports;
showing it (``dockyard gc`` draws progress bars on a terminal) is the caller's business."""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    def total(self, phase: str, steps: int) -> None:
        """``phase`` will take ``steps`` steps."""
        ...

    def advance(self, phase: str, steps: int = 1) -> None:
        """``steps`` more steps of ``phase`` are done."""
        ...


class NoProgress:
    """For callers that do not watch (the scheduled collection)."""

    def total(self, phase: str, steps: int) -> None:
        pass

    def advance(self, phase: str, steps: int = 1) -> None:
        pass
