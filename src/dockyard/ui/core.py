"""What every page of the web UI shares: its state on the application, the visitor (session,
identity, CSRF token) on the request, URLs under the public prefix, rendering, and the
middleware that puts the visitor on the request, refuses forged writes and sets the headers
that keep hostile content inert.

Everything a pusher wrote (labels, annotations, history, file names) is shown through Jinja2
with autoescaping, under a Content-Security-Policy that runs no inline script and no script
from anywhere but the UI's own static files."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import jinja2
from aiohttp import web

from dockyard.api.base import proxied_of, registry_of
from dockyard.auth.access import Identity
from dockyard.auth.accounts import Accounts
from dockyard.auth.middleware import IDENTITY
from dockyard.clientaddress import TrustedProxies
from dockyard.config import Config
from dockyard.errors import ErrorCode, RegistryError
from dockyard.http.request import base_url, is_valid_host
from dockyard.http.responses import Handler
from dockyard.oci.names import validate_name
from dockyard.registry.layer_listing import LayerListings
from dockyard.registry.repository import Repository
from dockyard.ui import format as fmt
from dockyard.ui.sessions import COOKIE, CSRF_FIELD, Session, SessionCodec

#: Scripts and styles only from the UI's own files; no inline script, no plugin, no framing,
#: forms only to ourselves. ``img-src data:`` is for nothing a pusher controls (no page puts
#: pushed text in a URL); the usage chart is inline SVG.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}

#: a path prefix a trusted proxy may announce: absolute, plain segments, no dot segments
_PREFIX = re.compile(r"(?:/[A-Za-z0-9_~-][A-Za-z0-9._~-]*)*")


@dataclass
class UiState:
    config: Config
    accounts: Accounts
    codec: SessionCodec
    trusted: TrustedProxies
    templates: jinja2.Environment
    #: layer file lists, made and kept (this worker's cache and rate limit)
    layers: LayerListings


UI_STATE = web.AppKey("ui_state", UiState)


@dataclass
class Visitor:
    """Who is looking at the page, as the middleware found them."""

    session: Session
    #: None: not signed in, and anonymous visitors may see nothing
    identity: Identity | None
    csrf: str
    #: the session changed: the response sets the cookie again
    renew: bool = False
    flash: list[str] = field(default_factory=list)

    @property
    def user(self) -> str | None:
        return self.session.user


VISITOR = web.RequestKey("ui_visitor", Visitor)


def state_of(request: web.Request) -> UiState:
    return request.app[UI_STATE]


def visitor_of(request: web.Request) -> Visitor:
    return request[VISITOR]


def public_prefix(request: web.Request) -> str:
    """The path the browser sees the registry under: ``X-Forwarded-Prefix`` from a trusted
    proxy (nginx serving us at ``/registry/`` with the prefix stripped), then ``http.prefix``."""
    state = state_of(request)
    forwarded = ""
    header = request.headers.get("X-Forwarded-Prefix", "").strip().rstrip("/")
    if header and state.trusted.trusts(request.remote or "") and _PREFIX.fullmatch(header):
        forwarded = header
    return forwarded + state.config.http.prefix


def ui_root(request: web.Request) -> str:
    return public_prefix(request) + "/ui"


class Urls:
    """Every UI URL a page links to, under the public prefix. Names, tags and digests are
    quoted although their grammars leave nothing to quote: a link never carries text as is."""

    def __init__(self, root: str) -> None:
        self.root = root

    def home(self, **query: Any) -> str:
        return self._with(f"{self.root}/", query)

    def static(self, name: str) -> str:
        return f"{self.root}/static/{quote(name)}"

    def login(self, next_url: str | None = None) -> str:
        return self._with(f"{self.root}/login", {"next": next_url})

    def logout(self) -> str:
        return f"{self.root}/logout"

    def usage(self, **query: Any) -> str:
        return self._with(f"{self.root}/usage", query)

    def repository(self, name: str, **query: Any) -> str:
        return self._with(f"{self.root}/r/{quote(name)}", query)

    def tag(self, name: str, tag: str) -> str:
        return f"{self.root}/r/{quote(name)}/-/tag/{quote(tag, safe='')}"

    def manifest(self, name: str, digest: object) -> str:
        return f"{self.root}/r/{quote(name)}/-/manifest/{quote(str(digest), safe=':')}"

    def layer(self, name: str, digest: object, **query: Any) -> str:
        base = f"{self.root}/r/{quote(name)}/-/layer/{quote(str(digest), safe=':')}"
        return self._with(base, query)

    def compare(self, name: str, **query: Any) -> str:
        return self._with(f"{self.root}/r/{quote(name)}/-/compare", query)

    def delete(self, name: str) -> str:
        return f"{self.root}/r/{quote(name)}/-/delete"

    @staticmethod
    def _with(path: str, query: dict[str, Any]) -> str:
        pairs: list[tuple[str, str]] = []
        for key, value in query.items():
            if value is None or value == "":
                continue
            if isinstance(value, list | tuple):
                pairs += [(key, str(v)) for v in value]
            else:
                pairs.append((key, str(value)))
        return f"{path}?{urlencode(pairs)}" if pairs else path


def pull_host(request: web.Request) -> str:
    """The host name pull commands show: ``ui.pullhost``, else ``http.host``'s, else the one
    the browser used (when it is a valid host name: a forged Host is not echoed)."""
    config = state_of(request).config
    if config.ui.pullhost:
        return config.ui.pullhost
    base = base_url(request)
    host = base.split("://", 1)[-1]
    if host and is_valid_host(host):
        return host
    return "registry.example.com"


def render(
    request: web.Request,
    template: str,
    status: int = 200,
    **context: Any,
) -> web.Response:
    state = state_of(request)
    visitor = request.get(VISITOR)
    urls = Urls(ui_root(request))
    page = state.templates.get_template(template).render(
        urls=urls,
        visitor=visitor,
        csrf_field=CSRF_FIELD,
        can_sign_in=state.accounts.can_sign_in,
        fmt=fmt,
        now=time.time(),
        **context,
    )
    return web.Response(text=page, status=status, content_type="text/html", charset="utf-8")


def redirect(location: str) -> web.HTTPSeeOther:
    return web.HTTPSeeOther(location=location)


def set_cookie(request: web.Request, response: web.StreamResponse, session: Session) -> None:
    state = state_of(request)
    secure = request.secure or base_url(request).startswith("https://")
    response.set_cookie(
        COOKIE,
        state.codec.encode(session),
        max_age=max(0, int(session.expires - time.time())),
        path=ui_root(request) + "/",
        httponly=True,
        samesite="Strict",
        secure=secure,
    )


def begin_session(request: web.Request, session: Session) -> None:
    """Replace the visitor's session (signing in or out): a new id, a new CSRF token."""
    visitor = visitor_of(request)
    state = state_of(request)
    visitor.session = session
    visitor.csrf = state.codec.csrf_token(session)
    visitor.renew = True


