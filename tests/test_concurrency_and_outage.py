"""Many clients at once, and an upstream that goes away, with real registries and skopeo.

Concurrent cold pulls must cost the upstream each blob once. With the upstream stopped,
cached tags still pull (within max_stale) and uncached ones fail fast with an OCI error.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from conftest import TAG, MirrorFactory, Upstream
from support.images import push as push_image
from support.images import standard_images
from support.registry import Registry
from support.skopeo import SkopeoError, skopeo_copy_async

pytestmark = pytest.mark.slow  # starts registries, servers or processes


@pytest.fixture
def own_upstream(tmp_path: Path) -> Iterator[Upstream]:
    """An upstream this test may stop, seeded with fresh images."""
    images = standard_images(seed_base=7)
    with Registry(tmp_path / "own-upstream") as registry:
        for kind in ("oci", "oci-index"):
            push_image(registry.url, Upstream.repo(kind), images[kind], TAG)
        yield Upstream(registry, images)


async def test_eight_concurrent_cold_pulls_fetch_each_blob_once(
    make_mirror: MirrorFactory, own_upstream: Upstream, tmp_path: Path
) -> None:
    mirror = await make_mirror({"local": {"url": own_upstream.url, "tag_ttl": "1h"}})
    registry = own_upstream.registry
    image = own_upstream.images["oci-index"]
    mark = registry.mark()
    source = f"docker://{mirror.host}/{Upstream.repo('oci-index')}:{TAG}"
    await asyncio.gather(
        *(skopeo_copy_async(source, f"dir:{tmp_path / f'pull-{i}'}") for i in range(8))
    )
    for i in range(8):
        assert (tmp_path / f"pull-{i}" / "manifest.json").read_bytes() == image.manifest
        for digest, data in image.all_blobs().items():
            assert (tmp_path / f"pull-{i}" / digest.removeprefix("sha256:")).read_bytes() == data

    blobs = image.all_blobs()
    for digest in blobs:
        registry.wait_for_access("GET", f"/blobs/{digest}", since=mark)
    fetched = Counter(
        entry.route.rsplit("/", 1)[-1]
        for entry in registry.requests(method="GET", path_contains="/blobs/", since=mark)
    )
    assert fetched == dict.fromkeys(blobs, 1)
    # The index and each platform manifest were fetched once too.
    manifest_gets = Counter(
        entry.route for entry in registry.requests("GET", "/manifests/", since=mark)
    )
    assert all(count == 1 for count in manifest_gets.values()), manifest_gets


async def test_upstream_down_cached_tags_pull_uncached_fail_fast(
    make_mirror: MirrorFactory, own_upstream: Upstream, tmp_path: Path
) -> None:
    # tag_ttl 0: every tag request wants revalidation, so the outage is really met.
    mirror = await make_mirror({"local": {"url": own_upstream.url, "tag_ttl": "0s"}})
    cached = f"docker://{mirror.host}/{Upstream.repo('oci')}:{TAG}"
    await skopeo_copy_async(cached, f"dir:{tmp_path / 'before'}")

    own_upstream.registry.stop()
    await skopeo_copy_async(cached, f"dir:{tmp_path / 'during'}")
    assert (tmp_path / "during" / "manifest.json").read_bytes() == own_upstream.images[
        "oci"
    ].manifest

    started = time.monotonic()
    with pytest.raises(SkopeoError):
        await skopeo_copy_async(
            f"docker://{mirror.host}/{Upstream.repo('oci-index')}:{TAG}", f"dir:{tmp_path / 'x'}"
        )
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{mirror.url}/v2/{Upstream.repo('oci-index')}/manifests/{TAG}") as response,
    ):
        assert response.status == 503
        body = await response.json()
        assert body["errors"][0]["code"] == "UNAVAILABLE"
    # Connection refused is answered at once; nothing waits for a timeout.
    assert time.monotonic() - started < 30


async def test_stale_answers_stop_at_max_stale(
    make_mirror: MirrorFactory, own_upstream: Upstream
) -> None:
    mirror = await make_mirror(
        {"local": {"url": own_upstream.url, "tag_ttl": "0s", "max_stale": "0s"}}
    )
    path = f"/v2/{Upstream.repo('oci')}/manifests/{TAG}"
    async with aiohttp.ClientSession() as http:
        async with http.get(mirror.url + path) as response:
            assert response.status == 200
        own_upstream.registry.stop()
        async with http.get(mirror.url + path) as response:
            assert response.status == 503
        # By digest it is immutable and still served.
        digest = own_upstream.images["oci"].digest
        async with http.get(
            f"{mirror.url}/v2/{Upstream.repo('oci')}/manifests/{digest}"
        ) as response:
            assert response.status == 200
