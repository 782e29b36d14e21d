"""Repository names and tags, with the grammar of the distribution spec."""

from __future__ import annotations

import re

from dockyard.errors import ErrorCode, RegistryError

_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_NAME = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*\Z")
_TAG = re.compile(r"^[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}\Z")

#: registry:2 caps the name at 255 characters (the spec counts the host too).
MAX_NAME_LENGTH = 255


def validate_name(name: str) -> str:
    if len(name) > MAX_NAME_LENGTH or not _NAME.match(name):
        raise RegistryError(ErrorCode.NAME_INVALID, "invalid repository name", {"name": name})
    return name


def validate_tag(tag: str) -> str:
    if not _TAG.match(tag):
        raise RegistryError(ErrorCode.TAG_INVALID, "invalid tag", {"tag": tag})
    return tag
