"""The JSON API (``/dockyard/api/v1``) against its OpenAPI description: every operation the served
description lists is exercised with a caller who may (the answer validated against the schema
declared for it) and with one who may not (401 or 403, validated too); then what the routes do
(filtering, pages, sizes and times, deletes with their refusals and events, retention), the
administrators of htpasswd and of an external token server, bad input, and the CLI's remote
mode against a running server."""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import requests
from openapi_spec_validator import validate as validate_openapi

from dockyard.auth.htpasswd import hash_password
from dockyard.cli.credentials import Credentials
from dockyard.cli.remote import RemoteClient, RemoteError, remote_client
from harness import InProcessDockyard, Server, ServerFactory, assert_error
from harness.certs import sign_token, token_auth, token_signer
from harness.client import OCI_MANIFEST
from harness.dockyard import run_command as dockyard
from harness.receiver import Receiver

ROOT = "/dockyard/api/v1"
SERVICE = "registry.test"
PASSWORDS = {"admin": "adminpw", "bob": "bobpw", "dave": "davepw", "carol": "carolpw"}
ADMIN = "dockyard:admin:*"


def write_users(path: Path, users: dict[str, str]) -> None:
    path.write_text("".join(f"{u}:{hash_password(p, rounds=4)}\n" for u, p in users.items()))


def token_server_auth(users: Path, key: Path) -> dict[str, Any]:
    """admin: an administrator; bob: pull on team-a/*; dave: pull and delete on team-a/*;
    carol: nothing on team-a (pull on shared/*)."""
    return {
        "token": {
            "service": SERVICE,
            "issuer": "dockyard-test",
            "server": {
                "htpasswd": str(users),
                "key": str(key),
                "admins": ["admin"],
                "groups": {"readers": ["bob"], "deleters": ["dave"]},
                "access": [
                    {"repository": "team-a/*", "groups": ["readers"], "actions": ["pull"]},
                    {
                        "repository": "team-a/*",
                        "groups": ["deleters"],
                        "actions": ["pull", "delete"],
                    },
                    {"repository": "shared/*", "users": ["carol"], "actions": ["pull"]},
                ],
            },
        }
    }


POLICIES = [
    {
        "repositories": ["team-a/*"],
        "immutabletags": ["release-.*"],
        "retention": {"keeplatest": 10},
    }
]
QUOTAS = [{"scope": "team-a/*", "limit": "1GiB"}, {"scope": "team-b/*", "limit": "1GiB"}]


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessDockyard]:
    """One server with the built-in token server's access rules, policies and quotas, for the
    tests of this module that each use repositories of their own."""
    work = tmp_path_factory.mktemp("json-api")
    write_users(work / "users", PASSWORDS)
    server = InProcessDockyard.start(
        work,
        auth=token_server_auth(work / "users", work / "key.pem"),
        policies=POLICIES,
        quotas=QUOTAS,
        index={"pullflush": "0.2s"},
    )
    yield server
    server.stop()
    log = server.log()
    assert "Traceback" not in log, log[-5000:]


# -- calling the API as a user, through the challenge ------------------------------------------


def challenge_params(header: str) -> dict[str, str]:
    scheme, _, rest = header.partition(" ")
    assert scheme == "Bearer", header
    out = {}
    for part in rest.split('",'):
        key, _, value = part.partition("=")
        out[key.strip()] = value.strip().strip('"')
    return out


def token(s: Server, user: str | None, scopes: list[str]) -> str:
    r = requests.get(
        f"{s.url}/auth/token",
        auth=(user, PASSWORDS[user]) if user else None,
        params=[("service", SERVICE), *(("scope", x) for x in scopes)],
    )
    assert r.status_code == 200, r.text
    return r.json()["token"]


def call(
    s: Server,
    user: str | None,
    method: str,
    path: str,
    *,
    params: dict[str, str] | None = None,
    body: Any = None,
    extra_scopes: tuple[str, ...] = (),
) -> requests.Response:
    """``method path`` as ``user`` (None: anonymous) the way a client does it: without a token,
    then with one for the scope the 401 names."""
    url = s.url + ROOT + path
    r = requests.request(method, url, params=params, json=body)
    if user is None or r.status_code != 401:
        return r
    scope = challenge_params(r.headers["WWW-Authenticate"])["scope"]
    t = token(s, user, [scope, *extra_scopes])
    return requests.request(
        method, url, params=params, json=body, headers={"Authorization": f"Bearer {t}"}
    )


def push(s: Server, name: str, tag: str | None, layers: list[bytes] | None = None) -> str:
    """Push as the administrator (nobody else may push on this server)."""
    t = token(s, "admin", [f"repository:{name}:pull,push"])
    s.session.headers["Authorization"] = f"Bearer {t}"
    try:
        digest, _ = s.push_image(name, tag, layers)
    finally:
        del s.session.headers["Authorization"]
    return digest


