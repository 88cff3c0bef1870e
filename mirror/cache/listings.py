"""Tags lists, referrers and the catalog: short-lived pass-through with outage fallback.

Tags lists and referrers go to the upstream and are kept for
`tags_list_ttl`; within it they are answered from the store, and when the
upstream fails the last answer is served whatever its age. A tags list with
nothing stored falls back to the tags this mirror holds records for. The
catalog lists the repositories held locally.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit

from mirror.cache.context import CacheContext
from mirror.errors import (
    ManifestUnknown,
    MetadataUnavailable,
    NameUnknown,
    TooManyRequests,
    UpstreamUnavailable,
)
from mirror.headers import bounded_int, header_safe
from mirror.metadata.base import CachedResponse
from mirror.oci import OCI_INDEX, Digest
from mirror.routing import Route
from mirror.upstream.status import raise_for_upstream_status

LISTING_MAX_BYTES = 4 * 1024 * 1024
MAX_LINK_PAGE = 10_000  # as the API caps a client's n


@dataclass(frozen=True, slots=True)
class Listing:
    body: bytes
    content_type: str
    cache_result: str
    link: str | None = None  # the next page, as a path on this mirror
    filters_applied: str | None = None


def paginate(items: list[str], n: int | None, last: str | None) -> tuple[list[str], bool]:
    """Items after `last` (exclusive), at most `n`; and whether more follow."""
    ordered = sorted(items)
    if last is not None:
        ordered = [item for item in ordered if item > last]
    if n is None:
        return ordered, False
    return ordered[:n], len(ordered) > n


def next_link(path: str, n: int, last: str, extra: Mapping[str, str]) -> str:
    return f'<{path}?{urlencode({**extra, "n": n, "last": last})}>; rel="next"'


class Listings:
    def __init__(
        self,
        context: CacheContext,
        ttls: Mapping[str, float],
        default_upstream: str | None,
    ):
        self._ctx = context
        self._ttls = ttls
        self._default = default_upstream

    async def tags(self, route: Route, n: int | None, last: str | None) -> Listing:
        query = {key: str(value) for key, value in (("n", n), ("last", last)) if value is not None}
        if n == 0:
            return Listing(_tags_body(route.client_name, []), "application/json", "hit")
        key = f"tags:{route.upstream}/{route.repository}?{urlencode(query)}"
        path = f"tags/list?{urlencode(query)}" if query else "tags/list"
        try:
            if self._ctx.offline:
                raise UpstreamUnavailable("offline")  # answered from our own tag records
            cached = await self._fetch_or_cached(route, key, path, NameUnknown)
        except (UpstreamUnavailable, TooManyRequests):
            # Nothing stored for this query: what we know from our own tag records.
            try:
                known = await self._ctx.metadata.list_tags(route.upstream, route.repository)
            except MetadataUnavailable:
                known = []
            if not known:
                if self._ctx.offline:
                    raise NameUnknown("no tags known, and this mirror is offline") from None
                raise
            page, more = paginate(known, n, last)
            link = self._link(route, n, page[-1]) if more and n and page else None
            return Listing(_tags_body(route.client_name, page), "application/json", "stale", link)
        response, result = cached
        try:
            tags = json.loads(response.body).get("tags") or []
        except (ValueError, AttributeError):
            tags = []
        # Apply n and last here too: distribution 2.8 ignores them for tags lists, and
        # the spec wants lexical order, which 2.8 does not give an unpaginated list.
        page, more = paginate([str(tag) for tag in tags], n, last)
        upstream_link = response.headers.get("Link")
        if upstream_link:
            link = self._rewrite_link(route, upstream_link)
        else:
            link = self._link(route, n, page[-1]) if more and n and page else None
        return Listing(_tags_body(route.client_name, page), "application/json", result, link)

    async def referrers(self, route: Route, digest: Digest, artifact_type: str | None) -> Listing:
        query = {"artifactType": artifact_type} if artifact_type else {}
        path = f"referrers/{digest}" + (f"?{urlencode(query)}" if query else "")
        key = f"referrers:{route.upstream}/{route.repository}/{path}"
        if self._ctx.offline:
            cached = await self._ctx.metadata.get_response(key)
            if cached is None:
                raise ManifestUnknown("no referrers known, and this mirror is offline")
            response, result = cached, "hit"
        else:
            response, result = await self._fetch_or_cached(route, key, path, ManifestUnknown)
        return Listing(
            response.body.encode(),
            OCI_INDEX,
            result,
            filters_applied=_filters_applied(response.headers.get("OCI-Filters-Applied")),
        )

    async def catalog(
        self,
        n: int | None,
        last: str | None,
        path: str,
        visible: Callable[[str, str], bool] = lambda upstream, repository: True,
    ) -> Listing:
        """The repositories held locally that this client may pull."""
        names = [
            repository if upstream == self._default else f"{upstream}/{repository}"
            for upstream, repository in await self._ctx.metadata.list_repositories()
            if visible(upstream, repository)
        ]
        page, more = paginate(names, n, last)
        link = next_link(path, n, page[-1], {}) if more and n and page else None
        body = json.dumps({"repositories": page}).encode()
        return Listing(body, "application/json", "hit", link)

    async def _fetch_or_cached(
        self,
        route: Route,
        key: str,
        path: str,
        not_found: type[NameUnknown] | type[ManifestUnknown],
    ) -> tuple[CachedResponse, str]:
        try:
            cached = await self._ctx.metadata.get_response(key)
        except MetadataUnavailable:
            cached = None  # degraded: pass through
        now = time.time()
        if cached is not None and now - cached.stored_at < self._ttls[route.upstream]:
            return cached, "hit"
        try:
            async with await self._ctx.clients[route.upstream].open(
                "GET", route.repository, path, headers={"Accept": "application/json"}
            ) as response:
                raise_for_upstream_status(response, not_found)
                body = await response.read(LISTING_MAX_BYTES)
                kept_headers = {
                    name: response.headers[name]
                    for name in ("Link", "OCI-Filters-Applied")
                    if name in response.headers
                }
                content_type = response.headers.get("Content-Type", "application/json")
        except (UpstreamUnavailable, TooManyRequests):
            if cached is not None:
                return cached, "stale"
            raise
        try:
            text = body.decode("utf-8")
            json.loads(text)
        except ValueError:
            raise UpstreamUnavailable("upstream sent a listing that is not JSON") from None
        fresh = CachedResponse(200, text, content_type, now, kept_headers)
        with contextlib.suppress(MetadataUnavailable):  # degraded: just not kept
            await self._ctx.metadata.put_response(key, fresh)
        return fresh, "miss"

    def _link(self, route: Route, n: int, last: str) -> str:
        extra = {"ns": route.namespace} if route.namespace else {}
        return next_link(f"/v2/{route.client_name}/tags/list", n, last, extra)

    def _rewrite_link(self, route: Route, upstream_link: str) -> str | None:
        """The upstream's next-page link, as a path on this mirror for this client."""
        target = upstream_link.split(";", 1)[0].strip().strip("<>")
        params = dict(parse_qsl(urlsplit(target).query))
        last = params.get("last")
        n = bounded_int(params.get("n", ""), MAX_LINK_PAGE)
        if not last or n is None:
            return None
        return self._link(route, n, last)


def _filters_applied(value: str | None) -> str | None:
    """The upstream's OCI-Filters-Applied, passed on only if it can be sent as it is."""
    return value if value is not None and header_safe(value) else None


def _tags_body(name: str, tags: list[str]) -> bytes:
    return json.dumps({"name": name, "tags": tags}).encode()
