"""Who may sign in to the web UI and what a signed-in (or anonymous) visitor may do, asked at
every request, so that a user removed from htpasswd, a changed password or a changed access
rule takes effect at the next page.

- no auth: no sign-in; everyone may do everything (as registry:2 without auth lets anyone
  delete);
- htpasswd: its users sign in with their passwords (throttled as ``docker login`` is); every
  user may pull, push and delete, administrators are ``auth.htpasswd.admins``; nothing without
  signing in;
- the built-in token server: its users sign in; what they may do is its access policy, and
  anonymous visitors see what its anonymous rules let them pull;
- an external token server: Dockyard cannot check passwords it does not hold, so the UI offers
  no sign-in and shows nothing (its clients keep using tokens against ``/v2/``).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from dockyard.auth.access import EVERYONE, BasicGrants, Identity, Policy, PolicyGrants
from dockyard.auth.login import Login


class AccountKind(Enum):
    OPEN = "open"
    HTPASSWD = "htpasswd"
    TOKEN_SERVER = "token-server"
    EXTERNAL = "external"


@dataclass(frozen=True)
class Accounts:
    kind: AccountKind
    login: Login | None = None
    admins: frozenset[str] = frozenset()
    policy: Policy | None = None

    @property
    def can_sign_in(self) -> bool:
        return self.login is not None

    async def sign_in(self, user: str, password: str, address: str) -> Identity:
        """The user's identity; raises BadCredentials, or 429 while throttled."""
        assert self.login is not None
        await self.login.check(user, password, address)
        identity = self.identity(user, self.fingerprint(user))
        assert identity is not None
        return identity

    def fingerprint(self, user: str) -> str | None:
        """Changes when the user's password does; None once the user is gone."""
        if self.login is None:
            return None
        return self.login.users.fingerprint(user)

    def identity(self, user: str | None, fingerprint: str | None) -> Identity | None:
        """The visitor's identity now: ``user`` signed in with the password ``fingerprint``
        stood for (None: not signed in). None when that session is no longer good (the user
        was removed or changed password) or when anonymous visitors may not browse."""
        if user is not None:
            if self.login is None or fingerprint is None or self.fingerprint(user) != fingerprint:
                return None
            if self.kind is AccountKind.HTPASSWD:
                return Identity(user=user, grants=BasicGrants(admin=user in self.admins))
            assert self.policy is not None
            return Identity(user=user, grants=PolicyGrants(user, self.policy))
        if self.kind is AccountKind.OPEN:
            return EVERYONE
        policy = self.policy
        if self.kind is AccountKind.TOKEN_SERVER and policy is not None and policy.has_anonymous:
            return Identity(user=None, grants=PolicyGrants(None, policy))
        return None


OPEN = Accounts(AccountKind.OPEN)
