"""A Docker-style token server (the ``realm`` of distribution's ``auth: token``) for tests.

This module owns the signing key, its self-signed certificate (the registry's
``rootcertbundle``), the ``GET /token`` endpoint and a thread-safe record of every token
request. It runs in a background thread on a stdlib HTTP server so it serves requests no
matter which (or whether an) asyncio event loop the test uses.

distribution 2.8 finds the verification key through the JWT header ``kid``, which must be
the libtrust key ID of the signing key: SHA-256 over the DER SubjectPublicKeyInfo, first 240
bits, base32 without padding, in 12 colon-separated groups of 4 characters.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from .net import LOOPBACK, Service, http_request
from .registry import TokenAuthSettings


def libtrust_key_id(public_key: rsa.RSAPublicKey) -> str:
    """The key ID libtrust (and so distribution 2.x) derives from a public key."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    encoded = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode().rstrip("=")
    return ":".join(encoded[i : i + 4] for i in range(0, len(encoded), 4))


@dataclass(frozen=True)
class Access:
    """One entry of the JWT ``access`` claim."""

    type: str
    name: str
    actions: tuple[str, ...]

    def claim(self) -> dict[str, Any]:
        return {"type": self.type, "name": self.name, "actions": list(self.actions)}


def parse_scope(scope: str) -> Access | None:
    """Parse ``type:name:actions``; names may contain ':' (e.g. ``host:5000/repo``)."""
    kind, sep, rest = scope.partition(":")
    name, sep2, actions = rest.rpartition(":")
    if not sep or not sep2 or not kind or not name:
        return None
    return Access(kind, name, tuple(a for a in actions.split(",") if a))


@dataclass(frozen=True)
class TokenRequest:
    """What one ``/token`` request asked for and what it got.

    ``authorized`` is true when valid Basic credentials were presented; ``username`` is the
    name from the Authorization header (also for wrong passwords), ``None`` when anonymous.
    """

    scopes: tuple[str, ...]
    service: str | None
    username: str | None
    authorized: bool
    status: int
    granted: tuple[Access, ...]
    query: str


