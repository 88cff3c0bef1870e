"""The `/v2/` endpoints: parse and validate, call one cache API, write the response.

`add_routes` draws the `/v2/` grammar in aiohttp's router, one small handler per
endpoint. Repository names contain `/`, so the name pattern is greedy across segments
and the last segments decide the endpoint (`/manifests/<reference>`, `/blobs/<digest>`,
`/referrers/<digest>`, `/tags/list`). The patterns only split the path: names,
references and digests are validated by `mirror.oci`. Only GET and HEAD are served;
any other method on a `/v2/` path is 405 UNSUPPORTED. No policy lives here: hit,
miss, TTL and stale decisions are the caches'.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web
from aiohttp.typedefs import Handler

from mirror.api import transport
from mirror.api.errors import expect_handler
from mirror.api.middleware import PRINCIPAL
from mirror.api.services import SERVICES, Services
from mirror.cache.blobs import BlobSource
from mirror.cache.listings import Listing
from mirror.cache.manifests import Manifest
from mirror.errors import (
    NameUnknown,
    RangeInvalid,
    SizeInvalid,
    Unsupported,
)
from mirror.headers import bounded_int
from mirror.logging import ACCESS_INFO
from mirror.oci import AcceptSet, Digest, Reference
from mirror.routing import Route

READ_METHODS = frozenset({"GET", "HEAD"})
MAX_PAGE = 10_000
# Longer than any repository name with its upstream prefix, or any media type.
QUERY_VALUE_MAX = 512

# aiohttp matches these against the path with `%2F` still encoded, so an encoded slash
# never separates the endpoint from the name or the argument. `.` stops at a newline,
# and so does the argument, as the catch-all `/v2/{tail:.*}` these replaced did: such a
# path stays 404 NAME_UNKNOWN.
_NAME = "{name:.+}"
_ARGUMENT = r"[^/\n]+"


def add_routes(router: web.UrlDispatcher) -> None:
    """The `/v2/` endpoints, and the answer for every other `/v2/` path and method.

    The four name endpoints cannot overlap: each is told by its next-to-last segment.
    `tags/list` takes an empty name too, so that `/v2//tags/list` reaches the name's
    validation as it always has.
    """
    endpoints: list[tuple[str, Handler]] = [
        ("/v2", base),
        ("/v2/", base),
        ("/v2/_catalog", catalog),
        ("/v2/{name:.*}/tags/list", tags),
        (f"/v2/{_NAME}/manifests/{{reference:{_ARGUMENT}}}", manifest),
        (f"/v2/{_NAME}/blobs/{{digest:{_ARGUMENT}}}", blob),
        (f"/v2/{_NAME}/referrers/{{digest:{_ARGUMENT}}}", referrers),
    ]
    for path, handler in endpoints:
        router.add_get(path, handler, expect_handler=expect_handler)
    # Registered last, any method: what no endpoint above took, here rather than in
    # aiohttp's own 404 and 405, so that its `Expect` is answered by `expect_handler`.
    for path in ("/v2", "/v2/{tail:.*}"):
        router.add_route("*", path, not_served, expect_handler=expect_handler)


async def not_served(request: web.Request) -> web.StreamResponse:
    if request.method not in READ_METHODS:
        raise Unsupported("this mirror is read-only", headers={"Allow": "GET, HEAD"})
    raise NameUnknown("no such endpoint")


def _page_size(request: web.Request) -> int | None:
    text = request.query.get("n")
    if text is None or text == "":
        return None
    size = bounded_int(text, MAX_PAGE)
    if size is None:
        raise SizeInvalid("n must be a non-negative integer", detail={"n": text[:20]})
    return size


def _query_text(request: web.Request, key: str) -> str | None:
    """A free-text query value (`last`, `artifactType`): bounded, so the Link built from
    it and the upstream request carrying it stay within every client's header limit."""
    text = request.query.get(key)
    if text is not None and len(text) > QUERY_VALUE_MAX:
        raise SizeInvalid(f"{key} is too long", detail={key: text[:20]})
    return text


