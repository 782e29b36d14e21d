"""Checking a user name and password: throttled, cached, constant-time."""

from __future__ import annotations

import math

from dockyard import metrics
from dockyard.auth.htpasswd import Htpasswd
from dockyard.auth.throttle import LoginThrottle
from dockyard.errors import ErrorCode, RegistryError


class BadCredentials(Exception):
    """Wrong user name or password (the caller answers 401 with its own challenge)."""


class Login:
    def __init__(self, users: Htpasswd, throttle: LoginThrottle) -> None:
        self.users = users
        self.throttle = throttle

    async def check(self, user: str, password: str, address: str) -> None:
        """Return if the credentials are right; raise BadCredentials, or 429 while this user
        from this address, or this address for any user, is locked out after repeated failures
        (see auth.throttle). The lock-out is checked before bcrypt runs. Credentials verified
        recently pass without bcrypt and are never throttled, so a brute force against a user
        does not lock out that user's working clients."""
        if self.users.cached(user, password):
            return
        wait = await self.throttle.retry_after(user, address)
        if wait is not None:
            if metrics.active is not None:
                metrics.active.auth_failures.labels("throttled").inc()
            seconds = max(1, math.ceil(wait))
            raise RegistryError(
                ErrorCode.TOOMANYREQUESTS,
                "too many failed logins; try again later",
                {"retryAfter": seconds},
                headers={"Retry-After": str(seconds)},
            )
        if await self.users.verify(user, password):
            await self.throttle.succeeded(user, address)
            return
        await self.throttle.failed(user, address)
        if metrics.active is not None:
            metrics.active.auth_failures.labels("bad_credentials").inc()
        raise BadCredentials(user)
