"""Where an upstream's credentials come from, and how fresh they are.

A `CredentialSource` answers `get()` with (user, secret) or None (anonymous). Four kinds:

    StaticCredentials    username + password/password_file/password_env, read at each use
    HelperCredentials    `docker-credential-NAME get` (Docker's credential-helper protocol)
    EcrCredentials       ECR GetAuthorizationToken through aiobotocore, standard AWS chain
    GcpCredentials       google-auth's default chain, used as `oauth2accesstoken`

The last three are `_RefreshingSource`s: a credential is cached until its refresh time
(a helper's `lifetime`; for tokens, some way before the expiry the issuer gave), is
fetched once however many requests want it (`SingleFlight`), and is fetched anew when
the upstream refused it (`get(refresh=True)`). A failed fetch is logged
(`upstream_credentials_failed`, never the secret), counted, and kept in `state` for
`/readyz`; a credential fetched earlier that has not expired yet goes on being used.
Library and subprocess failures leave this module as `UpstreamCredentialsUnavailable`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import urlsplit

import structlog

from mirror.concurrency import SingleFlight
from mirror.errors import UpstreamCredentialsUnavailable

log = structlog.get_logger(__name__)

Credentials = tuple[str, str]

HELPER_PREFIX = "docker-credential-"
HELPER_OUTPUT_MAX = 64 * 1024
GCP_USER = "oauth2accesstoken"
DEFAULT_GCP_SCOPES = ("https://www.googleapis.com/auth/cloud-platform",)
# Tokens are replaced this share of their lifetime early, at least 5 min, at most half.
REFRESH_SHARE = 0.1
REFRESH_MARGIN = 300.0
# After a failed renewal while the old credential is still valid: how long it is used
# before the next try (not one helper run or API call per request).
RETRY_AFTER = 30.0


def refresh_after(lifetime: float) -> float:
    """Seconds after issue at which a token valid for `lifetime` seconds is replaced:
    12 h ECR tokens at 10.8 h, 1 h Google tokens at 54 min, a 10 s test token at 5 s."""
    margin = min(max(lifetime * REFRESH_SHARE, REFRESH_MARGIN), lifetime / 2)
    return max(lifetime - margin, 0.0)


@dataclass(slots=True)
class CredentialState:
    """How a source has fared, for `/readyz` and metrics (wall-clock times)."""

    last_success: float | None = None
    last_error: str | None = None
    last_error_at: float | None = None
    expires_at: float | None = None
    errors: int = 0
    failing: bool = False  # the last attempt failed


class CredentialSource(Protocol):
    state: CredentialState

    @property
    def refreshable(self) -> bool:
        """Whether `get(refresh=True)` can yield something other than `get()`."""
        ...

    async def get(self, *, refresh: bool = False) -> Credentials | None: ...

    async def close(self) -> None: ...


class StaticCredentials:
    """Today's username and password: `read` is called at each use (files rotate)."""

    refreshable = False

    def __init__(self, read: Callable[[], Credentials | None]):
        self._read = read
        self.state = CredentialState()

    async def get(self, *, refresh: bool = False) -> Credentials | None:
        return self._read()

    async def close(self) -> None:
        return None


