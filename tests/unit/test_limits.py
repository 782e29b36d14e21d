"""Client addresses behind trusted proxies, the login throttle and its shared table, and the
table of connections per address."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dockyard.auth.htpasswd import Htpasswd, hash_password
from dockyard.auth.login import BadCredentials, Login
from dockyard.auth.throttle import (
    FailureTable,
    Key,
    LoginThrottle,
    State,
    after_failure,
    keys_for,
    redis_failures,
)
from dockyard.clientaddress import TrustedProxies, canonical, limit_key, parse_address
from dockyard.config import LoginThrottleConfig, RedisConfig
from dockyard.connections import REFUSED, ConnectionLimiter, ConnectionTable
from dockyard.errors import RegistryError

RULES = LoginThrottleConfig(attempts=3, addressattempts=5, window=10, lockout=2, maxlockout=5)


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


# -- client addresses ---------------------------------------------------------------------------


def test_forwarded_for_is_believed_only_from_trusted_proxies() -> None:
    none = TrustedProxies()
    assert none.client("127.0.0.1", ["203.0.113.9"]) == "127.0.0.1"  # loopback is not special
    proxies = TrustedProxies(["10.0.0.0/8", "127.0.0.1", "2001:db8:1::/48"])
    assert proxies.client("192.0.2.7", ["203.0.113.9"]) == "192.0.2.7"
    assert proxies.client("127.0.0.1", ["203.0.113.9"]) == "203.0.113.9"
    assert proxies.client("127.0.0.1", []) == "127.0.0.1"
    # from the right, skipping trusted hops; the client can prepend anything it likes
    assert proxies.client("127.0.0.1", ["1.1.1.1, 203.0.113.9, 10.1.2.3"]) == "203.0.113.9"
    assert proxies.client("127.0.0.1", ["1.1.1.1", "203.0.113.9, 10.1.2.3"]) == "203.0.113.9"
    # every hop trusted: the leftmost
    assert proxies.client("127.0.0.1", ["10.0.0.5, 10.0.0.6"]) == "10.0.0.5"
    # garbage stops the walk at the last address a trusted hop vouched for
    assert proxies.client("127.0.0.1", ["203.0.113.9, unknown"]) == "127.0.0.1"
    assert proxies.client("127.0.0.1", ["203.0.113.9, , 10.0.0.2"]) == "10.0.0.2"
    # dual-stack peers and IPv6 proxies
    assert proxies.client("::ffff:127.0.0.1", ["203.0.113.9"]) == "203.0.113.9"
    assert proxies.client("2001:db8:1::5", ["[2001:db8:2::1]:4711"]) == "2001:db8:2::1"
    assert proxies.client("", ["203.0.113.9"]) == ""  # a unix socket's peer stays as it is
    assert proxies.trusts("10.9.9.9") and not proxies.trusts("11.0.0.1")
    assert not proxies.trusts("") and not proxies.trusts("nonsense")


def test_address_forms() -> None:
    assert str(parse_address("192.0.2.1:80")) == "192.0.2.1"
    assert str(parse_address(" [2001:db8::1] ")) == "2001:db8::1"
    assert parse_address("192.0.2.1:http") is None
    assert parse_address("[2001:db8::1]x") is None
    assert parse_address("example.com") is None
    assert canonical("::ffff:192.0.2.1") == "192.0.2.1"
    assert canonical("unix") == "unix"


def test_limits_count_ipv6_clients_by_their_64() -> None:
    assert limit_key("2001:db8:1:2:3:4:5:6") == "2001:db8:1:2::/64"
    assert limit_key("2001:db8:1:2::9") == limit_key("2001:db8:1:2:ffff::1")
    assert limit_key("2001:db8:1:3::1") != limit_key("2001:db8:1:2::1")
    assert limit_key("::ffff:192.0.2.1") == "192.0.2.1"  # not the /64 of every IPv4 client
    assert limit_key("192.0.2.1") == "192.0.2.1"
    user, address = keys_for(RULES, "alice", "2001:db8:1:2::9")
    assert keys_for(RULES, "alice", "2001:db8:1:2::10") == (user, address)
    assert (user.limit, address.limit) == (3, 5)


# -- the failure counters ---------------------------------------------------------------------


def test_lockout_doubles_and_is_forgotten() -> None:
    table = FailureTable(slots=64)
    key = Key("k", 3)
    for now in (0.0, 1.0):
        table.failure([key], RULES, now)
    assert table.retry_after(["k"], 1.0) is None
    table.failure([key], RULES, 2.0)
    assert table.retry_after(["k"], 2.0) == pytest.approx(2.0)  # lockout
    assert table.retry_after(["k"], 4.0) is None
    for now in (4.0, 4.1, 4.2):
        table.failure([key], RULES, now)
    assert table.retry_after(["k"], 4.2) == pytest.approx(4.0)  # doubled ...
    for now in (8.2, 8.3, 8.4):
        table.failure([key], RULES, now)
    assert table.retry_after(["k"], 8.4) == pytest.approx(5.0)  # ... up to maxlockout
    # maxlockout after the last lock-out ended, the doubling is forgotten
    for now in (18.5, 18.6, 18.7):
        table.failure([key], RULES, now)
    assert table.retry_after(["k"], 18.7) == pytest.approx(2.0)
    table.reset("k")
    assert table.retry_after(["k"], 18.7) is None


def test_failures_outside_the_window_do_not_add_up() -> None:
    table = FailureTable(slots=64)
    key = Key("k", 3)
    for now in (0.0, 1.0, 11.0, 12.0, 22.0):  # never three within 10 s
        table.failure([key], RULES, now)
        assert table.retry_after(["k"], now) is None


def test_a_racing_failure_does_not_extend_a_lockout() -> None:
    state = State()
    for now in (0.0, 1.0, 2.0):
        state = after_failure(state, 3, RULES, now)
    assert state.locked_until == pytest.approx(4.0) and state.lockouts == 1
    assert after_failure(state, 3, RULES, 2.5) == state


def test_table_is_bounded_and_salted() -> None:
    table = FailureTable(slots=64)
    size = table.size
    for i in range(5000):
        table.failure([Key(f"flood{i}", 3)], RULES, 0.0)
    assert table.size == size == len(table.memory)
    # a random salt per table: where keys land cannot be computed from outside
    other = FailureTable(slots=64)
    names = [f"user{i}" for i in range(32)]
    assert [table.locate(n) for n in names] != [other.locate(n) for n in names]
    assert len({table.locate(n)[1] for n in names}) == len(names)


def test_a_flood_of_new_keys_does_not_evict_what_matters() -> None:
    table = FailureTable(slots=FailureTable.WAYS)  # one bucket: every key collides
    locked, guessed = Key("locked", 3), Key("guessed", 3)
    for now in (0.0, 0.1, 0.2):
        table.failure([locked], RULES, now)
    for now in (0.0, 0.1):
        table.failure([guessed], RULES, now)
    for i in range(10_000):  # each flood key fails once
        table.failure([Key(f"flood{i}", 3)], RULES, 0.5)
    assert table.retry_after(["locked"], 0.5) is not None  # still locked out
    table.failure([guessed], RULES, 0.6)  # its two failures were kept: this third one locks
    assert table.retry_after(["guessed"], 0.6) is not None
    assert table.evictions > 0


def test_when_everything_is_locked_the_soonest_to_unlock_goes() -> None:
    table = FailureTable(slots=FailureTable.WAYS)
    for i in range(FailureTable.WAYS):
        for _ in range(3):
            table.failure([Key(f"k{i}", 3)], RULES, i / 10)
    table.failure([Key("new", 3)], RULES, 1.0)
    assert table.retry_after(["k0"], 1.0) is None  # locked until 2.0, the soonest: evicted
    assert all(table.retry_after([f"k{i}"], 1.0) for i in range(1, FailureTable.WAYS))


def _fail_in_child(table: FailureTable, name: str, times: int) -> None:
    for _ in range(times):
        table.failure([Key(name, 3)], RULES, time.monotonic())


def test_table_is_shared_with_forked_workers() -> None:
    table = FailureTable(slots=64)
    fork = multiprocessing.get_context("fork")
    children = [fork.Process(target=_fail_in_child, args=(table, "alice", 1)) for _ in range(3)]
    for child in children:
        child.start()
    for child in children:
        child.join(10)
        assert child.exitcode == 0
    assert table.retry_after(["alice"], time.monotonic()) is not None


def test_a_crashed_worker_cannot_leave_the_table_locked() -> None:
    table = FailureTable(slots=64)
    fork = multiprocessing.get_context("fork")
    holding = fork.Event()

    def die_holding_the_lock() -> None:
        with table.locked():
            holding.set()
            os._exit(1)

    child = fork.Process(target=die_holding_the_lock)
    child.start()
    child.join(10)
    assert holding.is_set() and child.exitcode == 1  # it died inside the lock
    # A lock that outlived its holder would block this for ever: give it a second.
    done = threading.Event()

    def fail_once() -> None:
        table.failure([Key("k", 3)], RULES, 0.0)
        done.set()

    threading.Thread(target=fail_once, daemon=True).start()
    assert done.wait(1), "the table is still locked by a worker that died holding it"


# -- login --------------------------------------------------------------------------------------


def write_users(path: Path, **users: str) -> None:
    path.write_text("".join(f"{u}:{hash_password(p, rounds=4)}\n" for u, p in users.items()))


def test_login_throttles_per_user_and_address_and_per_address(tmp_path: Path) -> None:
    path = tmp_path / "h"
    write_users(path, alice="secret", bob="b")
    throttle = LoginThrottle(RULES, FailureTable(slots=64))
    login = Login(Htpasswd(str(path), config_key="k", cache_ttl=0), throttle)

    async def go() -> None:
        for _ in range(3):
            with pytest.raises(BadCredentials):
                await login.check("alice", "guess", "10.0.0.1")
        with pytest.raises(RegistryError) as err:
            await login.check("alice", "secret", "10.0.0.1")  # locked before bcrypt
        assert err.value.status == 429 and int(err.value.headers["Retry-After"]) > 0
        await login.check("alice", "secret", "10.0.0.2")  # the right password elsewhere
        with pytest.raises(BadCredentials):
            await login.check("alice", "guess", "10.0.0.2")
        await login.check("bob", "b", "10.0.0.1")  # another user from that address
        # spraying: five failures from one address, any users, lock the address out
        for user in ("carol", "dave"):
            with pytest.raises(BadCredentials):
                await login.check(user, "guess", "10.0.0.1")
        with pytest.raises(RegistryError):
            await login.check("bob", "b", "10.0.0.1")
        await login.check("bob", "b", "10.0.0.3")
        # a success clears the user's counter from that address, not the address's
        for _ in range(2):
            with pytest.raises(BadCredentials):
                await login.check("bob", "guess", "10.0.0.4")
        await login.check("bob", "b", "10.0.0.4")
        for _ in range(2):
            with pytest.raises(BadCredentials):
                await login.check("bob", "guess", "10.0.0.4")
        await login.check("bob", "b", "10.0.0.4")

    run(go())


def test_login_counts_in_redis(redis_addr: str, tmp_path: Path) -> None:
    async def go() -> None:
        config = RedisConfig(addr=redis_addr, db=3)
        first = LoginThrottle(RULES, FailureTable(slots=64), redis_failures(config, RULES))
        second = LoginThrottle(RULES, FailureTable(slots=64), redis_failures(config, RULES))
        try:
            await first.redis.client.flushdb()  # type: ignore[union-attr]
            for throttle in (first, second, first):  # two instances, one count
                assert await second.retry_after("alice", "10.0.0.1") is None
                await throttle.failed("alice", "10.0.0.1")
            wait = await second.retry_after("alice", "10.0.0.1")
            assert wait is not None and 1 < wait <= 2
            assert await first.retry_after("alice", "10.0.0.2") is None
            ttls = [
                await first.redis.client.pttl(k)  # type: ignore[union-attr]
                for k in await first.redis.client.keys("dockyard:login:*")  # type: ignore[union-attr]
            ]
            # nothing outlives what it remembers: the window, or lockout + maxlockout
            assert sorted(ttls)[0] <= 7000 and sorted(ttls)[1] <= 10_000 and min(ttls) > 0
            await first.succeeded("alice", "10.0.0.1")
            assert await second.retry_after("alice", "10.0.0.1") is None
        finally:
            await first.close()
            await second.close()

    run(go())


def test_unreachable_redis_falls_back_to_the_table(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here

    async def go() -> None:
        config = RedisConfig(addr=f"127.0.0.1:{port}", dialtimeout=1)
        throttle = LoginThrottle(RULES, FailureTable(slots=64), redis_failures(config, RULES))
        for _ in range(3):
            await throttle.failed("alice", "10.0.0.1")
        assert await throttle.retry_after("alice", "10.0.0.1") is not None
        await throttle.close()

    run(go())
    warnings = [r.getMessage() for r in caplog.records if "redis is unavailable" in r.getMessage()]
    assert len(warnings) == 1  # once, then left alone for a while


# -- connections per address ----------------------------------------------------------------------


def test_connections_are_counted_per_address_across_workers() -> None:
    table = ConnectionTable(workers=3, slots=64)
    a = [table.acquire("192.0.2.1", worker, 3) for worker in (0, 1, 2)]
    assert REFUSED not in a and None not in a
    assert table.acquire("192.0.2.1", 0, 3) == REFUSED
    assert table.acquire("192.0.2.2", 0, 3) not in (REFUSED, None)
    assert table.count("192.0.2.1") == 3
    table.release(a[1], 1)  # type: ignore[arg-type]
    assert table.count("192.0.2.1") == 2
    assert table.acquire("192.0.2.1", 2, 3) not in (REFUSED, None)
    # a worker started again forgets what its predecessor counted
    table.reset_worker(2)
    assert table.count("192.0.2.1") == 1


def test_connection_table_full_bucket_lets_in_uncounted() -> None:
    table = ConnectionTable(workers=1, slots=ConnectionTable.WAYS)
    for i in range(ConnectionTable.WAYS):
        assert table.acquire(f"192.0.2.{i}", 0, 1) not in (REFUSED, None)
    assert table.acquire("198.51.100.1", 0, 1) is None
    slot = table.acquire("192.0.2.0", 0, 2)
    assert slot not in (REFUSED, None)
    table.release(slot, 0)  # type: ignore[arg-type]
    table.release(slot, 0)  # type: ignore[arg-type]  # the row is free again
    assert table.acquire("198.51.100.1", 0, 1) not in (REFUSED, None)


def test_limiter_exempts_trusted_proxies_and_counts_ipv6_by_64() -> None:
    table = ConnectionTable(workers=1, slots=64)
    limiter = ConnectionLimiter(table, 0, 1, TrustedProxies(["10.0.0.1"]))
    assert all(limiter.admit("10.0.0.1") for _ in range(5))
    assert limiter.admit("") is not None  # unix socket
    first = limiter.admit("2001:db8:1:2::1")
    assert first is not None
    assert limiter.admit("2001:db8:1:2::2") is None
    limiter.release(first)
    assert limiter.admit("2001:db8:1:2::2") is not None


def test_the_parent_makes_the_tables_without_loading_the_http_stack() -> None:
    code = (
        "import sys\n"
        "from dockyard.config import load_config\n"
        "from dockyard.server import serve\n"
        "from dockyard.shared import Shared\n"
        "Shared.create(load_config(None, {}), 4)\n"
        "assert 'aiohttp' not in sys.modules and 'redis' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
