"""Delivery: one loop per endpoint, in the one process of the instance that holds the outbox's
lock, sending each event in its own envelope (as registry:2 does), in outbox order.

An event is retried until the endpoint answers 2xx or 3xx: immediately while fewer than
``threshold`` consecutive failures, then after ``backoff``, doubling on each failure up to
``maxbackoff`` (registry:2 waits ``backoff`` each time). Only an endpoint whose backlog exceeds
``notifications.outbox.maxbytes`` loses events: the oldest, with a log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import hmac
import json
import logging
import os
import time
from typing import Any

import aiohttp

from dockyard.events.envelope import MEDIA_TYPE, rfc3339
from dockyard.events.outbox import LOCK, Outbox
from dockyard.notificationsconfig import EndpointConfig, NotificationsConfig

log = logging.getLogger("dockyard.events")

SIGNATURE_HEADER = "Dockyard-Signature"
#: how often a worker that does not deliver tries to take over (the holder died)
_LEAD_RETRY = 1.0
_RECLAIM_EVERY = 30.0
_SAVE_EVERY = 0.2


def envelope_body(event: dict[str, Any]) -> bytes:
    """registry:2's body: ``json.MarshalIndent(envelope, "", "   ")``."""
    return json.dumps({"events": [event]}, indent=3).encode()


def signature(secrets: list[str], body: bytes, timestamp: int | None = None) -> str:
    """``t=<unix seconds>,v1=<hex>[,v1=<hex>]``: HMAC-SHA256 of ``<t>.<body>`` with each key
    (current first). A receiver accepts the request if any ``v1`` matches one of its keys."""
    t = int(time.time()) if timestamp is None else timestamp
    signed = str(t).encode() + b"." + body
    parts = [f"t={t}"]
    for secret in secrets:
        parts.append("v1=" + hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest())
    return ",".join(parts)


class Overflow(Exception):
    """The backlog grew past the bound while an event was being retried."""