class TokenServer(Service):
    """Issues RS256 JWTs that a distribution registry configured with ``registry_settings()``
    accepts.

    ``users`` maps username to password; authenticated users get every action they request.
    Anonymous requests get only the requested actions that are in ``anonymous_actions``.
    ``expires_in=None`` omits the field from the JSON (clients must then assume 60 s).
    ``jwt_lifetime`` sets the JWT ``exp`` independently (default: ``expires_in`` or 60);
    note distribution allows 60 s of leeway on ``exp``/``nbf``, so a token only looks
    expired to the registry once ``exp`` is more than a minute in the past.
    """

    def __init__(
        self,
        users: dict[str, str] | None = None,
        anonymous_actions: Sequence[str] = ("pull",),
        expires_in: int | None = 300,
        *,
        service: str = "test-registry",
        issuer: str = "test-issuer",
        jwt_lifetime: int | None = None,
        workdir: Path | None = None,
    ) -> None:
        self.users: dict[str, str] = dict(users or {})
        self.anonymous_actions: tuple[str, ...] = tuple(anonymous_actions)
        self.expires_in = expires_in
        self.jwt_lifetime = jwt_lifetime
        self.service = service
        self.issuer = issuer
        self._workdir = workdir
        self._tempdir: tempfile.TemporaryDirectory[str] | None = None
        self._lock = threading.Lock()
        self._requests: list[TokenRequest] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._key: rsa.RSAPrivateKey | None = None
        self.key_id = ""
        self.cert_path = Path()
        self.port = 0

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        if self._server is not None:
            return
        if self._workdir is None:
            self._tempdir = tempfile.TemporaryDirectory(prefix="tokenserver-")
            workdir = Path(self._tempdir.name)
        else:
            workdir = self._workdir
            workdir.mkdir(parents=True, exist_ok=True)
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.key_id = libtrust_key_id(self._key.public_key())
        self.cert_path = workdir / "token-signing.crt"
        self.cert_path.write_bytes(_self_signed_cert(self._key, self.issuer))

        server = ThreadingHTTPServer((LOOPBACK, 0), _make_handler(self))
        server.daemon_threads = True
        self._server = server
        self.port = server.server_address[1]
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"tokenserver-{self.port}",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self._tempdir is not None:
            self._tempdir.cleanup()
            self._tempdir = None

    # -- addresses and settings --------------------------------------------------------------

    @property
    def realm(self) -> str:
        return f"{self.url}/token"

    def registry_settings(self) -> TokenAuthSettings:
        if self._server is None:
            raise RuntimeError("start() the token server before asking for registry settings")
        return TokenAuthSettings(
            realm=self.realm,
            service=self.service,
            issuer=self.issuer,
            rootcertbundle=self.cert_path,
        )

    # -- records -----------------------------------------------------------------------------

    @property
    def requests(self) -> list[TokenRequest]:
        """A snapshot of every request so far, oldest first."""
        with self._lock:
            return list(self._requests)

    @property
    def issued_count(self) -> int:
        with self._lock:
            return sum(1 for r in self._requests if r.status == 200)

    def clear(self) -> None:
        with self._lock:
            self._requests.clear()

    def _record(self, request: TokenRequest) -> None:
        with self._lock:
            self._requests.append(request)

    # -- tokens ------------------------------------------------------------------------------

    def issue(self, subject: str, audience: str, access: Iterable[Access]) -> str:
        """Sign a JWT the registry will accept (also usable directly by tests)."""
        if self._key is None:
            raise RuntimeError("token server not started")
        now = int(time.time())
        lifetime = self.jwt_lifetime
        if lifetime is None:
            lifetime = self.expires_in if self.expires_in is not None else 60
        claims = {
            "iss": self.issuer,
            "sub": subject,
            "aud": audience,
            "exp": now + lifetime,
            "nbf": now - 1,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": [a.claim() for a in access],
        }
        return jwt.encode(
            claims, self._key, algorithm="RS256", headers={"kid": self.key_id, "typ": "JWT"}
        )

    def decode(self, token: str) -> dict[str, Any]:
        """Verify and decode a token this server issued."""
        if self._key is None:
            raise RuntimeError("token server not started")
        claims: dict[str, Any] = jwt.decode(
            token,
            self._key.public_key(),
            algorithms=["RS256"],
            options={"verify_aud": False, "verify_exp": False},
        )
        return claims

    def _authenticate(self, header: str | None) -> tuple[str | None, bool]:
        """(username, credentials valid) from an Authorization header."""
        if header is None:
            return None, False
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            return "", False
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return "", False
        user, _, password = decoded.partition(":")
        return user, self.users.get(user) == password

    def handle_token(self, query: str, authorization: str | None) -> tuple[int, dict[str, Any]]:
        """Answer one ``GET /token``: (HTTP status, JSON body)."""
        params = urllib.parse.parse_qs(query, keep_blank_values=True)
        scopes = tuple(s for raw in params.get("scope", []) for s in raw.split(" ") if s)
        service = params.get("service", [None])[0]
        username, authorized = self._authenticate(authorization)
        if authorization is not None and not authorized:
            self._record(TokenRequest(scopes, service, username, False, 401, (), query))
            return 401, {"details": "incorrect username or password"}

        granted = []
        for scope in scopes:
            wanted = parse_scope(scope)
            if wanted is None:
                continue
            actions = wanted.actions
            if not authorized:
                actions = tuple(a for a in actions if a in self.anonymous_actions)
            # Like Docker Hub, keep the entry even when nothing was granted.
            granted.append(Access(wanted.type, wanted.name, actions))

        token = self.issue(username or "", service or self.service, granted)
        self._record(
            TokenRequest(scopes, service, username, authorized, 200, tuple(granted), query)
        )
        body: dict[str, Any] = {
            "token": token,
            "access_token": token,
            "issued_at": dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z"),
        }
        if self.expires_in is not None:
            body["expires_in"] = self.expires_in
        return 200, body


def _self_signed_cert(key: rsa.RSAPrivateKey, common_name: str) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def _make_handler(server: TokenServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            parts = urllib.parse.urlsplit(self.path)
            if parts.path != "/token":
                self._send(404, {"details": "not found"})
                return
            status, body = server.handle_token(parts.query, self.headers.get("Authorization"))
            extra = {}
            if status == 401:
                extra["WWW-Authenticate"] = f'Basic realm="{server.realm}"'
            self._send(status, body, extra)

        def _send(
            self, status: int, body: Mapping[str, Any], extra: Mapping[str, str] | None = None
        ) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (extra or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            """Silent: requests are recorded in TokenServer.requests instead."""

    return Handler


def fetch_token(
    realm: str,
    service: str,
    scopes: Sequence[str],
    username: str | None = None,
    password: str | None = None,
) -> str:
    """Get a token from any Docker-style token endpoint (sync), Basic auth when given."""
    query = urllib.parse.urlencode([("service", service)] + [("scope", s) for s in scopes])
    headers = {}
    if username is not None:
        creds = base64.b64encode(f"{username}:{password or ''}".encode()).decode()
        headers["Authorization"] = f"Basic {creds}"
    sep = "&" if "?" in realm else "?"
    resp = http_request("GET", f"{realm}{sep}{query}", headers=headers)
    if resp.status != 200:
        raise PermissionError(f"token request failed: {resp.status} {resp.body!r}")
    body = json.loads(resp.body)
    token = body.get("token") or body.get("access_token")
    if not isinstance(token, str):
        raise ValueError(f"no token in response: {body!r}")
    return token
