"""Who may see the console, and who may act in it.

One middleware guards `/ui/...` and `/api/v1/...`. Authentication is the registry API's
own (HTTP Basic against `auth.htpasswd`, `access.py`), so a browser's Basic prompt
works and scripts use `curl -u`. The rules (`ui` in the config):

- view: loopback clients, clients logged in as an htpasswd user, and, with
  `ui.allow_remote`, anonymous remote clients. Anyone else: 401 with the same Basic
  challenge as `/v2/` (403 when no htpasswd is configured: there is no login to ask for);
- act (every POST): members of the `ui.admins` group; with no htpasswd configured,
  loopback clients (a single-user workstation), never remote ones;
- every POST carries `X-CSRF-Token` (from `GET /api/v1/session`) and, when the browser
  sends `Origin`, comes from this server's own origin. Otherwise 403 DENIED.

A loopback connection that carries `Forwarded` or `X-Forwarded-For` came through a
reverse proxy on this host: it counts as remote, so a proxy never makes the world local.

The CSRF token is an HMAC of the user name under a secret every worker and restart
shares (`csrf_secret`): the cluster secret when configured, else a file created once
in the storage root's `meta/` with mode 0600.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import ipaddress
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from mirror.access import ANONYMOUS, AccessControl, Principal
from mirror.config import MirrorConfig
from mirror.errors import Denied, Unauthorized

log = structlog.get_logger(__name__)

CSRF_HEADER = "X-CSRF-Token"
SECRET_FILE = "console-secret"  # noqa: S105 (a file name, not a secret)
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(frozen=True, slots=True)
class Viewer:
    """Who is looking at the console, and what they may do."""

    principal: Principal
    admin: bool
    local: bool

    @property
    def user(self) -> str | None:
        return self.principal.user


VIEWER = web.RequestKey("console_viewer", Viewer)


def is_console_path(path: str) -> bool:
    return path in ("/ui", "/api/v1") or path.startswith(("/ui/", "/api/v1/"))


def is_local(request: web.BaseRequest) -> bool:
    """A loopback peer, that no proxy on this host forwarded, asking for a loopback name."""
    if request.headers.get("Forwarded") or request.headers.get("X-Forwarded-For"):
        return False
    return _is_loopback(request.remote) and _is_loopback_host(request.host)


def _is_loopback(text: str | None) -> bool:
    if text is None:
        return False
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return False  # a Unix socket or something stranger: not known to be local
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def _is_loopback_host(host: str) -> bool:
    """The `Host` a loopback client asked for names this machine's loopback: a page
    served from any other name reached us through DNS rebinding, and is not local."""
    name = host.lower()
    if name.startswith("["):
        name = name[1:].partition("]")[0]
    elif name.count(":") == 1:
        name = name.partition(":")[0]
    return name == "localhost" or name.endswith(".localhost") or _is_loopback(name)


class ConsoleGate:
    """The console's access rules and its CSRF tokens (see the module docstring)."""

    def __init__(self, access: AccessControl, config: MirrorConfig, secret: bytes):
        self._access = access
        self._htpasswd = config.auth.htpasswd is not None
        self._admins = config.ui.admins
        self._allow_remote = config.ui.allow_remote
        self._secret = secret

    async def viewer(self, request: web.Request) -> Viewer:
        """Who the request comes from, once they may view; 401/403 if they may not."""
        local = is_local(request)
        authorization = request.headers.get("Authorization")
        principal = ANONYMOUS
        if authorization and self._htpasswd:
            principal = await self._access.authenticate(authorization)
        if principal.user is None and not (local or self._allow_remote):
            if self._htpasswd:
                raise Unauthorized(
                    "log in to use the console",
                    headers={"WWW-Authenticate": self._access.challenge},
                )
            raise Denied("the console answers loopback clients only (ui.allow_remote)")
        if self._htpasswd:
            admin = principal.user is not None and self._admins in principal.groups
        else:
            admin = local
        return Viewer(principal, admin, local)

    def csrf_token(self, user: str | None) -> str:
        message = b"console-csrf\0" + (user or "").encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    def check_action(self, request: web.Request, viewer: Viewer) -> None:
        """A mutating request: same origin, the viewer's CSRF token, and an admin."""
        origin = request.headers.get("Origin")
        if origin is not None and origin != f"{request.scheme}://{request.host}":
            raise Denied("cross-origin requests may not act")
        token = request.headers.get("X-CSRF-Token", "")
        if not hmac.compare_digest(token.encode(), self.csrf_token(viewer.user).encode()):
            raise Denied(f"missing or wrong {CSRF_HEADER} (GET /api/v1/session gives it)")
        if not viewer.admin:
            if viewer.user is None and self._htpasswd:
                raise Unauthorized(
                    "log in as an admin to act",
                    headers={"WWW-Authenticate": self._access.challenge},
                )
            raise Denied(f"only members of the {self._admins!r} group may act")


GATE = web.AppKey("console_gate", ConsoleGate)


@web.middleware
async def console_gate(request: web.Request, handler: Handler) -> web.StreamResponse:
    if not is_console_path(request.path):
        return await handler(request)
    gate = request.app[GATE]
    viewer = await gate.viewer(request)
    if request.method not in SAFE_METHODS:
        gate.check_action(request, viewer)
    request[VIEWER] = viewer
    return await handler(request)


def csrf_secret(config: MirrorConfig, meta_dir: Path) -> bytes:
    """The key CSRF tokens are made with, the same in every worker and after a restart."""
    cluster = config.cluster.secret_value()
    if cluster:
        return hashlib.sha256(b"console-csrf-key\0" + cluster.encode()).digest()
    path = meta_dir / SECRET_FILE
    with contextlib.suppress(FileNotFoundError):
        return _read_secret(path)
    meta_dir.mkdir(parents=True, exist_ok=True)
    # Written whole under another name and linked into place: a worker racing us
    # finds either no file or a complete one, and the first link wins.
    temp = meta_dir / f".{SECRET_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
    descriptor = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(secrets.token_hex(32))
    try:
        os.link(temp, path)
    except FileExistsError:
        pass
    finally:
        temp.unlink()
    return _read_secret(path)


def _read_secret(path: Path) -> bytes:
    text = path.read_text(encoding="ascii").strip()
    if len(text) < 32:
        raise OSError(f"{path}: the console secret is too short; delete it to make a new one")
    return bytes.fromhex(text)
