"""Back-off of failed logins (htpasswd and the built-in token server), ``http.limits.login``.

Two counters are kept for each failed login: one per (user, client address), limited to
``attempts``, and one per client address across all users, limited to ``addressattempts``
(password spraying). IPv6 clients count by their /64. A counter that reaches its limit within
``window`` is locked out for ``lockout``, doubling with each further lock-out of the same key
up to ``maxlockout``; the doubling is forgotten ``maxlockout`` after the last lock-out ends.
Both counters are checked before any bcrypt work, and a locked one is answered 429. A success
clears the (user, address) counter only: a good account must not wipe a brute force from the
same address. Nothing is keyed by the user alone, so wrong guesses from one address never lock
the user out at another (credentials in the verification cache are never throttled at all).

Where the counters live:

- **Redis**, when ``redis.addr`` is set: shared by every instance, each update one atomic Lua
  script on Redis's clock, each key expiring when it has nothing left to remember. Key names
  are SHA-256 digests, so user names and addresses are not stored. An unreachable Redis is
  skipped with a warning and retried after a pause (as the blob descriptor cache does);
  meanwhile the counters are this instance's table below.
- otherwise a **fixed-size table shared by the workers** of the instance (``FailureTable``),
  so N workers allow the configured number of guesses, not N times as many.

The table under a flood of distinct keys. Its memory is fixed, so a new key may have to push
an old one out. Keys land in buckets of ``WAYS`` slots by a salted hash, so an attacker can
neither aim keys at the bucket of the key they want forgotten nor predict which keys collide.
When a bucket is full, the slot given up is, in order: an expired one; the unlocked one with
the least history (fewest lock-outs, then fewest failures); only when all are locked out, the
one whose lock-out ends first. Checking never inserts; only a failed login does, and each
costs the attacker a bcrypt verification the server paces (tens per second per core) and
counts against the attacker's own address. An attacker's own counters hold at least as much
history as a fresh key, so flooding mostly evicts the flood: to get a key with k failures
forgotten, every slot of its unknown bucket must first hold a key with at least k failures,
and to get a locked-out key forgotten every one of them must be locked out — for a table of
65,536 slots that is on the order of ``attempts`` times 65,536 failed bcrypt checks within one
lock-out, far beyond what the bcrypt pace allows. The check itself never fails open: a key
that is present and locked is always refused.
"""

from __future__ import annotations

import hashlib
import logging
import math
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dockyard.clientaddress import limit_key
from dockyard.config import LoginThrottleConfig, RedisConfig
from dockyard.sharedmem import SharedTable

log = logging.getLogger("dockyard.auth")

#: seconds Redis is left alone after it failed (as the blob descriptor cache does)
RETRY_AFTER_FAILURE = 5.0
#: the largest exponent of the lock-out doubling (maxlockout caps it long before)
_MAX_DOUBLING = 40


@dataclass(frozen=True)
class Key:
    """One counter: its name and how many failures it allows per window."""

    name: str
    limit: int


def keys_for(rules: LoginThrottleConfig, user: str, address: str) -> tuple[Key, Key]:
    """(the (user, address) counter, the address counter)."""
    client = limit_key(address)
    return (
        Key(f"user:{len(user)}:{user}:{client}", rules.attempts),
        Key(f"addr:{client}", rules.addressattempts),
    )


@dataclass(frozen=True)
class State:
    """One counter's state; times on the clock of the store that keeps it."""

    window_end: float = 0.0
    failures: int = 0
    lockouts: int = 0
    locked_until: float = 0.0
    expires: float = 0.0


def after_failure(state: State, limit: int, rules: LoginThrottleConfig, now: float) -> State:
    """A counter after one more failure (the Lua script in RedisFailures does the same)."""
    if now >= state.expires:
        state = State()
    if state.locked_until > now:  # a login that raced the lock-out: nothing to add
        return state
    window_end, failures = state.window_end, state.failures
    if window_end <= now:
        window_end, failures = now + rules.window, 0
    failures += 1
    lockouts, locked_until = state.lockouts, state.locked_until
    if failures >= limit:
        lockouts += 1
        doubled = rules.lockout * 2.0 ** min(lockouts - 1, _MAX_DOUBLING)
        locked_until = now + min(doubled, rules.maxlockout)
        failures, window_end = 0, now
    expires = locked_until + rules.maxlockout if lockouts else window_end
    return State(window_end, failures, lockouts, locked_until, expires)


