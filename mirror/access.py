"""Who the client is, and what it may pull.

Clients authenticate with HTTP Basic against an htpasswd file of bcrypt entries (as
`htpasswd -B` writes them), answered with `WWW-Authenticate: Basic realm=...` so
`docker login`, containerd, podman and skopeo all work. The file is re-read when it
changes. bcrypt is slow by design, so a verified (user, password) pair is remembered
for a few minutes, keyed by an HMAC under a per-process secret (never the password).

Access rules say which users, groups or anonymous clients may pull which upstreams and
repositories (globs). They are checked right after routing, before any cache or
upstream work: no credentials where some are needed is 401 UNAUTHORIZED, credentials
that lack the right are 403 DENIED.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from base64 import b64decode
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

import bcrypt
import structlog

from mirror.config import AuthConfig
from mirror.errors import Denied, Unauthorized

log = structlog.get_logger(__name__)

VERIFIED_FOR = 300.0
BCRYPT_MAX_PASSWORD = 72  # bytes
# A real bcrypt hash to check against for unknown users, so the answer takes as long
# as for known ones and does not tell which user names exist.
_DUMMY_HASH = bcrypt.hashpw(b"not a password", bcrypt.gensalt(rounds=10))


@dataclass(frozen=True, slots=True)
class Principal:
    user: str | None  # None: anonymous
    groups: frozenset[str] = frozenset()


ANONYMOUS = Principal(None)


class Htpasswd:
    """bcrypt entries from an htpasswd file, re-read when the file changes."""

    def __init__(self, path: Path):
        self._path = path
        self._stamp: tuple[int, int] | None = None
        self._entries: dict[str, bytes] = {}
        self._verified: dict[bytes, float] = {}
        self._key = secrets.token_bytes(32)
        self.reload_if_changed()

    def reload_if_changed(self) -> None:
        try:
            stat = self._path.stat()
        except OSError as exc:
            log.error("htpasswd_unreadable", path=str(self._path), error=exc.strerror)
            return
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp == self._stamp:
            return
        entries = {}
        for number, line in enumerate(self._path.read_text(encoding="utf-8").splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            user, sep, hashed = line.partition(":")
            if not sep or not hashed.startswith(("$2y$", "$2b$", "$2a$")):
                log.warning("htpasswd_entry_skipped", line=number, reason="not a bcrypt entry")
                continue
            entries[user] = hashed.encode()
        self._entries, self._stamp = entries, stamp
        self._verified.clear()  # a changed password must not stay accepted
        log.info("htpasswd_loaded", path=str(self._path), users=len(entries))

    async def verify(self, user: str, password: str) -> bool:
        self.reload_if_changed()
        key = hmac.new(self._key, f"{user}\0{password}".encode(), hashlib.sha256).digest()
        if self._verified.get(key, 0.0) > time.monotonic():
            return True
        hashed = self._entries.get(user)
        secret = password.encode()
        if len(secret) > BCRYPT_MAX_PASSWORD or b"\0" in secret:
            # bcrypt refuses the long ones (ValueError) and C implementations end a
            # password at NUL: htpasswd -B could not have stored either whole, and
            # accepting a prefix would accept passwords never set.
            return False
        matches = await asyncio.to_thread(bcrypt.checkpw, secret, hashed or _DUMMY_HASH)
        if matches and hashed is not None:
            self._verified[key] = time.monotonic() + VERIFIED_FOR
            return True
        return False


class AccessControl:
    def __init__(self, config: AuthConfig):
        self._config = config
        self._htpasswd = Htpasswd(config.htpasswd) if config.htpasswd else None
        self._groups_of: dict[str, set[str]] = {}
        for group, members in config.groups.items():
            for member in members:
                self._groups_of.setdefault(member, set()).add(group)
        self.challenge = f'Basic realm="{config.realm}"'

    def _unauthorized(self, message: str) -> Unauthorized:
        return Unauthorized(message, headers={"WWW-Authenticate": self.challenge})

    async def authenticate(self, authorization: str | None) -> Principal:
        if not authorization or self._htpasswd is None:
            # With no users configured, credentials a client sends anyway (for the
            # upstream, say) are no concern of ours.
            if self._config.anonymous:
                return ANONYMOUS
            raise self._unauthorized("authentication required")
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() != "basic":
            raise self._unauthorized("use Basic authentication")
        try:
            user, sep, password = b64decode(credentials, validate=True).decode().partition(":")
        except ValueError:  # binascii.Error, UnicodeDecodeError, non-ASCII text
            raise self._unauthorized("malformed credentials") from None
        if not sep or not await self._htpasswd.verify(user, password):
            raise self._unauthorized("invalid username or password")
        return Principal(user, frozenset(self._groups_of.get(user, ())))

    def may_pull(self, principal: Principal, upstream: str, repository: str) -> bool:
        if not self._config.rules:
            return True
        return any(
            _applies(rule.users, rule.groups, rule.anonymous, principal)
            and any(fnmatchcase(upstream, pattern) for pattern in rule.upstreams)
            and any(fnmatchcase(repository, pattern) for pattern in rule.repositories)
            for rule in self._config.rules
        )

    def authorize(self, principal: Principal, upstream: str, repository: str) -> None:
        if self.may_pull(principal, upstream, repository):
            return
        if principal.user is None:
            raise self._unauthorized("log in to pull this repository")
        raise Denied(
            "you may not pull this repository",
            detail={"upstream": upstream, "repository": repository},
        )


def _applies(
    users: tuple[str, ...], groups: tuple[str, ...], anonymous: bool, principal: Principal
) -> bool:
    if principal.user is None:
        return anonymous
    return principal.user in users or bool(principal.groups & set(groups))
