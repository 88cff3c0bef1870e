"""The manifest policy: immutable digests, tags on a TTL, stale answers in outages.

By digest a manifest is immutable: fetched once, verified against the digest,
kept forever. By tag, a tag record (upstream, repository, tag → digest, media
type, checked-at) answers without any upstream call within `tag_ttl`; after
it the tag is revalidated with a HEAD (free on Docker Hub), and a GET is made
only for a digest we do not hold. If the upstream is unreachable, times out,
fails with 5xx or rate-limits us, the old record is served until `max_stale`
past its last confirmation.

We always ask the upstream for all four manifest types and negotiate with the
client locally, as distribution does: an OCI manifest or index is refused
(404) to a client whose Accept lists only other manifest types; a Docker
manifest list requested by tag by a client without list support resolves to
its linux/amd64 entry; a Docker schema 2 manifest is returned whatever the
client listed.

Hot manifests and fresh tag records are answered from memory (`mirror/cache/hot.py`),
with no store read, within the same rules.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

import structlog

from mirror.cache.context import CacheContext
from mirror.cache.hot import HotManifests, TagKey
from mirror.concurrency import SingleFlight, TaskOwner
from mirror.errors import (
    DigestInvalid,
    ManifestInvalid,
    ManifestUnknown,
    MetadataUnavailable,
    MirrorError,
    ObjectStoreUnavailable,
    TooManyRequests,
    UpstreamBadResponse,
    UpstreamUnavailable,
)
from mirror.metadata.base import BlobRecord, TagRecord
from mirror.oci import (
    ACCEPT_ALL_MANIFESTS,
    DOCKER_MANIFEST_LIST,
    MANIFEST_MAX_BYTES,
    MANIFEST_MEDIA_TYPES,
    OCI_INDEX,
    OCI_MANIFEST,
    AcceptSet,
    Digest,
    Reference,
    bare_media_type,
)
from mirror.policy import FOREVER, UpstreamPolicy
from mirror.routing import Route
from mirror.upstream.client import UpstreamResponse
from mirror.upstream.status import raise_for_upstream_status

log = structlog.get_logger(__name__)

MEMORY_BYTES = 64 * 1024 * 1024  # storage.memory_manifests's default
OFFLINE_MISS = "not in the cache, and this mirror is offline"


@dataclass(frozen=True, slots=True)
class Manifest:
    """A manifest to send: exact upstream bytes (None for a HEAD answered from headers)."""

    digest: str
    media_type: str
    size: int
    body: bytes | None
    # hit, miss, revalidated, stale, pass-through, fallback (a tag resolved by a fallback)
    cache_result: str


class ManifestCache:
    def __init__(
        self,
        context: CacheContext,
        policies: Mapping[str, UpstreamPolicy],
        clock: Callable[[], float] = time.time,
        memory_bytes: int = MEMORY_BYTES,
    ):
        self._ctx = context
        self._policies = policies
        self._clock = clock
        self._by_digest: SingleFlight[tuple[str, str, str], Manifest] = SingleFlight()
        self._by_tag: SingleFlight[tuple[str, str, str], Manifest] = SingleFlight()
        self.stale_answers: Counter[str] = Counter()  # by upstream
        self.hot = HotManifests(memory_bytes, clock)
        self._refreshes = TaskOwner("hot-manifest-refreshes")

    async def close(self) -> None:
        await self._refreshes.close()
        await self._by_digest.close()
        await self._by_tag.close()

    def _refresh_if_due(
        self, key: str | TagKey, refresh: Callable[[], Coroutine[Any, Any, None]]
    ) -> None:
        """Read a hot entry again in the background once it is due (`HotManifests.due`):
        the request that noticed is answered from memory all the same."""
        if not self._refreshes.closing and self.hot.due(key):
            self._refreshes.spawn(refresh(), name="hot-manifest-refresh")

    async def get(
        self, route: Route, reference: Reference, accept: AcceptSet, *, head: bool = False
    ) -> Manifest:
        if reference.digest is not None:
            manifest = await self._by_digest_cached(route, reference.digest)
        else:
            assert reference.tag is not None
            manifest = await self._by_tag_cached(route, reference.tag, head=head)
        return await self._negotiate(route, manifest, accept, by_tag=reference.tag is not None)

    # By digest

    async def _by_digest_cached(self, route: Route, digest: Digest) -> Manifest:
        manifest = await self._load(str(digest), "hit")
        if manifest is not None:
            await self._check_access(route, digest)
            return manifest
        key = (route.upstream, route.repository, str(digest))
        return await self._by_digest.run(key, lambda: self._fetch(route, str(digest), digest))

    async def cached(self, digest: str) -> Manifest | None:
        """The manifest if the cache holds it; never asks the upstream."""
        return await self._load(digest, "hit")

    async def _check_access(self, route: Route, digest: Digest) -> None:
        """The content access rule, asked once per repository while the manifest is hot."""
        if self.hot.allowed(str(digest), route.upstream, route.repository):
            return
        await self._ctx.access.check(route, "manifests", digest)
        self.hot.allow(str(digest), route.upstream, route.repository)

    def forget(self, digest: str) -> None:
        """The blob left the cache (eviction, scrub): drop it from memory too."""
        self.hot.forget(digest)

    async def _load(self, digest: str, cache_result: str) -> Manifest | None:
        """A manifest we hold, or None: from memory while it is hot there."""
        hot = self.hot.manifest(digest)
        if hot is not None:
            self._refresh_if_due(digest, lambda: self._refresh_manifest(digest))
            media_type, body = hot
            return Manifest(digest, media_type, len(body), body, cache_result)
        manifest = await self._load_stored(digest, cache_result)
        if manifest is not None and manifest.body is not None:
            self.hot.put_manifest(digest, manifest.media_type, manifest.body)
        return manifest

    async def _refresh_manifest(self, digest: str) -> None:
        # Its record alone: the bytes of a digest never change, and whoever removes the
        # blob (eviction, `mirror gc`) removes the record.
        try:
            record = await self._ctx.metadata.get_blob(digest)
        except MetadataUnavailable:
            return  # left to lapse at its time: the request after it reads the stores
        finally:
            current = self.hot.refreshed(digest)
        if not current:
            return  # evicted meanwhile: the read may predate it
        if record is None or record.media_type is None:
            self.hot.forget(digest)  # evicted or collected by another process
        else:
            self.hot.confirm_manifest(digest)

    async def _load_stored(self, digest: str, cache_result: str) -> Manifest | None:
        try:
            record = await self._ctx.metadata.get_blob(digest)
        except MetadataUnavailable:
            # Degraded: the bytes on disk are verified; their own mediaType says what they are.
            return await self._load_without_metadata(digest, cache_result)
        if record is None or record.media_type is None:
            return None
        body = await self._stored_body(digest)
        if body is None:
            return None
        return Manifest(digest, record.media_type, len(body), body, cache_result)

    async def _stored_body(self, digest: str) -> bytes | None:
        """The manifest's bytes from the blob store; None if it lacks them or cannot be
        reached (an object store's outage: the manifest is fetched again)."""
        try:
            return await self._ctx.store.read_bytes(Digest.parse(digest))
        except ObjectStoreUnavailable as exc:
            log.warning("manifest_store_unavailable", digest=digest, error=exc.message)
            return None

    async def _load_without_metadata(self, digest: str, cache_result: str) -> Manifest | None:
        body = await self._stored_body(digest)
        if body is None:
            return None
        try:
            media_type = json.loads(body).get("mediaType")
        except (ValueError, AttributeError):
            return None
        if media_type not in MANIFEST_MEDIA_TYPES:
            return None
        return Manifest(digest, media_type, len(body), body, cache_result)

    async def _fetch(self, route: Route, reference: str, expected: Digest | None) -> Manifest:
        """GET a manifest from the upstream, verify it, store it."""
        if self._ctx.offline:
            raise ManifestUnknown(OFFLINE_MISS, detail={"reference": reference})
        client = self._ctx.clients[route.upstream]
        async with await client.open(
            "GET",
            route.repository,
            f"manifests/{reference}",
            headers={"Accept": ACCEPT_ALL_MANIFESTS},
        ) as response:
            raise_for_upstream_status(response, ManifestUnknown)
            body = await response.read(MANIFEST_MAX_BYTES)
            media_type = _media_type_of(response, body)
            digest = _verified_digest(response, body, expected)
        # A manifest the store cannot take is still served; only the caching is lost.
        await self._ctx.store.put_bytes(digest, body)
        now = self._clock()
        # Records the answer does not depend on: an outage only delays them.
        await self._ctx.deferred.put_blob(
            str(digest),
            BlobRecord(size=len(body), created_at=now, last_access=now, media_type=media_type),
        )
        await self._ctx.access.record(route, digest)
        await self._ctx.deferred.add_repository(route.upstream, route.repository)
        log.info(
            "manifest_fetched",
            upstream=route.upstream,
            repository=route.repository,
            digest=str(digest),
        )
        return Manifest(str(digest), media_type, len(body), body, "miss")

    # By tag

    async def _tag_record(self, route: Route, tag: str) -> TagRecord | None:
        """The tag's record: from memory while fresh there, else from the store (and then
        into memory while it is fresh)."""
        key = (route.upstream, route.repository, tag)
        remembered = self.hot.tag(key)
        if remembered is not None:
            self._refresh_if_due(key, lambda: self._refresh_tag(route, tag))
            return remembered
        try:
            record = await self._ctx.metadata.get_tag(route.upstream, route.repository, tag)
        except MetadataUnavailable:
            return None  # degraded: ask the upstream, as if we had never seen the tag
        if record is not None:
            self.hot.put_tag(key, record, record.checked_at + self._tag_ttl(route, tag))
        return record

    async def _refresh_tag(self, route: Route, tag: str) -> None:
        key = (route.upstream, route.repository, tag)
        try:
            record = await self._ctx.metadata.get_tag(route.upstream, route.repository, tag)
        except MetadataUnavailable:
            return  # left to lapse at its time
        finally:
            current = self.hot.refreshed(key)
        if not current:
            return
        if record is None:
            self.hot.drop_tag(key)  # deleted (`mirror gc`)
        else:
            self.hot.put_tag(key, record, record.checked_at + self._tag_ttl(route, tag))

    def _tag_ttl(self, route: Route, tag: str) -> float:
        # Offline, what we hold is the truth whatever its age.
        if self._ctx.offline:
            return FOREVER
        return self._policies[route.upstream].ttl_for(route.repository, tag)

    async def _by_tag_cached(self, route: Route, tag: str, *, head: bool) -> Manifest:
        record = await self._tag_record(route, tag)
        policy = self._policies[route.upstream]
        ttl = self._tag_ttl(route, tag)
        if record is not None and self._clock() - record.checked_at < ttl:
            manifest = await self._load(record.digest, "hit")
            if manifest is not None:
                return manifest
        key = (route.upstream, route.repository, tag)
        manifest = await self._by_tag.run(
            key, lambda: self._revalidate(route, tag, record, ttl + policy.max_stale, head)
        )
        if manifest.body is None and not head:
            # This GET joined a client HEAD's revalidation, answered from headers alone.
            return await self._by_digest_cached(route, Digest.parse(manifest.digest))
        return manifest

    async def _revalidate(
        self, route: Route, tag: str, record: TagRecord | None, usable_for: float, head: bool
    ) -> Manifest:
        client = self._ctx.clients[route.upstream]
        try:
            async with await client.open(
                "HEAD",
                route.repository,
                f"manifests/{tag}",
                headers={"Accept": ACCEPT_ALL_MANIFESTS},
            ) as response:
                raise_for_upstream_status(response, ManifestUnknown)
                announced = _announced_digest(response)
                fallback = response.fallback
                head_type = bare_media_type(response.headers.get("Content-Type"))
                head_size = response.content_length
            manifest = None
            if announced is not None:
                manifest = await self._load(str(announced), "revalidated")
                if manifest is not None:
                    # The upstream just said this repository's tag points at it.
                    await self._ctx.access.record(route, announced)
                elif head and head_type in MANIFEST_MEDIA_TYPES and head_size:
                    # A client HEAD needs no body: answer from the upstream's headers and
                    # spare a GET, which Docker Hub counts as a pull. The tag is recorded
                    # all the same: Docker's GET by digest follows and caches the body,
                    # and the next pull within tag_ttl then asks the upstream nothing.
                    manifest = Manifest(str(announced), head_type, head_size, None, "pass-through")
            if manifest is None:
                # By digest when we know it: the tag cannot move between HEAD and GET.
                manifest = await self._fetch(route, str(announced or tag), announced)
            if fallback is not None:
                # The digest is the fallback's word, not the upstream's: say so.
                log.warning(
                    "manifest_from_fallback",
                    upstream=route.upstream,
                    repository=route.repository,
                    tag=tag,
                    fallback=fallback,
                    digest=manifest.digest,
                )
                manifest = dataclasses.replace(manifest, cache_result="fallback")
        except (UpstreamUnavailable, TooManyRequests) as exc:
            return await self._stale_or_raise(route, tag, record, usable_for, exc)
        except MirrorError:
            raise
        await self._ctx.deferred.put_tag(
            route.upstream,
            route.repository,
            tag,
            TagRecord(
                digest=manifest.digest, media_type=manifest.media_type, checked_at=self._clock()
            ),
        )
        return manifest

    async def _stale_or_raise(
        self,
        route: Route,
        tag: str,
        record: TagRecord | None,
        usable_for: float,
        error: MirrorError,
    ) -> Manifest:
        # usable_for: the tag's TTL plus max_stale, counted from its last confirmation.
        if record is None or self._clock() - record.checked_at > usable_for:
            raise error
        body = await self._stored_body(record.digest)
        if body is None:
            raise error
        self.stale_answers[route.upstream] += 1
        log.warning(
            "manifest_served_stale",
            upstream=route.upstream,
            repository=route.repository,
            tag=tag,
            age=round(self._clock() - record.checked_at),
            error=error.message,
        )
        return Manifest(record.digest, record.media_type, len(body), body, "stale")

    # Negotiation with the client's Accept

    async def _negotiate(
        self, route: Route, manifest: Manifest, accept: AcceptSet, *, by_tag: bool
    ) -> Manifest:
        media_type = manifest.media_type
        if accept.allows(media_type):
            return manifest
        if media_type in (OCI_MANIFEST, OCI_INDEX):
            raise ManifestUnknown(
                f"{media_type} found, but the Accept header does not allow it",
                detail={"mediaType": media_type},
            )
        if media_type == DOCKER_MANIFEST_LIST and by_tag and manifest.body is not None:
            platform_digest = _amd64_entry(manifest.body)
            if platform_digest is not None:
                entry = await self._by_digest_cached(route, Digest.parse(platform_digest))
                return Manifest(
                    entry.digest, entry.media_type, entry.size, entry.body, manifest.cache_result
                )
        return manifest

    async def refresh(self, route: Route, tag: str) -> Manifest:
        """Revalidate the tag with the upstream now, whatever its TTL (the console's
        refresh). An upstream failure is raised, never answered stale."""
        key = (route.upstream, route.repository, tag)
        # No record to fall back on: a failure is the answer.
        manifest = await self._by_tag.run(
            key, lambda: self._revalidate(route, tag, None, -1.0, head=False)
        )
        if manifest.cache_result == "stale":  # joined a client's revalidation, which may
            raise UpstreamUnavailable("the upstream did not answer; the tag was not refreshed")
        now = self._clock()
        record = TagRecord(digest=manifest.digest, media_type=manifest.media_type, checked_at=now)
        self.hot.put_tag(key, record, now + self._tag_ttl(route, tag))  # not the old one
        return manifest


def _media_type_of(response: UpstreamResponse, body: bytes) -> str:
    media_type = bare_media_type(response.headers.get("Content-Type"))
    if media_type in MANIFEST_MEDIA_TYPES or media_type.startswith("application/vnd."):
        return media_type
    try:
        declared = json.loads(body).get("mediaType")
    except (ValueError, AttributeError):
        raise ManifestInvalid("upstream manifest is not JSON") from None
    if not isinstance(declared, str) or not declared:
        raise UpstreamBadResponse("upstream manifest has no media type")
    return declared


def _announced_digest(response: UpstreamResponse) -> Digest | None:
    """The upstream's Docker-Content-Digest; a malformed one is the upstream's fault."""
    text = response.headers.get("Docker-Content-Digest")
    if not text:
        return None
    try:
        return Digest.parse(text)
    except DigestInvalid:
        raise UpstreamBadResponse("upstream sent an invalid Docker-Content-Digest") from None


def _verified_digest(response: UpstreamResponse, body: bytes, expected: Digest | None) -> Digest:
    """The body's digest, which must match the requested one and the upstream's claim."""
    announced = _announced_digest(response)
    algorithm = (expected or announced or Digest("sha256", "")).algorithm
    actual = Digest.of(body, algorithm)
    for claimed in (expected, announced):
        if claimed is not None and claimed.algorithm == actual.algorithm and claimed != actual:
            raise UpstreamBadResponse(
                "upstream manifest does not match its digest",
                detail={"expected": str(claimed), "actual": str(actual)},
            )
    return actual


def _amd64_entry(body: bytes) -> str | None:
    try:
        manifests = json.loads(body).get("manifests", [])
        for entry in manifests:
            platform = entry.get("platform", {})
            if platform.get("os") == "linux" and platform.get("architecture") == "amd64":
                return str(entry["digest"])
    except (ValueError, AttributeError, KeyError, TypeError):
        return None
    return None
