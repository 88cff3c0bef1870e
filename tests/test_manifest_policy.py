"""The manifest policy (mirror/cache/manifests.py) without a socket: tag TTLs and their
edges, tag rules, serve-stale windows and Accept negotiation, against an in-memory
upstream, the real blob and metadata stores on tmp_path, and an injected clock."""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support.net import eventually_async
from support.stub_upstream import StubUpstream

from mirror.app import eviction_listener
from mirror.cache.context import CacheContext
from mirror.cache.hot import CONFIRM_EVERY, ENTRY_OVERHEAD, REFRESH_BY, HotManifests
from mirror.cache.manifests import MEMORY_BYTES, Manifest, ManifestCache
from mirror.cache.provenance import ContentAccess
from mirror.config import TagRule
from mirror.errors import ManifestUnknown, MirrorError, TooManyRequests, UpstreamUnavailable
from mirror.metadata.base import TagRecord
from mirror.metadata.deferred import DeferredWrites
from mirror.metadata.embedded import EmbeddedMetadataStore
from mirror.oci import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
    AcceptSet,
    Digest,
    Reference,
)
from mirror.policy import UpstreamPolicy
from mirror.routing import Route
from mirror.storage.blobstore import FilesystemBlobStore

UPSTREAM = "hub"
REPO = "team/app"
ROUTE = Route(UPSTREAM, REPO, REPO)
TAG_TTL = 600.0
MAX_STALE = 3600.0
START = 1_000_000.0
ANY = AcceptSet.from_headers([])
DOCKER_ONLY = AcceptSet.from_headers([f"{DOCKER_MANIFEST}, {DOCKER_MANIFEST_LIST}"])


def manifest_body(media_type: str, marker: str = "") -> bytes:
    return json.dumps(
        {"schemaVersion": 2, "mediaType": media_type, "config": {}, "layers": [], "m": marker}
    ).encode()


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


@dataclass
class World:
    cache: ManifestCache
    upstream: StubUpstream
    clock: Clock
    store: FilesystemBlobStore
    metadata: EmbeddedMetadataStore

    async def get(
        self, reference: str = "latest", accept: AcceptSet = ANY, *, head: bool = False
    ) -> Manifest:
        return await self.cache.get(ROUTE, Reference.parse(reference), accept, head=head)


@contextlib.asynccontextmanager
async def open_world(
    tmp_path: Path, *, credentialed: bool = False, memory_bytes: int = MEMORY_BYTES
) -> AsyncIterator[World]:
    store = FilesystemBlobStore(tmp_path / "storage")
    store.prepare()
    metadata = EmbeddedMetadataStore(store.meta_dir)
    deferred = DeferredWrites(metadata)
    upstream = StubUpstream()
    clients = {UPSTREAM: upstream}
    policy = UpstreamPolicy(
        TAG_TTL,
        MAX_STALE,
        tag_rules=(
            TagRule(repository=REPO, tag="v*", immutable=True),
            TagRule(repository=REPO, tag="nightly", tag_ttl=60),
        ),
    )
    clock = Clock()
    access = ContentAccess(
        metadata,
        deferred,
        clients,  # type: ignore[arg-type]
        frozenset({UPSTREAM} if credentialed else ()),
    )
    context = CacheContext(store, metadata, deferred, clients, access)  # type: ignore[arg-type]
    cache = ManifestCache(context, {UPSTREAM: policy}, clock, memory_bytes)
    try:
        yield World(cache, upstream, clock, store, metadata)
    finally:
        await cache.close()
        await metadata.close()


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    async with open_world(tmp_path) as opened:
        yield opened


async def cached_tag(world: World, tag: str = "latest") -> str:
    """A tag fetched once at START; the upstream's record of requests starts empty."""
    digest = world.upstream.publish(REPO, manifest_body(OCI_MANIFEST), OCI_MANIFEST, tag=tag)
    first = await world.get(tag)
    assert (first.digest, first.cache_result) == (digest, "miss")
    world.upstream.asked.clear()
    return digest


# Tag TTLs


