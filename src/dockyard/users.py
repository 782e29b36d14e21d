"""Editing htpasswd files (``dockyard user ...``): bcrypt entries in the ``$2y$`` form Apache's
``htpasswd -B`` writes, so no apache2-utils is needed. Lines for other users are kept as they are;
the file is replaced atomically, keeping its permissions (new files are created 0600)."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile

from dockyard.auth.htpasswd import hash_password


class UserFileError(Exception):
    pass


def _read_lines(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise UserFileError(f"cannot read {path}: {exc.strerror}") from None


def _user_of(line: str) -> str | None:
    text = line.strip()
    if not text or text.startswith("#") or ":" not in text:
        return None
    return text.split(":", 1)[0]


def list_users(path: str) -> list[str]:
    return [u for u in (_user_of(line) for line in _read_lines(path)) if u is not None]


def _write(path: str, lines: list[str]) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        mode = 0o600
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".htpasswd-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def set_password(path: str, user: str, password: str, *, create: bool) -> None:
    """``create``: add a new user (error if present); otherwise change an existing one."""
    if not user or ":" in user or any(c.isspace() for c in user):
        raise UserFileError(f"invalid user name {user!r}")
    if not password:
        raise UserFileError("the password is empty")
    lines = _read_lines(path)
    entry = f"{user}:{hash_password(password)}"
    index = next((i for i, line in enumerate(lines) if _user_of(line) == user), None)
    if create:
        if index is not None:
            raise UserFileError(f"user {user!r} already exists (use 'dockyard user passwd')")
        lines.append(entry)
    else:
        if index is None:
            raise UserFileError(f"no user {user!r} in {path}")
        lines[index] = entry
    _write(path, lines)


def remove_user(path: str, user: str) -> None:
    lines = _read_lines(path)
    kept = [line for line in lines if _user_of(line) != user]
    if len(kept) == len(lines):
        raise UserFileError(f"no user {user!r} in {path}")
    _write(path, kept)