# -- the description, and every operation in it ------------------------------------------------


@pytest.fixture(scope="module")
def description(registry: InProcessDockyard) -> dict[str, Any]:
    r = requests.get(f"{registry.url}{ROOT}/openapi.json")
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("application/json")
    return r.json()


def operations(doc: dict[str, Any]) -> dict[str, tuple[str, str, dict[str, Any]]]:
    """operationId -> (method, path template, operation)."""
    return {
        op["operationId"]: (method.upper(), path, op)
        for path, item in doc["paths"].items()
        for method, op in item.items()
    }


def check_against(doc: dict[str, Any], op: dict[str, Any], r: requests.Response) -> None:
    """The answer's status is declared for the operation and its body fits the schema."""
    declared = op["responses"].get(str(r.status_code))
    assert declared is not None, f"{op['operationId']}: {r.status_code} not declared: {r.text}"
    if "$ref" in declared:
        declared = doc["components"]["responses"][declared["$ref"].rsplit("/", 1)[1]]
    schema = declared["content"]["application/json"]["schema"]
    assert r.headers["Content-Type"].startswith("application/json")
    validator = jsonschema.Draft202012Validator(
        {**schema, "components": doc["components"]}, format_checker=jsonschema.FormatChecker()
    )
    validator.validate(r.json())


@dataclass
class Exercise:
    """How an operation is called: its path parameters (after ``setup`` pushed what it needs),
    who may and who may not (None: anonymous, answered 401), what else the answer must say."""

    allowed: str | None
    denied: str | None
    params: Callable[[Server], dict[str, str]] = lambda s: {}
    query: dict[str, str] = field(default_factory=dict)
    body: Any = None
    extra_scopes: tuple[str, ...] = ()
    then: Callable[[Server, requests.Response], None] = lambda s, r: None


def _listed_for_bob(s: Server, r: requests.Response) -> None:
    names = [x["name"] for x in r.json()["repositories"]]
    assert "team-a/listed" in names
    assert not [n for n in names if not n.startswith("team-a/")]  # only what bob may pull


def _pushed(name: str, *tags: str) -> Callable[[Server], dict[str, str]]:
    def setup(s: Server) -> dict[str, str]:
        digest = ""
        for tag in tags:
            digest = push(s, name, tag)
        return {"name": name, "tag": tags[-1] if tags else "", "digest": digest}

    return setup


def _untagged(name: str) -> Callable[[Server], dict[str, str]]:
    def setup(s: Server) -> dict[str, str]:
        push(s, name, "keep")
        return {"name": name, "digest": push(s, name, None)}

    return setup


def _repository_gone(s: Server, r: requests.Response) -> None:
    assert r.json()["dry_run"] is False and r.json()["tags"]
    assert call(s, "admin", "GET", "/repositories/team-a/doomed").status_code == 404


def _tag_gone(s: Server, r: requests.Response) -> None:
    tags = call(s, "bob", "GET", "/repositories/team-a/tagged/-/tags").json()["tags"]
    assert [t["tag"] for t in tags] == ["keep"]


def _manifest_gone(s: Server, r: requests.Response) -> None:
    assert r.json()["tags"] == []
    summary = call(s, "bob", "GET", "/repositories/team-a/untagged").json()
    assert summary["manifests"] == 1 and summary["tags"] == 1


def _usage_setup(s: Server) -> dict[str, str]:
    push(s, "team-a/mine", "1")
    push(s, "team-b/theirs", "1")
    return {}


def _bob_usage(s: Server, r: requests.Response) -> None:
    body = r.json()
    assert body["admin"] is False and body["total"] is None
    assert {q["scope"] for q in body["quotas"]} == {"team-a/*"}  # not team-b/*: nothing of it
    assert all(x["name"].startswith("team-a/") for x in body["repositories"])


EXERCISES: dict[str, Exercise] = {
    "listRepositories": Exercise(
        "bob", None, _pushed("team-a/listed", "1"), query={"q": "team-"}, then=_listed_for_bob
    ),
    "getRepository": Exercise("bob", "carol", _pushed("team-a/one", "1")),
    "deleteRepository": Exercise(
        "dave", "bob", _pushed("team-a/doomed", "1", "2"), then=_repository_gone
    ),
    "listTags": Exercise("bob", "carol", _pushed("team-a/listing", "1", "2")),
    "deleteTag": Exercise("dave", "bob", _pushed("team-a/tagged", "keep", "old"), then=_tag_gone),
    "deleteManifest": Exercise("dave", "bob", _untagged("team-a/untagged"), then=_manifest_gone),
    "getUsage": Exercise("bob", None, _usage_setup, then=_bob_usage),
    "getPolicies": Exercise("admin", "bob"),
    "runRetention": Exercise("admin", "bob", body={"dry_run": True}),
}
#: served without authentication on purpose (its operation says ``security: []``)
PUBLIC = {"getOpenAPI"}


