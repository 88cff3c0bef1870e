"""Talking to one upstream registry over its own pooled aiohttp session (guard.py).

`UpstreamClient.open` sends a request for `/v2/<repository>/<path>` and returns
an `UpstreamResponse` once the status line and headers are in. The repository is
the client-facing name; an upstream reached through a path of its own (a Harbor
proxy project, an ECR pull-through rule) gets its `repository_prefix` in front, in
the URL and in token scopes alike. Along the way it:
- answers auth challenges (see `auth.py`), once per hop, with a fresh token
  when the cached one was refused;
- follows 301/302/303/307/308 itself (at most 10 hops), so that credentials
  go only to the upstream's own origin and a redirect target's own challenge
  is answered anonymously; every target passes the upstream's `TargetGuard`
  (`guard.py`) before it is contacted;
- re-asks the registry once when a redirect target answers 403, the sign of a
  presigned URL that expired;
- retries once when connecting fails or times out (aiohttp itself retries once
  when a connection drops before the response).

aiohttp's exceptions stop here: callers see `UpstreamUnavailable`.
"""

from __future__ import annotations

import collections
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from urllib.parse import urljoin, urlsplit, urlunsplit

import aiohttp
import structlog
from multidict import CIMultiDict, CIMultiDictProxy

from mirror.errors import OfflineMiss, UpstreamBadResponse, UpstreamUnavailable
from mirror.upstream.auth import Authenticator, origin_of
from mirror.upstream.credentials import CredentialSource
from mirror.upstream.guard import UpstreamNetwork
from mirror.upstream.tokens import TokenCache

log = structlog.get_logger(__name__)

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 10
USER_AGENT = "registry-mirror/0.1 (+pull-through cache)"


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    """What the client needs to know about one upstream (values, not the config)."""

    name: str
    url: str
    credentials: CredentialSource
    connect_timeout: float
    read_timeout: float
    offline: bool = False  # never contact this upstream (air-gapped serving)
    # The upstream's own repository names are `<prefix>/<client-facing name>`.
    repository_prefix: str = ""


@dataclass(frozen=True, slots=True)
class RateLimit:
    """What the upstream last said of our pull allowance (Docker Hub's headers)."""

    limit: int | None
    remaining: int | None
    window_seconds: int | None

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> RateLimit | None:
        remaining_text = headers.get("RateLimit-Remaining")
        if remaining_text is None:
            return None
        limit, window = _quota(headers.get("RateLimit-Limit", ""))
        remaining, remaining_window = _quota(remaining_text)
        return cls(limit, remaining, window or remaining_window)


# How many recent failures an upstream's health remembers (the console shows the last hour).
RECENT_FAILURES = 1000


class UpstreamHealth:
    """How an upstream has been answering, for the console: when it last answered
    well, and its recent failures by cause. Updated per upstream request (an
    assignment or an append), read when the console asks."""

    def __init__(self, clock: Callable[[], float] = time.time):
        self._clock = clock
        self.last_success: float | None = None
        self._failures: collections.deque[tuple[float, str]] = collections.deque(
            maxlen=RECENT_FAILURES
        )

    def answered(self, status: int) -> None:
        # 401 is the first step of every token flow, not a failure; what it ends in is.
        if status == 429:
            self.failed("rate_limited")
        elif status >= 500:
            self.failed("server_error")
        elif status == 403:
            self.failed("denied")
        elif status != 401:
            self.last_success = self._clock()

    def failed(self, cause: str) -> None:
        self._failures.append((self._clock(), cause))

    def recent_failures(self, within: float) -> dict[str, int]:
        """Failures by cause in the last `within` seconds."""
        since = self._clock() - within
        return dict(collections.Counter(cause for when, cause in self._failures if when >= since))


def _quota(value: str) -> tuple[int | None, int | None]:
    """`100;w=21600` into (100, 21600); missing parts are None."""
    count_text, _, rest = value.partition(";")
    count = int(count_text) if count_text.strip().isdigit() else None
    window_text = rest.strip().removeprefix("w=")
    return count, int(window_text) if window_text.isdigit() else None