class EndpointLoop:
    def __init__(
        self,
        endpoint: EndpointConfig,
        outbox: Outbox,
        session: aiohttp.ClientSession,
        maxbytes: int,
        poll: float,
    ) -> None:
        self.endpoint = endpoint
        self.outbox = outbox
        self.session = session
        self.maxbytes = maxbytes
        self.poll = poll
        self.state = outbox.load_state(endpoint.name)

    def _save(self) -> None:
        self.outbox.save_state(self.endpoint.name, self.state)

    async def run(self) -> None:
        while True:
            replay = self.outbox.take_replay(self.endpoint.name)
            if replay is not None:
                # never past what is not delivered yet
                replay = min(replay, self.state.offset)
                log.info("replaying events to %s from offset %d", self.endpoint.name, replay)
                self.state.offset = replay
                self._save()
            self._bound()
            lines = await asyncio.to_thread(self.outbox.read, self.state.offset)
            if not lines:
                await asyncio.sleep(self.poll)
                continue
            saved = time.monotonic()
            try:
                for end, line in lines:
                    if line:
                        await self._deliver_line(line)
                    self.state.offset = end
                    # The progress is saved every _SAVE_EVERY, not after each event (a write
                    # and a rename each): a crash sends the events of that moment again, with
                    # their ids (at least once).
                    if time.monotonic() - saved >= _SAVE_EVERY:
                        self._save()
                        saved = time.monotonic()
                        if self.outbox.replay_pending(self.endpoint.name):
                            break
            except Overflow:
                continue
            finally:
                self._save()  # also when stopping: what was delivered is not sent again

    def _bound(self) -> bool:
        """Drop the oldest events past the bound; True if any were dropped."""
        size = self.outbox.size()
        if self.state.offset > size:  # the outbox was removed or replaced
            log.warning(
                "notification endpoint %s: the outbox is shorter than the delivered offset "
                "(%d > %d): delivering from its start",
                self.endpoint.name,
                self.state.offset,
                size,
            )
            self.state.offset = self.outbox.reclaimed() if self.outbox.reclaimed() <= size else 0
            self._save()
        if size - self.state.offset <= self.maxbytes:
            return False
        start = self.outbox.line_start_after(size - self.maxbytes)
        dropped = self.outbox.count_lines(self.state.offset, start)
        self.state.offset = start
        self.state.dropped += dropped
        self._save()
        log.error(
            "notification endpoint %s: backlog over notifications.outbox.maxbytes (%d bytes): "
            "dropped the %d oldest events",
            self.endpoint.name,
            self.maxbytes,
            dropped,
        )
        return True

    async def _deliver_line(self, line: bytes) -> None:
        try:
            event = json.loads(line)
        except ValueError:
            log.error("notification outbox: skipping a line that is not JSON")
            return
        if self.endpoint.ignores(event):
            return
        body = envelope_body(event)
        while True:
            error = await self._send(body)
            now = rfc3339(time.time_ns())
            if error is None:
                self.state.failures = 0
                self.state.delivered += 1
                self.state.last_success_at = now
                return
            self.state.failures += 1
            self.state.failed_attempts += 1
            self.state.last_error = error
            self.state.last_error_at = now
            self._save()
            if self.state.failures == 1 or self.state.failures % 100 == 0:
                log.warning(
                    "notification endpoint %s: delivery failed (%s), retrying",
                    self.endpoint.name,
                    error,
                    extra={"fields": {"event": event.get("id"), "failures": self.state.failures}},
                )
            threshold = self.endpoint.effective_threshold
            if self.state.failures >= threshold:
                delay = min(
                    self.endpoint.effective_backoff * 2 ** min(self.state.failures - threshold, 30),
                    max(self.endpoint.maxbackoff, self.endpoint.effective_backoff),
                )
                await asyncio.sleep(delay)
            else:
                await asyncio.sleep(0)
            if self._bound():
                raise Overflow

    async def _send(self, body: bytes) -> str | None:
        """None on success, else what went wrong."""
        headers: list[tuple[str, str]] = [("Content-Type", MEDIA_TYPE)]
        for name, values in self.endpoint.headers.items():
            headers.extend((name, v) for v in values)
        if self.endpoint.secrets:
            headers.append((SIGNATURE_HEADER, signature(self.endpoint.secrets, body)))
        try:
            async with self.session.post(
                self.endpoint.url,
                data=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=self.endpoint.effective_timeout),
            ) as response:
                await response.read()
                if 200 <= response.status < 400:
                    return None
                return f"{response.status} {response.reason}"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def _forever(loop: EndpointLoop) -> None:
    """An endpoint's loop, started again after anything unexpected (a disk error)."""
    while True:
        try:
            await loop.run()
        except Exception:
            log.exception("notification endpoint %s: delivery loop failed", loop.endpoint.name)
            await asyncio.sleep(1.0)


class Deliverer:
    """Takes the outbox's lock when it can (one process per instance), then runs a loop per
    enabled endpoint."""

    def __init__(self, config: NotificationsConfig, outbox: Outbox) -> None:
        self.config = config
        self.outbox = outbox

    async def run(self) -> None:
        lock_fd = os.open(
            os.path.join(self.outbox.directory, LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
        )
        try:
            while True:
                try:
                    fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    await asyncio.sleep(_LEAD_RETRY)
            await self._deliver()
        finally:
            os.close(lock_fd)  # releases the lock

    async def _deliver(self) -> None:
        outbox_config = self.config.outbox
        async with aiohttp.ClientSession() as session:
            loops = [
                EndpointLoop(
                    e, self.outbox, session, outbox_config.maxbytes, outbox_config.pollinterval
                )
                for e in self.config.active
            ]
            tasks = [asyncio.create_task(_forever(loop)) for loop in loops]
            try:
                while True:
                    await asyncio.sleep(_RECLAIM_EVERY)
                    lowest = min(loop.state.offset for loop in loops)
                    with contextlib.suppress(OSError):
                        await asyncio.to_thread(self.outbox.reclaim, lowest)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