def test_the_description_is_valid_and_every_operation_is_exercised(
    description: dict[str, Any],
) -> None:
    validate_openapi(description)
    assert description["openapi"] == "3.1.0"
    assert description["servers"] == [{"url": ROOT}]
    assert set(operations(description)) == set(EXERCISES) | PUBLIC
    for op_id in PUBLIC:
        assert operations(description)[op_id][2]["security"] == []


def _expand(template: str, params: dict[str, str]) -> str:
    for key, value in params.items():
        template = template.replace("{" + key + "}", value)
    return template


@pytest.mark.parametrize("op_id", sorted(EXERCISES))
def test_operation_with_a_caller_who_may_and_one_who_may_not(
    registry: InProcessDockyard, description: dict[str, Any], op_id: str
) -> None:
    method, template, op = operations(description)[op_id]
    exercise = EXERCISES[op_id]
    params = exercise.params(registry)
    path = _expand(template, params)
    scope = _expand(op["x-dockyard-scope"], params)

    # Nobody: 401, with the challenge naming the scope the description says.
    r = call(registry, None, method, path, params=exercise.query, body=exercise.body)
    check_against(description, op, r)
    assert r.status_code == 401
    assert challenge_params(r.headers["WWW-Authenticate"])["scope"] == scope

    # Who may not: 403 (a token for the scope, without the right in it).
    if exercise.denied is not None:
        r = call(registry, exercise.denied, method, path, params=exercise.query, body=exercise.body)
        check_against(description, op, r)
        assert_error(r, 403, "DENIED")
        assert 'error="insufficient_scope"' in r.headers["WWW-Authenticate"]

    # Who may: 2xx, the body as described.
    r = call(
        registry,
        exercise.allowed,
        method,
        path,
        params=exercise.query,
        body=exercise.body,
        extra_scopes=exercise.extra_scopes,
    )
    check_against(description, op, r)
    assert r.status_code == 200, r.text
    exercise.then(registry, r)


def test_the_description_itself_needs_no_credentials(
    registry: InProcessDockyard, description: dict[str, Any]
) -> None:
    _, _, op = operations(description)["getOpenAPI"]
    r = requests.get(f"{registry.url}{ROOT}/openapi.json")
    check_against(description, op, r)
    assert r.json() == description


# -- what the routes answer --------------------------------------------------------------------


def test_administrators_see_everything_in_usage(registry: InProcessDockyard) -> None:
    push(registry, "team-b/usage", "1", [b"x" * 1000])
    as_admin = call(registry, "admin", "GET", "/usage", extra_scopes=(ADMIN,)).json()
    assert as_admin["admin"] is True
    assert as_admin["total"]["scope"] == "*" and as_admin["total"]["bytes"] > 1000
    assert [q["scope"] for q in as_admin["quotas"]] == ["team-a/*", "team-b/*"]
    assert [q["limit"] for q in as_admin["quotas"]] == [1024**3, 1024**3]
    entry = next(x for x in as_admin["repositories"] if x["name"] == "team-b/usage")
    assert entry["quotas"] == ["team-b/*"] and entry["size"] > 1000
    # An administrator's token without the admin scope is an ordinary caller's.
    plain = call(registry, "admin", "GET", "/usage").json()
    assert plain["admin"] is False and plain["total"] is None
    # So is a token server user asking for the scope they are not granted.
    assert call(registry, "bob", "GET", "/usage", extra_scopes=(ADMIN,)).json()["admin"] is False


