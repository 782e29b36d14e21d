"""The built-in token server's endpoint: ``GET|POST <prefix>/auth/token``.

GET is the Docker token protocol: Basic credentials (or none, for anonymous access), ``service``,
any number of ``scope``; ``offline_token=true`` adds a refresh token (``docker login`` asks for
one). POST is the OAuth2 form newer clients use: ``grant_type=password`` (username, password) or
``grant_type=refresh_token``, with ``scope`` space-separated and ``access_type=offline`` for a
refresh token.
"""

from __future__ import annotations

from aiohttp import web

from dockyard.api.base import send_continue
from dockyard.auth.access import parse_scopes
from dockyard.auth.login import BadCredentials
from dockyard.auth.middleware import TOKEN_PATH, parse_basic, unauthorized
from dockyard.auth.tokenserver import InvalidGrant, TokenServer
from dockyard.errors import ErrorCode, RegistryError
from dockyard.http.request import client_address
from dockyard.http.responses import json_response

TOKEN_SERVER_KEY = web.AppKey("token_server", TokenServer)
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def _server(request: web.Request) -> TokenServer:
    return request.app[TOKEN_SERVER_KEY]


def _check_service(server: TokenServer, service: str | None) -> None:
    if service and service != server.service:
        raise RegistryError(
            ErrorCode.DENIED,
            f"this token server serves {server.service!r}, not {service!r}",
            status=400,
        )


async def _login(request: web.Request, user: str, password: str) -> None:
    server = _server(request)
    try:
        await server.login.check(user, password, client_address(request))
    except BadCredentials:
        raise unauthorized(
            'Basic realm="dockyard-token"', "incorrect username or password"
        ) from None


async def get_token(request: web.Request) -> web.Response:
    server = _server(request)
    _check_service(server, request.query.get("service"))
    user = None
    header = request.headers.get("Authorization")
    if header:
        credentials = parse_basic(header)
        if credentials is None:
            raise unauthorized('Basic realm="dockyard-token"', "malformed Authorization header")
        user, password = credentials
        await _login(request, user, password)
    scopes = parse_scopes(request.query.getall("scope", []))
    offline = request.query.get("offline_token", "").lower() == "true"
    issued = server.issue(user, scopes, offline=offline)
    return json_response(issued.docker_response(), headers=NO_STORE)


async def post_token(request: web.Request) -> web.Response:
    server = _server(request)
    await send_continue(request)
    form = await request.post()
    _check_service(server, str(form.get("service") or ""))
    grant_type = form.get("grant_type")
    if grant_type == "password":
        user, password = str(form.get("username") or ""), str(form.get("password") or "")
        if not user:
            raise RegistryError(ErrorCode.UNAUTHORIZED, "username is required", status=400)
        await _login(request, user, password)
    elif grant_type == "refresh_token":
        try:
            user = server.redeem(str(form.get("refresh_token") or ""))
        except InvalidGrant as exc:
            raise unauthorized(
                'Basic realm="dockyard-token"', f"invalid refresh token: {exc}"
            ) from None
    else:
        raise RegistryError(
            ErrorCode.UNSUPPORTED, f"unsupported grant_type {grant_type!r}", status=400
        )
    scopes = parse_scopes(str(v) for v in form.getall("scope", []))
    offline = form.get("access_type") == "offline"
    issued = server.issue(user, scopes, offline=offline)
    body = issued.docker_response()
    if grant_type == "refresh_token":
        body["refresh_token"] = str(form.get("refresh_token"))
    return json_response(body, headers=NO_STORE)


def routes(prefix: str) -> list[web.AbstractRouteDef]:
    return [web.get(prefix + TOKEN_PATH, get_token), web.post(prefix + TOKEN_PATH, post_token)]
