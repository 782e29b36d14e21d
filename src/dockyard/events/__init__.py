"""Notifications (webhooks): registry:2's events, kept in a durable outbox and delivered to
every configured endpoint (``notifications`` in the configuration).

A handler calls one function once its request has succeeded: :func:`manifest_event`,
:func:`blob_event` or :func:`delete_event`. Tags and manifests deleted outside a request
(``dockyard retention``, the maintenance schedule) make the same delete events with
``events.deletes.record_deletes``. A repository deleted (``dockyard rm``, the admin
API) makes :func:`repository_delete_events`; a command outside the server appends them to the
outbox with :func:`record_from_command`. Push, mount and delete events are on disk before
they return (so before the response is sent); pull events are written by a background task at
most ``notifications.outbox.pullflush`` later (what a crash can lose). Delivery runs in one
process of the instance (see :mod:`dockyard.events.delivery`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from aiohttp import web

from dockyard import __version__
from dockyard.auth.middleware import identity_of
from dockyard.config import Config, ConfigError
from dockyard.events import envelope
from dockyard.events.delivery import Deliverer
from dockyard.events.outbox import Outbox, outbox_directory
from dockyard.http.request import client_address, url_for
from dockyard.notificationsconfig import INSTANCE_ID

log = logging.getLogger("dockyard.events")

_REQUEST = web.RequestKey("event_request", dict)


class _RecentJSON:
    """JSON texts made for recent pull events, by what they are made of, for the next pulls
    of the same thing: a bounded LRU (the keys hold what clients sent)."""

    ENTRIES = 1024
    LARGEST = 4096

    def __init__(self) -> None:
        self._texts: dict[tuple[Any, ...], str] = {}

    def get(self, key: tuple[Any, ...]) -> str | None:
        text = self._texts.pop(key, None)
        if text is not None:
            self._texts[key] = text  # the most recently used last
        return text

    def put(self, key: tuple[Any, ...], text: str) -> str:
        # Headers in the key are as large as clients make them: neither is kept when large.
        key_size = sum(len(part) for part in key if isinstance(part, str))
        if len(text) <= self.LARGEST and key_size <= self.LARGEST:
            self._texts[key] = text
            if len(self._texts) > self.ENTRIES:
                del self._texts[next(iter(self._texts))]
        return text


class Events:
    def __init__(self, config: Config) -> None:
        self.config = config.notifications
        self.outbox = Outbox(outbox_directory(config))
        self.source = instance_source(config)
        self.actions = {
            action
            for action in ("push", "pull", "mount", "delete")
            if any(action not in e.ignore.actions for e in self.config.active)
        }
        self._source_json = envelope.compact(self.source)
        #: outbox lines of pull events not yet written
        self._pulls: list[str] = []
        #: a pull target's JSON by what it is made of
        self._targets = _RecentJSON()
        #: the same for a request's JSON after its id (addr, host, method, user agent)
        self._requests = _RecentJSON()
        self._tasks: list[asyncio.Task[None]] = []
        self._flushed = asyncio.Event()

    @classmethod
    def for_config(cls, config: Config) -> Events | None:
        if not config.notifications.active:
            return None
        if config.storage.filesystem is None and not config.notifications.outbox.directory:
            log.warning(
                "notifications.outbox.directory is not set: events wait in %s, which must be "
                "a local disk that survives restarts",
                outbox_directory(config),
            )
        return cls(config)

    async def start(self) -> None:
        try:
            await asyncio.to_thread(self.outbox.open)
        except OSError as exc:
            raise ConfigError(
                "notifications.outbox.directory",
                f"cannot write the outbox in {self.outbox.directory}: {exc}",
            ) from None
        self._tasks = [
            asyncio.create_task(self._flush_pulls()),
            asyncio.create_task(Deliverer(self.config, self.outbox).run()),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._write_pulls()
        self.outbox.close()

    async def record(self, event: dict[str, Any]) -> None:
        """A push, mount or delete event: on disk when this returns."""
        await asyncio.to_thread(self.outbox.append, [event], True)

    def record_pull(
        self,
        request: web.Request,
        key: tuple[Any, ...],
        target: Callable[[str], dict[str, Any]],
    ) -> None:
        """A pull event, written with the next batch. ``key`` says everything
        ``target(base_url)`` is made of besides the base URL, so that its JSON is made once for
        many pulls. Nothing is built on the way that a cache already holds: a pull event per
        request is on the hot path."""
        headers = request.headers
        target_key = (
            key,
            request.host,
            headers.get("X-Forwarded-Host"),
            headers.get("X-Forwarded-Proto"),
            headers.get("X-Forwarded-Port"),
            headers.get("Forwarded"),
            request.secure,
        )
        target_json = self._targets.get(target_key)
        if target_json is None:
            made = envelope.compact(target(url_for(request, "")))
            target_json = self._targets.put(target_key, made)
        # All but the id is the same for the requests of one keep-alive connection.
        request_key = (
            client_address(request),
            getattr(request.protocol, "peername", None),
            request.host,
            request.method,
            headers.get("User-Agent", ""),
        )
        rest = self._requests.get(request_key)
        if rest is None:
            fields = _request_fields(request)
            made = envelope.request_json(fields).split(",", 1)[1]  # (an id has no comma)
            rest = self._requests.put(request_key, made)
        request_json = f'{{"id":"{envelope.new_id()}",{rest}'
        self._pulls.append(
            envelope.event_line(
                "pull", target_json, request_json, _actor(request), self._source_json
            )
        )
        if len(self._pulls) >= self.config.outbox.pullbatch:
            self._flushed.set()

    async def _flush_pulls(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.outbox.pullflush):
                    await self._flushed.wait()
            self._flushed.clear()
            await self._write_pulls()

    async def _write_pulls(self) -> None:
        pulls, self._pulls = self._pulls, []
        if pulls:
            try:
                await asyncio.to_thread(self.outbox.append_lines, "".join(pulls).encode(), True)
            except OSError:
                log.exception("notification outbox: %d pull events lost", len(pulls))


EVENTS_KEY = web.AppKey("events", Events)


def _events_for(request: web.Request, action: str) -> Events | None:
    events = request.app.get(EVENTS_KEY)
    if events is None or action not in events.actions:
        return None
    return events


def _request_fields(request: web.Request) -> dict[str, Any]:
    fields = request.get(_REQUEST)
    if fields is None:
        addr = client_address(request)
        # the TCP peer, as the connection's handler noted it when the connection opened
        peer = getattr(request.protocol, "peername", None)
        if isinstance(peer, tuple) and len(peer) >= 2 and peer[0] == request.remote:
            addr = f"[{addr}]:{peer[1]}" if ":" in addr else f"{addr}:{peer[1]}"
        fields = {
            "id": envelope.new_id(),
            "addr": addr,
            "host": request.host,
            "method": request.method,
            "useragent": request.headers.get("User-Agent", ""),
        }
        request[_REQUEST] = fields
    return fields


def _actor(request: web.Request) -> str | None:
    return identity_of(request).user


async def _record(request: web.Request, events: Events, action: str, target: dict) -> None:
    await events.record(
        envelope.event(action, target, _request_fields(request), _actor(request), events.source)
    )


async def manifest_event(
    request: web.Request,
    action: str,
    repository: str,
    digest: object,
    media_type: str,
    body: bytes,
    tag: str | None = None,
) -> None:
    """A manifest pushed (``push``) or served (``pull``, GET and HEAD)."""
    events = _events_for(request, action)
    if events is None:
        return
    with_references = events.config.events.includereferences

    def target(base: str) -> dict[str, Any]:
        return envelope.target(
            media_type=media_type,
            size=len(body),
            digest=str(digest),
            repository=repository,
            url=f"{base}/v2/{repository}/manifests/{digest}",
            tag=tag,
            # content-addressed: the same for every pull of the digest
            references=envelope.references_of(body) if with_references else None,
        )

    if action == "pull":
        key = ("manifest", repository, digest, media_type, len(body), tag)
        events.record_pull(request, key, target)
    else:
        await _record(request, events, action, target(url_for(request, "")))


async def blob_event(
    request: web.Request,
    action: str,
    repository: str,
    digest: object,
    size: int,
    from_repository: str | None = None,
) -> None:
    """A blob committed (``push``), mounted (``mount``) or served (``pull``, GET and HEAD)."""
    events = _events_for(request, action)
    if events is None:
        return

    def target(base: str) -> dict[str, Any]:
        return envelope.target(
            media_type=envelope.BLOB_MEDIA_TYPE,
            size=size,
            digest=str(digest),
            repository=repository,
            from_repository=from_repository,
            url=f"{base}/v2/{repository}/blobs/{digest}",
        )

    if action == "pull":
        events.record_pull(request, ("blob", repository, digest, size), target)
    else:
        await _record(request, events, action, target(url_for(request, "")))


async def delete_event(
    request: web.Request,
    repository: str,
    digest: object | None = None,
    tags: list[str] | tuple[str, ...] = (),
) -> None:
    """A manifest deleted by digest (``digest`` and the ``tags`` that pointed at it), a blob
    deleted (``digest``), or a tag deleted (``tags``): one event each, as registry:2."""
    events = _events_for(request, "delete")
    if events is None:
        return
    targets = envelope.delete_targets(repository, () if digest is None else (digest,), tags)
    request_fields, actor = _request_fields(request), _actor(request)
    built = [envelope.event("delete", t, request_fields, actor, events.source) for t in targets]
    if built:
        await asyncio.to_thread(events.outbox.append, built, True)


#: Dockyard's mark in the target of the event of a whole repository deleted, which registry:2
#: has no event for: ``{"repository": <name>, "dockyard": {"kind": "repository"}}``
REPOSITORY_DELETED = {"kind": "repository"}


def repository_delete_events(
    repository: str,
    manifests: Mapping[str, Sequence[str]],
    tags: Sequence[str],
    request: dict[str, Any],
    actor: str | None,
    source: dict[str, Any],
) -> list[dict[str, Any]]:
    """The ``delete`` events of a repository deleted. For each manifest (digest -> the tags
    that pointed at it) what registry:2 sends when a manifest is deleted by digest:
    ``{digest, repository}``, then ``{repository, tag}`` per tag, so receivers that act on
    manifests (scanners, CD) need nothing new; one ``{repository, tag}`` for each of ``tags``
    (tags that pointed at no manifest of the repository); last, the repository's own
    ``{repository, dockyard: {kind: repository}}``."""
    targets = []
    for digest, its_tags in manifests.items():
        targets += envelope.delete_targets(repository, (digest,), its_tags)
    targets += envelope.delete_targets(repository, (), tags)
    targets.append({**envelope.target(repository=repository), "dockyard": dict(REPOSITORY_DELETED)})
    return [envelope.event("delete", t, request, actor, source) for t in targets]


async def repository_deleted(
    request: web.Request,
    repository: str,
    manifests: Mapping[str, Sequence[str]],
    tags: Sequence[str],
) -> None:
    """A repository deleted by a request (the JSON API): :func:`repository_delete_events` with
    this request and its caller, on disk when this returns, as :func:`delete_event`'s."""
    events = _events_for(request, "delete")
    if events is None:
        return
    built = repository_delete_events(
        repository, manifests, tags, _request_fields(request), _actor(request), events.source
    )
    await asyncio.to_thread(events.outbox.append, built, True)


