"""The JSON API's OpenAPI 3.1 description, served unauthenticated beside it:
``GET /dockyard/api/v1/openapi.json``.

Written by hand, here, beside the handlers it describes; ``tests/api/test_json_api.py`` exercises
every operation it lists (with a caller who may and one who may not) and validates each answer
against the schema declared for it, so the description cannot drift from what is served.
``x-dockyard-scope`` on an operation names the token scope it needs (``{name}`` is the
repository), which is also the scope its 401 challenge names."""

from __future__ import annotations

from functools import cache
from typing import Any

from aiohttp import web

from dockyard import __version__
from dockyard.api.v1.common import DEFAULT_PAGE, ROOT
from dockyard.http.responses import json_response

#: the distribution spec's repository name grammar
NAME_REGEX = r"^[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*$"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"oneOf": [schema, {"type": "null"}]}


def _object(properties: dict[str, Any], *, optional: tuple[str, ...] = ()) -> dict[str, Any]:
    """A closed object: every property required unless ``optional``, nothing else allowed (so
    the tests catch a field served but not described, and the reverse)."""
    return {
        "type": "object",
        "properties": properties,
        "required": [k for k in properties if k not in optional],
        "additionalProperties": False,
    }


_STRING = {"type": "string"}
_COUNT = {"type": "integer", "minimum": 0}
_TIME = {"type": ["string", "null"], "format": "date-time"}
_STRINGS = {"type": "array", "items": _STRING}
_NEXT = {
    "type": ["string", "null"],
    "description": "The next page's URL (relative, as the `Link` header's); null on the last page.",
}

