"""Answering upstream auth challenges: Bearer token flow and Basic, with a token cache.

A registry says how it wants to be asked in `WWW-Authenticate`. For Bearer we
call its token endpoint (`realm`) with `service` and `scope`, anonymously or
with the upstream's credentials, and cache the token until `expires_in`
(default 60 s) minus a margin. Challenges are remembered per origin so the
next request carries a token up front instead of paying a 401 round trip.

Credentials come from the upstream's `CredentialSource` (`credentials.py`). When they
are refused (the token server says 401, or the registry refuses a fresh token), a source
that can renew them (helper, ECR, Google) is asked once more with `refresh=True`, and
the request is tried once with what it gives.

Credentials are only ever offered to the configured upstream's own origin and
the token realm it names; a redirect target gets an anonymous token at most. Every
realm passes the upstream's `TargetGuard` first (see `guard.py`), and credentials
never go to a realm over plain HTTP on another host.
"""

from __future__ import annotations

import json
import re
import time
from base64 import b64encode
from dataclasses import dataclass
from urllib.parse import urlencode, urlsplit

import aiohttp
import structlog

from mirror.concurrency import SingleFlight
from mirror.errors import (
    UpstreamBadResponse,
    UpstreamCredentialsRefused,
    UpstreamCredentialsUnavailable,
    UpstreamUnavailable,
)
from mirror.upstream.credentials import CredentialSource
from mirror.upstream.guard import TargetGuard
from mirror.upstream.tokens import TokenCache

log = structlog.get_logger(__name__)

_PARAM_RE = re.compile(r'([A-Za-z][\w-]*)\s*=\s*("(?:[^"\\]|\\.)*"|[^,\s]*)')
DEFAULT_TOKEN_LIFETIME = 60.0
TOKEN_MAX_BYTES = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Challenge:
    scheme: str  # "bearer" or "basic", lower-case
    realm: str | None = None
    service: str | None = None
    scope: str | None = None

    @classmethod
    def parse(cls, header: str) -> Challenge | None:
        scheme, _, rest = header.strip().partition(" ")
        scheme = scheme.lower()
        if scheme not in ("bearer", "basic"):
            return None
        params = {
            key.lower(): value[1:-1].replace('\\"', '"') if value.startswith('"') else value
            for key, value in _PARAM_RE.findall(rest)
        }
        realm = params.get("realm")
        if scheme == "bearer" and (not realm or urlsplit(realm).scheme not in ("http", "https")):
            return None
        return cls(scheme, realm, params.get("service"), params.get("scope"))


def origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


def basic_header(credentials: tuple[str, str]) -> str:
    user, password = credentials
    return "Basic " + b64encode(f"{user}:{password}".encode()).decode("ascii")