def test_repositories_and_tags_from_the_index(registry: InProcessDockyard) -> None:
    layer = os.urandom(3000)
    digest = push(registry, "team-a/detail", "v1", [layer])
    push(registry, "team-a/detail", "v2")
    # A pull through the registry API; the size is the manifest's, its config's and layer's.
    t = token(registry, "admin", ["repository:team-a/detail:pull"])
    r = requests.get(
        registry.v2(f"team-a/detail/manifests/{digest}"),
        headers={"Authorization": f"Bearer {t}", "Accept": OCI_MANIFEST},
    )
    body = r.json()
    expected = len(r.content) + body["config"]["size"] + sum(x["size"] for x in body["layers"])
    deadline = time.time() + 10
    while True:  # the pull reaches the index within index.pullflush (0.2 s)
        tags = call(registry, "bob", "GET", "/repositories/team-a/detail/-/tags").json()
        if tags["tags"][0]["pulled"] is not None or time.time() > deadline:
            break
        time.sleep(0.1)
    v1, v2 = tags["tags"]
    assert tags["name"] == "team-a/detail" and tags["next"] is None
    assert (v1["tag"], v1["digest"], v1["size"]) == ("v1", digest, expected)
    assert v1["media_type"] == OCI_MANIFEST
    assert v1["pulled"] is not None and v2["pulled"] is None
    assert v1["pushed"].endswith("Z") and v1["pushed"] <= v2["pushed"]
    summary = call(registry, "bob", "GET", "/repositories/team-a/detail").json()
    assert summary["tags"] == 2 and summary["manifests"] == 2
    assert summary["size"] >= expected and summary["pulled"] == v1["pulled"]
    assert summary["pushed"] == v2["pushed"]
    r = call(registry, "bob", "GET", "/repositories/team-a/nothing-here")
    assert_error(r, 404, "NAME_UNKNOWN")
    r = call(registry, "bob", "GET", "/repositories/team-a/nothing-here/-/tags")
    assert_error(r, 404, "NAME_UNKNOWN")


def test_immutable_tags_are_refused_as_by_the_registry_api(registry: InProcessDockyard) -> None:
    digest = push(registry, "team-a/frozen", "release-1")
    push(registry, "team-a/frozen", "latest")
    r = call(registry, "dave", "DELETE", "/repositories/team-a/frozen/-/tags/release-1")
    assert_error(r, 403, "DENIED")
    assert "immutable" in r.json()["errors"][0]["message"]
    r = call(registry, "dave", "DELETE", f"/repositories/team-a/frozen/-/manifests/{digest}")
    assert_error(r, 403, "DENIED")
    # The repository holds an immutable tag: refused to dave, a dry run shows what would go.
    r = call(registry, "dave", "DELETE", "/repositories/team-a/frozen")
    assert_error(r, 403, "DENIED")
    r = call(registry, "dave", "DELETE", "/repositories/team-a/frozen", params={"dry_run": "true"})
    assert r.status_code == 200 and r.json()["dry_run"] is True
    assert set(r.json()["tags"]) == {"release-1", "latest"}
    tags = call(registry, "bob", "GET", "/repositories/team-a/frozen/-/tags").json()["tags"]
    assert [t["tag"] for t in tags] == ["latest", "release-1"]
    # An administrator may, as the operator's dockyard rm; with a token that says so.
    r = call(registry, "admin", "DELETE", "/repositories/team-a/frozen")
    assert_error(r, 403, "DENIED")
    assert ADMIN in r.json()["errors"][0]["message"]
    r = call(registry, "admin", "DELETE", "/repositories/team-a/frozen", extra_scopes=(ADMIN,))
    assert r.status_code == 200 and set(r.json()["tags"]) == {"release-1", "latest"}


def test_policies_as_configured(registry: InProcessDockyard) -> None:
    body = call(registry, "admin", "GET", "/policies").json()
    (policy,) = body["policies"]
    assert policy["repositories"] == ["team-a/*"]
    assert policy["immutabletags"] == ["release-.*"]
    assert policy["retention"] == {"keeplatest": 10, "maxshare": 0.5}
    assert len(policy["retention_id"]) == 16
    assert body["quotas"] == [
        {"scope": "team-a/*", "limit": 1024**3},
        {"scope": "team-b/*", "limit": 1024**3},
    ]


# -- pages, filters and bad input, on a server without auth --------------------------------------


def test_pages_follow_link_and_next(start_server: ServerFactory) -> None:
    s = start_server()
    for i in range(5):
        s.push_image(f"page/r{i}", "t")
    s.push_image("other/x", "t")
    for i in range(5):
        s.push_image("page/r0", f"tag{i}")
    names, url, pages = [], f"{s.url}{ROOT}/repositories?n=2&q=page/", 0
    while url:
        r = requests.get(url)
        body = r.json()
        names += [x["name"] for x in body["repositories"]]
        pages += 1
        if body["next"] is None:
            assert "Link" not in r.headers
            url = None
        else:
            assert r.headers["Link"] == f'<{body["next"]}>; rel="next"'
            assert "q=page%2F" in body["next"]  # the filter stays on every page
            url = s.url + body["next"]
    assert names == [f"page/r{i}" for i in range(5)] and pages == 3
    tags = f"{s.url}{ROOT}/repositories/page/r0/-/tags"
    r = requests.get(tags, params={"n": 2, "last": "tag4"})
    assert r.json() == {"name": "page/r0", "tags": [], "next": None}  # after the last
    r = requests.get(tags, params={"n": 2, "last": "t"})  # "t" sorts before "tag0"
    assert [t["tag"] for t in r.json()["tags"]] == ["tag0", "tag1"]
    r = requests.get(tags, params={"n": 2, "last": "tag1"})
    assert [t["tag"] for t in r.json()["tags"]] == ["tag2", "tag3"]
    assert r.json()["next"] == f"{ROOT}/repositories/page/r0/-/tags?n=2&last=tag3"
    assert requests.get(f"{s.url}{ROOT}/repositories", params={"n": 0}).json() == {
        "repositories": [],
        "next": None,
    }
    # n is capped at catalog.maxentries (1000), not refused
    r = requests.get(f"{s.url}{ROOT}/repositories", params={"n": 10**17})
    assert r.status_code == 200 and len(r.json()["repositories"]) == 6