async def test_tag_just_inside_its_ttl_asks_the_upstream_nothing(world: World) -> None:
    digest = await cached_tag(world)
    world.clock.now = START + TAG_TTL - 0.001
    manifest = await world.get()
    assert (manifest.digest, manifest.cache_result) == (digest, "hit")
    assert world.upstream.asked == []


@pytest.mark.parametrize("age", [TAG_TTL, TAG_TTL + 0.001])
async def test_tag_at_or_past_its_ttl_is_revalidated_with_one_head(
    world: World, age: float
) -> None:
    digest = await cached_tag(world)
    world.clock.now = START + age
    manifest = await world.get()
    assert (manifest.digest, manifest.cache_result) == (digest, "revalidated")
    assert world.upstream.asked == [("HEAD", REPO, "manifests/latest")]
    # The confirmation restarts the TTL.
    world.upstream.asked.clear()
    world.clock.now = START + age + TAG_TTL - 0.001
    assert (await world.get()).cache_result == "hit"
    assert world.upstream.asked == []


async def test_a_moved_tag_is_fetched_by_the_digest_the_head_announced(world: World) -> None:
    await cached_tag(world)
    moved = world.upstream.publish(
        REPO, manifest_body(OCI_MANIFEST, "2"), OCI_MANIFEST, tag="latest"
    )
    world.clock.now = START + TAG_TTL
    manifest = await world.get()
    assert (manifest.digest, manifest.cache_result) == (moved, "miss")
    assert world.upstream.asked == [
        ("HEAD", REPO, "manifests/latest"),
        ("GET", REPO, f"manifests/{moved}"),
    ]


async def test_a_tag_rule_ttl_replaces_the_upstream_ttl(world: World) -> None:
    await cached_tag(world, "nightly")
    world.clock.now = START + 60 - 0.001
    assert (await world.get("nightly")).cache_result == "hit"
    world.clock.now = START + 60
    assert (await world.get("nightly")).cache_result == "revalidated"
    assert world.upstream.asked == [("HEAD", REPO, "manifests/nightly")]


async def test_an_immutable_tag_is_never_revalidated(world: World) -> None:
    digest = await cached_tag(world, "v1.2")
    world.clock.now = START + 10 * 365 * 86400
    manifest = await world.get("v1.2")
    assert (manifest.digest, manifest.cache_result) == (digest, "hit")
    assert world.upstream.asked == []


# Serve-stale windows

FAILURES: list[tuple[int | UpstreamUnavailable, type[MirrorError]]] = [
    (UpstreamUnavailable("upstream connection failed"), UpstreamUnavailable),
    (500, UpstreamUnavailable),
    (503, UpstreamUnavailable),
    (429, TooManyRequests),
]


@pytest.mark.parametrize(("failure", "error"), FAILURES)
async def test_a_failing_upstream_gets_the_stale_tag_up_to_max_stale(
    world: World, failure: int | UpstreamUnavailable, error: type[MirrorError]
) -> None:
    digest = await cached_tag(world)
    world.upstream.failure = failure
    for age in (TAG_TTL, TAG_TTL + MAX_STALE):
        world.clock.now = START + age
        manifest = await world.get()
        assert (manifest.digest, manifest.cache_result) == (digest, "stale"), age
    assert world.cache.stale_answers[UPSTREAM] == 2
    world.clock.now = START + TAG_TTL + MAX_STALE + 0.001
    with pytest.raises(error):
        await world.get()
    assert world.cache.stale_answers[UPSTREAM] == 2


@pytest.mark.parametrize(("failure", "error"), FAILURES)
async def test_a_failing_upstream_with_nothing_cached_is_the_error(
    world: World, failure: int | UpstreamUnavailable, error: type[MirrorError]
) -> None:
    world.upstream.failure = failure
    with pytest.raises(error):
        await world.get()
    assert world.upstream.asked == [("HEAD", REPO, "manifests/latest")]
    assert world.cache.stale_answers[UPSTREAM] == 0


async def test_a_tag_the_upstream_no_longer_has_is_not_served_stale(world: World) -> None:
    await cached_tag(world)
    world.upstream.failure = 404
    world.clock.now = START + TAG_TTL
    with pytest.raises(ManifestUnknown):
        await world.get()


