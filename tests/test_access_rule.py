"""The access rule for cached content (mirror/cache/provenance.py) without a socket:
public and credentialed upstreams, known and unknown holders, and a metadata outage
(where the upstream's word decides), against an in-memory upstream and the real
embedded metadata store."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.stub_upstream import StubUpstream

from mirror.cache.provenance import ContentAccess, Kind
from mirror.errors import (
    BlobUnknown,
    ManifestUnknown,
    MetadataUnavailable,
    UpstreamUnavailable,
)
from mirror.metadata.deferred import DeferredWrites
from mirror.metadata.embedded import EmbeddedMetadataStore
from mirror.oci import OCI_MANIFEST, Digest
from mirror.routing import Route

PUBLIC = "hub"
PRIVATE = "ghcr"
LAYER = b"layer bytes"
MANIFEST = b'{"schemaVersion": 2, "mediaType": "' + OCI_MANIFEST.encode() + b'"}'


def route(upstream: str, repository: str) -> Route:
    return Route(upstream, repository, repository)


class OutageStore(EmbeddedMetadataStore):
    """The embedded store, unreachable while `down` (as a Redis outage looks)."""

    down = False

    async def blob_repositories(self, digest: str) -> list[tuple[str, str]]:
        if self.down:
            raise MetadataUnavailable("switched off")
        return await super().blob_repositories(digest)

    async def add_blob_repository(self, digest: str, upstream: str, repository: str) -> None:
        if self.down:
            raise MetadataUnavailable("switched off")
        await super().add_blob_repository(digest, upstream, repository)


@dataclass
class World:
    metadata: OutageStore
    upstreams: dict[str, StubUpstream]

    def access(self, credentialed: frozenset[str]) -> ContentAccess:
        deferred = DeferredWrites(self.metadata)
        return ContentAccess(self.metadata, deferred, self.upstreams, credentialed)  # type: ignore[arg-type]

    async def held_by(self, digest: str, upstream: str, repository: str) -> None:
        await self.metadata.add_blob_repository(digest, upstream, repository)

    def asked(self) -> list[tuple[str, str, str, str]]:
        return [(name, *entry) for name, stub in self.upstreams.items() for entry in stub.asked]


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    metadata = OutageStore(tmp_path / "meta")
    try:
        yield World(metadata, {PUBLIC: StubUpstream(), PRIVATE: StubUpstream()})
    finally:
        await metadata.close()


def layer_in(world: World, upstream: str, *repositories: str) -> Digest:
    digest = ""
    for repository in repositories:
        digest = world.upstreams[upstream].hold_blob(repository, LAYER)
    return Digest.parse(digest)


async def test_without_credentialed_upstreams_anything_cached_is_served(world: World) -> None:
    digest = Digest.parse(world.upstreams[PUBLIC].hold_blob("a/one", LAYER))
    world.metadata.down = True  # not even asked
    access = world.access(frozenset())
    for kind in ("blobs", "manifests"):
        await access.check(route(PUBLIC, "b/other"), kind, digest)
    assert world.asked() == []


async def test_public_content_held_by_a_public_repository_is_shared(world: World) -> None:
    digest = layer_in(world, PUBLIC, "a/one")
    await world.held_by(str(digest), PUBLIC, "a/one")
    await world.access(frozenset({PRIVATE})).check(route(PUBLIC, "b/other"), "blobs", digest)
    assert world.asked() == []


async def test_a_known_holder_is_served_without_asking(world: World) -> None:
    digest = layer_in(world, PRIVATE, "org/secret")
    await world.held_by(str(digest), PRIVATE, "org/secret")
    await world.access(frozenset({PRIVATE})).check(route(PRIVATE, "org/secret"), "blobs", digest)
    assert world.asked() == []


@pytest.mark.parametrize(
    ("holder", "asker"),
    [
        ((PRIVATE, "org/secret"), (PRIVATE, "org/public")),  # both on the credentialed one
        ((PRIVATE, "org/secret"), (PUBLIC, "some/app")),  # held only behind credentials
        ((PUBLIC, "some/app"), (PRIVATE, "org/app")),  # asked for through credentials
    ],
)
async def test_another_repository_is_served_only_once_its_upstream_says_it_holds_it(
    world: World, holder: tuple[str, str], asker: tuple[str, str]
) -> None:
    digest = layer_in(world, holder[0], holder[1])
    await world.held_by(str(digest), *holder)
    access = world.access(frozenset({PRIVATE}))
    with pytest.raises(BlobUnknown):
        await access.check(route(*asker), "blobs", digest)
    assert world.asked() == [(asker[0], "HEAD", asker[1], f"blobs/{digest}")]
    # The upstream now says yes: served, and remembered.
    layer_in(world, asker[0], asker[1])
    await access.check(route(*asker), "blobs", digest)
    assert (asker[0], asker[1]) in await world.metadata.blob_repositories(str(digest))
    world.upstreams[asker[0]].asked.clear()
    await access.check(route(*asker), "blobs", digest)
    assert world.asked() == []


async def test_manifests_are_confirmed_with_every_manifest_type_and_refused_as_manifests(
    world: World,
) -> None:
    digest = Digest.parse(world.upstreams[PRIVATE].publish("org/secret", MANIFEST, OCI_MANIFEST))
    await world.held_by(str(digest), PRIVATE, "org/secret")
    access = world.access(frozenset({PRIVATE}))
    with pytest.raises(ManifestUnknown):
        await access.check(route(PRIVATE, "org/public"), "manifests", digest)
    world.upstreams[PRIVATE].publish("org/public", MANIFEST, OCI_MANIFEST)
    await access.check(route(PRIVATE, "org/public"), "manifests", digest)
    assert [path for _, _, _, path in world.asked()] == [f"manifests/{digest}"] * 2


@pytest.mark.parametrize("asker", [(PUBLIC, "some/app"), (PRIVATE, "org/app")])
async def test_unknown_holders_count_as_credentialed(world: World, asker: tuple[str, str]) -> None:
    digest = layer_in(world, asker[0], asker[1])  # cached, but its records were lost
    await world.access(frozenset({PRIVATE})).check(route(*asker), "blobs", digest)
    assert world.asked() == [(asker[0], "HEAD", asker[1], f"blobs/{digest}")]


@pytest.mark.parametrize("kind", ["blobs", "manifests"])
async def test_in_a_metadata_outage_the_upstream_decides(world: World, kind: Kind) -> None:
    digest = layer_in(world, PRIVATE, "org/secret")
    await world.held_by(str(digest), PRIVATE, "org/secret")
    access = world.access(frozenset({PRIVATE}))
    world.metadata.down = True
    # Even the known holder is asked: the store cannot say who holds it.
    if kind == "blobs":
        await access.check(route(PRIVATE, "org/secret"), kind, digest)
    not_found = BlobUnknown if kind == "blobs" else ManifestUnknown
    with pytest.raises(not_found):
        await access.check(route(PRIVATE, "org/public"), kind, digest)
    world.upstreams[PRIVATE].failure = UpstreamUnavailable("upstream connection failed")
    with pytest.raises(UpstreamUnavailable):
        await access.check(route(PRIVATE, "org/secret"), kind, digest)
    assert len(world.asked()) == (3 if kind == "blobs" else 2)
    # The upstream's word in an outage is not recorded.
    world.metadata.down = False
    assert await world.metadata.blob_repositories(str(digest)) == [(PRIVATE, "org/secret")]


async def test_an_upstream_error_while_confirming_is_the_error(world: World) -> None:
    digest = layer_in(world, PRIVATE, "org/secret")
    await world.held_by(str(digest), PRIVATE, "org/secret")
    world.upstreams[PRIVATE].failure = 503
    with pytest.raises(UpstreamUnavailable):
        await world.access(frozenset({PRIVATE})).check(
            route(PRIVATE, "org/public"), "blobs", digest
        )


def test_only_public_downloads_are_shared_across_repositories(world: World) -> None:
    access = world.access(frozenset({PRIVATE}))
    assert access.may_share(route(PRIVATE, "org/a"), route(PRIVATE, "org/a"))
    assert access.may_share(route(PUBLIC, "a/one"), route(PUBLIC, "b/two"))
    assert not access.may_share(route(PRIVATE, "org/a"), route(PRIVATE, "org/b"))
    assert not access.may_share(route(PUBLIC, "a/one"), route(PRIVATE, "org/b"))
    assert not access.may_share(route(PRIVATE, "org/a"), route(PUBLIC, "a/one"))