BAD_N = ["-1", "abc", "1e3", "99999999999999999999", "²", " 1", "0x10"]
BAD_NAMES = ["UPPER/case", "a..b", "a/.b", "x" * 300, "a_", "%2e%2e", "team%2Fapp"]


def test_bad_input_is_a_4xx_never_a_500(start_server: ServerFactory) -> None:
    s = start_server()
    s.push_image("fuzz/app", "t")
    base = s.url + ROOT
    for n in BAD_N:
        for path in ("/repositories", "/usage", "/repositories/fuzz/app/-/tags"):
            assert_error(
                requests.get(base + path, params={"n": n}), 400, "PAGINATION_NUMBER_INVALID"
            )
    for last in ["", "\x00", "é" * 500, "zzz", "../..", "a" * 4000]:
        for path in ("/repositories", "/repositories/fuzz/app/-/tags", "/usage"):
            assert requests.get(base + path, params={"last": last}).status_code == 200
    for q in ["\x00", "%", "_", "*", "é"]:
        assert requests.get(base + "/repositories", params={"q": q}).json()["next"] is None
    for name in BAD_NAMES:
        for method, path in (
            ("GET", f"/repositories/{name}"),
            ("GET", f"/repositories/{name}/-/tags"),
            ("DELETE", f"/repositories/{name}"),
            ("DELETE", f"/repositories/{name}/-/tags/t"),
            ("DELETE", f"/repositories/{name}/-/manifests/sha256:{'0' * 64}"),
        ):
            r = requests.request(method, base + path)
            assert_error(r, 400, "NAME_INVALID")
    for name in ["-a/b", "a/-", "a//b", "a/"]:  # no route: a segment never starts with "-"
        assert_error(requests.get(f"{base}/repositories/{name}"), 404, "UNSUPPORTED")
    for tag in ["-x", "." + "a", "a" * 200, "%20"]:
        r = requests.delete(f"{base}/repositories/fuzz/app/-/tags/{tag}")
        assert_error(r, 400, "TAG_INVALID")
    assert_error(
        requests.delete(f"{base}/repositories/fuzz/app/-/tags/nope"), 404, "MANIFEST_UNKNOWN"
    )
    for digest in ["sha256:abc", "md5:" + "0" * 32, "nope", "sha256:" + "G" * 64]:
        r = requests.delete(f"{base}/repositories/fuzz/app/-/manifests/{digest}")
        assert_error(r, 400, "DIGEST_INVALID")
    r = requests.delete(f"{base}/repositories/fuzz/app/-/manifests/sha256:{'0' * 64}")
    assert_error(r, 404, "MANIFEST_UNKNOWN")
    assert_error(requests.delete(f"{base}/repositories/fuzz/nothing"), 404, "NAME_UNKNOWN")
    for flag in ["yes", "2", "TRUE!"]:
        r = requests.delete(f"{base}/repositories/fuzz/app", params={"dry_run": flag})
        assert_error(r, 400, "UNSUPPORTED")
    for body in [
        b"[]",
        b"{",
        b'{"dry_run": "false"}',
        b'{"dryrun": false}',
        b'{"dry_run": 0}',
        b'{"repository": 5}',
        b"[" * 100000,
    ]:
        r = requests.post(f"{base}/retention", data=body)
        assert r.status_code in (400, 413), (body[:30], r.status_code)
        assert r.json()["errors"][0]["code"] in ("UNSUPPORTED", "SIZE_INVALID")
    assert_error(requests.post(f"{base}/retention", data=b" " * 70000), 413, "SIZE_INVALID")
    assert_error(requests.get(f"{base}/nothing"), 404, "UNSUPPORTED")
    assert_error(requests.put(f"{base}/repositories"), 405, "UNSUPPORTED")
    log = s.log()
    assert "Traceback" not in log and "level=error" not in log, log[-3000:]


