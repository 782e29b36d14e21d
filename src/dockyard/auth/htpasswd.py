"""htpasswd files as registry:2 uses them: ``user:bcrypt-hash`` per line.

Only bcrypt entries (``$2y$``, ``$2a$``, ``$2b$``, as ``htpasswd -B`` writes them) are accepted;
any other hash type is refused at start-up with the file, the line and the reason. The file is
re-read when it changes on disk (a bad edit keeps the previous version in force and is logged).

bcrypt is slow on purpose and clients send credentials with every request, so successful
verifications are cached. The cache key is an HMAC, under a per-process random key, of user,
password and stored hash: the password itself is never kept, an entry expires after ``ttl``
seconds, and the whole cache is dropped when the file changes.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import re
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass

import bcrypt

from dockyard.errors import ConfigError

log = logging.getLogger("dockyard.auth")

_BCRYPT = re.compile(rb"^\$2[aby]\$\d\d\$[./A-Za-z0-9]{53}\Z")
_USER = re.compile(r"^[^:\s]+\Z")
# Checked against when the user does not exist, so timing does not reveal which users exist
# (a cost-10 hash of a random password nobody knows).
_DUMMY_HASH = b"$2b$10$wYcs6r7FSltnjiawNgJpGe9GYeGvnyA6doiqe5jVaK/a2QqYtLJfa"

#: how often (seconds) the file's metadata is checked for changes
RELOAD_CHECK_INTERVAL = 1.0
CACHE_CAPACITY = 10_000


def describe_hash(hashed: str) -> str:
    """A human name for a non-bcrypt htpasswd hash."""
    if hashed.startswith("$apr1$"):
        return "Apache MD5 ($apr1$)"
    if hashed.startswith("{SHA}"):
        return "SHA-1 ({SHA})"
    if hashed.startswith("$1$"):
        return "MD5-crypt ($1$)"
    if hashed.startswith(("$5$", "$6$")):
        return "SHA-crypt ($5$/$6$)"
    if hashed.startswith("$2"):
        return "a malformed bcrypt hash"
    return "crypt or plain text"


class HtpasswdError(ValueError):
    def __init__(self, path: str, line: int, reason: str) -> None:
        self.path = path
        self.line = line
        self.reason = reason
        super().__init__(f"{path}:{line}: {reason}")


def parse(text: str, path: str) -> dict[str, bytes]:
    users: dict[str, bytes] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        if not sep or not _USER.match(user) or not hashed:
            raise HtpasswdError(path, number, "not a 'user:hash' entry")
        if not _BCRYPT.match(hashed.encode()):
            raise HtpasswdError(
                path,
                number,
                f"user {user!r} has an unsupported password hash ({describe_hash(hashed)}); "
                "only bcrypt is accepted: recreate it with 'htpasswd -B' or "
                "'dockyard user passwd'",
            )
        if user in users:
            raise HtpasswdError(path, number, f"user {user!r} appears twice")
        users[user] = hashed.encode()
    return users


def hash_password(password: str, rounds: int = 10) -> str:
    """A bcrypt hash in the ``$2y$`` form Apache's ``htpasswd -B`` writes."""
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds)).decode()
    return "$2y$" + hashed[4:]


@dataclass(frozen=True)
class _Stamp:
    mtime_ns: int
    size: int
    inode: int


def _stamp(path: str) -> _Stamp:
    st = os.stat(path)
    return _Stamp(st.st_mtime_ns, st.st_size, st.st_ino)


class Htpasswd:
    """The users of one htpasswd file, with a verification cache."""

    def __init__(self, path: str, cache_ttl: float = 300.0, *, config_key: str) -> None:
        self.path = path
        self.cache_ttl = cache_ttl
        self._cache_key = secrets.token_bytes(32)
        self._cache: OrderedDict[bytes, float] = OrderedDict()
        self._checked = 0.0
        try:
            self._stamp = _stamp(path)
            with open(path, encoding="utf-8") as f:
                self.users = parse(f.read(), path)
        except OSError as exc:
            raise ConfigError(config_key, f"cannot read {path}: {exc.strerror}") from None
        except (HtpasswdError, UnicodeDecodeError) as exc:
            raise ConfigError(config_key, str(exc)) from None

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now - self._checked < RELOAD_CHECK_INTERVAL:
            return
        self._checked = now
        try:
            stamp = _stamp(self.path)
            if stamp == self._stamp:
                return
            with open(self.path, encoding="utf-8") as f:
                users = parse(f.read(), self.path)
        except (OSError, HtpasswdError, UnicodeDecodeError) as exc:
            log.error("htpasswd file not reloaded, keeping the previous users: %s", exc)
            return
        self.users = users
        self._stamp = stamp
        self._cache.clear()
        log.info("htpasswd file reloaded", extra={"fields": {"users": len(users)}})

    def _key(self, user: str, password: str, hashed: bytes) -> bytes:
        message = b"\0".join([user.encode(), password.encode(), hashed])
        return hmac.new(self._cache_key, message, hashlib.sha256).digest()

    def cached(self, user: str, password: str) -> bool:
        """True if this exact user/password was verified recently (no bcrypt needed)."""
        self._maybe_reload()
        hashed = self.users.get(user)
        if hashed is None or self.cache_ttl <= 0:
            return False
        key = self._key(user, password, hashed)
        expires = self._cache.get(key)
        if expires is None:
            return False
        if expires < time.monotonic():
            del self._cache[key]
            return False
        return True

    async def verify(self, user: str, password: str) -> bool:
        if self.cached(user, password):
            return True
        hashed = self.users.get(user)
        loop = asyncio.get_running_loop()
        ok = await loop.run_in_executor(
            None, bcrypt.checkpw, password.encode(), hashed or _DUMMY_HASH
        )
        if not ok or hashed is None:
            return False
        if self.cache_ttl > 0:
            self._cache[self._key(user, password, hashed)] = time.monotonic() + self.cache_ttl
            while len(self._cache) > CACHE_CAPACITY:
                self._cache.popitem(last=False)
        return True

    def fingerprint(self, user: str) -> str | None:
        """A short value that changes when the user's password changes (binds refresh tokens
        to the password they were issued for); None for a user who does not exist."""
        self._maybe_reload()
        hashed = self.users.get(user)
        return None if hashed is None else hashlib.sha256(hashed).hexdigest()[:16]
