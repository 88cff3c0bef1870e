"""htpasswd entries for tests, hashed the way `htpasswd -B` does (bcrypt)."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from pathlib import Path

import bcrypt


def hash_password(password: str) -> str:
    """A bcrypt htpasswd hash. Cost 10 (htpasswd's default 5 is weaker than any real
    deployment; more only slows the tests)."""
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=10)).decode()


def write_htpasswd(path: Path, users: Mapping[str, str]) -> Path:
    """An htpasswd file of `users` (name -> password) at `path`."""
    path.write_text(
        "".join(f"{user}:{hash_password(pw)}\n" for user, pw in users.items()), encoding="utf-8"
    )
    return path


def basic(user: str, password: str) -> dict[str, str]:
    """The `Authorization` header of HTTP Basic."""
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}