def _repository_endpoint(
    request: web.Request, kind: str, argument: str | None = None
) -> tuple[Services, Route, str]:
    """The start of every endpoint on a repository: its kind on the access line, the
    route (the client's access rules checked before any cache or upstream work), and
    the text of its `argument` from the path ("" without one)."""
    info = request[ACCESS_INFO]
    info.kind = kind
    services = request.app[SERVICES]
    text = request.match_info[argument] if argument else ""
    route = services.router.resolve(request.match_info["name"], request.query.get("ns"))
    info.upstream, info.repository, info.reference = (
        route.upstream,
        route.repository,
        text or None,
    )
    services.access.authorize(request[PRINCIPAL], route.upstream, route.repository)
    return services, route, text


def not_modified(request: web.Request, digest: str) -> bool:
    """True if `If-None-Match` names `digest` as a quoted entity tag, or is `*`: the
    client holds this content already. Weak tags count too (RFC 9110 compares
    `If-None-Match` weakly); an unquoted digest is not an entity tag and does not."""
    tags = request.if_none_match
    return tags is not None and any(tag.value in (digest, "*") for tag in tags)


async def base(request: web.Request) -> web.StreamResponse:
    request[ACCESS_INFO].kind = "base"
    return web.json_response({})


async def catalog(request: web.Request) -> web.StreamResponse:
    request[ACCESS_INFO].kind = "catalog"
    services = request.app[SERVICES]
    principal = request[PRINCIPAL]
    listing = await services.listings.catalog(
        _page_size(request),
        _query_text(request, "last"),
        "/v2/_catalog",
        visible=lambda upstream, repo: services.access.may_pull(principal, upstream, repo),
    )
    return _listing_response(request, listing)


async def tags(request: web.Request) -> web.StreamResponse:
    services, route, _ = _repository_endpoint(request, "tags")
    listing = await services.listings.tags(route, _page_size(request), _query_text(request, "last"))
    return _listing_response(request, listing)


async def referrers(request: web.Request) -> web.StreamResponse:
    services, route, argument = _repository_endpoint(request, "referrers", "digest")
    digest = Digest.parse(argument)
    artifact_type = _query_text(request, "artifactType")
    listing = await services.listings.referrers(route, digest, artifact_type)
    return _listing_response(request, listing)


def _listing_response(request: web.Request, listing: Listing) -> web.Response:
    request[ACCESS_INFO].cache = listing.cache_result
    response = web.Response(body=listing.body, content_type=listing.content_type)
    if listing.link:
        response.headers["Link"] = listing.link
    if listing.filters_applied:
        response.headers["OCI-Filters-Applied"] = listing.filters_applied
    return response


# Manifests


async def manifest(request: web.Request) -> web.StreamResponse:
    services, route, argument = _repository_endpoint(request, "manifest", "reference")
    reference = Reference.parse(argument)
    accept = AcceptSet.from_headers(request.headers.getall("Accept", []))
    head = request.method == "HEAD"
    found = await services.manifests.get(route, reference, accept, head=head)
    request[ACCESS_INFO].cache = found.cache_result
    return await _send_manifest(request, route, found, head=head)


async def _send_manifest(
    request: web.Request, route: Route, manifest: Manifest, *, head: bool
) -> web.StreamResponse:
    headers = {
        "Content-Type": manifest.media_type,
        "Docker-Content-Digest": manifest.digest,
        "ETag": f'"{manifest.digest}"',
        "X-Cache": _x_cache(manifest.cache_result),
    }
    if not head and manifest.body is not None and not not_modified(request, manifest.digest):
        # A whole body in one Response: aiohttp sends it with the headers in one write
        # (a StreamResponse sends its headers first, a second system call per pull).
        request[ACCESS_INFO].body_bytes = len(manifest.body)
        # A pulled manifest's last access moves, as a blob's does (eviction reads it),
        # and so does its repository's last pull (the console's list).
        request.app[SERVICES].blobs.note_pull(route, manifest.digest)
        return web.Response(body=manifest.body, headers=headers)
    response = web.StreamResponse(headers=headers)
    response.content_length = manifest.size
    if not_modified(request, manifest.digest):
        response.set_status(304)
        response.content_length = None
        await response.prepare(request)
        return response
    await response.prepare(request)  # a HEAD: the headers alone
    await response.write_eof()
    return response


