"""The ``notifications:`` section: registry:2's webhook endpoints, and Dockyard's outbox.

registry:2's keys (distribution ``configuration.go`` ``Notifications``, ``Endpoint``,
``Events``, ``Ignore``; defaults from ``notifications/endpoint.go``)::

    notifications:
      events:
        includereferences: true      # target.references on manifest events
      endpoints:
        - name: ci
          url: https://ci.example/hook
          headers: {Authorization: [Bearer xyz]}
          timeout: 1s                # 1s when <= 0
          threshold: 10              # 10 when <= 0
          backoff: 1s                # 1s when <= 0
          ignoredmediatypes: [application/octet-stream]
          ignore: {mediatypes: [...], actions: [pull]}
          disabled: false

Dockyard's additions (registry:2 ignores unknown keys, so a shared file stays valid):
``endpoints[].maxbackoff`` (the exponential backoff's ceiling), ``endpoints[].secrets`` (HMAC
signing keys, current first), and ``notifications.outbox`` (where events wait, how much may
wait, how often pull events are written). Nothing here imports aiohttp.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from pydantic import Field, field_validator

from dockyard.config_base import Duration, Section

#: new at each start of the server, shared by its workers (forked after this is imported):
#: registry:2's ``source.instanceID``
INSTANCE_ID = str(uuid.uuid4())

ACTIONS = ("push", "pull", "mount", "delete")

log = logging.getLogger("dockyard.config")


class IgnoreConfig(Section):
    mediatypes: list[str] = Field(default_factory=list)
    actions: list[str] = Field(default_factory=list)

    @field_validator("actions")
    @classmethod
    def _actions(cls, v: list[str]) -> list[str]:
        for action in v:
            if action not in ACTIONS:
                raise ValueError(f"unknown action {action!r} (one of {', '.join(ACTIONS)})")
        return v


class EndpointConfig(Section):
    name: str
    url: str
    disabled: bool = False
    #: name -> values (Go's http.Header); a single string is taken as one value
    headers: dict[str, list[str]] = Field(default_factory=dict)
    timeout: Duration = 0.0
    threshold: int = 0
    backoff: Duration = 0.0
    ignoredmediatypes: list[str] = Field(default_factory=list)
    ignore: IgnoreConfig = Field(default_factory=IgnoreConfig)
    #: Dockyard: the ceiling of the exponential backoff after ``threshold`` failures
    maxbackoff: Duration = 300.0
    #: Dockyard: HMAC-SHA256 keys; every one signs (current first, then the previous one
    #: during a rotation), see events.delivery.signature
    secrets: list[str] = Field(default_factory=list)

    @field_validator("headers", mode="before")
    @classmethod
    def _headers(cls, v: Any) -> Any:
        if isinstance(v, dict):
            return {k: [x] if isinstance(x, str) else x for k, x in v.items()}
        return v

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError(f"{v!r} is not an http:// or https:// URL")
        return v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v or "/" in v or v.startswith("."):
            raise ValueError(f"{v!r}: a name is required, without '/' or a leading '.'")
        return v

    # registry:2's defaults for values <= 0 (notifications/endpoint.go defaults())
    @property
    def effective_timeout(self) -> float:
        return self.timeout if self.timeout > 0 else 1.0

    @property
    def effective_threshold(self) -> int:
        return self.threshold if self.threshold > 0 else 10

    @property
    def effective_backoff(self) -> float:
        return self.backoff if self.backoff > 0 else 1.0

    @property
    def ignored_media_types(self) -> frozenset[str]:
        return frozenset(self.ignoredmediatypes) | frozenset(self.ignore.mediatypes)

    def ignores(self, event: dict[str, Any]) -> bool:
        """distribution 3's filter: an event is dropped if its action is ignored, or if its
        target's media type is (2.8 applied ``ignore.actions`` only with media types set)."""
        if event.get("action") in self.ignore.actions:
            return True
        media_type = event.get("target", {}).get("mediaType")
        return media_type is not None and media_type in self.ignored_media_types


class EventsConfig(Section):
    includereferences: bool = False


class OutboxConfig(Section):
    """Dockyard: the durable outbox (see dockyard.events.outbox)."""

    #: default: ``<filesystem rootdirectory>/dockyard/events``; required with other storage
    directory: str = ""
    #: per endpoint: the undelivered events kept at most; beyond it the oldest are dropped
    maxbytes: int = Field(default=1024 * 1024 * 1024, ge=4096)
    #: pull events wait in memory at most this long before they are written (the loss bound
    #: of a crash), or until ``pullbatch`` of them are waiting
    pullflush: Duration = 1.0
    pullbatch: int = Field(default=1000, ge=1)
    #: how often the delivery loop looks for new events written by other workers
    pollinterval: Duration = 0.2


class NotificationsConfig(Section):
    events: EventsConfig = Field(default_factory=EventsConfig)
    endpoints: list[EndpointConfig] = Field(default_factory=list)
    outbox: OutboxConfig = Field(default_factory=OutboxConfig)

    @field_validator("endpoints")
    @classmethod
    def _unique(cls, v: list[EndpointConfig]) -> list[EndpointConfig]:
        names = [e.name for e in v]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"endpoint name {name!r} is used twice")
        # config._warn_unknown does not walk into lists
        for i, endpoint in enumerate(v):
            for model, prefix in ((endpoint, ""), (endpoint.ignore, "ignore.")):
                for key in model.model_extra or {}:
                    log.warning(
                        "ignoring unknown configuration key notifications.endpoints.%d.%s%s",
                        i,
                        prefix,
                        key,
                    )
        return v

    @property
    def active(self) -> list[EndpointConfig]:
        """Enabled endpoints (registry:2 skips disabled ones at start)."""
        return [e for e in self.endpoints if not e.disabled]