class _RefreshingSource:
    """A credential fetched by `_fetch`, cached until its refresh time."""

    refreshable = True
    kind = "credentials"

    def __init__(self, upstream: str, clock: Callable[[], float] = time.time):
        self._upstream = upstream
        self._clock = clock
        self.state = CredentialState()
        self._cached: Credentials | None = None
        self._refresh_at = 0.0
        self._expires_at: float | None = None  # None: no expiry known
        self._inflight: SingleFlight[str, Credentials] = SingleFlight()

    async def _fetch(self) -> tuple[Credentials, float, float | None]:
        """(credentials, refresh at, expires at), wall-clock times."""
        raise NotImplementedError

    async def get(self, *, refresh: bool = False) -> Credentials | None:
        now = self._clock()
        if self._cached is not None and not refresh and now < self._refresh_at:
            return self._cached
        # A refused credential must not be handed out again by a concurrent caller
        # that finds the cache still warm.
        if refresh:
            self._refresh_at = 0.0
        return await self._inflight.run("fetch", self._renew)

    async def _renew(self) -> Credentials:
        try:
            credentials, refresh_at, expires_at = await self._fetch()
        except UpstreamCredentialsUnavailable as exc:
            self._failed(exc.message)
            now = self._clock()
            still_valid = self._expires_at is None or now < self._expires_at
            if self._cached is not None and still_valid and self._refresh_at > 0:
                # Not refused, and it lives a while yet: use it, and try again later.
                self._refresh_at = now + RETRY_AFTER
                if self._expires_at is not None:
                    self._refresh_at = min(self._refresh_at, self._expires_at)
                return self._cached
            raise
        self._cached, self._refresh_at, self._expires_at = credentials, refresh_at, expires_at
        self.state.last_success = self._clock()
        self.state.expires_at = expires_at
        self.state.failing = False
        log.info(
            "upstream_credentials_renewed",
            upstream=self._upstream,
            source=self.kind,
            user=credentials[0],
            refresh_in=round(refresh_at - self._clock(), 1),
        )
        return credentials

    def _failed(self, reason: str) -> None:
        self.state.errors += 1
        self.state.failing = True
        self.state.last_error = reason
        self.state.last_error_at = self._clock()
        log.warning(
            "upstream_credentials_failed", upstream=self._upstream, source=self.kind, error=reason
        )

    async def close(self) -> None:
        await self._inflight.close()