# tag, window_end, failures, lockouts, locked_until, expires
_SLOT = struct.Struct("<QdIIdd")


class FailureTable(SharedTable):
    """Failure counters in memory shared by the workers of one instance (see the module
    docstring for what happens when it is full). Times are ``time.monotonic()``, one clock for
    every process of the machine."""

    WAYS = 8
    DEFAULT_SLOTS = 65536

    def __init__(self, slots: int = DEFAULT_SLOTS) -> None:
        super().__init__(slots, _SLOT.size, self.WAYS)
        self.evictions = 0  # of entries that still held something (this process's count)

    def _read(self, offset: int) -> tuple[int, State]:
        tag, *fields = _SLOT.unpack_from(self.memory, offset)
        return tag, State(*fields)

    def _write(self, offset: int, tag: int, state: State) -> None:
        _SLOT.pack_into(
            self.memory,
            offset,
            tag,
            state.window_end,
            state.failures,
            state.lockouts,
            state.locked_until,
            state.expires,
        )

    def _find(self, name: str) -> tuple[int | None, int, int]:
        """(offset of the key's slot or None, its bucket's offset, its tag)."""
        bucket, tag = self.locate(name)
        for offset in self.bucket_slots(bucket):
            if _SLOT.unpack_from(self.memory, offset)[0] == tag:
                return offset, bucket, tag
        return None, bucket, tag

    def retry_after(self, names: Sequence[str], now: float) -> float | None:
        """Seconds until every key in ``names`` may try again; None if they all may now."""
        longest = 0.0
        with self.locked():
            for name in names:
                offset, _, _ = self._find(name)
                if offset is not None:
                    longest = max(longest, self._read(offset)[1].locked_until - now)
        return longest if longest > 0 else None

    def failure(self, keys: Sequence[Key], rules: LoginThrottleConfig, now: float) -> None:
        with self.locked():
            for key in keys:
                offset, bucket, tag = self._find(key.name)
                state = State()
                if offset is None:
                    offset = self._victim(bucket, now)
                else:
                    state = self._read(offset)[1]
                self._write(offset, tag, after_failure(state, key.limit, rules, now))

    def reset(self, name: str) -> None:
        with self.locked():
            offset, _, _ = self._find(name)
            if offset is not None:
                self._write(offset, 0, State())

    def _victim(self, bucket: int, now: float) -> int:
        """The slot a new key takes in a full bucket: see the module docstring."""

        def cost(offset: int) -> tuple[int, float, float, float]:
            tag, state = self._read(offset)
            if tag == 0 or now >= state.expires:
                return (0, 0.0, 0.0, 0.0)
            if state.locked_until <= now:
                return (1, state.lockouts, state.failures, state.expires)
            return (2, state.locked_until, 0.0, 0.0)

        ranked = min((cost(offset), offset) for offset in self.bucket_slots(bucket))
        if ranked[0][0] != 0:
            self.evictions += 1
            if self.evictions == 1 or self.evictions % 10_000 == 0:
                log.warning(
                    "the login throttle table is full: forgetting the least significant failures",
                    extra={"fields": {"evictions": self.evictions, "slots": self.slots}},
                )
        return ranked[1]


# -- Redis ------------------------------------------------------------------------------------

_CHECK = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local longest = 0
for _, key in ipairs(KEYS) do
  local u = tonumber(redis.call('HGET', key, 'u') or '0') or 0
  if u - now > longest then longest = u - now end
end
return longest
"""

# ARGV: window, lockout, maxlockout (ms), then each key's limit. Mirrors after_failure.
_FAILURE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window, lockout, maxlockout = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
for i, key in ipairs(KEYS) do
  local limit = tonumber(ARGV[3 + i])
  local s = redis.call('HMGET', key, 'w', 'f', 'n', 'u')
  local w, f = tonumber(s[1]) or 0, tonumber(s[2]) or 0
  local n, u = tonumber(s[3]) or 0, tonumber(s[4]) or 0
  if u <= now then
    if w <= now then
      w = now + window
      f = 0
    end
    f = f + 1
    if f >= limit then
      n = n + 1
      u = now + math.min(lockout * 2 ^ math.min(n - 1, 40), maxlockout)
      f = 0
      w = now
    end
    local expires = w
    if n > 0 then expires = u + maxlockout end
    redis.call('HSET', key, 'w', w, 'f', f, 'n', n, 'u', u)
    redis.call('PEXPIRE', key, math.max(1, math.ceil(expires - now)))
  end
end
return 0
"""


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


