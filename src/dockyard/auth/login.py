"""Checking a user name and password: throttled, cached, constant-time."""

from __future__ import annotations

import math

from dockyard.auth.htpasswd import Htpasswd
from dockyard.auth.throttle import FailureThrottle
from dockyard.errors import ErrorCode, RegistryError


class BadCredentials(Exception):
    """Wrong user name or password (the caller answers 401 with its own challenge)."""


class Login:
    def __init__(self, users: Htpasswd, throttle: FailureThrottle) -> None:
        self.users = users
        self.throttle = throttle

    async def check(self, user: str, password: str, address: str) -> None:
        """Return if the credentials are right; raise BadCredentials, or 429 while the address
        or the user is locked out after repeated failures. Credentials verified recently pass
        without bcrypt and are never throttled, so a brute force against a user does not lock
        out that user's working clients."""
        if self.users.cached(user, password):
            return
        keys = (f"addr:{address}", f"user:{user}")
        waits = [w for w in (self.throttle.retry_after(k) for k in keys) if w is not None]
        if waits:
            seconds = math.ceil(max(waits))
            raise RegistryError(
                ErrorCode.TOOMANYREQUESTS,
                "too many failed logins; try again later",
                {"retryAfter": seconds},
                headers={"Retry-After": str(seconds)},
            )
        if await self.users.verify(user, password):
            self.throttle.success(keys[1])
            return
        for key in keys:
            self.throttle.failure(key)
        raise BadCredentials(user)
