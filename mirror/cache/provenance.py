"""The access rule for cached content, blobs and manifests alike.

Content is addressed by digest, so once cached it could be served through any name.
For public upstreams that is harmless and it is what makes a cache worth having. For
an upstream reached with credentials it would leak: a client allowed to pull
`public/app` must not get a private manifest or layer by naming its digest.

The rule: content is served for a (upstream, repository) that is known to hold it
(fetched for it, or confirmed by that upstream), or when neither that upstream nor any
known holder is credentialed. Otherwise the repository's own upstream is asked (one
HEAD of that digest in that repository) and a yes is remembered. Content whose holders
are unknown (records lost) counts as credentialed while any credentialed upstream is
configured. With no credentialed upstream at all, the rule costs nothing: no metadata
round trip on the hot path.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from mirror.errors import BlobUnknown, ManifestUnknown, MetadataUnavailable
from mirror.metadata.base import MetadataStore
from mirror.metadata.deferred import DeferredWrites
from mirror.oci import ACCEPT_ALL_MANIFESTS, Digest
from mirror.routing import Route
from mirror.upstream.client import UpstreamClient
from mirror.upstream.status import raise_for_upstream_status

Kind = Literal["blobs", "manifests"]


class ContentAccess:
    """May this route be served this cached digest?"""

    def __init__(
        self,
        metadata: MetadataStore,
        deferred: DeferredWrites,
        clients: Mapping[str, UpstreamClient],
        credentialed: frozenset[str],
    ):
        self._metadata = metadata
        self._deferred = deferred
        self._clients = clients
        self._credentialed = credentialed

    def may_share(self, route: Route, fetched_for: Route) -> bool:
        """May `route` join a download started for `fetched_for` without asking?"""
        if (fetched_for.upstream, fetched_for.repository) == (route.upstream, route.repository):
            return True
        return not ({route.upstream, fetched_for.upstream} & self._credentialed)

    async def check(self, route: Route, kind: Kind, digest: Digest) -> None:
        """Return if `route` may be served the cached `digest`; else raise BLOB_UNKNOWN or
        MANIFEST_UNKNOWN (the upstream says this repository lacks it), or an upstream
        error."""
        if not self._credentialed:
            return
        try:
            holders = await self._metadata.blob_repositories(str(digest))
        except MetadataUnavailable:
            # Degraded: the upstream's word is still to be had (not recorded for now).
            await self.confirm(route, kind, digest)
            return
        if (route.upstream, route.repository) in holders:
            return
        if holders and not (
            route.upstream in self._credentialed
            or any(upstream in self._credentialed for upstream, _ in holders)
        ):
            return
        await self.confirm(route, kind, digest)
        await self.record(route, digest)

    async def confirm(self, route: Route, kind: Kind, digest: Digest) -> int | None:
        """HEAD the digest in this repository upstream; its size, or BLOB_UNKNOWN /
        MANIFEST_UNKNOWN if the upstream says it is not there."""
        # A registry answers a manifest HEAD only for the types the Accept allows.
        headers = {"Accept": ACCEPT_ALL_MANIFESTS} if kind == "manifests" else None
        not_found = ManifestUnknown if kind == "manifests" else BlobUnknown
        client = self._clients[route.upstream]
        async with await client.open(
            "HEAD", route.repository, f"{kind}/{digest}", headers=headers
        ) as response:
            raise_for_upstream_status(response, not_found)
            return response.content_length

    async def record(self, route: Route, digest: Digest) -> None:
        """Remember that this repository holds the digest."""
        await self._deferred.add_blob_repository(str(digest), route.upstream, route.repository)
