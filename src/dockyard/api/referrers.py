"""The referrers API: ``GET /v2/<name>/referrers/<digest>[?artifactType=]`` (end-12a/b)."""

from __future__ import annotations

from aiohttp import web

from dockyard.api.base import digest_param, proxied_of, repository_of
from dockyard.auth.access import Need, requires
from dockyard.http.responses import json_response
from dockyard.oci import mediatypes as mt


@requires(Need.PULL)
async def list_referrers(request: web.Request) -> web.Response:
    """Always an image index: empty when nothing refers to the digest (the spec forbids a 404
    for a valid digest without referrers)."""
    subject = digest_param(request)
    artifact_type = request.query.get("artifactType")
    proxied = proxied_of(request)
    upstream = await proxied.referrers(subject, artifact_type) if proxied is not None else None
    if upstream is not None:
        manifests, filtered = upstream
        if artifact_type is not None and not filtered:
            manifests = [m for m in manifests if m.get("artifactType") == artifact_type]
    else:
        repo = repository_of(request)
        manifests = [d.to_json() for d in await repo.referrers.list(subject, artifact_type)]
    headers = {"OCI-Filters-Applied": "artifactType"} if artifact_type is not None else {}
    index = {"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": manifests}
    return json_response(index, headers=headers, content_type=mt.OCI_INDEX)


def routes(prefix: str) -> list[web.AbstractRouteDef]:
    return [web.get(prefix + "/v2/{name:.+}/referrers/{digest}", list_referrers)]
