"""Throttling of failed logins, per client address and per user.

After ``limit`` failures within ``window`` seconds a key is locked out for ``lockout`` seconds
(doubling on each further lockout, up to ``max_lockout``); a locked-out key gets 429
TOOMANYREQUESTS with ``Retry-After`` before any bcrypt work is done. A user's counter resets on
success; an address's does not (one good account must not reset a brute force from the same
host). State is per worker process.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class _Entry:
    failures: list[float] = field(default_factory=list)
    locked_until: float = 0.0
    lockouts: int = 0


class FailureThrottle:
    def __init__(
        self,
        limit: int = 10,
        window: float = 60.0,
        lockout: float = 30.0,
        max_lockout: float = 900.0,
        capacity: int = 100_000,
    ) -> None:
        self.limit = limit
        self.window = window
        self.lockout = lockout
        self.max_lockout = max_lockout
        self.capacity = capacity
        self._entries: dict[str, _Entry] = {}

    def retry_after(self, key: str) -> float | None:
        """Seconds until ``key`` may try again, or None if it may now."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        remaining = entry.locked_until - time.monotonic()
        return remaining if remaining > 0 else None

    def failure(self, key: str) -> None:
        now = time.monotonic()
        entry = self._entries.get(key)
        if entry is None:
            if len(self._entries) >= self.capacity:
                self._prune(now)
            entry = self._entries[key] = _Entry()
        entry.failures = [t for t in entry.failures if now - t < self.window]
        entry.failures.append(now)
        if len(entry.failures) >= self.limit:
            entry.lockouts += 1
            duration = min(self.lockout * 2 ** (entry.lockouts - 1), self.max_lockout)
            entry.locked_until = now + duration
            entry.failures.clear()

    def success(self, key: str) -> None:
        self._entries.pop(key, None)

    def _prune(self, now: float) -> None:
        stale = [
            k
            for k, e in self._entries.items()
            if e.locked_until < now and not any(now - t < self.window for t in e.failures)
        ]
        for key in stale:
            del self._entries[key]
        if len(self._entries) >= self.capacity:
            self._entries.clear()
