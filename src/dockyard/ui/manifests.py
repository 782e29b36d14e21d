"""A tag's or a manifest's page (platforms of an index, layers, the image config with its
history, referrers, pull commands), and two tags compared."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from dockyard.errors import ErrorCode, RegistryError
from dockyard.oci.digest import Digest
from dockyard.oci.manifest import Descriptor
from dockyard.oci.names import validate_tag
from dockyard.registry.repository import Repository
from dockyard.ui import format as fmt
from dockyard.ui.core import may_delete, pull_host, render, visible_repository
from dockyard.ui.image import (
    MAX_CONFIG_BYTES,
    ConfigView,
    ManifestView,
    compare,
    describe_config,
    describe_manifest,
)


@dataclass
class Shown:
    """A manifest as a page shows it."""

    digest: Digest
    size: int
    view: ManifestView
    config: ConfigView | None
    #: why the config is not shown (too large, missing)
    config_note: str
    referrers: list[Descriptor]
    #: each layer's Dockerfile step (history ``created_by``), by layer digest
    made_by: dict[str, str]


async def read_config(repo: Repository, view: ManifestView) -> tuple[ConfigView | None, str]:
    if view.is_index or view.config is None:
        return None, ""
    try:
        digest = Digest.parse(view.config.digest)
        info = await repo.blobs.stat(digest)
    except RegistryError:
        return None, "The config blob is not in this repository."
    if info.size > MAX_CONFIG_BYTES:
        return None, f"The config is {info.size} bytes: too large to show."
    body = await repo.registry.blobs.read(digest)
    return describe_config(body, view.layers), ""


async def show(repo: Repository, digest: Digest) -> Shown:
    stored = await repo.manifests.get(digest)
    view = describe_manifest(stored.body, stored.media_type)
    config, note = await read_config(repo, view)
    referrers = await repo.referrers.list(digest)
    made_by = {}
    if config is not None:
        made_by = {s.layer.digest: s.created_by for s in config.history if s.layer is not None}
    return Shown(digest, len(stored.body), view, config, note, referrers, made_by)


async def tag_view(request: web.Request) -> web.Response:
    repo = visible_repository(request)
    tag = validate_tag(request.match_info["tag"])
    return await _page(request, repo, await repo.tags.resolve(tag), tag)


async def manifest_view(request: web.Request) -> web.Response:
    repo = visible_repository(request)
    return await _page(request, repo, Digest.parse(request.match_info["digest"]), None)


async def _page(
    request: web.Request, repo: Repository, digest: Digest, tag: str | None
) -> web.Response:
    return render(
        request,
        "manifest.html",
        name=repo.name,
        tag=tag,
        shown=await show(repo, digest),
        host=pull_host(request),
        may_delete=may_delete(request, repo.name),
    )


async def _image_of(repo: Repository, reference: str, platform: str) -> tuple[Shown, str]:
    """The image a tag names; for an index, its entry for ``platform`` (else the first), and
    the platform chosen."""
    shown = await show(repo, await repo.tags.resolve(validate_tag(reference)))
    if not shown.view.is_index:
        return shown, ""
    entries = [m for m in shown.view.manifests if m.platform is not None]
    if not entries:
        raise RegistryError(ErrorCode.MANIFEST_INVALID, f"{reference} lists no platform")
    chosen = next((m for m in entries if fmt.platform(m.platform) == platform), entries[0])
    return await show(repo, Digest.parse(chosen.digest)), fmt.platform(chosen.platform)


async def compare_view(request: web.Request) -> web.Response:
    repo = visible_repository(request)
    selected = request.query.getall("tag", [])  # the repository page's two boxes
    a, b = selected[:2] if len(selected) == 2 else ("", "")
    a, b = request.query.get("a", a), request.query.get("b", b)
    platform = request.query.get("platform", "linux/amd64")
    result = None
    chosen = ("", "")
    if a and b:
        left, platform_a = await _image_of(repo, a, platform)
        right, platform_b = await _image_of(repo, b, platform)
        chosen = (platform_a, platform_b)
        result = compare(
            left.view, right.view, left.config or ConfigView(), right.config or ConfigView()
        )
    return render(
        request,
        "compare.html",
        name=repo.name,
        a=a,
        b=b,
        platforms=chosen,
        result=result,
    )


def routes(root: str, name_pattern: str) -> list[web.AbstractRouteDef]:
    base = f"{root}/r/{{name:{name_pattern}}}/-"
    return [
        web.get(base + "/tag/{tag}", tag_view),
        web.get(base + "/manifest/{digest}", manifest_view),
        web.get(base + "/compare", compare_view),
    ]