_SAFE_METHODS = ("GET", "HEAD")


def ui_middleware(prefix: str) -> web.Middleware:
    """For the UI's paths only: the visitor, CSRF on every state-changing request, HTML error
    pages, and the security headers."""
    root = prefix + "/ui"

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path != root and not request.path.startswith(root + "/"):
            return await handler(request)
        if request.path.startswith(root + "/static/"):
            response = await handler(request)
            response.headers.update(SECURITY_HEADERS)
            return response
        state = state_of(request)
        codec = state.codec
        session = codec.decode(request.cookies.get(COOKIE))
        renew = session is None
        if session is None:
            session = codec.new()
        identity = state.accounts.identity(session.user, session.fingerprint)
        if identity is None and session.user is not None:
            # removed from htpasswd, or the password changed: signed out from now on
            session = codec.new()
            renew = True
            identity = state.accounts.identity(None, None)
        visitor = Visitor(session, identity, codec.csrf_token(session), renew)
        request[VISITOR] = visitor
        if identity is not None:
            request[IDENTITY] = identity  # what the model's events name as the actor
        try:
            if request.method not in _SAFE_METHODS:
                await _check_forgery(request, session)
            response = await handler(request)
        except web.HTTPException as exc:
            # Answered here, not by the error middleware (whose JSON error drops Location).
            if 300 <= exc.status < 400:
                response = web.Response(status=exc.status, headers={"Location": exc.location})
            else:
                response = render(
                    request, "error.html", status=exc.status, code="", message=exc.reason
                )
        except RegistryError as exc:
            response = render(
                request, "error.html", status=exc.status, code=exc.code.name, message=exc.message
            )
            response.headers.update(exc.headers)  # Retry-After of a throttled sign-in
        response.headers.update(SECURITY_HEADERS)
        response.headers["Cache-Control"] = "no-store"
        if visitor.renew:
            set_cookie(request, response, visitor.session)
        return response

    return middleware


async def _check_forgery(request: web.Request, session: Session) -> None:
    """A write must come from our own page: the browser says so (``Sec-Fetch-Site``,
    ``Origin``) where it tells, and the form carries this session's CSRF token always."""

    def refuse(why: str) -> RegistryError:
        return RegistryError(ErrorCode.DENIED, f"request refused: {why}", status=403)

    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site not in ("same-origin", "none"):
        raise refuse("it came from another site")
    origin = request.headers.get("Origin")
    if origin is not None and origin != "null":
        # By host only: behind a TLS proxy that does not say X-Forwarded-Proto the browser's
        # https origin is our http one, and that is no forgery.
        ours = base_url(request).partition("://")[2] or request.host
        if urlsplit(origin).netloc.lower() != ours.lower():
            raise refuse("it came from another origin")
    try:
        form = await request.post()
    except ValueError:  # a malformed form (multipart without its boundary, bad encoding)
        raise RegistryError(ErrorCode.UNSUPPORTED, "the form cannot be read", status=400) from None
    token = form.get(CSRF_FIELD)
    if not isinstance(token, str) or not state_of(request).codec.csrf_ok(session, token):
        raise refuse("the form's CSRF token is missing or not this session's; reload the page")


def identity_or_login(request: web.Request) -> Identity:
    """The visitor's identity; a visitor who must sign in first is sent to the sign-in page,
    which brings them back here."""
    identity = visitor_of(request).identity
    if identity is None:
        raise redirect(Urls(ui_root(request)).login(request.path_qs))
    return identity


def not_visible(name: str) -> RegistryError:
    # The same answer whether the repository is absent or hidden from this visitor: the UI
    # does not tell who may not pull whether a name exists.
    return RegistryError(
        ErrorCode.NAME_UNKNOWN,
        f"no repository {name!r}, or you may not see it",
        status=404,
    )


def visible_repository(request: web.Request) -> Repository:
    """The repository of the URL, if the visitor may pull it."""
    identity = identity_or_login(request)
    name = validate_name(request.match_info["name"])
    if not identity.may_pull(name):
        raise not_visible(name)
    return registry_of(request).repository(name)


def may_delete(request: web.Request, name: str) -> bool:
    """Whether the page offers deletes in ``name``: the visitor's right, deletes enabled, and
    not a pull-through cache (the delete itself checks all of it again)."""
    identity = identity_or_login(request)
    return (
        identity.may_delete(name)
        and registry_of(request).delete_enabled
        and proxied_of(request) is None
    )
