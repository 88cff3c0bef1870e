"""An upstream's answer status, turned into the domain error a client should see.

The caches (blobs, manifests, listings, the access rule) all ask the upstream and all
meet the same failures; this is the one place that says what each status means to a
client: 404 is the caller's own "unknown" error, 401/403 a refusal, 429 a rate limit
passed on with its `Retry-After`, 5xx an upstream outage (which a cache may answer
stale), anything else a broken reply.
"""

from __future__ import annotations

from mirror.errors import (
    Denied,
    MirrorError,
    TooManyRequests,
    UpstreamBadResponse,
    UpstreamUnavailable,
)
from mirror.headers import retry_after_seconds
from mirror.upstream.client import UpstreamResponse


def raise_for_upstream_status(response: UpstreamResponse, not_found: type[MirrorError]) -> None:
    """Turn an upstream failure status into the error the client should see."""
    status = response.status
    if status == 200:
        return
    if status == 404:
        raise not_found("not found upstream")
    if status in (401, 403):
        raise Denied("the upstream refused access", detail={"upstream_status": status})
    if status == 429:
        raise TooManyRequests(
            "the upstream is rate limiting this mirror",
            headers={"Retry-After": retry_after_seconds(response.headers.get("Retry-After"), 60)},
        )
    if status >= 500:
        raise UpstreamUnavailable("the upstream failed", detail={"upstream_status": status})
    raise UpstreamBadResponse("unexpected upstream status", detail={"upstream_status": status})