# Accept negotiation


@pytest.mark.parametrize("media_type", [OCI_MANIFEST, OCI_INDEX])
async def test_oci_types_are_refused_to_a_client_listing_only_docker_types(
    world: World, media_type: str
) -> None:
    world.upstream.publish(REPO, manifest_body(media_type), media_type, tag="latest")
    with pytest.raises(ManifestUnknown, match="Accept"):
        await world.get(accept=DOCKER_ONLY)
    # Refused by negotiation, not by the upstream: the manifest is cached all the same.
    assert (await world.get()).cache_result == "hit"


def manifest_list(amd64: str, arm64: str) -> bytes:
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST_LIST,
            "manifests": [
                {"digest": arm64, "platform": {"os": "linux", "architecture": "arm64"}},
                {"digest": amd64, "platform": {"os": "linux", "architecture": "amd64"}},
            ],
        }
    ).encode()


async def test_a_docker_list_by_tag_resolves_to_amd64_without_list_support(
    world: World,
) -> None:
    amd64 = world.upstream.publish(REPO, manifest_body(DOCKER_MANIFEST, "amd64"), DOCKER_MANIFEST)
    arm64 = world.upstream.publish(REPO, manifest_body(DOCKER_MANIFEST, "arm64"), DOCKER_MANIFEST)
    listed = world.upstream.publish(
        REPO, manifest_list(amd64, arm64), DOCKER_MANIFEST_LIST, tag="latest"
    )
    schema2_only = AcceptSet.from_headers([DOCKER_MANIFEST])
    manifest = await world.get(accept=schema2_only)
    assert (manifest.digest, manifest.media_type) == (amd64, DOCKER_MANIFEST)
    # With list support, and by digest whatever the Accept, the list itself.
    assert (await world.get(accept=DOCKER_ONLY)).digest == listed
    assert (await world.get(listed, accept=schema2_only)).digest == listed


@pytest.mark.parametrize(
    "accept", [[OCI_MANIFEST], [OCI_INDEX], [DOCKER_MANIFEST_LIST], ["text/plain"]]
)
async def test_docker_schema2_is_returned_whatever_the_client_listed(
    world: World, accept: list[str]
) -> None:
    digest = world.upstream.publish(
        REPO, manifest_body(DOCKER_MANIFEST), DOCKER_MANIFEST, tag="latest"
    )
    manifest = await world.get(accept=AcceptSet.from_headers(accept))
    assert (manifest.digest, manifest.media_type) == (digest, DOCKER_MANIFEST)


@pytest.mark.parametrize("accept", [[], ["*/*"], [DOCKER_MANIFEST, "*/*"]])
@pytest.mark.parametrize("media_type", [OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST_LIST])
async def test_a_wildcard_or_no_accept_gets_the_manifest_as_it_is(
    world: World, accept: list[str], media_type: str
) -> None:
    digest = world.upstream.publish(REPO, manifest_body(media_type), media_type, tag="latest")
    manifest = await world.get(accept=AcceptSet.from_headers(accept))
    assert (manifest.digest, manifest.media_type) == (digest, media_type)


# Hot manifests and tag records in memory (mirror/cache/hot.py)

OTHER = Route(UPSTREAM, "team/other", "team/other")


class StoreReads:
    """Counts the metadata and blob store reads a manifest request makes."""

    def __init__(self, world: World, monkeypatch: pytest.MonkeyPatch):
        self.counts: Counter[str] = Counter()
        for target, name in (
            (world.metadata, "get_blob"),
            (world.metadata, "get_tag"),
            (world.store, "read_bytes"),
        ):
            original = getattr(target, name)

            async def counted(*args: Any, _original: Any = original, _name: str = name) -> Any:
                self.counts[_name] += 1
                return await _original(*args)

            monkeypatch.setattr(target, name, counted)


async def evicted_elsewhere(world: World, digest: str) -> None:
    """What another process's eviction (or `mirror gc`) leaves: no file, no record."""
    await world.store.delete(Digest.parse(digest))
    await world.metadata.delete_blob(digest)


