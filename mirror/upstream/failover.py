"""Failover: other sources of an upstream's content, asked when the upstream fails.

An upstream may list fallbacks (`upstreams.<name>.fallbacks`): other registries that
hold the same content, such as `mirror.gcr.io` for Docker Hub. `FailoverClient` is
the upstream's client; when the upstream cannot answer (connection error, timeout,
5xx, 429) the same request goes to each fallback in order, anonymously, each through
its own `UpstreamClient` (its own session, guard and token challenges). A 404 from
the upstream is an answer, not a failure: no fallback is asked.

A 429 carries a Retry-After: the upstream is then skipped, straight to the
fallbacks, for that long (at most `MAX_PRIMARY_PAUSE`), so that it is not hammered.

Content from a fallback is trusted only as far as its digest: a response to a
request by digest (blob or manifest) is hashed as it is read, and bytes that do not
match raise `DigestMismatch` before the caller commits anything. That fallback is then
passed over for `MISMATCH_QUARANTINE`, so the client's retry goes to the next one. A
tag resolved through a fallback is what the fallback says; the response carries the
fallback's label (`UpstreamResponse.fallback`) so that the manifest cache can mark it.
"""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import AsyncIterator, Callable, Mapping

import structlog

from mirror.errors import (
    DigestInvalid,
    DigestMismatch,
    MirrorError,
    TooManyRequests,
    UpstreamUnavailable,
)
from mirror.headers import bounded_int
from mirror.oci import Digest, looks_like_digest
from mirror.upstream.client import UpstreamClient, UpstreamResponse, UpstreamSettings
from mirror.upstream.guard import UpstreamNetwork
from mirror.upstream.tokens import TokenCache

log = structlog.get_logger(__name__)

# Longest the upstream is skipped after a 429, whatever its Retry-After says.
MAX_PRIMARY_PAUSE = 300.0
# A 429 without a usable Retry-After.
DEFAULT_PRIMARY_PAUSE = 60.0
# How long a fallback that served bytes not matching their digest is passed over.
MISMATCH_QUARANTINE = 600.0

# (upstream, fallback, outcome): outcome is served, failed or mismatch.
ObserveFallback = Callable[[str, str, str], None]


def _is_failure(status: int) -> bool:
    """Statuses that mean "ask someone else"; a 404 (or 401/403) is an answer."""
    return status == 429 or status >= 500


class _VerifiedResponse(UpstreamResponse):
    """A fallback's answer to a request by digest, hashed as it is read."""

    def __init__(self, inner: UpstreamResponse, digest: Digest, on_mismatch: Callable[[], None]):
        # The same response underneath (no second constructor); only reading is checked.
        self.__dict__.update(inner.__dict__)
        self._digest = digest
        self._on_mismatch = on_mismatch

    def _check(self, hashed: str) -> None:
        if hashed != self._digest.hex:
            self._on_mismatch()
            raise DigestMismatch(
                "a fallback served bytes that do not match the digest",
                detail={"digest": str(self._digest), "fallback": self.fallback},
            )

    async def read(self, limit: int) -> bytes:
        body = await super().read(limit)
        self._check(hashlib.new(self._digest.algorithm, body).hexdigest())
        return body

    async def iter_batches(self, max_batch: int) -> AsyncIterator[bytes]:
        hasher = hashlib.new(self._digest.algorithm)
        async for batch in super().iter_batches(max_batch):
            hasher.update(batch)
            yield batch
        self._check(hasher.hexdigest())


def _requested_digest(path: str) -> Digest | None:
    """The digest a `blobs/<digest>` or `manifests/<digest>` request asks for."""
    kind, _, reference = path.partition("/")
    if kind not in ("blobs", "manifests") or not looks_like_digest(reference):
        return None
    try:
        return Digest.parse(reference)
    except DigestInvalid:
        return None  # an algorithm we cannot check: the caller refuses it anyway


