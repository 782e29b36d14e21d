"""Deleting tags and manifests from the UI: a confirmation page that says what each delete
takes with it (a manifest takes every tag on it) and what will be refused and why, then the
deletes themselves, through the JSON API's own functions (the same rights, refusals and
events as ``DELETE /v2/<name>/manifests/<reference>``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web

from dockyard.api.base import writable_repository_of
from dockyard.api.v1.common import check_writable
from dockyard.api.v1.manifests import delete_with_tags
from dockyard.api.v1.tags import untag
from dockyard.errors import ErrorCode, RegistryError
from dockyard.oci.digest import Digest
from dockyard.oci.names import validate_tag
from dockyard.registry.repository import Repository
from dockyard.ui.core import Urls, identity_or_login, redirect, render, ui_root, visible_repository

#: the most tags and manifests one confirmation takes (a page of tags is 50)
MAX_TARGETS = 200


@dataclass
class Planned:
    kind: str  # "tag" or "manifest"
    reference: str
    digest: str = ""
    #: for a manifest: every tag that goes with it
    takes: list[str] = field(default_factory=list)
    #: why it would be refused; empty when it can go
    refusal: str = ""


def _targets(values: list[str], what: str) -> list[str]:
    if len(values) > MAX_TARGETS:
        raise RegistryError(
            ErrorCode.UNSUPPORTED, f"at most {MAX_TARGETS} {what} at once", status=400
        )
    return list(dict.fromkeys(values))  # in order, once each


def _require_delete_right(request: web.Request, repo: Repository) -> None:
    identity = identity_or_login(request)
    if not identity.may_delete(repo.name):
        raise RegistryError(ErrorCode.DENIED, f"you may not delete from {repo.name}", status=403)
    # read-only mode, a server not accepting writes now, storage.delete.enabled
    check_writable(request)
    writable_repository_of(request)  # a pull-through cache cannot be deleted from


async def _plan(repo: Repository, tags: list[str], digests: list[str]) -> list[Planned]:
    guard = repo.registry.policies.tag_guard(repo.name)
    out: list[Planned] = []
    for tag in tags:
        planned = Planned("tag", tag)
        try:
            planned.digest = str(await repo.tags.resolve(validate_tag(tag)))
        except RegistryError as exc:
            planned.refusal = exc.message
        refusal = guard(tag) if guard is not None and not planned.refusal else None
        if refusal is not None:
            planned.refusal = refusal.message
        out.append(planned)
    for text in digests:
        planned = Planned("manifest", text, digest=text)
        try:
            digest = Digest.parse(text)
            await repo.manifests.get(digest)
            planned.takes = sorted(await repo.tags.pointing_to(digest))
        except RegistryError as exc:
            planned.refusal = exc.message
        for tag in planned.takes:
            refusal = guard(tag) if guard is not None else None
            if refusal is not None and not planned.refusal:
                planned.refusal = refusal.message
        out.append(planned)
    return out


async def confirm(request: web.Request) -> web.Response:
    repo = visible_repository(request)
    _require_delete_right(request, repo)
    tags = _targets(request.query.getall("tag", []), "tags")
    digests = _targets(request.query.getall("digest", []), "manifests")
    plan = await _plan(repo, tags, digests)
    return render(request, "delete.html", name=repo.name, plan=plan, done=None)


async def delete(request: web.Request) -> web.Response:
    repo = visible_repository(request)
    _require_delete_right(request, repo)
    form = await request.post()
    tags = _targets([v for v in form.getall("tag", []) if isinstance(v, str)], "tags")
    digests = _targets([v for v in form.getall("digest", []) if isinstance(v, str)], "manifests")
    done: list[tuple[str, str, str]] = []  # (reference, outcome, detail)
    for tag in tags:
        try:
            await untag(request, repo, validate_tag(tag))
            done.append((tag, "deleted", ""))
        except RegistryError as exc:
            done.append((tag, "refused", exc.message))
    for text in digests:
        try:
            went = await delete_with_tags(request, repo, Digest.parse(text))
            done.append((text, "deleted", ", ".join(went)))
        except RegistryError as exc:
            done.append((text, "refused", exc.message))
    if all(outcome == "deleted" for _, outcome, _ in done):
        raise redirect(Urls(ui_root(request)).repository(repo.name, deleted=len(done)))
    return render(request, "delete.html", name=repo.name, plan=None, done=done, status=409)


def routes(root: str, name_pattern: str) -> list[web.AbstractRouteDef]:
    path = f"{root}/r/{{name:{name_pattern}}}/-/delete"
    return [web.get(path, confirm), web.post(path, delete)]
