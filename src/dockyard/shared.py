"""What the workers of one instance share: tables the supervising parent makes before it forks
them (see dockyard.sharedmem). With one worker there is no fork, and they are simply local."""

from __future__ import annotations

from dataclasses import dataclass

from dockyard.auth.throttle import FailureTable
from dockyard.config import Config
from dockyard.connections import ConnectionTable


@dataclass(frozen=True)
class Shared:
    login_failures: FailureTable
    #: None when connections per address are unlimited
    connections: ConnectionTable | None

    @classmethod
    def create(cls, config: Config, workers: int) -> Shared:
        limited = config.http.limits.connectionsperaddress > 0
        return cls(
            login_failures=FailureTable(),
            connections=ConnectionTable(workers) if limited else None,
        )