def redact_url(url: str) -> str:
    """A URL safe to log: presigned query strings carry signatures, so drop them."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.hostname or "", parts.path, "", "")) + (
        "?…" if parts.query else ""
    )


class UpstreamResponse:
    """An upstream answer whose body has not been read yet. Release it when done."""

    def __init__(self, response: aiohttp.ClientResponse, redirected_elsewhere: bool):
        self._response = response
        self.status = response.status
        self.headers: CIMultiDictProxy[str] = response.headers
        self.url = str(response.url)
        self.redirected_elsewhere = redirected_elsewhere
        # Set when a failover source answered instead of the upstream (failover.py).
        self.fallback: str | None = None

    @property
    def content_length(self) -> int | None:
        return self._response.content_length

    async def read(self, limit: int) -> bytes:
        """The whole body, refusing one larger than `limit` bytes."""
        if self.content_length is not None and self.content_length > limit:
            raise UpstreamBadResponse("upstream response is too large", detail={"limit": limit})
        try:
            body = await self._response.content.read(limit + 1)
            # read(n) may return less than is there; drain up to the limit.
            while len(body) <= limit:
                more = await self._response.content.read(limit + 1 - len(body))
                if not more:
                    break
                body += more
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UpstreamUnavailable("upstream connection failed while reading") from exc
        if len(body) > limit:
            raise UpstreamBadResponse("upstream response is too large", detail={"limit": limit})
        return body

    async def iter_batches(self, max_batch: int) -> AsyncIterator[bytes]:
        """The body in pieces: whatever has arrived, up to `max_batch` bytes at a time.

        A fast upstream yields large batches (few hops to the writer thread); a
        slow one yields each piece as soon as it lands, so readers never wait
        for a batch to fill.
        """
        content = self._response.content
        try:
            while True:
                first = await content.readany()
                if not first:
                    return
                parts, size = [first], len(first)
                while size < max_batch:
                    more = content.read_nowait(max_batch - size)
                    if not more:
                        break
                    parts.append(more)
                    size += len(more)
                yield b"".join(parts) if len(parts) > 1 else first
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UpstreamUnavailable("upstream connection failed mid-transfer") from exc

    def release(self) -> None:
        self._response.release()

    def close(self) -> None:
        """Drop the connection (a body we will not read must not be drained)."""
        self._response.close()

    async def __aenter__(self) -> UpstreamResponse:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close() if exc is not None else self.release()


class UpstreamClient:
    """Requests to one upstream registry."""

    def __init__(
        self,
        settings: UpstreamSettings,
        network: UpstreamNetwork,
        tokens: TokenCache,
        observe: Callable[[str, str, int, float], None] | None = None,
    ):
        self.settings = settings
        self._observe = observe  # (upstream, method, status, seconds), for metrics
        self.name = settings.name
        self._base = settings.url.rstrip("/")
        self._origin = origin_of(self._base)
        self._session = network.session
        self._guard = network.guard
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=settings.connect_timeout, sock_read=settings.read_timeout
        )
        self._auth = Authenticator(
            settings.name,
            self._origin,
            settings.credentials,
            network.session,
            tokens,
            self._timeout,
            network.guard,
        )
        self.rate_limit: RateLimit | None = None
        self.health = UpstreamHealth()

    def upstream_repository(self, repository: str) -> str:
        """The upstream's name for a client-facing repository (its prefix put in front)."""
        prefix = self.settings.repository_prefix
        return f"{prefix}/{repository}" if prefix else repository

    def url_for(self, repository: str, path: str) -> str:
        return f"{self._base}/v2/{self.upstream_repository(repository)}/{path}"

    async def open(
        self,
        method: str,
        repository: str,
        path: str,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> UpstreamResponse:
        """Send the request; return the final response after auth and redirects."""
        if self.settings.offline:
            # The caches do not ask when offline; this is the last line, should one.
            raise OfflineMiss("not in the cache, and this mirror is offline")
        url = self.url_for(repository, path)
        response = await self._attempt(method, url, repository, headers)
        if response.status == 403 and response.redirected_elsewhere:
            # A presigned URL the registry gave us expired; a new request gets a new one.
            log.info("upstream_presigned_refused", upstream=self.name, url=redact_url(response.url))
            response.close()
            response = await self._attempt(method, url, repository, headers)
        return response

    async def _attempt(
        self, method: str, url: str, repository: str, headers: Mapping[str, str] | None
    ) -> UpstreamResponse:
        try:
            return await self._follow(method, url, repository, headers)
        except (aiohttp.ClientConnectorError, TimeoutError) as first:
            # Nothing reached a client yet, and GET/HEAD are idempotent: one retry. (A
            # connection dropped before the response aiohttp already retries itself.)
            log.info("upstream_retry", upstream=self.name, error=repr(first))
            try:
                return await self._follow(method, url, repository, headers)
            except (aiohttp.ClientError, TimeoutError) as exc:
                self.health.failed("unreachable")
                raise UpstreamUnavailable(
                    "upstream unreachable", detail={"upstream": self.name}
                ) from exc
        except aiohttp.ClientError as exc:
            self.health.failed("unreachable")
            raise UpstreamUnavailable(
                "upstream request failed", detail={"upstream": self.name}
            ) from exc

    async def _follow(
        self, method: str, url: str, repository: str, headers: Mapping[str, str] | None
    ) -> UpstreamResponse:
        redirected_elsewhere = False
        for _hop in range(MAX_REDIRECTS + 1):
            response = await self._send_authenticated(method, url, repository, headers)
            location = response.headers.get("Location")
            if response.status not in REDIRECT_STATUSES or not location:
                return UpstreamResponse(response, redirected_elsewhere)
            response.release()
            target = urljoin(url, location)
            if urlsplit(target).scheme not in ("http", "https"):
                raise UpstreamBadResponse("upstream redirected to a non-HTTP URL")
            await self._guard.check("redirect", target)
            if response.status == 303:
                method = "GET"
            if origin_of(target) != self._origin:
                redirected_elsewhere = True
            url = target
        raise UpstreamBadResponse("upstream redirected too many times")

    async def _send_authenticated(
        self, method: str, url: str, repository: str, headers: Mapping[str, str] | None
    ) -> aiohttp.ClientResponse:
        response = await self._send(method, url, repository, headers, refresh_token=False)
        if response.status != 401:
            return response
        sent_credentials = "Authorization" in response.request_info.headers
        challenge_header = response.headers.get("WWW-Authenticate", "")
        response.release()
        if self._auth.remember(origin_of(url), challenge_header) is None:
            return await self._send(method, url, repository, headers, refresh_token=False)
        # A token we sent was refused: fetch a fresh one. If we sent none, the challenge
        # was news to us, and a token another process already fetched may do...
        response = await self._send(
            method, url, repository, headers, refresh_token=sent_credentials
        )
        if response.status != 401 or sent_credentials:
            return await self._renewing_credentials(method, url, repository, headers, response)
        # ...unless it is refused too: then one fresh token, and that is the answer.
        response.release()
        response = await self._send(method, url, repository, headers, refresh_token=True)
        return await self._renewing_credentials(method, url, repository, headers, response)

    async def _renewing_credentials(
        self,
        method: str,
        url: str,
        repository: str,
        headers: Mapping[str, str] | None,
        response: aiohttp.ClientResponse,
    ) -> aiohttp.ClientResponse:
        """Refused with a fresh token (or Basic): the credential itself may have been
        rotated. Sources that can (helper, ECR, Google) are asked anew, once."""
        if response.status != 401 or "Authorization" not in response.request_info.headers:
            return response
        if not await self._auth.renew_credentials(origin_of(url)):
            return response
        response.release()
        return await self._send(method, url, repository, headers, refresh_token=True)

    async def _send(
        self,
        method: str,
        url: str,
        repository: str,
        headers: Mapping[str, str] | None,
        *,
        refresh_token: bool,
    ) -> aiohttp.ClientResponse:
        request_headers: CIMultiDict[str] = CIMultiDict(headers or {})
        # Byte-exact bodies: never let anything in between compress them for us.
        request_headers["Accept-Encoding"] = "identity"
        request_headers["User-Agent"] = USER_AGENT
        # Token scopes name the repository as the upstream knows it.
        upstream_repository = self.upstream_repository(repository)
        authorization = await self._auth.header_for(url, upstream_repository, refresh=refresh_token)
        if authorization:
            request_headers["Authorization"] = authorization
        started = time.monotonic()
        try:
            response = await self._session.request(
                method,
                url,
                headers=request_headers,
                allow_redirects=False,
                timeout=self._timeout,
            )
        except aiohttp.ClientConnectorError as exc:
            # The name was checked before this hop; it answering otherwise now (DNS
            # rebinding) is refused by the session's resolver, and is no failure to retry.
            refusal = self._guard.refusal_of(exc)
            if refusal is not None:
                raise refusal from None
            raise
        self._note_rate_limit(response.headers)
        self.health.answered(response.status)
        if self._observe is not None:
            self._observe(self.name, method, response.status, time.monotonic() - started)
        log.debug(
            "upstream_request",
            upstream=self.name,
            method=method,
            repository=repository,
            upstream_repository=upstream_repository,
            url=redact_url(url),
            status=response.status,
            seconds=round(time.monotonic() - started, 4),
        )
        return response

    def _note_rate_limit(self, headers: Mapping[str, str]) -> None:
        observed = RateLimit.from_headers(headers)
        if observed is None:
            return
        self.rate_limit = observed
        low = (
            observed.limit is not None
            and observed.remaining is not None
            and observed.remaining < observed.limit / 10
        )
        (log.warning if low else log.debug)(
            "upstream_rate_limit",
            upstream=self.name,
            limit=observed.limit,
            remaining=observed.remaining,
            window_seconds=observed.window_seconds,
        )
