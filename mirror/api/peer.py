"""The peer endpoint: the blobs this replica holds, served to the other replicas of its
fleet on `cluster.listen`, and nothing else.

    GET|HEAD /cluster/v1/blobs/<digest>    Authorization: Bearer <cluster secret>

A committed blob, or a download running in this process, read as it grows (its last
byte held until verified, as for `/v2/`), sent through `transport.send_blob_body` with
`Range`, `Docker-Content-Digest` and `Content-Length` as on `/v2/`. A blob this process
neither holds nor is downloading is 404 BLOB_UNKNOWN: the endpoint never fetches,
resolves no route, reads no upstream and checks no client access rule (the caller is a
replica, which checks its client's rights itself). Manifests have no peer path: they
are small, and each replica keeps its own tag TTLs.

It is its own aiohttp app with its own router, on its own port and runner, built from a
started mirror app (`app.create_peer_app`): no path of the public app reaches it, and
no `/v2/` path reaches the public caches through it. Every request needs the shared
secret, read on each request (a rotated `secret_file` needs no restart) and compared in
constant time; anything else is 401 UNAUTHORIZED. The secret is never logged: the
access line has no headers, and `logging.mask_credentials` masks a Bearer value
wherever else it would appear.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from mirror.api import transport, v2
from mirror.api.errors import expect_handler, oci_errors
from mirror.api.middleware import on_prepare, request_context
from mirror.cache.blobs import BlobCache
from mirror.errors import BlobUnknown, NameUnknown, Unauthorized, Unsupported
from mirror.logging import ACCESS_INFO
from mirror.metrics import METRICS, Metrics
from mirror.oci import Digest

log = structlog.get_logger(__name__)

BLOB_PATH = "/cluster/v1/blobs/{digest}"
PEER_BLOBS = web.AppKey("peer_blobs", BlobCache)
# Called on every request: the secret as it is now ("" refuses every request).
PEER_SECRET = web.AppKey[Callable[[], str]]("peer_secret")
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="mirror-cluster"'}


def create_peer_app(
    blobs: BlobCache, secret: Callable[[], str], metrics: Metrics
) -> web.Application:
    """The peer endpoint over `blobs`, guarded by `secret`; `metrics` counts its requests
    with the public app's (kind "peer")."""
    app = web.Application(middlewares=[request_context, oci_errors, require_secret])
    app[PEER_BLOBS] = blobs
    app[PEER_SECRET] = secret
    app[METRICS] = metrics
    app.on_response_prepare.append(on_prepare)
    app.on_response_prepare.append(transport.remember_prepared)
    app.router.add_get(BLOB_PATH, peer_blob, expect_handler=expect_handler)
    app.router.add_route("*", "/{tail:.*}", not_served, expect_handler=expect_handler)
    return app


@web.middleware
async def require_secret(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every request, whatever its path, shows the cluster secret first: nothing about
    this replica is told to a caller without it."""
    request[ACCESS_INFO].kind = "peer"
    expected = request.app[PEER_SECRET]()
    if not expected:
        log.warning("cluster_secret_unavailable")
        raise Unauthorized("the cluster secret is not available", headers=_CHALLENGE)
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    # aiohttp keeps header bytes that are not UTF-8 as surrogates: they compare, unequal.
    offered = given.strip().encode("utf-8", "surrogateescape")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        offered, expected.encode("utf-8", "surrogateescape")
    ):
        raise Unauthorized("the cluster secret is required", headers=_CHALLENGE)
    return await handler(request)


async def not_served(request: web.Request) -> web.StreamResponse:
    if request.method not in v2.READ_METHODS:
        raise Unsupported("the peer endpoint is read-only", headers={"Allow": "GET, HEAD"})
    raise NameUnknown("no such endpoint")


async def peer_blob(request: web.Request) -> web.StreamResponse:
    info = request[ACCESS_INFO]
    info.reference = request.match_info["digest"][:100]
    digest = Digest.parse(request.match_info["digest"])
    source = await request.app[PEER_BLOBS].held(digest)
    if source is None:
        raise BlobUnknown("this replica does not hold the blob", detail={"digest": str(digest)})
    try:
        info.cache = source.cache_result
        byte_range = v2.parse_range(request, source.size)
        response = web.StreamResponse(
            headers={
                "Content-Type": "application/octet-stream",
                "Docker-Content-Digest": str(digest),
                "Accept-Ranges": "bytes",
            }
        )
        with request.app[PEER_BLOBS].reading(digest):
            return await v2.send_blob(
                request, response, source, byte_range, head=request.method == "HEAD"
            )
    finally:
        source.close()