def command_request(command: str, method: str = "DELETE") -> dict[str, str]:
    """The ``request`` of an event a ``dockyard`` command makes: no client address or host
    (there was no HTTP request), the user agent names the command."""
    return {
        "id": envelope.new_id(),
        "addr": "",
        "host": "",
        "method": method,
        "useragent": f"dockyard/{__version__} {command}",
    }


def instance_source(config: Config) -> dict[str, str]:
    """The ``source`` of this instance's events, whether a server or a command records them."""
    return {"addr": envelope.source_addr(config.http.addr), "instanceID": INSTANCE_ID}


def record_from_command(config: Config, events: list[dict[str, Any]]) -> int:
    """Append ``events`` to the outbox of ``config`` from a process that is not a server (a
    ``dockyard`` command), on disk when this returns; the instance's delivering worker sends
    them with its own (it reads the file, whoever appended). This is safe beside the workers'
    writes for the same reason theirs are beside each other's: one ``O_APPEND`` write of whole
    lines per batch, which a local file system never interleaves with another. Only events an
    enabled endpoint does not ignore are written; returns how many. Blocking."""
    endpoints = config.notifications.active
    wanted = [e for e in events if any(not endpoint.ignores(e) for endpoint in endpoints)]
    if not wanted:
        return 0
    outbox = Outbox(outbox_directory(config))
    try:
        outbox.append(wanted, True)
    finally:
        outbox.close()
    return len(wanted)
