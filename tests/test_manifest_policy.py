"""The manifest policy (mirror/cache/manifests.py) without a socket: tag TTLs and their
edges, tag rules, serve-stale windows and Accept negotiation, against an in-memory
upstream, the real blob and metadata stores on tmp_path, and an injected clock."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.stub_upstream import StubUpstream

from mirror.cache.context import CacheContext
from mirror.cache.manifests import Manifest, ManifestCache
from mirror.cache.provenance import ContentAccess
from mirror.config import TagRule
from mirror.errors import ManifestUnknown, MirrorError, TooManyRequests, UpstreamUnavailable
from mirror.metadata.deferred import DeferredWrites
from mirror.metadata.embedded import EmbeddedMetadataStore
from mirror.oci import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
    AcceptSet,
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

    async def get(
        self, reference: str = "latest", accept: AcceptSet = ANY, *, head: bool = False
    ) -> Manifest:
        return await self.cache.get(ROUTE, Reference.parse(reference), accept, head=head)


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
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
    access = ContentAccess(metadata, deferred, clients, frozenset())  # type: ignore[arg-type]
    context = CacheContext(store, metadata, deferred, clients, access)  # type: ignore[arg-type]
    cache = ManifestCache(context, {UPSTREAM: policy}, clock)
    try:
        yield World(cache, upstream, clock)
    finally:
        await cache.close()
        await metadata.close()


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