class FailoverClient(UpstreamClient):
    """An upstream's client that turns to its fallbacks when the upstream fails."""

    def __init__(
        self,
        settings: UpstreamSettings,
        network: UpstreamNetwork,
        tokens: TokenCache,
        fallbacks: Mapping[str, UpstreamClient],
        *,
        observe: Callable[[str, str, int, float], None] | None = None,
        observe_fallback: ObserveFallback | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        super().__init__(settings, network, tokens, observe)
        self._fallbacks = dict(fallbacks)  # label -> client, in the configured order
        self._observe_fallback = observe_fallback
        self._clock = clock
        self._primary_paused_until = 0.0
        self._quarantined_until: dict[str, float] = {}

    @property
    def primary_paused(self) -> bool:
        """True while the upstream is skipped after a 429."""
        return self._clock() < self._primary_paused_until

    async def open(
        self,
        method: str,
        repository: str,
        path: str,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> UpstreamResponse:
        if not self._fallbacks:
            return await super().open(method, repository, path, headers=headers)
        now = self._clock()
        primary: UpstreamResponse | None = None
        failure: Exception | None = None
        if now >= self._primary_paused_until:
            try:
                primary = await super().open(method, repository, path, headers=headers)
            except UpstreamUnavailable as exc:
                failure = exc
            else:
                if not _is_failure(primary.status):
                    return primary
                if primary.status == 429:
                    self._pause_primary(primary, now)
        else:
            failure = TooManyRequests(
                "the upstream is rate limiting this mirror",
                headers={"Retry-After": str(max(1, round(self._primary_paused_until - now)))},
            )
        answer = await self._ask_fallbacks(method, repository, path, headers, now)
        if answer is not None:
            if primary is not None:
                primary.close()
            return answer
        if primary is not None:
            return primary  # the upstream's own failure, for the caller to turn into an error
        assert failure is not None
        raise failure

    def _pause_primary(self, response: UpstreamResponse, now: float) -> None:
        seconds = bounded_int((response.headers.get("Retry-After") or "").strip(), 86_400)
        pause = min(
            float(seconds) if seconds is not None else DEFAULT_PRIMARY_PAUSE, MAX_PRIMARY_PAUSE
        )
        self._primary_paused_until = now + pause
        log.warning("upstream_paused", upstream=self.name, seconds=pause)

    async def _ask_fallbacks(
        self,
        method: str,
        repository: str,
        path: str,
        headers: Mapping[str, str] | None,
        now: float,
    ) -> UpstreamResponse | None:
        for label, client in self._fallbacks.items():
            if now < self._quarantined_until.get(label, 0.0):
                continue
            try:
                response = await client.open(method, repository, path, headers=headers)
            except MirrorError as exc:
                # Unreachable, refused by the guard, a broken reply: the next one may do.
                self._count(label, "failed")
                log.info(
                    "upstream_fallback_failed",
                    upstream=self.name,
                    fallback=label,
                    error=exc.message,
                )
                continue
            if response.status >= 400:
                self._count(label, "failed")
                log.info(
                    "upstream_fallback_failed",
                    upstream=self.name,
                    fallback=label,
                    status=response.status,
                )
                response.close()
                continue
            self._count(label, "served")
            log.info(
                "upstream_fallback_served",
                upstream=self.name,
                fallback=label,
                repository=repository,
                path=path,
            )
            response.fallback = label
            digest = _requested_digest(path)
            if digest is None or method == "HEAD":
                return response
            return _VerifiedResponse(response, digest, functools.partial(self._reject, label))
        return None

    def _reject(self, label: str) -> None:
        self._count(label, "mismatch")
        self._quarantined_until[label] = self._clock() + MISMATCH_QUARANTINE
        log.warning("upstream_fallback_mismatch", upstream=self.name, fallback=label)

    def _count(self, label: str, outcome: str) -> None:
        if self._observe_fallback is not None:
            self._observe_fallback(self.name, label, outcome)
