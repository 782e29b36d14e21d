"""Delete events for tags and manifests deleted outside a request (``dockyard retention``, the
maintenance schedule): the events an API delete makes (``delete_event``: one per manifest
digest, then one per tag), with a request naming the command instead of a client, appended to
the instance's outbox from whatever process deleted (``record_from_command`` says why that is
safe beside the workers' own appends). The delivering worker sends them like any other."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any

from dockyard.config import Config
from dockyard.events import command_request, envelope, instance_source, record_from_command


def delete_events(
    config: Config,
    repository: str,
    *,
    digests: Sequence[object] = (),
    tags: Sequence[str] = (),
    actor: str = "dockyard retention",
    command: str = "retention",
) -> list[dict[str, Any]]:
    """registry:2's delete events for ``digests`` (manifests or blobs) and ``tags`` of
    ``repository``, deleted by ``dockyard <command>`` (the request's user agent) on behalf of
    ``actor`` (the event's ``actor.name``)."""
    request = command_request(command)
    source = instance_source(config)
    return [
        envelope.event("delete", target, request, actor, source)
        for target in envelope.delete_targets(repository, digests, tags)
    ]


def record_deletes(
    config: Config,
    repository: str,
    *,
    digests: Sequence[object] = (),
    tags: Sequence[str] = (),
    actor: str = "dockyard retention",
    command: str = "retention",
) -> int:
    """Append the delete events of ``digests`` and ``tags`` to the outbox (on disk when this
    returns), unless no enabled endpoint wants them; returns how many were written. Blocking:
    call it in a thread from async code (:func:`delete_listener` does)."""
    if not config.notifications.active:
        return 0  # no endpoint: not even the outbox directory is touched
    events = delete_events(
        config, repository, digests=digests, tags=tags, actor=actor, command=command
    )
    return record_from_command(config, events)


def delete_listener(
    config: Config, actor: str = "dockyard retention", command: str = "retention"
) -> Callable[[str, object | None, Sequence[str]], Awaitable[None]]:
    """An async ``(repository, digest or None, tags)`` callback recording each deletion's
    events as it is made (``registry.retention_run.DeletionListener``)."""

    async def deleted(repository: str, digest: object | None, tags: Sequence[str]) -> None:
        digests = () if digest is None else (digest,)
        await asyncio.to_thread(
            partial(record_deletes, digests=digests, tags=tags, actor=actor, command=command),
            config,
            repository,
        )

    return deleted
