"""The CLI's remote mode: commands given ``--url`` ask a running Dockyard through its JSON API
(``/dockyard/api/v1``) instead of opening the store, so an operator needs neither a shell on the
server nor its configuration, and is allowed exactly what their registry credentials allow.

Credentials are docker's (``cli.credentials``: ``config.json``, ``credsStore``, ``credHelpers``)
or ``--username``/``--password-stdin``. Authentication is the registry's own dance: a request
without credentials, the 401's challenge, then Basic credentials (htpasswd) or a bearer token for
the scope the challenge names from the realm it names (Docker's token protocol: a GET with Basic
credentials, or the OAuth2 POST with an identity token). Tokens are kept per scope for the
command's run; nothing is written to disk.

For other commands (``dockyard rm --url``, ``dockyard retention --url``): ``remote_client(url)``
gives a :class:`RemoteClient`; ``client.request("DELETE", "/repositories/team/app")`` returns the
parsed JSON or raises :class:`RemoteError` with the server's error code; ``remote_options`` adds
the same options to a click command and ``client_from_options`` builds its client.

Only the standard library speaks HTTP here (urllib), so the command loads nothing of the server.
"""

from __future__ import annotations

import base64
import json
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from email.message import Message
from typing import Any, NoReturn, TypeVar

import click

from dockyard import __version__
from dockyard.cli.credentials import Credentials, CredentialsError, lookup
from dockyard.cli.output import Column, echo_json, echo_quotas, echo_table, format_size

#: the JSON API's root (``dockyard.api.v1.common.ROOT``, not imported: that loads the server's
#: HTTP stack; a unit test keeps the two equal)
API_ROOT = "/dockyard/api/v1"
DEFAULT_TIMEOUT = 60.0
#: what administrators ask for besides what a challenge names, where it matters (``du``): the
#: usage route needs only the catalog's scope, and answers more to a token that also has this
ADMIN_SCOPE = "dockyard:admin:*"

F = TypeVar("F", bound=Callable[..., Any])


class RemoteError(Exception):
    """The server refused (its error code and message), or could not be reached (status 0)."""

    def __init__(self, status: int, code: str, message: str, detail: Any = None) -> None:
        self.status = status
        self.code = code
        self.message = message
        self.detail = detail
        super().__init__(f"{status} {code}: {message}" if status else message)


@dataclass
class Response:
    status: int
    headers: Message
    body: bytes

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            raise RemoteError(self.status, "UNKNOWN", "the answer is not JSON") from None

    def error(self) -> RemoteError:
        """The distribution spec's error body as a RemoteError (or what the status says)."""
        try:
            first = json.loads(self.body)["errors"][0]
            return RemoteError(
                self.status, str(first["code"]), str(first["message"]), first.get("detail")
            )
        except (ValueError, KeyError, IndexError, TypeError):
            text = self.body.decode("utf-8", "replace").strip()[:200]
            return RemoteError(self.status, "UNKNOWN", text or f"HTTP {self.status}")


