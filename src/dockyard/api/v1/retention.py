"""Running the retention policies from the JSON API, for administrators:
``POST /dockyard/api/v1/retention`` with ``{"dry_run": true|false, "confirm": false,
"repository": "<glob>"}``; what ``dockyard retention [--dry-run] [--confirm] [--repository]``
does on the server, answered with its JSON report.

A dry run is the default (an empty body is one): only ``"dry_run": false`` deletes. A run that
deletes is a write: refused on a read-only server, while the write gate is closed (an immediate
garbage collection), and where ``storage.delete.enabled`` is off, as the registry API's deletes
are. Its deletions make the same delete events as an API delete, with this request and caller.
"""

from __future__ import annotations

from collections.abc import Sequence

from aiohttp import web

from dockyard.api.base import registry_of
from dockyard.api.v1.common import ROOT, check_writable, json_object
from dockyard.auth.access import Need, requires
from dockyard.auth.middleware import identity_of
from dockyard.errors import ErrorCode, RegistryError
from dockyard.events import delete_event
from dockyard.http.request import CONFIG_KEY
from dockyard.http.responses import json_response
from dockyard.oci.digest import Digest
from dockyard.registry.lease import LeaseBusy
from dockyard.registry.retention_run import run_retention

#: what a client asks a run for while another holds the lease
RETRY_AFTER = 30

FIELDS: dict[str, type] = {"dry_run": bool, "confirm": bool, "repository": str}


@requires(Need.ADMIN)
async def run(request: web.Request) -> web.Response:
    asked = await json_object(request, FIELDS)
    dry_run: bool = asked.get("dry_run", True)
    if not dry_run:
        check_writable(request)
    user = identity_of(request).user

    async def deleted(repository: str, digest: Digest | None, tags: Sequence[str]) -> None:
        await delete_event(request, repository, digest, list(tags))

    try:
        report = await run_retention(
            registry_of(request),
            request.app[CONFIG_KEY].policies,
            dry_run=dry_run,
            confirm=asked.get("confirm", False),
            only=asked.get("repository"),
            deletions=None if dry_run else deleted,
            actor=f"{user or 'anonymous'} (dockyard API)",
        )
    except LeaseBusy as exc:
        raise RegistryError(
            ErrorCode.UNAVAILABLE,
            f"another retention run is in progress: {exc}",
            status=409,
            headers={"Retry-After": str(RETRY_AFTER)},
        ) from None
    return json_response(report.to_json())


def routes(prefix: str) -> list[web.AbstractRouteDef]:
    return [web.post(f"{prefix}{ROOT}/retention", run)]
