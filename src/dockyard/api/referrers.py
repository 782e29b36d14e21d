"""The referrers API: ``GET /v2/<name>/referrers/<digest>[?artifactType=]`` (end-12a/b)."""

from __future__ import annotations

from aiohttp import web

from dockyard.api.base import digest_param, repository_of
from dockyard.auth.access import Need, requires
from dockyard.http.responses import json_response
from dockyard.oci import mediatypes as mt


@requires(Need.PULL)
async def list_referrers(request: web.Request) -> web.Response:
    """Always an image index: empty when nothing refers to the digest (the spec forbids a 404
    for a valid digest without referrers)."""
    repo = repository_of(request)
    subject = digest_param(request)
    artifact_type = request.query.get("artifactType")
    descriptors = await repo.referrers.list(subject, artifact_type)
    headers = {"OCI-Filters-Applied": "artifactType"} if artifact_type is not None else {}
    index = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_INDEX,
        "manifests": [d.to_json() for d in descriptors],
    }
    return json_response(index, headers=headers, content_type=mt.OCI_INDEX)


def routes(prefix: str) -> list[web.AbstractRouteDef]:
    return [web.get(prefix + "/v2/{name:.+}/referrers/{digest}", list_referrers)]