_PARAM = re.compile(r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')


def parse_challenge(header: str) -> tuple[str, dict[str, str]] | None:
    """``Bearer realm="...",service="...",scope="..."`` -> ("bearer", {realm, service,
    scope}); None for a header that is not a challenge."""
    scheme, _, rest = header.strip().partition(" ")
    if not scheme:
        return None
    params = {
        m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3)
        for m in _PARAM.finditer(rest)
    }
    return scheme.lower(), {k: v.replace('\\"', '"') for k, v in params.items()}


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    # A redirect would carry the Authorization header wherever it points; the API never
    # redirects, so one is answered as the error it is.
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class RemoteClient:
    """One registry's JSON API. ``url``: the registry's base URL (``https://reg.example.com``,
    with its ``http.prefix`` path if it has one)."""

    def __init__(
        self,
        url: str,
        credentials: Credentials | None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        extra_scopes: Sequence[str] = (),
    ) -> None:
        parsed = urllib.parse.urlsplit(url)
        self.origin = f"{parsed.scheme}://{parsed.netloc}"
        self.base = self.origin + parsed.path.rstrip("/")
        self.credentials = credentials
        self.timeout = timeout
        self.extra_scopes = tuple(extra_scopes)
        self._opener = urllib.request.build_opener(_NoRedirects)
        self._authorization: str | None = None
        #: bearer tokens by (realm, service, scopes)
        self._tokens: dict[tuple[str, str, tuple[str, ...]], str] = {}

    # -- HTTP ------------------------------------------------------------------------------

    def _open(
        self,
        method: str,
        url: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Response:
        request = urllib.request.Request(url, data=body, method=method)
        request.add_header("User-Agent", f"dockyard/{__version__} (remote)")
        request.add_header("Accept", "application/json")
        for name, value in (headers or {}).items():
            request.add_header(name, value)
        try:
            with self._opener.open(request, timeout=self.timeout) as answer:
                return Response(answer.status, answer.headers, answer.read())
        except urllib.error.HTTPError as exc:
            with exc:
                return Response(exc.code, exc.headers, exc.read())
        except urllib.error.URLError as exc:
            raise RemoteError(0, "UNREACHABLE", f"{url}: {exc.reason}") from None
        except (TimeoutError, ConnectionError) as exc:
            raise RemoteError(0, "UNREACHABLE", f"{url}: {exc}") from None

    def send(self, method: str, url: str, body: Any = None) -> Response:
        """``method url`` with ``body`` as JSON, authenticating as the challenges ask; the
        answer, whatever its status."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}

        def attempt() -> Response:
            auth = {"Authorization": self._authorization} if self._authorization else {}
            return self._open(method, url, data, headers | auth)

        response = attempt()
        for _ in range(2):  # a first answer, then one wider or fresher token at most
            if response.status not in (401, 403):
                break
            challenge = parse_challenge(response.headers.get("WWW-Authenticate", ""))
            if challenge is None:
                break
            authorization = self._answer(challenge, stale=response.status == 401)
            if authorization is None or authorization == self._authorization:
                # Nothing new to offer: the refusal stands (sending the same password again
                # would only count another failed login against it).
                break
            self._authorization = authorization
            response = attempt()
        return response

    def _answer(self, challenge: tuple[str, dict[str, str]], stale: bool) -> str | None:
        scheme, params = challenge
        creds = self.credentials
        if scheme == "basic":
            if creds is None:
                return None
            if creds.identity_token:
                raise RemoteError(
                    401,
                    "UNAUTHORIZED",
                    f"the server asks for a password; the credentials from {creds.source} "
                    "are an identity token",
                )
            pair = f"{creds.username}:{creds.secret}".encode()
            return "Basic " + base64.b64encode(pair).decode()
        if scheme != "bearer" or "realm" not in params:
            return None
        scopes = tuple(dict.fromkeys([*params.get("scope", "").split(), *self.extra_scopes]))
        key = (params["realm"], params.get("service", ""), scopes)
        if stale:  # a 401 to a token we held: expired, or from before a restart
            self._tokens.pop(key, None)
        if key not in self._tokens:
            self._tokens[key] = self._fetch_token(*key)
        return "Bearer " + self._tokens[key]

    def _fetch_token(self, realm: str, service: str, scopes: tuple[str, ...]) -> str:
        if urllib.parse.urlsplit(realm).scheme not in ("http", "https"):
            raise RemoteError(401, "UNAUTHORIZED", f"the token realm {realm!r} is not a URL")
        creds = self.credentials
        if creds is not None and creds.identity_token:
            # What docker does with an identity token: OAuth2's refresh grant.
            form = {
                "grant_type": "refresh_token",
                "refresh_token": creds.secret,
                "service": service,
                "scope": " ".join(scopes),
                "client_id": "dockyard",
            }
            response = self._open(
                "POST",
                realm,
                urllib.parse.urlencode(form).encode(),
                {"Content-Type": "application/x-www-form-urlencoded"},
            )
        else:
            query = urllib.parse.urlencode([("service", service), *(("scope", s) for s in scopes)])
            headers = {}
            if creds is not None:
                pair = f"{creds.username}:{creds.secret}".encode()
                headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()
            separator = "&" if "?" in realm else "?"
            response = self._open("GET", f"{realm}{separator}{query}", None, headers)
        if response.status != 200:
            error = response.error()
            who = f"the credentials from {creds.source}" if creds else "an anonymous token"
            raise RemoteError(
                error.status, error.code, f"the token server refused {who}: {error.message}"
            )
        body = response.json()
        token = (body.get("token") or body.get("access_token")) if isinstance(body, dict) else None
        if not isinstance(token, str) or not token:
            raise RemoteError(502, "UNKNOWN", "the token server answered without a token")
        return token

    # -- the API ---------------------------------------------------------------------------

    def api_url(self, path: str, params: dict[str, Any] | None = None) -> str:
        """The URL of an API path (``/repositories``; the API root may be written or not)."""
        if not path.startswith("/"):
            path = "/" + path
        if not path.startswith(API_ROOT + "/") and path != API_ROOT:
            path = API_ROOT + path
        url = self.base + path
        given = {k: v for k, v in (params or {}).items() if v is not None}
        return f"{url}?{urllib.parse.urlencode(given)}" if given else url

    def _refusal(self, response: Response) -> RemoteError:
        error = response.error()
        if error.status == 401 and self.credentials is None:
            host = urllib.parse.urlsplit(self.origin).netloc
            error.message += (
                f" (docker's configuration has no credentials for {host}: docker login {host}, "
                "or --username)"
            )
            error.args = (f"{error.status} {error.code}: {error.message}",)
        return error

    def request(
        self, method: str, path: str, *, params: dict[str, Any] | None = None, body: Any = None
    ) -> Any:
        """The parsed JSON answer to ``method path``; RemoteError for an error answer."""
        response = self.send(method, self.api_url(path, params), body)
        if response.status >= 400 or response.status < 200:
            raise self._refusal(response)
        return response.json()

    def pages(self, path: str, params: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
        """Every page of a list, following ``next`` (relative to the server's origin)."""
        url: str | None = self.api_url(path, params)
        while url is not None:
            response = self.send("GET", url)
            if response.status >= 400 or response.status < 200:
                raise self._refusal(response)
            page = response.json()
            yield page
            following = page.get("next")
            url = self.origin + following if following else None


def normalize_url(url: str) -> str:
    """``reg.example.com`` -> ``https://reg.example.com`` (as docker assumes); no trailing
    ``/``. A URL with a path is a registry under ``http.prefix``."""
    url = url.strip()
    if "://" not in url:
        url = "https://" + url
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise click.BadParameter(f"{url!r} is not an http(s) URL", param_hint="--url")
    return url.rstrip("/")


def remote_client(
    url: str,
    *,
    username: str | None = None,
    password: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    extra_scopes: Sequence[str] = (),
) -> RemoteClient:
    """A client of the registry at ``url``: as ``username`` with ``password`` if given, else
    with docker's credentials for its host (anonymous without any). CredentialsError when the
    docker configuration or its helper fails."""
    url = normalize_url(url)
    if username is not None:
        credentials: Credentials | None = Credentials(username, password or "", False, "--username")
    else:
        credentials = lookup(url)
    return RemoteClient(url, credentials, timeout=timeout, extra_scopes=extra_scopes)


# -- the commands' options -------------------------------------------------------------------


def remote_options(command: F) -> F:
    """``--url`` (or ``DOCKYARD_URL``), ``--username``, ``--password-stdin``."""
    command = click.option(
        "--password-stdin",
        is_flag=True,
        help="With --username: read the password from standard input.",
    )(command)
    command = click.option(
        "--username",
        "-u",
        metavar="USER",
        help="Log in as USER instead of using docker's stored credentials.",
    )(command)
    return click.option(
        "--url",
        envvar="DOCKYARD_URL",
        metavar="URL",
        help="Ask the registry at URL through its JSON API instead of opening the store "
        "(credentials from docker's config.json; also DOCKYARD_URL).",
    )(command)


def client_from_options(
    url: str,
    username: str | None,
    password_stdin: bool,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    extra_scopes: Sequence[str] = (),
) -> RemoteClient:
    """The client the options ask for; a usage error or exit status 2 for what cannot work."""
    password = None
    if password_stdin and username is None:
        raise click.UsageError("--password-stdin needs --username")
    if username is not None:
        if password_stdin:
            password = sys.stdin.readline().rstrip("\r\n")
        else:
            password = click.prompt("Password", hide_input=True)
    try:
        return remote_client(
            url,
            username=username,
            password=password,
            timeout=timeout,
            extra_scopes=extra_scopes,
        )
    except CredentialsError as exc:
        click.echo(f"dockyard: {exc}", err=True)
        sys.exit(2)


def fail(exc: RemoteError) -> NoReturn:
    """Report a refusal and exit: 1, or 3 for something that does not exist (as ``rm``)."""
    click.echo(f"dockyard: {exc}", err=True)
    sys.exit(3 if exc.status == 404 else 1)


# -- usage (``dockyard du --url``) ------------------------------------------------------------


def fetch_usage(client: RemoteClient, query: str | None = None) -> dict[str, Any]:
    """Every page of ``/usage`` in one answer: the first page's totals, the quotas of every
    page (each once), all the repositories."""
    merged: dict[str, Any] = {"admin": False, "total": None, "quotas": [], "repositories": []}
    seen: set[str] = set()
    for i, page in enumerate(client.pages("/usage", {"q": query})):
        if i == 0:
            merged["admin"], merged["total"] = page["admin"], page["total"]
        for quota in page["quotas"]:
            if quota["scope"] not in seen:
                seen.add(quota["scope"])
                merged["quotas"].append(quota)
        merged["repositories"] += page["repositories"]
    return merged


def remote_du(url: str, username: str | None, password_stdin: bool, as_json: bool) -> None:
    """``dockyard du --url``: the usage the registry's index counts, as tables or JSON."""
    client = client_from_options(url, username, password_stdin, extra_scopes=(ADMIN_SCOPE,))
    try:
        usage = fetch_usage(client)
    except RemoteError as exc:
        fail(exc)
    if as_json:
        echo_json(usage)
        return
    echo_table(
        [
            Column("REPOSITORY"),
            Column("MANIFESTS", numeric=True),
            Column("TAGS", numeric=True),
            Column("SIZE", numeric=True),
            Column("UPLOADING", numeric=True),
        ],
        [
            [
                r["name"],
                str(r["manifests"]),
                str(r["tags"]),
                format_size(r["size"]),
                format_size(r["uploading"]),
            ]
            for r in usage["repositories"]
        ],
    )
    total = usage["total"]
    if total is not None:
        click.echo(
            f"\nregistry: {format_size(total['bytes'])} in {total['blobs']} blobs used by "
            f"{total['repositories']} repositories ({format_size(total['uploading'])} uploading)"
        )
    echo_quotas(
        [(q["scope"], q["bytes"], q["uploading"], q["limit"], q["bytes"]) for q in usage["quotas"]]
    )


def remote_rm(
    url: str,
    username: str | None,
    password_stdin: bool,
    repository: str,
    dry_run: bool,
    as_json: bool,
) -> None:
    """``dockyard rm --url``: the server deletes the repository (exit 3 when there is none)."""
    client = client_from_options(url, username, password_stdin, extra_scopes=(ADMIN_SCOPE,))
    try:
        deletion = client.request(
            "DELETE",
            f"/repositories/{repository}",
            params={"dry_run": "true" if dry_run else "false"},
        )
    except RemoteError as exc:
        if exc.status == 404:
            click.echo(f"dockyard: no repository named {repository}: {exc}", err=True)
            sys.exit(3)
        fail(exc)
    if as_json:
        echo_json(deletion)
        return
    verb = "would remove" if dry_run else "removed"
    click.echo(
        f"{verb} repository {deletion['repository']}: {len(deletion['tags'])} tags, "
        f"{len(deletion['manifests'])} manifests, {deletion['layer_links']} layer links, "
        f"{len(deletion['uploads'])} uploads in progress"
    )
    if not deletion.get("settled", True):
        click.echo(
            f"dockyard: pushes to {repository} kept arriving; what they wrote last may remain: "
            "run dockyard rm again",
            err=True,
        )
        sys.exit(4)


def remote_retention(
    url: str,
    username: str | None,
    password_stdin: bool,
    body: dict[str, Any],
    as_json: bool,
) -> dict[str, Any]:
    """``dockyard retention --url``: the server runs it (an administrator's call) and answers
    with the report; printed as the local command prints it. Returns the report."""
    client = client_from_options(
        url, username, password_stdin, extra_scopes=(ADMIN_SCOPE,), timeout=3600.0
    )
    try:
        report = client.request("POST", "/retention", body=body)
    except RemoteError as exc:
        fail(exc)
    if as_json:
        echo_json(report)
        return report
    report_only = report["dry_run"]
    for run in report["repositories"]:
        withheld = run.get("withheld")
        verb = "would delete" if report_only or withheld else "deleted"
        deleted = [t for t in run["tags"] if t["action"] == "delete"]
        gone = [m for m in run["manifests"] if m["action"] == "delete"]
        if not (deleted or gone or withheld or run["errors"]):
            continue
        click.echo(
            f"{run['repository']}: {verb} {len(deleted)} of {len(run['tags'])} tags and "
            f"{len(gone)} of {len(run['manifests'])} manifests"
        )
        if withheld:
            click.echo(f"  only reported, nothing deleted: {withheld}")
        for tag in deleted:
            click.echo(
                f"  {verb} tag {run['repository']}:{tag['tag']} ({tag['digest']}): {tag['reason']}"
            )
        for manifest in gone:
            click.echo(
                f"  {verb} manifest {run['repository']}@{manifest['digest']}: {manifest['reason']}"
            )
        for error in run["errors"]:
            click.echo(f"  error: {error}")
    return report