def _x_cache(cache_result: str) -> str:
    return {
        "hit": "HIT",
        "stale": "STALE",
        "revalidated": "HIT",
        "fallback": "MISS (fallback)",
    }.get(cache_result, "MISS")


# Blobs


@dataclass(frozen=True, slots=True)
class ByteRange:
    start: int
    end: int  # exclusive


def parse_range(request: web.Request, size: int | None) -> ByteRange | None:
    """The single byte range to send, None for the whole blob; RangeInvalid if unsatisfiable."""
    header = request.headers.get("Range")
    if header is None:
        return None
    if "," in header:
        # Multi-range: answering with the whole blob is allowed, and containers/image
        # splits a 200 itself.
        return None
    try:
        requested = request.http_range
    except ValueError:
        raise RangeInvalid("invalid Range header", detail={"range": header[:100]}) from None
    if size is None:
        return None
    start, stop = requested.start, requested.stop
    if start is None:
        start = 0
    if start < 0:  # suffix range: the last -start bytes
        start = max(size + start, 0)
    if start >= size:
        raise RangeInvalid(
            "range not satisfiable",
            detail={"range": header[:100], "size": size},
            headers={"Content-Range": f"bytes */{size}"},
        )
    end = size if stop is None else min(stop, size)
    return ByteRange(start, end)


async def blob(request: web.Request) -> web.StreamResponse:
    services, route, argument = _repository_endpoint(request, "blob", "digest")
    digest = Digest.parse(argument)
    if request.method == "HEAD":
        size, cache_result = await services.blobs.head(route, digest)
        request[ACCESS_INFO].cache = cache_result
        response = _blob_response(digest, cache_result)
        response.content_length = size
        await response.prepare(request)
        await response.write_eof()
        return response
    source = await services.blobs.open(route, digest)
    try:
        request[ACCESS_INFO].cache = source.cache_result
        if source.redirect is not None:
            # The object store serves it: a short-lived signed URL, as distribution does.
            return web.Response(
                status=307,
                headers={"Location": source.redirect, "Docker-Content-Digest": str(digest)},
            )
        byte_range = parse_range(request, source.size)
        if source.stored is not None and not_modified(request, str(digest)):
            response = _blob_response(digest, source.cache_result)
            response.set_status(304)
            await response.prepare(request)
            return response
        with services.blobs.reading(digest):
            response = _blob_response(digest, source.cache_result)
            return await send_blob(request, response, source, byte_range)
    finally:
        source.close()


def _blob_response(digest: Digest, cache_result: str) -> web.StreamResponse:
    return web.StreamResponse(
        headers={
            "Content-Type": "application/octet-stream",
            "Docker-Content-Digest": str(digest),
            "ETag": f'"{digest}"',
            "Accept-Ranges": "bytes",
            "Cache-Control": "max-age=31536000, immutable",
            "X-Cache": _x_cache(cache_result),
        }
    )


async def send_blob(
    request: web.Request,
    response: web.StreamResponse,
    source: BlobSource,
    byte_range: ByteRange | None,
    *,
    head: bool = False,
) -> web.StreamResponse:
    """Send `source` (`byte_range` of it, as a 206) with `response`'s headers; for a
    HEAD, the same status and headers and no body. `/v2/` and the peer port both
    answer blobs this way."""
    start, end = 0, source.size
    if byte_range is not None and source.size is not None:
        start, end = byte_range.start, byte_range.end
        response.set_status(206)
        response.headers["Content-Range"] = f"bytes {start}-{end - 1}/{source.size}"
    if end is not None:
        response.content_length = end - start
    await response.prepare(request)
    if head:
        await response.write_eof()
        return response
    file = None if source.stored is None else source.stored.file
    chunks = spans = None
    if source.stored is not None and file is None:
        assert end is not None
        chunks = source.stored.chunks(start, end, transport.CHUNK)
    elif source.stored is None:
        assert source.download is not None
        if source.download.in_local_file and transport.may_sendfile(request):
            spans = source.download.file_spans(start, end)
        else:
            chunks = source.download.iter_bytes(start, end, chunk=transport.CHUNK)
    await transport.send_blob_body(
        request,
        response,
        file=file,
        chunks=chunks,
        offset=start,
        count=None if end is None else end - start,
        spans=spans,
    )
    return response