def test_deletes_disabled_and_read_only_refuse_writes(start_server: ServerFactory) -> None:
    s = start_server(storage={"delete": {"enabled": False}})
    digest, _ = s.push_image("ro/app", "t")
    base = s.url + ROOT
    for method, path in (
        ("DELETE", "/repositories/ro/app/-/tags/t"),
        ("DELETE", f"/repositories/ro/app/-/manifests/{digest}"),
        ("DELETE", "/repositories/ro/app"),
    ):
        assert_error(requests.request(method, base + path), 405, "UNSUPPORTED")
    r = requests.post(f"{base}/retention", json={"dry_run": False})
    assert_error(r, 405, "UNSUPPORTED")
    assert requests.post(f"{base}/retention", json={"dry_run": True}).status_code == 200
    assert requests.delete(base + "/repositories/ro/app", params={"dry_run": "1"}).ok
    read_only = start_server(storage={"maintenance": {"readonly": {"enabled": True}}}, root=s.root)
    r = requests.post(f"{read_only.url}{ROOT}/retention", json={"dry_run": False})
    assert_error(r, 405, "UNSUPPORTED")
    assert "read-only" in r.json()["errors"][0]["message"]
    r = requests.delete(f"{read_only.url}{ROOT}/repositories/ro/app/-/tags/t")
    assert_error(r, 405, "UNSUPPORTED")


def test_deletes_and_retention_make_delete_events(start_server: ServerFactory) -> None:
    receiver = Receiver().start()
    try:
        s = start_server(
            notifications={
                "endpoints": [
                    {
                        "name": "test",
                        "url": receiver.url,
                        "timeout": "2s",
                        "backoff": "50ms",
                        "ignore": {"actions": ["push", "pull"]},
                    }
                ],
                "outbox": {"pollinterval": "50ms"},
            },
            policies=[{"repositories": ["ret/*"], "retention": {"keeplatest": 1}}],
        )
        base = s.url + ROOT
        s.push_image("ev/app", "a")
        untagged, _ = s.push_image("ev/app", None)
        s.push_image("ev/gone", "x")
        for tag in ("1", "2", "3"):
            s.push_image("ret/app", tag)
            time.sleep(0.02)  # distinct push times: keeplatest keeps the last
        assert requests.delete(f"{base}/repositories/ev/app/-/tags/a").ok
        assert requests.delete(f"{base}/repositories/ev/app/-/manifests/{untagged}").ok
        assert requests.delete(f"{base}/repositories/ev/gone").ok
        dry = requests.post(f"{base}/retention").json()  # an empty body is a dry run
        assert dry["dry_run"] is True
        (planned,) = dry["repositories"]
        assert [t["tag"] for t in planned["tags"] if t["action"] == "delete"] == ["1", "2"]
        # A policy's first run only reports until confirmed.
        first = requests.post(f"{base}/retention", json={"dry_run": False}).json()
        assert first["repositories"][0]["withheld"] and not first["repositories"][0]["deleted_tags"]
        r = requests.post(f"{base}/retention", json={"dry_run": False, "confirm": True})
        assert r.status_code == 200, r.text
        assert sorted(r.json()["repositories"][0]["deleted_tags"]) == ["1", "2"]
        left = requests.get(f"{base}/repositories/ret/app/-/tags").json()["tags"]
        assert [t["tag"] for t in left] == ["3"]
        deadline = time.monotonic() + 20
        while True:  # the retention run's events come last
            events = receiver.events()
            targets = [(e["target"].get("repository"), e["target"].get("tag")) for e in events]
            if {("ret/app", "1"), ("ret/app", "2")} <= set(targets) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert ("ev/app", "a") in targets
        assert any(e["target"].get("digest") == untagged for e in events)
        assert any(e["target"].get("dockyard") == {"kind": "repository"} for e in events)
        assert {("ret/app", "1"), ("ret/app", "2")} <= set(targets)
        assert {e["action"] for e in events} == {"delete"}
        assert all(e["request"]["method"] in ("DELETE", "POST") for e in events)
    finally:
        receiver.stop()


# -- administrators with htpasswd and with an external token server -----------------------------