SCHEMAS: dict[str, Any] = {
    "Error": {
        "description": "The distribution spec's error body, as the registry API answers.",
        "type": "object",
        "required": ["errors"],
        "properties": {
            "errors": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "required": ["code", "message"],
                    "properties": {"code": _STRING, "message": _STRING, "detail": {}},
                },
            }
        },
    },
    "Repository": _object(
        {
            "name": _STRING,
            "tags": _COUNT,
            "manifests": _COUNT,
            "size": {
                **_COUNT,
                "description": "Bytes of the distinct blobs the repository uses (manifests, "
                "configs, layers, blobs linked without a manifest).",
            },
            "pushed": {**_TIME, "description": "The latest tag push; null without tags."},
            "pulled": {**_TIME, "description": "The latest manifest pull; null if never."},
        }
    ),
    "RepositoryPage": _object(
        {"repositories": {"type": "array", "items": _ref("Repository")}, "next": _NEXT}
    ),
    "Tag": _object(
        {
            "tag": _STRING,
            "digest": _STRING,
            "media_type": {"type": ["string", "null"]},
            "size": {
                "type": ["integer", "null"],
                "minimum": 0,
                "description": "The manifest's bytes plus those of the blobs it references "
                "directly (an image's config and layers; an index's children count on their "
                "own).",
            },
            "pushed": {"type": "string", "format": "date-time"},
            "pulled": _TIME,
        }
    ),
    "TagPage": _object(
        {"name": _STRING, "tags": {"type": "array", "items": _ref("Tag")}, "next": _NEXT}
    ),
    "TagDeleted": _object({"repository": _STRING, "tag": _STRING, "digest": _STRING}),
    "ManifestDeleted": _object({"repository": _STRING, "digest": _STRING, "tags": _STRINGS}),
    "RepositoryDeletion": _object(
        {
            "repository": _STRING,
            "dry_run": {"type": "boolean"},
            "tags": {
                "type": "object",
                "additionalProperties": _STRING,
                "description": "Each tag removed, with the digest it pointed to.",
            },
            "manifests": _STRINGS,
            "layer_links": _COUNT,
            "uploads": _STRINGS,
            "passes": _COUNT,
            "settled": {
                "type": "boolean",
                "description": "False when pushes kept arriving during the deletion: what they "
                "wrote last may remain; delete again.",
            },
            "seconds": {"type": "number", "minimum": 0},
        }
    ),
    "ScopeUsage": _object(
        {
            "scope": {
                **_STRING,
                "description": "A repository, a namespace (`team-a/*`) or `*`.",
            },
            "limit": {
                "type": ["integer", "null"],
                "description": "The quota's limit in bytes; null for the registry's total.",
            },
            "bytes": {
                **_COUNT,
                "description": "The distinct blobs used within the scope, each once, plus "
                "`uploading`.",
            },
            "blobs": _COUNT,
            "repositories": _COUNT,
            "uploading": {**_COUNT, "description": "Bytes of uploads in progress."},
        }
    ),
    "RepositoryUsage": _object(
        {
            "name": _STRING,
            "tags": _COUNT,
            "manifests": _COUNT,
            "size": _COUNT,
            "blobs": _COUNT,
            "uploading": _COUNT,
            "unique": {
                "type": ["integer", "null"],
                "minimum": 0,
                "description": "Administrators: the bytes of its blobs no other repository "
                "uses (what deleting it alone would let a collection reclaim); null for others.",
            },
            "quotas": {**_STRINGS, "description": "The scopes of the quotas that hold it."},
        }
    ),
    "Usage": _object(
        {
            "admin": {
                "type": "boolean",
                "description": "Whether the caller is an administrator (then `total` and every "
                "quota are given).",
            },
            "total": _nullable(_ref("ScopeUsage")),
            "quotas": {"type": "array", "items": _ref("ScopeUsage")},
            "repositories": {"type": "array", "items": _ref("RepositoryUsage")},
            "next": _NEXT,
        }
    ),
    "Policy": _object(
        {
            "repositories": _STRINGS,
            "immutabletags": _STRINGS,
            "retention": {
                "type": ["object", "null"],
                "description": "The retention rules as configured (periods as `7d`).",
            },
            "retention_id": {
                "type": ["string", "null"],
                "description": "The id a confirmed first run is recorded under.",
            },
        }
    ),
    "Policies": _object(
        {
            "policies": {"type": "array", "items": _ref("Policy")},
            "quotas": {
                "type": "array",
                "items": _object({"scope": _STRING, "limit": _COUNT}),
            },
        }
    ),
    "RetentionRequest": _object(
        {
            "dry_run": {
                "type": "boolean",
                "default": True,
                "description": "Only `false` deletes: an empty body is a dry run.",
            },
            "confirm": {
                "type": "boolean",
                "default": False,
                "description": "Apply what is otherwise only reported: a policy's first run, "
                "a repository where more than the policy's `maxshare` of the tags would go.",
            },
            "repository": {
                **_STRING,
                "description": "Only the repositories matching this glob (`*` crosses `/`).",
            },
        },
        optional=("dry_run", "confirm", "repository"),
    ),
    "TagVerdict": {
        "type": "object",
        "required": ["tag", "digest", "action", "rules", "reason"],
        "properties": {
            "tag": _STRING,
            "digest": _STRING,
            "action": {"enum": ["keep", "delete"]},
            "rules": _STRINGS,
            "reason": _STRING,
            "spared": {"type": "boolean"},
        },
    },
    "ManifestVerdict": {
        "type": "object",
        "required": ["digest", "action", "reason"],
        "properties": {
            "digest": _STRING,
            "action": {"enum": ["keep", "delete"]},
            "reason": _STRING,
            "spared": {"type": "boolean"},
        },
    },
    "RetentionRepository": {
        "type": "object",
        "required": [
            "repository",
            "policy",
            "policy_id",
            "rules",
            "share",
            "tags",
            "manifests",
            "order",
            "withheld",
            "deleted_tags",
            "deleted_manifests",
            "spared",
            "errors",
        ],
        "properties": {
            "repository": _STRING,
            "policy": _STRINGS,
            "policy_id": _STRING,
            "rules": {"type": "object"},
            "share": {"type": "number", "minimum": 0, "maximum": 1},
            "tags": {"type": "array", "items": _ref("TagVerdict")},
            "manifests": {"type": "array", "items": _ref("ManifestVerdict")},
            "order": {**_STRINGS, "description": "The manifests to delete, in order."},
            "withheld": {
                "type": ["string", "null"],
                "description": "Why the deletions were only reported (a first run, too large "
                "a share).",
            },
            "deleted_tags": _STRINGS,
            "deleted_manifests": _STRINGS,
            "spared": _STRINGS,
            "errors": _STRINGS,
        },
    },
    "RetentionReport": _object(
        {
            "dry_run": {"type": "boolean"},
            "confirm": {"type": "boolean"},
            "repositories": {"type": "array", "items": _ref("RetentionRepository")},
            "confirmed_policies": _STRINGS,
            "errors": _STRINGS,
            "seconds": {"type": "number", "minimum": 0},
        }
    ),
}