async def hot_then_evicted_elsewhere(world: World) -> str:
    """A cached manifest in this process's memory, then removed by another process."""
    digest = await cached_tag(world)
    assert (await world.get(digest)).cache_result == "hit"  # hot now
    await evicted_elsewhere(world, digest)
    return digest


async def test_a_hot_manifest_is_answered_with_no_store_read(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    digest = await cached_tag(world)
    await world.get()  # read from the stores once, into memory
    reads = StoreReads(world, monkeypatch)
    for _ in range(3):
        assert (await world.get()).cache_result == "hit"
        assert (await world.get(digest)).cache_result == "hit"
    assert reads.counts == {}
    assert world.upstream.asked == []
    # Memory is a short-lived copy: read again once CONFIRM_EVERY has passed.
    world.clock.now += CONFIRM_EVERY
    assert (await world.get()).digest == digest
    assert reads.counts == {"get_tag": 1, "get_blob": 1, "read_bytes": 1}


async def test_a_manifest_pulled_on_is_read_again_in_the_background(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    await cached_tag(world)
    await world.get()  # the tag record and the manifest into memory
    reads = StoreReads(world, monkeypatch)
    world.clock.now += REFRESH_BY
    # Answered from memory; the stores are read after, with no request waiting on them.
    assert (await world.get()).cache_result == "hit"
    read_once = {"get_tag": 1, "get_blob": 1}  # a manifest's bytes never change

    async def read_again() -> bool:
        return reads.counts == read_once

    await eventually_async(read_again)
    assert (await world.get()).cache_result == "hit"  # one read at a time, not one per hit
    # Past the first read's CONFIRM_EVERY: the second read keeps it in memory.
    world.clock.now = START + CONFIRM_EVERY + 1
    assert (await world.get()).cache_result == "hit"
    assert reads.counts == read_once
    assert world.upstream.asked == []


async def test_a_read_in_the_background_drops_what_another_process_evicted(
    world: World,
) -> None:
    digest = await hot_then_evicted_elsewhere(world)
    world.clock.now += REFRESH_BY
    assert (await world.get(digest)).cache_result == "hit"  # memory, within CONFIRM_EVERY

    async def dropped() -> bool:
        return world.cache.hot.manifest(digest) is None

    await eventually_async(dropped)
    manifest = await world.get(digest)
    assert (manifest.digest, manifest.cache_result) == (digest, "miss")
    assert world.upstream.asked == [("GET", REPO, f"manifests/{digest}")]


def test_a_read_again_that_began_before_an_eviction_is_void() -> None:
    clock = Clock()
    hot = HotManifests(MEMORY_BYTES, clock)
    hot.put_manifest("a", OCI_MANIFEST, b"a")
    assert hot.due("a") is False  # just read
    clock.now += REFRESH_BY
    assert hot.due("a") is True
    assert hot.due("a") is False  # one read at a time
    hot.forget("a")  # this process evicted it while the read ran
    assert hot.refreshed("a") is False
    hot.put_manifest("a", OCI_MANIFEST, b"a")
    clock.now += REFRESH_BY
    assert hot.due("a") is True
    assert hot.refreshed("a") is True


async def test_memory_off_reads_the_stores_every_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_world(tmp_path, memory_bytes=0) as world:
        digest = await cached_tag(world)
        reads = StoreReads(world, monkeypatch)
        for _ in range(2):
            assert (await world.get(digest)).cache_result == "hit"
        assert reads.counts == {"get_blob": 2, "read_bytes": 2}
        assert len(world.cache.hot) == 0


async def test_a_manifest_evicted_by_another_process_leaves_memory_within_confirm_every(
    world: World,
) -> None:
    digest = await hot_then_evicted_elsewhere(world)
    world.clock.now += CONFIRM_EVERY
    manifest = await world.get(digest)
    assert (manifest.digest, manifest.cache_result) == (digest, "miss")
    assert world.upstream.asked == [("GET", REPO, f"manifests/{digest}")]


async def test_an_eviction_in_this_process_drops_the_manifest_from_memory_at_once(
    world: World,
) -> None:
    digest = await cached_tag(world)
    assert (await world.get(digest)).cache_result == "hit"  # hot now
    await evicted_elsewhere(world, digest)
    # What the app gives its Evictor to hear of each removed blob (no fleet here).
    await eviction_listener(world.cache, None)(digest)
    assert (await world.get(digest)).cache_result == "miss"  # the clock has not moved


async def test_a_hot_manifest_keeps_the_access_rule_per_repository(tmp_path: Path) -> None:
    async with open_world(tmp_path, credentialed=True) as world:
        body = manifest_body(OCI_MANIFEST, "private")
        digest = world.upstream.publish(REPO, body, OCI_MANIFEST)
        assert (await world.get(digest)).cache_result == "miss"  # fetched for REPO
        assert (await world.get(digest)).cache_result == "hit"  # into memory, rule asked
        world.upstream.asked.clear()
        assert (await world.get(digest)).cache_result == "hit"
        assert world.upstream.asked == []
        # Another repository of the same credentialed upstream: the upstream is asked,
        # every time, while it says no; memory holding the bytes changes nothing.
        for _ in range(2):
            with pytest.raises(ManifestUnknown):
                await world.cache.get(OTHER, Reference.parse(digest), ANY)
        assert world.upstream.asked == [("HEAD", OTHER.repository, f"manifests/{digest}")] * 2
        # Once the upstream says it holds it, it is asked no more.
        world.upstream.publish(OTHER.repository, body, OCI_MANIFEST)
        world.upstream.asked.clear()
        for _ in range(2):
            found = await world.cache.get(OTHER, Reference.parse(digest), ANY)
            assert (found.digest, found.cache_result) == (digest, "hit")
        assert world.upstream.asked == [("HEAD", OTHER.repository, f"manifests/{digest}")]


async def test_a_tag_in_memory_is_answered_only_while_fresh(world: World) -> None:
    digest = await cached_tag(world)
    world.clock.now = START + TAG_TTL - 1
    assert (await world.get()).cache_result == "hit"  # the record is in memory now
    world.clock.now = START + TAG_TTL
    manifest = await world.get()
    assert (manifest.digest, manifest.cache_result) == (digest, "revalidated")
    assert world.upstream.asked == [("HEAD", REPO, "manifests/latest")]


async def test_a_tag_moved_by_another_process_is_seen_within_confirm_every(
    world: World,
) -> None:
    old = await cached_tag(world)
    assert (await world.get()).digest == old  # the record is in memory now
    # Another worker revalidated the tag and found it moved.
    moved = world.upstream.publish(REPO, manifest_body(OCI_MANIFEST, "2"), OCI_MANIFEST)
    assert (await world.get(moved)).cache_result == "miss"
    await world.metadata.put_tag(
        UPSTREAM, REPO, "latest", TagRecord(moved, OCI_MANIFEST, checked_at=START + 1)
    )
    world.upstream.asked.clear()
    world.clock.now = START + CONFIRM_EVERY
    manifest = await world.get()
    assert (manifest.digest, manifest.cache_result) == (moved, "hit")
    assert world.upstream.asked == []


def test_memory_is_bounded_by_bytes_least_recently_used_out_first() -> None:
    clock = Clock()
    entry = 100 + ENTRY_OVERHEAD
    hot = HotManifests(3 * entry, clock)
    for name in "abc":
        hot.put_manifest(name, OCI_MANIFEST, name.encode() * 100)
    assert hot.manifest("a") is not None  # a is now the most recently used
    hot.put_manifest("d", OCI_MANIFEST, b"d" * 100)
    assert [name for name in "abcd" if hot.manifest(name) is not None] == ["a", "c", "d"]
    assert hot.bytes == 3 * entry
    # A tag record costs room too.
    hot.put_tag((UPSTREAM, REPO, "latest"), TagRecord("a", OCI_MANIFEST, START), START + 60)
    assert hot.bytes <= 3 * entry
    assert len(hot) == 3
    # A manifest bigger than the whole memory is not kept, and evicts nothing.
    hot.put_manifest("huge", OCI_MANIFEST, b"x" * 3 * entry)
    assert hot.manifest("huge") is None
    assert len(hot) == 3