class RedisFailures:
    """The counters in Redis, shared by every instance using it."""

    PREFIX = "dockyard:login:"

    def __init__(self, client: Any, rules: LoginThrottleConfig) -> None:
        self.client = client
        self.rules = rules
        self._check = client.register_script(_CHECK)
        self._failure = client.register_script(_FAILURE)

    def _name(self, name: str) -> str:
        digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()
        return self.PREFIX + digest[:40]

    async def retry_after(self, names: Sequence[str]) -> float | None:
        ms = await self._check(keys=[self._name(n) for n in names])
        return int(ms) / 1000 if int(ms) > 0 else None

    async def failure(self, keys: Sequence[Key]) -> None:
        rules = self.rules
        await self._failure(
            keys=[self._name(k.name) for k in keys],
            args=[
                _ms(rules.window),
                _ms(rules.lockout),
                _ms(rules.maxlockout),
                *(k.limit for k in keys),
            ],
        )

    async def reset(self, name: str) -> None:
        await self.client.delete(self._name(name))

    async def close(self) -> None:
        try:
            await self.client.aclose()
        except Exception:  # closing a client whose server is gone
            log.debug("closing the redis client failed", exc_info=True)


def redis_failures(config: RedisConfig, rules: LoginThrottleConfig) -> RedisFailures:
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    from dockyard.registry.cache import redis_client

    client = redis_client(
        config.addr,
        config.password,
        config.username,
        config.db,
        socket_connect_timeout=config.dialtimeout,
        socket_timeout=max(config.readtimeout, config.writetimeout),
        max_connections=config.pool.maxactive,
        ssl=config.tls.enabled,
        # A login waits for this: one quick retry (a pooled connection Redis closed), not
        # redis-py's seconds of back-off; a Redis that is down is skipped for a while instead.
        retry=Retry(NoBackoff(), 1),
    )
    return RedisFailures(client, rules)


# -- the throttle ---------------------------------------------------------------------------


class LoginThrottle:
    """What a login asks: may this user try from this address; this attempt failed; this one
    succeeded."""

    def __init__(
        self,
        rules: LoginThrottleConfig,
        table: FailureTable,
        redis: RedisFailures | None = None,
    ) -> None:
        self.rules = rules
        self.table = table
        self.redis = redis
        self._redis_down_until = 0.0

    def _redis(self) -> RedisFailures | None:
        if self.redis is None or time.monotonic() < self._redis_down_until:
            return None
        return self.redis

    def _redis_failed(self, exc: BaseException) -> None:
        if time.monotonic() >= self._redis_down_until:
            log.warning(
                "redis is unavailable; failed logins are counted in this instance only",
                extra={"fields": {"error": f"{type(exc).__name__}: {exc}"}},
            )
        self._redis_down_until = time.monotonic() + RETRY_AFTER_FAILURE

    async def retry_after(self, user: str, address: str) -> float | None:
        """Seconds until this user may try again from this address; None: now."""
        names = [k.name for k in keys_for(self.rules, user, address)]
        redis = self._redis()
        if redis is not None:
            try:
                return await redis.retry_after(names)
            except Exception as exc:
                self._redis_failed(exc)
        return self.table.retry_after(names, time.monotonic())

    async def failed(self, user: str, address: str) -> None:
        keys = keys_for(self.rules, user, address)
        redis = self._redis()
        if redis is not None:
            try:
                await redis.failure(keys)
                return
            except Exception as exc:
                self._redis_failed(exc)
        self.table.failure(keys, self.rules, time.monotonic())

    async def succeeded(self, user: str, address: str) -> None:
        name = keys_for(self.rules, user, address)[0].name
        # Also locally: failures counted here while Redis was away must not outlive a success.
        self.table.reset(name)
        redis = self._redis()
        if redis is not None:
            try:
                await redis.reset(name)
            except Exception as exc:
                self._redis_failed(exc)

    async def close(self) -> None:
        if self.redis is not None:
            await self.redis.close()