def _error(description: str, **headers: str) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": _ref("Error")}},
    }
    if headers:
        response["headers"] = {
            name: {"description": text, "schema": _STRING} for name, text in headers.items()
        }
    return response


RESPONSES: dict[str, Any] = {
    "BadRequest": _error(
        "A malformed parameter or body: `PAGINATION_NUMBER_INVALID` (`n`), `NAME_INVALID`, "
        "`TAG_INVALID`, `DIGEST_INVALID`, or `UNSUPPORTED` (a flag, a body field)."
    ),
    "Unauthorized": _error(
        "`UNAUTHORIZED`: no credentials, or wrong ones.",
        **{
            "WWW-Authenticate": "`Basic realm=...` (htpasswd), or `Bearer realm=...,service=...,"
            'scope="<the scope this operation needs>"`: where to get a token, and for what.'
        },
    ),
    "Forbidden": _error(
        "`DENIED`: authenticated, without the right (or the tag is immutable, or a quota refuses).",
        **{"WWW-Authenticate": "The Bearer challenge naming the scope needed, for a wider token."},
    ),
    "NotFound": _error("`NAME_UNKNOWN` (no such repository) or `MANIFEST_UNKNOWN`."),
    "NotAllowed": _error(
        "`UNSUPPORTED`: deletes are off (`storage.delete.enabled`), the server is read-only, or "
        "the repository is a pull-through cache."
    ),
    "Unavailable": _error(
        "`UNAVAILABLE`: writes are paused (an immediate garbage collection).",
        **{"Retry-After": "Seconds to wait."},
    ),
    "TooManyRequests": _error(
        "`TOOMANYREQUESTS`: too many failed logins from this address.",
        **{"Retry-After": "Seconds to wait."},
    ),
    "Conflict": _error(
        "`UNAVAILABLE`: another retention run holds the lease.",
        **{"Retry-After": "Seconds to wait."},
    ),
    "TooLarge": _error("`SIZE_INVALID`: the body is larger than 64 KiB."),
}

_PARAMETERS: dict[str, Any] = {
    "name": {
        "name": "name",
        "in": "path",
        "required": True,
        "description": "The repository. It may hold `/`, written as is (not `%2F`, which is "
        "refused): `/repositories/team/app/-/tags`. `/-/` ends the name.",
        "schema": {"type": "string", "pattern": NAME_REGEX, "maxLength": 255},
    },
    "n": {
        "name": "n",
        "in": "query",
        "description": f"Page size (default {DEFAULT_PAGE}; at most `catalog.maxentries`, "
        "default 1000).",
        "schema": {"type": "integer", "minimum": 0},
    },
    "last": {
        "name": "last",
        "in": "query",
        "description": "Where the previous page ended (its last name or tag): the page starts "
        "after it.",
        "schema": _STRING,
    },
    "q": {
        "name": "q",
        "in": "query",
        "description": "Only repositories whose name contains this.",
        "schema": _STRING,
    },
    "tag": {"name": "tag", "in": "path", "required": True, "schema": _STRING},
    "digest": {
        "name": "digest",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "examples": ["sha256:" + "0" * 64]},
    },
    "dry_run": {
        "name": "dry_run",
        "in": "query",
        "description": "`true`: report what would be removed, change nothing.",
        "schema": {"type": "boolean", "default": False},
    },
}


