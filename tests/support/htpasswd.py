"""htpasswd entries for tests, hashed the way `htpasswd -B` does (bcrypt)."""

from __future__ import annotations

import bcrypt


def hash_password(password: str) -> str:
    """A bcrypt htpasswd hash. Cost 10 (htpasswd's default 5 is weaker than any real
    deployment; more only slows the tests)."""
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=10)).decode()
