"""Registry credentials where ``docker login`` left them, so ``dockyard --url`` needs no login of
its own: ``config.json`` in ``$DOCKER_CONFIG`` (default ``~/.docker``).

Looked up as docker does for a registry host: the helper ``credHelpers`` names for it, else the
``credsStore`` helper, else the file's own ``auths`` entry (``auth``: base64 of ``user:password``,
or an ``identitytoken``). A helper is the program ``docker-credential-<name>``, run as
``docker-credential-<name> get`` with the server on standard input; it answers
``{"ServerURL", "Username", "Secret"}``, where the user name ``<token>`` means the secret is an
identity token (an OAuth2 refresh token), not a password. Where a helper has nothing for the host,
the file's entry is used, if any.

Nothing here is kept or logged: secrets are read for one command and passed to the remote client.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: the user name a helper (and ``auths``) gives with an identity token
IDENTITY_TOKEN_USER = "<token>"
#: how long a helper may take (one that asks for a keychain password waits for a person)
HELPER_TIMEOUT = 60.0


class CredentialsError(Exception):
    """The docker configuration or a helper failed: said rather than going on anonymously."""


@dataclass(frozen=True)
class Credentials:
    username: str
    secret: str = field(repr=False)
    #: the secret is an identity token (a refresh token for the token server), not a password
    identity_token: bool = False
    #: where they came from, for messages (never the secret)
    source: str = ""


def config_dir(environ: Mapping[str, str] | None = None) -> Path:
    environ = os.environ if environ is None else environ
    configured = environ.get("DOCKER_CONFIG")
    if configured:
        return Path(configured)
    return Path(environ.get("HOME") or Path.home()) / ".docker"


def registry_host(server: str) -> str:
    """What docker keys credentials by: the host (and port) of a URL or of a bare
    ``host[:port][/path]``, lower-cased (host names are not case-sensitive)."""
    text = server.strip()
    for scheme in ("https://", "http://"):
        if text.lower().startswith(scheme):
            text = text[len(scheme) :]
            break
    return text.split("/", 1)[0].lower()


def load_config(directory: Path) -> dict[str, Any]:
    """``config.json`` of ``directory``; empty when there is none."""
    path = directory / "config.json"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise CredentialsError(f"cannot read {path}: {exc.strerror}") from None
    try:
        data = json.loads(text) if text.strip() else {}
    except ValueError as exc:
        raise CredentialsError(f"{path} is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise CredentialsError(f"{path} is not a JSON object")
    return data


def from_helper(helper: str, server: str, where: str) -> Credentials | None:
    """Ask ``docker-credential-<helper>`` for ``server``; None when it has nothing for it."""
    program = f"docker-credential-{helper}"
    try:
        result = subprocess.run(
            [program, "get"],
            input=server,
            capture_output=True,
            text=True,
            timeout=HELPER_TIMEOUT,
            check=False,
        )
    except FileNotFoundError:
        raise CredentialsError(f"{program} (named by {where}) is not on PATH") from None
    except subprocess.TimeoutExpired:
        raise CredentialsError(f"{program} did not answer in {HELPER_TIMEOUT:g} s") from None
    except OSError as exc:
        raise CredentialsError(f"{program} could not run: {exc.strerror}") from None
    if result.returncode != 0:
        said = (result.stdout + result.stderr).strip()
        # The helpers' protocol: "credentials not found in native keychain" on stdout, exit 1.
        if "credentials not found" in said.lower():
            return None
        first = said.splitlines()[0] if said else f"exit status {result.returncode}"
        raise CredentialsError(f"{program} get failed: {first}")
    try:
        answer = json.loads(result.stdout)
        username, secret = str(answer["Username"]), str(answer["Secret"])
    except (ValueError, KeyError, TypeError):
        raise CredentialsError(
            f"{program} get answered something that is not credentials"
        ) from None
    if not secret:
        return None
    token = username == IDENTITY_TOKEN_USER
    return Credentials("" if token else username, secret, token, f"{program} ({where})")


def _from_entry(entry: Any, key: str, path: Path) -> Credentials | None:
    """An ``auths`` entry: an identity token, else ``auth`` (base64 ``user:password``), else
    the older ``username``/``password`` fields."""
    if not isinstance(entry, dict):
        return None
    where = f"auths[{key!r}] in {path}"
    username, password = "", ""
    encoded = entry.get("auth")
    if isinstance(encoded, str) and encoded:
        try:
            username, sep, password = (
                base64.b64decode(encoded, validate=True).decode().partition(":")
            )
        except (binascii.Error, UnicodeDecodeError):
            raise CredentialsError(f"{where}: auth is not base64 of user:password") from None
        if not sep:
            raise CredentialsError(f"{where}: auth is not base64 of user:password")
    elif isinstance(entry.get("username"), str):
        username, password = entry["username"], str(entry.get("password") or "")
    token = entry.get("identitytoken")
    if isinstance(token, str) and token:
        return Credentials(username, token, True, where)
    if username and password:
        return Credentials(username, password, False, where)
    return None


def _helper_queries(host: str) -> list[str]:
    # Helpers key entries by what `docker login` was given: the bare host, usually; a URL
    # where the login named one.
    return [host, f"https://{host}"]


def lookup(server: str, environ: Mapping[str, str] | None = None) -> Credentials | None:
    """The credentials docker would use for ``server`` (a URL or ``host[:port]``); None when
    it has none (anonymous). CredentialsError when the configuration or a helper is broken."""
    directory = config_dir(environ)
    path = directory / "config.json"
    config = load_config(directory)
    host = registry_host(server)
    entries = config.get("auths") if isinstance(config.get("auths"), dict) else {}
    entry_key = next((k for k in entries if registry_host(k) == host), None)
    helpers = config.get("credHelpers") if isinstance(config.get("credHelpers"), dict) else {}
    helper_key = next((k for k in helpers if registry_host(k) == host), None)
    if helper_key is not None and helpers[helper_key]:
        helper, where = str(helpers[helper_key]), f"credHelpers[{helper_key!r}] in {path}"
    elif isinstance(config.get("credsStore"), str) and config["credsStore"]:
        helper, where = config["credsStore"], f"credsStore in {path}"
    else:
        helper = where = ""
    if helper:
        for query in _helper_queries(host):
            found = from_helper(helper, query, where)
            if found is not None:
                return found
    if entry_key is not None:
        return _from_entry(entries[entry_key], entry_key, path)
    return None