def _param(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/parameters/{name}"}


def _ok(description: str, schema: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": _ref(schema)}},
    }


def _responses(ok: dict[str, Any], *errors: tuple[int, str]) -> dict[str, Any]:
    out: dict[str, Any] = {"200": ok}
    for status, name in (
        (401, "Unauthorized"),
        (403, "Forbidden"),
        (429, "TooManyRequests"),
        *errors,
    ):
        out[str(status)] = {"$ref": f"#/components/responses/{name}"}
    return dict(sorted(out.items()))


_PAGE_ERRORS = ((400, "BadRequest"),)
_WRITE_ERRORS = (
    (400, "BadRequest"),
    (404, "NotFound"),
    (405, "NotAllowed"),
    (503, "Unavailable"),
)


def _operation(
    operation_id: str,
    summary: str,
    description: str,
    scope: str,
    parameters: list[str],
    responses: dict[str, Any],
) -> dict[str, Any]:
    return {
        "operationId": operation_id,
        "summary": summary,
        "description": description,
        "x-dockyard-scope": scope,
        "parameters": [_param(p) for p in parameters],
        "responses": responses,
    }


def _paths() -> dict[str, Any]:
    one = "/repositories/{name}"
    return {
        "/repositories": {
            "get": _operation(
                "listRepositories",
                "The repositories the caller may pull",
                "Sorted by name, with tag and manifest counts, size and the latest push and "
                "pull, from the metadata index. Filtered by the catalog's rule: everything for "
                "htpasswd users, what the token server's rules let the token's subject pull.",
                "registry:catalog:*",
                ["n", "last", "q"],
                _responses(_ok("A page of repositories.", "RepositoryPage"), *_PAGE_ERRORS),
            )
        },
        one: {
            "get": _operation(
                "getRepository",
                "One repository's summary",
                "Its tag and manifest counts, size and latest push and pull.",
                "repository:{name}:pull",
                ["name"],
                _responses(
                    _ok("The repository.", "Repository"), (400, "BadRequest"), (404, "NotFound")
                ),
            ),
            "delete": _operation(
                "deleteRepository",
                "Delete a whole repository",
                "Its tags, manifests, layer links and uploads in progress; blobs only it used "
                "are reclaimed by the next garbage collection. Repositories nested in it stay. "
                "Needs the delete right on it and `storage.delete.enabled`; a repository with "
                "an immutable tag is refused (403) except to administrators. Delete events "
                "are sent as for `dockyard rm`.",
                "repository:{name}:delete",
                ["name", "dry_run"],
                _responses(
                    _ok("What was removed (or would be).", "RepositoryDeletion"), *_WRITE_ERRORS
                ),
            ),
        },
        one + "/-/tags": {
            "get": _operation(
                "listTags",
                "A repository's tags",
                "Sorted, each with the manifest's digest, media type and size, when the tag was "
                "pushed and when its manifest was last pulled. A page costs a page however many "
                "tags the repository has.",
                "repository:{name}:pull",
                ["name", "n", "last"],
                _responses(
                    _ok("A page of tags.", "TagPage"), (400, "BadRequest"), (404, "NotFound")
                ),
            )
        },
        one + "/-/tags/{tag}": {
            "delete": _operation(
                "deleteTag",
                "Delete a tag",
                "Only the tag; its manifest stays. As `DELETE /v2/<name>/manifests/<tag>`: the "
                "same right, refusals (an immutable tag: 403) and delete event.",
                "repository:{name}:delete",
                ["name", "tag"],
                _responses(_ok("The tag deleted.", "TagDeleted"), *_WRITE_ERRORS),
            )
        },
        one + "/-/manifests/{digest}": {
            "delete": _operation(
                "deleteManifest",
                "Delete a manifest and its tags",
                "As `DELETE /v2/<name>/manifests/<digest>`: the same right, refusals (a tag on "
                "it is immutable: 403, nothing removed) and delete events.",
                "repository:{name}:delete",
                ["name", "digest"],
                _responses(_ok("The manifest deleted.", "ManifestDeleted"), *_WRITE_ERRORS),
            )
        },
        "/usage": {
            "get": _operation(
                "getUsage",
                "Space used",
                "A page of the repositories the caller may pull with their usage and the "
                "quotas holding them, and those quotas' usage beside their limits. "
                "Administrators (a token with `dockyard:admin:*`, or an htpasswd admin) also get "
                "the registry's total and every quota.",
                "registry:catalog:*",
                ["n", "last", "q"],
                _responses(_ok("Usage.", "Usage"), *_PAGE_ERRORS),
            )
        },
        "/policies": {
            "get": _operation(
                "getPolicies",
                "The configured policies and quotas (administrators)",
                "`policies` in order (the first matching a repository is its policy) with "
                "their retention rules, and `quotas`.",
                "dockyard:admin:*",
                [],
                _responses(_ok("The policies.", "Policies")),
            )
        },
        "/retention": {
            "post": {
                **_operation(
                    "runRetention",
                    "Run the retention policies (administrators)",
                    "What `dockyard retention` does, on the server, answered with its report. A "
                    'dry run unless the body says `"dry_run": false`; a run that deletes needs '
                    "a writable server with `storage.delete.enabled`, and makes delete events. "
                    "One run at a time across instances (409 while another runs).",
                    "dockyard:admin:*",
                    [],
                    _responses(
                        _ok("The run's report.", "RetentionReport"),
                        (400, "BadRequest"),
                        (405, "NotAllowed"),
                        (409, "Conflict"),
                        (413, "TooLarge"),
                        (503, "Unavailable"),
                    ),
                ),
                "requestBody": {
                    "required": False,
                    "content": {"application/json": {"schema": _ref("RetentionRequest")}},
                },
            }
        },
        "/openapi.json": {
            "get": {
                "operationId": "getOpenAPI",
                "summary": "This description",
                "description": "Served without authentication.",
                "security": [],
                "responses": {
                    "200": {
                        "description": "The OpenAPI 3.1 document.",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    }
                },
            }
        },
    }


@cache
def document(prefix: str) -> dict[str, Any]:
    """The description for a server under ``http.prefix`` ``prefix`` (paths are relative to
    its ``servers`` URL)."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Dockyard JSON API",
            "version": f"1 (Dockyard {__version__})",
            "description": "Repositories, tags, usage and policies of a Dockyard registry, "
            "authenticated and authorised like its registry API: the same Basic credentials "
            "(htpasswd) or bearer tokens, whose 401 challenges name the scope an operation "
            "needs. Read operations answer for what the caller may pull. Lists are pages: "
            "`n` and `last` as the registry's catalog, the next page in `Link` and `next`.",
        },
        "servers": [{"url": prefix + ROOT}],
        "security": [{"basic": []}, {"bearer": []}],
        "paths": _paths(),
        "components": {
            "schemas": SCHEMAS,
            "responses": RESPONSES,
            "parameters": _PARAMETERS,
            "securitySchemes": {
                "basic": {
                    "type": "http",
                    "scheme": "basic",
                    "description": "With `auth.htpasswd`. Administrators: `auth.htpasswd.admins`.",
                },
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "JWT",
                    "description": "With `auth.token`: a token from the realm a 401 challenge "
                    "names, for the scope it names (Docker's token protocol). Administrators "
                    "hold `dockyard:admin:*`, which the built-in token server grants its "
                    "`admins`.",
                },
            },
        },
    }


def routes(prefix: str) -> list[web.AbstractRouteDef]:
    async def openapi(request: web.Request) -> web.Response:
        # No need declared: the description is public, as the routes it lists are not.
        return json_response(document(prefix))

    return [web.get(f"{prefix}{ROOT}/openapi.json", openapi)]
