"""A repository's page: its tags (digest, size, platforms, pushed and pulled times), filtered,
a page at a time from the metadata index, with boxes to select tags to delete and two to
compare."""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass

from aiohttp import web

from dockyard.api.v1.common import index_of
from dockyard.errors import RegistryError
from dockyard.oci import mediatypes as mt
from dockyard.registry.index import Index
from dockyard.registry.records import ManifestRecord, TagRecord
from dockyard.registry.repository import Repository
from dockyard.ui import format as fmt
from dockyard.ui.core import may_delete, not_visible, render, visible_repository
from dockyard.ui.image import describe_manifest

PAGE = 50
MAX_QUERY = 128


@dataclass
class TagRow:
    tag: TagRecord
    record: ManifestRecord | None
    kind: str
    platforms: list[str]


def kind_of(record: ManifestRecord | None) -> str:
    if record is None:
        return "unknown"
    if record.media_type in mt.INDEX_MANIFESTS:
        return "index"
    if (
        record.artifact_type
        and not record.artifact_type.startswith("application/vnd.oci.image.config")
        and record.artifact_type != "application/vnd.docker.container.image.v1+json"
    ):
        return "artifact"
    return "image"


async def platforms_of(repo: Repository, record: ManifestRecord) -> list[str]:
    """The platforms an index lists (read from the index itself, kept in memory by the
    model's manifest cache)."""
    try:
        stored = await repo.manifests.get(record.digest)
    except RegistryError:
        return []
    view = describe_manifest(stored.body, stored.media_type)
    return [fmt.platform(m.platform) for m in view.manifests if m.platform is not None][:20]


async def tag_page(
    index: Index, name: str, query: str, after: str | None
) -> tuple[list[TagRecord], bool]:
    """A page of the tags whose names hold ``query``, after the tag ``after``; and whether
    more follow."""
    found = await index.tags(name, after, PAGE + 1, contains=query)
    return found[:PAGE], len(found) > PAGE


async def repository(request: web.Request) -> web.Response:
    repo = visible_repository(request)
    index = index_of(request)
    summary = await index.repository(repo.name)
    if summary is None:
        raise not_visible(repo.name)
    query = request.query.get("q", "")[:MAX_QUERY]
    after = request.query.get("after") or None
    tags, more = await tag_page(index, repo.name, query, after)
    # what the delete that brought the visitor here removed (its redirect says how many)
    deleted = request.query.get("deleted", "")
    deleted_count = int(deleted) if re.fullmatch(r"[0-9]{1,4}", deleted) else 0
    records = await index.manifests(repo.name, (t.digest for t in tags))
    indexes = {d: r for d, r in records.items() if r.media_type in mt.INDEX_MANIFESTS}
    platforms = dict(
        zip(
            indexes,
            await asyncio.gather(*(platforms_of(repo, r) for r in indexes.values())),
            strict=True,
        )
    )
    rows = []
    for t in tags:
        record = records.get(t.digest)
        rows.append(TagRow(t, record, kind_of(record), platforms.get(t.digest, [])))
    return render(
        request,
        "repository.html",
        name=repo.name,
        summary=summary,
        rows=rows,
        query=query,
        next_after=tags[-1].tag if more and tags else None,
        first_page=after is None,
        deleted=deleted_count,
        may_delete=may_delete(request, repo.name),
    )


def routes(root: str, name_pattern: str) -> list[web.AbstractRouteDef]:
    return [web.get(f"{root}/r/{{name:{name_pattern}}}", repository)]
