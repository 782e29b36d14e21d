"""Quotas without a server: who is in which scope, and failing closed when the accounting
cannot answer."""

from __future__ import annotations

import asyncio
import sqlite3
from typing import Any

import pytest

from dockyard.config import QuotaConfig
from dockyard.errors import ErrorCode, RegistryError
from dockyard.registry.quotas import Quotas, in_scope


def test_scopes() -> None:
    assert in_scope("*", "a/b")
    assert in_scope("team-a/*", "team-a/app") and in_scope("team-a/*", "team-a/x/y")
    assert not in_scope("team-a/*", "team-a") and not in_scope("team-a/*", "team-ab/c")
    assert in_scope("team-a/app", "team-a/app") and not in_scope("team-a/app", "team-a/app2")


class _BrokenIndex:
    async def reserve(self, *args: Any, **kwargs: Any) -> None:
        raise sqlite3.OperationalError("disk I/O error")


def test_a_reservation_the_index_cannot_make_is_503_not_500() -> None:
    quotas = Quotas([QuotaConfig(scope="*", limit=10)], _BrokenIndex())  # type: ignore[arg-type]
    with pytest.raises(RegistryError) as refused:
        asyncio.run(quotas.reserve("a/b", "upload", 5))
    assert refused.value.code is ErrorCode.UNAVAILABLE
    assert refused.value.status == 503


class _UnreachableIndex:
    async def tally(self, scopes: Any) -> None:
        raise ConnectionError("Redis is not answering")


def test_a_start_the_index_cannot_check_is_503_not_500() -> None:
    quotas = Quotas([QuotaConfig(scope="a/*", limit=10)], _UnreachableIndex())  # type: ignore[arg-type]
    with pytest.raises(RegistryError) as refused:
        asyncio.run(quotas.check_start("a/b"))
    assert refused.value.status == 503
    asyncio.run(quotas.check_start("elsewhere"))  # no quota holds it: nothing asked
