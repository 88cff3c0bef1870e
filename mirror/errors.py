"""The domain's exception tree and its OCI error codes.

Every failure a client can be told about is a `MirrorError` carrying an OCI
error code and the HTTP status distribution maps it to; `api/errors.py` turns
it into the JSON body. Lower layers raise these (or subclasses) and never let
aiohttp, redis or diskcache exceptions escape their module unwrapped.

    MirrorError
    ├── NameInvalid, DigestInvalid, ManifestInvalid, RangeInvalid, SizeInvalid
    ├── NameUnknown, ManifestUnknown, BlobUnknown
    ├── OfflineMiss                offline, and not in the cache (404 NAME_UNKNOWN)
    ├── Unsupported
    ├── Unauthorized, Denied
    ├── BadRequest, Conflict       the console's API: a malformed body; an action refused
    ├── TooManyRequests
    ├── StorageFull                a blob does not fit the storage bounds (seeding)
    ├── BundleError                an OCI layout export/import cannot use; names file and key
    ├── UpstreamError              upstream unreachable, 5xx, or broken reply
    │   ├── UpstreamUnavailable    connection refused, timeout, 5xx  (503)
    │   ├── UpstreamBadResponse    wrong digest, size or protocol      (502)
    │   │   ├── DigestMismatch     bytes that do not hash to the digest (or size) asked for
    │   │   └── UpstreamCredentialsRefused  the token server refused our credentials
    │   ├── UpstreamTargetRefused  a realm or redirect the mirror must not follow (502)
    │   └── UpstreamCredentialsUnavailable  a credential source (helper, ECR, GCP) failed (503)
    ├── MetadataUnavailable        the metadata store cannot be reached (503)
    └── ObjectStoreUnavailable     the S3 object store cannot be reached or refuses (503)

`MetadataUnavailable` is deliberately not an upstream failure: the upstream may be
right there while Redis is down, and the caches answer the two differently (an
upstream failure may be answered stale; a metadata outage is worked around, and the
pull goes on uncoordinated). `ObjectStoreUnavailable` stands apart for the same reason:
the object store is the cache's own storage, not the upstream.

Two exceptions stay outside the tree on purpose, since no client is ever told them:
`ConfigError` (`config.py`), which stops a command before anything is served, and
`TargetRefusedError` (`upstream/guard.py`), an `OSError` the resolver raises so that
aiohttp carries it out of a connection attempt; `guard.py` turns it into
`UpstreamTargetRefused`.
"""

from __future__ import annotations

from typing import Any


class MirrorError(Exception):
    """A failure with an OCI error code and an HTTP status."""

    code = "UNKNOWN"
    status = 500

    def __init__(self, message: str, *, detail: Any = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.detail = detail
        self.headers = headers or {}


class NameInvalid(MirrorError):
    code, status = "NAME_INVALID", 400


class DigestInvalid(MirrorError):
    code, status = "DIGEST_INVALID", 400


class ManifestInvalid(MirrorError):
    code, status = "MANIFEST_INVALID", 400


class RangeInvalid(MirrorError):
    code, status = "RANGE_INVALID", 416


class SizeInvalid(MirrorError):
    code, status = "SIZE_INVALID", 400


class NameUnknown(MirrorError):
    code, status = "NAME_UNKNOWN", 404


class ManifestUnknown(MirrorError):
    code, status = "MANIFEST_UNKNOWN", 404


class BlobUnknown(MirrorError):
    code, status = "BLOB_UNKNOWN", 404


class OfflineMiss(MirrorError):
    """Offline, and what was asked for is not in the cache."""

    code, status = "NAME_UNKNOWN", 404


class Unsupported(MirrorError):
    code, status = "UNSUPPORTED", 405


class Unauthorized(MirrorError):
    code, status = "UNAUTHORIZED", 401


class Denied(MirrorError):
    code, status = "DENIED", 403


class BadRequest(MirrorError):
    """A console API request whose query or JSON body is malformed (not an OCI code:
    the console's API is not the registry's)."""

    code, status = "BAD_REQUEST", 400


class Conflict(MirrorError):
    """A console action the cache's state refuses (evicting pinned content)."""

    code, status = "CONFLICT", 409


class TooManyRequests(MirrorError):
    code, status = "TOOMANYREQUESTS", 429


class StorageFull(MirrorError):
    """A blob does not fit within storage.max_size / min_free even after eviction.

    Clients never see it (such a blob is streamed to them without caching); `mirror
    seed`, which wants it cached, does.
    """

    code, status = "UNAVAILABLE", 507


class BundleError(MirrorError):
    """A bundle (OCI image layout) that `mirror import` refuses, or `export` cannot write.

    Never reaches HTTP; the code is the nearest OCI one should it ever do so.
    """

    code, status = "MANIFEST_INVALID", 400


class UpstreamError(MirrorError):
    """The upstream could not give a usable answer.

    The OCI spec lists no code for a gateway failure; UNAVAILABLE is the code
    distribution uses for it, and these are 5xx, where the spec leaves the body free.
    """

    code, status = "UNAVAILABLE", 502


class UpstreamUnavailable(UpstreamError):
    code, status = "UNAVAILABLE", 503


class UpstreamBadResponse(UpstreamError):
    code, status = "UNAVAILABLE", 502


class DigestMismatch(UpstreamBadResponse):
    """Bytes received did not hash to the digest (or size) they were fetched for."""


class UpstreamCredentialsRefused(UpstreamBadResponse):
    """The token server refused the credentials we sent (401/403): they may have been
    rotated, and a source that can renew them is asked once before this is told."""


class UpstreamTargetRefused(UpstreamError):
    """The upstream named a token realm or redirect the mirror will not follow: an
    address more internal than the upstream's own, or credentials over plain HTTP."""

    code, status = "UNAVAILABLE", 502


class UpstreamCredentialsUnavailable(UpstreamError):
    """An upstream's credentials could not be had: its helper failed, or ECR or Google
    refused or could not be reached. The message never carries a secret."""

    code, status = "UNAVAILABLE", 503


class MetadataUnavailable(MirrorError):
    """The metadata store cannot be reached. The caches work around it (fetch without
    a lease, keep records for later); a client sees it only where nothing else helps."""

    code, status = "UNAVAILABLE", 503

    def __init__(self, message: str, *, detail: Any = None):
        super().__init__(message, detail=detail, headers={"Retry-After": "10"})


class ObjectStoreUnavailable(MirrorError):
    """The S3 object store cannot be reached, times out, or refuses a request (bad
    credentials, missing bucket, 5xx). An absent key is not this: it is a None.

    Like a metadata outage, not an upstream failure: a miss is still fetched and
    streamed to its clients, only not cached."""

    code, status = "UNAVAILABLE", 503

    def __init__(self, message: str, *, detail: Any = None):
        super().__init__(message, detail=detail, headers={"Retry-After": "10"})