class HelperCredentials(_RefreshingSource):
    """`docker-credential-NAME get`, asked for `server` (the registry's host) on stdin."""

    kind = "helper"

    def __init__(
        self,
        upstream: str,
        helper: str,
        server: str,
        lifetime: float,
        timeout: float,
        clock: Callable[[], float] = time.time,
    ):
        super().__init__(upstream, clock)
        self._program = HELPER_PREFIX + helper
        self._server = server
        self._lifetime = lifetime
        self._timeout = timeout

    async def _fetch(self) -> tuple[Credentials, float, float | None]:
        try:
            process = await asyncio.create_subprocess_exec(
                self._program,
                "get",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            raise UpstreamCredentialsUnavailable(
                f"cannot run {self._program}: {exc.strerror}"
            ) from None
        try:
            stdout, stderr = await asyncio.wait_for(
                process.communicate(self._server.encode()), timeout=self._timeout
            )
        except TimeoutError:
            process.kill()
            await process.wait()
            raise UpstreamCredentialsUnavailable(
                f"{self._program} did not answer in {self._timeout:g} s"
            ) from None
        if process.returncode != 0:
            # Helpers report errors ("credentials not found in native keychain") as
            # text; no secret is printed on failure, so the first line may be told.
            said = (stdout or stderr)[:200].decode(errors="replace").strip().splitlines()
            raise UpstreamCredentialsUnavailable(
                f"{self._program} failed (exit {process.returncode})"
                + (f": {said[0]}" if said else "")
            )
        credentials = _parse_helper_output(stdout[:HELPER_OUTPUT_MAX], self._program)
        now = self._clock()
        return credentials, now + self._lifetime, None


def _parse_helper_output(output: bytes, program: str) -> Credentials:
    try:
        answer = json.loads(output)
    except ValueError:
        raise UpstreamCredentialsUnavailable(f"{program} printed no JSON") from None
    user = answer.get("Username") if isinstance(answer, dict) else None
    secret = answer.get("Secret") if isinstance(answer, dict) else None
    if not isinstance(user, str) or not isinstance(secret, str) or not secret:
        raise UpstreamCredentialsUnavailable(f"{program} gave no Username and Secret")
    return user, secret


class EcrCredentials(_RefreshingSource):
    """An ECR authorization token: user AWS, valid until the `expiresAt` ECR gives."""

    kind = "ecr"

    def __init__(
        self,
        upstream: str,
        region: str,
        registry_id: str,
        endpoint: str | None,
        timeout: float,
        clock: Callable[[], float] = time.time,
    ):
        super().__init__(upstream, clock)
        self._region = region
        self._registry_id = registry_id
        self._endpoint = endpoint
        self._timeout = timeout

    async def _fetch(self) -> tuple[Credentials, float, float | None]:
        # Imported here: only upstreams with `ecr:` pay for botocore's start-up.
        from aiobotocore.config import AioConfig
        from aiobotocore.session import get_session
        from botocore.exceptions import BotoCoreError, ClientError

        session = get_session()
        config = AioConfig(
            connect_timeout=self._timeout,
            read_timeout=self._timeout,
            retries={"max_attempts": 2},
        )
        try:
            async with session.create_client(
                "ecr", region_name=self._region, endpoint_url=self._endpoint, config=config
            ) as client:
                answer = await client.get_authorization_token(registryIds=[self._registry_id])
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "error")
            raise UpstreamCredentialsUnavailable(
                f"ECR GetAuthorizationToken refused: {code}"
            ) from None
        except (BotoCoreError, OSError) as exc:
            raise UpstreamCredentialsUnavailable(
                f"ECR GetAuthorizationToken failed: {type(exc).__name__}"
            ) from None
        return self._read_answer(answer)

    def _read_answer(self, answer: dict[str, Any]) -> tuple[Credentials, float, float | None]:
        data = answer.get("authorizationData") or []
        if not data or "authorizationToken" not in data[0]:
            raise UpstreamCredentialsUnavailable("ECR sent no authorization token")
        try:
            decoded = base64.b64decode(data[0]["authorizationToken"], validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise UpstreamCredentialsUnavailable("ECR sent an unreadable token") from None
        user, sep, password = decoded.partition(":")
        if not sep or not password:
            raise UpstreamCredentialsUnavailable("ECR sent an unreadable token")
        now = self._clock()
        expires = data[0].get("expiresAt")
        expires_at = expires.timestamp() if isinstance(expires, datetime) else None
        if expires_at is None or expires_at <= now:
            # No usable expiry (or a clock far off): assume ECR's documented 12 h.
            expires_at = now + 12 * 3600
        return (user, password), now + refresh_after(expires_at - now), expires_at


class GcpCredentials(_RefreshingSource):
    """A Google OAuth access token from `google.auth.default()`, user `oauth2accesstoken`."""

    kind = "gcp"

    def __init__(
        self,
        upstream: str,
        scopes: Sequence[str],
        clock: Callable[[], float] = time.time,
    ):
        super().__init__(upstream, clock)
        self._scopes = tuple(scopes)
        self._google: Any = None  # the google-auth credentials, built on first use

    async def _fetch(self) -> tuple[Credentials, float, float | None]:
        # google-auth is synchronous (requests): it runs in a thread.
        token, expiry = await asyncio.to_thread(self._refresh_blocking)
        now = self._clock()
        expires_at = expiry if expiry is not None else now + 3600
        return (GCP_USER, token), now + refresh_after(max(expires_at - now, 0.0)), expires_at

    def _refresh_blocking(self) -> tuple[str, float | None]:
        import google.auth
        import google.auth.exceptions
        import google.auth.transport.requests

        try:
            if self._google is None:
                self._google, _project = google.auth.default(scopes=self._scopes)
            self._google.refresh(google.auth.transport.requests.Request())
        except google.auth.exceptions.GoogleAuthError as exc:
            raise UpstreamCredentialsUnavailable(
                f"google-auth could not get a token: {type(exc).__name__}"
            ) from None
        token = self._google.token
        if not isinstance(token, str) or not token:
            raise UpstreamCredentialsUnavailable("google-auth gave no access token")
        expiry = self._google.expiry  # naive UTC, or None
        if isinstance(expiry, datetime):
            return token, expiry.replace(tzinfo=UTC).timestamp()
        return token, None


def helper_server(url: str) -> str:
    """What a helper is asked for: the registry's host, as `docker login` stores it."""
    return urlsplit(url).netloc