class Authenticator:
    """Builds `Authorization` headers for one upstream; shares a token cache."""

    def __init__(
        self,
        upstream_name: str,
        upstream_origin: str,
        credentials: CredentialSource,
        session: aiohttp.ClientSession,
        tokens: TokenCache,
        timeout: aiohttp.ClientTimeout,
        guard: TargetGuard,
    ):
        self._name = upstream_name
        self._origin = upstream_origin
        self._credentials = credentials
        self._session = session
        self._tokens = tokens
        self._timeout = timeout
        self._guard = guard
        self._challenges: dict[str, Challenge] = {}
        self._inflight: SingleFlight[str, str] = SingleFlight()

    def _is_upstream(self, origin: str) -> bool:
        return origin == self._origin

    def remember(self, origin: str, header: str) -> Challenge | None:
        challenge = Challenge.parse(header)
        if challenge is not None:
            self._challenges[origin] = challenge
        return challenge

    async def header_for(self, url: str, repository: str, *, refresh: bool = False) -> str | None:
        """The Authorization value to send to `url`, or None to go without."""
        origin = origin_of(url)
        challenge = self._challenges.get(origin)
        if challenge is None:
            return None
        own = self._is_upstream(origin)
        credentials = await self._credentials.get() if own else None
        if challenge.scheme == "basic":
            return basic_header(credentials) if credentials else None
        # Our own upstream is asked for the repository's pull scope; a redirect target
        # names the scope it wants in its challenge (its paths differ from ours).
        scope = f"repository:{repository}:pull" if own else challenge.scope
        try:
            token = await self._token(challenge, scope, credentials, refresh=refresh)
        except UpstreamCredentialsRefused:
            if credentials is None or not self._credentials.refreshable:
                raise UpstreamBadResponse("upstream token server refused the credentials") from None
            # New ones, or UpstreamCredentialsUnavailable: the miss fails saying why.
            credentials = await self._renew()
            token = await self._token(challenge, scope, credentials, refresh=True)
        return f"Bearer {token}"

    async def renew_credentials(self, origin: str) -> bool:
        """Ask the source for new credentials after a refusal by `origin`; whether there
        is something new to try. A failure is the source's to log and count."""
        if not self._is_upstream(origin) or not self._credentials.refreshable:
            return False
        try:
            await self._renew()
        except UpstreamCredentialsUnavailable:
            return False
        return True

    async def _renew(self) -> tuple[str, str] | None:
        log.info("upstream_credentials_refused", upstream=self._name)
        return await self._credentials.get(refresh=True)

    async def _token(
        self,
        challenge: Challenge,
        scope: str | None,
        credentials: tuple[str, str] | None,
        *,
        refresh: bool,
    ) -> str:
        who = credentials[0] if credentials else ""
        key = f"token:{self._name}:{challenge.realm}:{challenge.service}:{scope}:{who}"
        if refresh:
            await self._tokens.delete(key)
        else:
            cached = await self._tokens.get(key)
            if cached is not None:
                return str(cached)

        async def fetch() -> str:
            token, lifetime = await self._fetch_token(challenge, scope, credentials)
            # Keep a margin so a token never expires between cache and upstream.
            ttl = max(lifetime - min(30.0, lifetime / 4), 1.0)
            await self._tokens.set(key, token, ttl=ttl)
            return token

        return await self._inflight.run(key, fetch)

    async def _fetch_token(
        self, challenge: Challenge, scope: str | None, credentials: tuple[str, str] | None
    ) -> tuple[str, float]:
        assert challenge.realm is not None
        query = {
            key: value for key, value in (("service", challenge.service), ("scope", scope)) if value
        }
        url = challenge.realm + ("&" if "?" in challenge.realm else "?") + urlencode(query)
        if credentials:
            self._guard.check_credentials("realm", url)
        await self._guard.check("realm", url)
        headers = {"Authorization": basic_header(credentials)} if credentials else {}
        started = time.monotonic()
        try:
            async with self._session.get(
                url, headers=headers, timeout=self._timeout, allow_redirects=False
            ) as response:
                if response.status != 200:
                    log.warning(
                        "upstream_token_refused",
                        upstream=self._name,
                        realm=challenge.realm,
                        scope=scope,
                        status=response.status,
                    )
                    refused = (
                        UpstreamCredentialsRefused
                        if credentials and response.status in (401, 403)
                        else UpstreamBadResponse
                    )
                    raise refused(
                        "upstream token server refused the request",
                        detail={"status": response.status},
                    )
                data = json.loads(await _read_bounded(response, TOKEN_MAX_BYTES))
        except aiohttp.ClientConnectorError as exc:
            refusal = self._guard.refusal_of(exc, "realm")
            if refusal is not None:
                raise refusal from None
            raise UpstreamUnavailable("upstream token server unreachable") from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UpstreamUnavailable("upstream token server unreachable") from exc
        except ValueError as exc:
            raise UpstreamBadResponse("upstream token server sent invalid JSON") from exc
        token = (data.get("token") or data.get("access_token")) if isinstance(data, dict) else None
        if not isinstance(token, str) or not token:
            raise UpstreamBadResponse("upstream token server sent no token")
        lifetime = data.get("expires_in")
        if not isinstance(lifetime, int | float) or lifetime <= 0:
            lifetime = DEFAULT_TOKEN_LIFETIME
        log.debug(
            "upstream_token_issued",
            upstream=self._name,
            scope=scope,
            expires_in=lifetime,
            seconds=round(time.monotonic() - started, 4),
        )
        return token, float(lifetime)


async def _read_bounded(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """The whole body, however many pieces it arrives in; refuses more than `limit`."""
    body = bytearray()
    while True:
        piece = await response.content.read(limit + 1 - len(body))
        if not piece:
            return bytes(body)
        body += piece
        if len(body) > limit:
            raise UpstreamBadResponse("upstream token response is too large")
