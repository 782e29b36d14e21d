"""Signing in and out of the web UI with the registry's own accounts (dockyard.auth.accounts)."""

from __future__ import annotations

from aiohttp import web

from dockyard.auth.login import BadCredentials
from dockyard.http.request import client_address
from dockyard.ui.core import (
    Urls,
    begin_session,
    redirect,
    render,
    state_of,
    ui_root,
    visitor_of,
)

#: longest user name or password the form takes (htpasswd's bcrypt reads 72 bytes anyway)
MAX_FIELD = 1024


def _safe_next(request: web.Request, target: str | None) -> str:
    """Where to go after signing in: a page of the UI, never another site (``//evil``)."""
    root = ui_root(request)
    if target and target.startswith(root + "/") and not any(c in target for c in "\\\r\n"):
        return target
    return root + "/"


async def login_page(request: web.Request) -> web.Response:
    state = state_of(request)
    return render(
        request,
        "login.html",
        accounts=state.accounts,
        next_url=_safe_next(request, request.query.get("next")),
        error=None,
    )


async def login(request: web.Request) -> web.Response:
    state = state_of(request)
    form = await request.post()
    user = form.get("username")
    password = form.get("password")
    next_url = _safe_next(request, form.get("next") if isinstance(form.get("next"), str) else None)

    def again(error: str, status: int) -> web.Response:
        return render(
            request,
            "login.html",
            status=status,
            accounts=state.accounts,
            next_url=next_url,
            error=error,
        )

    if not state.accounts.can_sign_in:
        return again("This registry has no accounts the UI can sign in with.", 400)
    if (
        not isinstance(user, str)
        or not isinstance(password, str)
        or not user
        or len(user) > MAX_FIELD
        or len(password) > MAX_FIELD
    ):
        return again("Enter a user name and a password.", 400)
    try:
        await state.accounts.sign_in(user, password, client_address(request))
    except BadCredentials:
        return again("Incorrect user name or password.", 401)
    # 429 (throttled) is a RegistryError: the middleware renders it
    begin_session(request, state.codec.new(user, state.accounts.fingerprint(user)))
    raise redirect(next_url)


async def logout(request: web.Request) -> web.Response:
    state = state_of(request)
    begin_session(request, state.codec.new())
    visitor_of(request).identity = None
    raise redirect(Urls(ui_root(request)).login())


def routes(root: str) -> list[web.AbstractRouteDef]:
    return [
        web.get(f"{root}/login", login_page),
        web.post(f"{root}/login", login),
        web.post(f"{root}/logout", logout),
    ]
