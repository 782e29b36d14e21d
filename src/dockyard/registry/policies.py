"""Storage policies (``policies`` in the configuration, Dockyard's addition): which rules apply
to a repository. Today: immutable tags. The first policy whose ``repositories`` globs match a
repository's name is its policy (the token server's glob semantics: ``*`` crosses ``/``)."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from dockyard.config import PolicyConfig
from dockyard.errors import ErrorCode, RegistryError

#: what a client write is checked with: the error that refuses changing ``tag``, or None
TagGuard = Callable[[str], RegistryError | None]


@dataclass(frozen=True)
class _Policy:
    repositories: tuple[str, ...]
    immutable: tuple[tuple[str, re.Pattern[str]], ...]

    def matches(self, repository: str) -> bool:
        return any(fnmatch.fnmatchcase(repository, glob) for glob in self.repositories)


class Policies:
    def __init__(self, configs: Sequence[PolicyConfig] = ()) -> None:
        self._policies = tuple(
            _Policy(
                tuple(c.repositories),
                tuple((pattern, re.compile(pattern)) for pattern in c.immutabletags),
            )
            for c in configs
        )

    def _policy_of(self, repository: str) -> _Policy | None:
        for policy in self._policies:
            if policy.matches(repository):
                return policy
        return None

    def tag_guard(self, repository: str) -> TagGuard | None:
        """How a client's change of a tag of ``repository`` is checked; None when no tag of it
        is immutable. (A pull-through cache's own tag refreshes are not checked.)"""
        policy = self._policy_of(repository)
        if policy is None or not policy.immutable:
            return None

        def refusal(tag: str) -> RegistryError | None:
            for pattern, compiled in policy.immutable:
                if compiled.fullmatch(tag):
                    return immutable_tag(repository, tag, policy.repositories, pattern)
            return None

        return refusal


def immutable_tag(repository: str, tag: str, globs: tuple[str, ...], pattern: str) -> RegistryError:
    # The message is what docker and podman print: it names the rule, so the pusher knows why.
    return RegistryError(
        ErrorCode.DENIED,
        f"tag {tag} of {repository} is immutable (policy for {', '.join(globs)}: "
        f"immutabletags {pattern}): push a new tag instead",
        {"repository": repository, "tag": tag, "rule": pattern},
    )
