"""What the workers of one instance share: tables the supervising parent makes before it forks
them (see dockyard.sharedmem). With one worker there is no fork, and they are simply local."""

from __future__ import annotations

from dataclasses import dataclass

from dockyard.auth.throttle import FailureTable
from dockyard.config import Config


@dataclass(frozen=True)
class Shared:
    login_failures: FailureTable

    @classmethod
    def create(cls, config: Config, workers: int) -> Shared:
        return cls(login_failures=FailureTable())