def test_htpasswd_admins(start_server: ServerFactory, tmp_path: Path) -> None:
    write_users(tmp_path / "users", {"alice": "alicepw", "bob": "bobpw"})
    s = start_server(
        auth={"htpasswd": {"realm": "R", "path": str(tmp_path / "users"), "admins": ["alice"]}}
    )
    s.session.auth = ("bob", "bobpw")
    s.push_image("team/app", "1")
    base = s.url + ROOT
    r = requests.get(f"{base}/policies")
    assert_error(r, 401, "UNAUTHORIZED")
    assert r.headers["WWW-Authenticate"] == 'Basic realm="R"'
    for method, path in (("GET", "/policies"), ("POST", "/retention")):
        r = requests.request(method, base + path, auth=("bob", "bobpw"))
        assert_error(r, 403, "DENIED")
        assert r.json()["errors"][0]["detail"] == {"scope": ADMIN}
        assert requests.request(method, base + path, auth=("alice", "alicepw")).status_code == 200
    assert requests.get(f"{base}/usage", auth=("bob", "bobpw")).json()["admin"] is False
    assert requests.get(f"{base}/usage", auth=("alice", "alicepw")).json()["admin"] is True
    # Everyone may pull and delete everything, as registry:2 has it.
    names = requests.get(f"{base}/repositories", auth=("bob", "bobpw")).json()["repositories"]
    assert [x["name"] for x in names] == ["team/app"]
    r = requests.delete(f"{base}/repositories/team/app/-/tags/1", auth=("bob", "bobpw"))
    assert r.status_code == 200 and r.json()["tag"] == "1"
    assert_error(requests.get(f"{base}/usage", auth=("bob", "wrong")), 401, "UNAUTHORIZED")


def test_external_token_server_admin_scope(start_server: ServerFactory, tmp_path: Path) -> None:
    key, bundle = token_signer(tmp_path)
    s = start_server(auth=token_auth(bundle))
    base = s.url + ROOT
    r = requests.get(f"{base}/policies")
    assert r.status_code == 401 and f'scope="{ADMIN}"' in r.headers["WWW-Authenticate"]
    catalog = sign_token(key, [{"type": "registry", "name": "catalog", "actions": ["*"]}])
    admin = sign_token(key, [{"type": "dockyard", "name": "admin", "actions": ["*"]}])
    r = requests.get(f"{base}/policies", headers={"Authorization": f"Bearer {catalog}"})
    assert_error(r, 403, "DENIED")
    assert requests.get(f"{base}/policies", headers={"Authorization": f"Bearer {admin}"}).ok
    both = sign_token(
        key,
        [
            {"type": "registry", "name": "catalog", "actions": ["*"]},
            {"type": "dockyard", "name": "admin", "actions": ["*"]},
        ],
    )
    usage = requests.get(f"{base}/usage", headers={"Authorization": f"Bearer {both}"}).json()
    assert usage["admin"] is True


# -- the CLI's remote mode -------------------------------------------------------------------


def test_remote_client_with_a_password_and_with_an_identity_token(
    registry: InProcessDockyard,
) -> None:
    """The client the commands use, in this process: the challenge, a token per scope kept for
    the run, every page followed; and docker's identity token (a refresh token) redeemed with
    OAuth2's POST."""
    for i in range(3):
        push(registry, f"team-a/client{i}", "1")
    client = remote_client(f"http://127.0.0.1:{registry.port}", username="bob", password="bobpw")
    pages = list(client.pages("/repositories", {"q": "team-a/client", "n": 1}))
    assert [p["repositories"][0]["name"] for p in pages] == [f"team-a/client{i}" for i in range(3)]
    assert len(client._tokens) == 1  # one token, for registry:catalog:*, served every page
    assert client.request("GET", "/repositories/team-a/client0/-/tags")["tags"][0]["tag"] == "1"
    with pytest.raises(RemoteError) as refused:
        client.request("GET", "/policies")
    assert (refused.value.status, refused.value.code) == (403, "DENIED")

    r = requests.get(
        f"{registry.url}/auth/token",
        auth=("admin", "adminpw"),
        params={"service": SERVICE, "offline_token": "true", "client_id": "docker"},
    )
    refresh = r.json()["refresh_token"]
    admin = RemoteClient(
        f"http://127.0.0.1:{registry.port}",
        Credentials("", refresh, identity_token=True, source="test"),
        extra_scopes=(ADMIN,),
    )
    assert admin.request("GET", "/usage")["admin"] is True
    assert admin.request("POST", "/retention", body={"dry_run": True})["dry_run"] is True
    anonymous = RemoteClient(f"http://127.0.0.1:{registry.port}", None)
    with pytest.raises(RemoteError) as refused:
        anonymous.request("GET", "/repositories")
    assert refused.value.status in (401, 403)


@pytest.mark.slow  # a dozen commands, each a new interpreter
def test_cli_remote_mode(registry: InProcessDockyard, tmp_path: Path) -> None:
    push(registry, "team-a/cli", "1.0")
    push(registry, "team-b/cli", "1.0")
    host = f"127.0.0.1:{registry.port}"
    admin_config = tmp_path / "admin"
    admin_config.mkdir()
    (admin_config / "config.json").write_text(
        json.dumps({"auths": {host: {"auth": base64.b64encode(b"admin:adminpw").decode()}}})
    )
    env = {"DOCKER_CONFIG": str(admin_config), "DOCKYARD_URL": ""}
    url = f"http://{host}"
    r = dockyard("du", "--url", url, "--json", env=env)
    assert r.returncode == 0, r.stderr
    usage = json.loads(r.stdout)
    assert usage["admin"] is True and usage["total"]["bytes"] > 0
    assert {"team-a/cli", "team-b/cli"} <= {x["name"] for x in usage["repositories"]}
    r = dockyard("du", "--url", url, env=env)
    assert r.returncode == 0, r.stderr
    assert "team-b/cli" in r.stdout and "QUOTA" in r.stdout and "registry:" in r.stdout

    # bob, through a credential helper: only what bob may pull; no administration.
    helper_dir = tmp_path / "bin"
    helper_dir.mkdir()
    helper = helper_dir / "docker-credential-fake"
    helper.write_text(
        "#!/bin/sh\nread server\n"
        'echo "{\\"ServerURL\\": \\"$server\\", \\"Username\\": \\"bob\\", '
        '\\"Secret\\": \\"bobpw\\"}"\n'
    )
    helper.chmod(0o755)
    bob_config = tmp_path / "bob"
    bob_config.mkdir()
    (bob_config / "config.json").write_text(json.dumps({"credHelpers": {host: "fake"}}))
    env = {
        "DOCKER_CONFIG": str(bob_config),
        "PATH": f"{helper_dir}{os.pathsep}{os.environ['PATH']}",
    }
    r = dockyard("repos", "--url", url, "--json", env=env)
    assert r.returncode == 0, r.stderr
    names = [x["name"] for x in json.loads(r.stdout)]
    assert "team-a/cli" in names and "team-b/cli" not in names
    r = dockyard("tags", "team-a/cli", "--url", url, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].split() == ["TAG", "DIGEST", "SIZE", "PUSHED", "PULLED"]
    assert r.stdout.splitlines()[1].startswith("1.0 ")
    r = dockyard("api", "GET", "/policies", "--url", url, env=env)
    assert r.returncode == 1 and "DENIED" in r.stderr
    r = dockyard("tags", "team-a/none", "--url", url, env=env)
    assert r.returncode == 3 and "NAME_UNKNOWN" in r.stderr
    r = dockyard("du", "--url", url, "--json", env=env)
    assert json.loads(r.stdout)["admin"] is False

    # --username with --password-stdin; a wrong password is a 401, said once.
    r = dockyard(
        "api",
        "POST",
        "/retention",
        "--url",
        url,
        "-u",
        "admin",
        "--password-stdin",
        env={"DOCKER_CONFIG": str(tmp_path / "none")},
        stdin="adminpw\n",
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["dry_run"] is True
    r = dockyard(
        "repos",
        "--url",
        url,
        "-u",
        "admin",
        "--password-stdin",
        env={"DOCKER_CONFIG": str(tmp_path / "none")},
        stdin="wrong\n",
    )
    assert r.returncode == 1 and "UNAUTHORIZED" in r.stderr
    r = dockyard("repos", env={"DOCKYARD_URL": ""})
    assert r.returncode == 2 and "--url" in r.stderr


@pytest.mark.slow  # each command a new interpreter
def test_cli_remote_rm_and_retention(start_server: Any, tmp_path: Path) -> None:
    """``dockyard rm --url`` and ``dockyard retention --url`` do through the API what they do
    on the store, with the same output and exit statuses."""
    s = start_server(policies=[{"repositories": ["ret/*"], "retention": {"keeplatest": 1}}])
    for tag in ("1", "2", "3"):
        s.push_image("ret/app", tag)
        time.sleep(0.02)  # distinct push times
    s.push_image("gone/app", "x")
    env = {"DOCKER_CONFIG": str(tmp_path), "DOCKYARD_URL": ""}
    url = s.url
    r = dockyard("retention", "--url", url, "--dry-run", env=env)
    assert r.returncode == 0, r.stderr
    assert "would delete tag ret/app:1" in r.stdout and "would delete tag ret/app:2" in r.stdout
    r = dockyard("retention", "--url", url, env=env)
    assert r.returncode == 4, (r.stdout, r.stderr)  # a first run only reports
    assert "only reported" in r.stdout
    r = dockyard("retention", "--url", url, "--confirm", "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert sorted(json.loads(r.stdout)["repositories"][0]["deleted_tags"]) == ["1", "2"]

    r = dockyard("rm", "gone/app", "--url", url, "--dry-run", env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("would remove repository gone/app: 1 tags, 1 manifests")
    assert s.session.head(s.v2("gone/app/manifests/x")).status_code == 200
    r = dockyard("rm", "gone/app", "--url", url, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("removed repository gone/app")
    assert s.session.head(s.v2("gone/app/manifests/x")).status_code == 404
    r = dockyard("rm", "gone/app", "--url", url, env=env)
    assert r.returncode == 3 and "no repository named gone/app" in r.stderr
