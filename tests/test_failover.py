"""Failover upstreams: `fallbacks` answer when the upstream fails, never when it says 404.

The failing upstream is the programmable fake (a 429 to everything is a fault a real
registry cannot produce); the fallback is a real registry holding the test images
under `test/<kind>`, configured by the URL-with-path shorthand (`<url>/test`), so
clients pull `<kind>`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import cast

import aiohttp
import pytest
import structlog
from aiohttp.test_utils import TestServer
from conftest import TAG, Mirror, MirrorFactory, Upstream
from prometheus_client.parser import text_string_to_metric_families
from support.fake_upstream import FakeUpstream, serve, status
from support.net import eventually
from support.skopeo import skopeo_copy_async
from test_pull_through import tree_bytes

from mirror.app import UPSTREAMS
from mirror.upstream.failover import FailoverClient

pytestmark = pytest.mark.slow  # starts registries, servers or processes

StartServer = Callable[..., Awaitable[TestServer]]


async def start_fake(aiohttp_server: StartServer, fake: FakeUpstream) -> str:
    server = await aiohttp_server(fake.app(), host="127.0.0.1")
    return str(server.make_url("")).rstrip("/")


def rate_limited(retry_after: str) -> FakeUpstream:
    return FakeUpstream(otherwise=status(429, {"Retry-After": retry_after}))


async def metric(http: aiohttp.ClientSession, mirror: Mirror, name: str, **labels: str) -> float:
    async with http.get(f"{mirror.url}/metrics") as response:
        text = (await response.read()).decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def fallback_label(upstream: Upstream) -> str:
    return f"{upstream.registry.host}/test"


async def test_a_rate_limited_upstream_is_replaced_by_its_fallback_byte_exact(
    make_mirror: MirrorFactory,
    upstream: Upstream,
    aiohttp_server: StartServer,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    primary = rate_limited("3600")
    mirror = await make_mirror(
        {
            "hub": {
                "url": await start_fake(aiohttp_server, primary),
                "fallbacks": [f"{upstream.url}/test"],
            }
        }
    )
    direct = tmp_path / "direct"
    await skopeo_copy_async(
        f"docker://{upstream.registry.host}/test/oci-index:{TAG}", f"dir:{direct}"
    )

    with structlog.testing.capture_logs() as logs:
        async with http.get(
            f"{mirror.url}/v2/oci-index/manifests/{TAG}",
            headers={"Accept": "application/vnd.oci.image.index.v1+json"},
        ) as response:
            assert response.status == 200
            assert response.headers["X-Cache"] == "MISS (fallback)"
        through = tmp_path / "through"
        await skopeo_copy_async(f"docker://{mirror.host}/oci-index:{TAG}", f"dir:{through}")

    assert tree_bytes(through) == tree_bytes(direct)
    marked = [entry for entry in logs if entry["event"] == "manifest_from_fallback"]
    assert marked
    assert marked[0]["fallback"] == fallback_label(upstream)
    assert marked[0]["repository"] == "oci-index"
    served = await metric(
        http,
        mirror,
        "mirror_upstream_fallbacks_total",
        upstream="hub",
        fallback=fallback_label(upstream),
        outcome="served",
    )
    assert served >= 1 + len(upstream.images["oci-index"].all_blobs())
    # The 429's Retry-After was respected: the upstream was asked once, then skipped.
    assert len(primary.requests) == 1


async def test_a_fallback_serving_wrong_bytes_is_rejected_and_the_next_one_serves(
    make_mirror: MirrorFactory,
    upstream: Upstream,
    aiohttp_server: StartServer,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    image = upstream.images["oci"]
    layer = image.layer_digests[0]
    data = image.all_blobs()[layer]
    liar = FakeUpstream()
    forged = bytes(reversed(data))
    liar.on("GET", f"/v2/oci/blobs/{layer}", serve(forged, digest=layer))
    liar_url = await start_fake(aiohttp_server, liar)
    mirror = await make_mirror(
        {
            "hub": {
                "url": await start_fake(aiohttp_server, rate_limited("3600")),
                "fallbacks": [liar_url, f"{upstream.url}/test"],
            }
        }
    )

    with pytest.raises(aiohttp.ClientError):
        async with http.get(f"{mirror.url}/v2/oci/blobs/{layer}") as response:
            await response.read()
    await mirror.settled()
    assert liar.count("GET", f"/v2/oci/blobs/{layer}") == 1
    mismatches = await metric(
        http,
        mirror,
        "mirror_upstream_fallbacks_total",
        fallback=liar_url.removeprefix("http://"),
        outcome="mismatch",
    )
    assert mismatches == 1
    assert mirror.blob_files() == []  # the forged bytes were never kept

    # The liar is passed over now: the real fallback serves, and a whole pull works.
    async with http.get(f"{mirror.url}/v2/oci/blobs/{layer}") as response:
        assert response.status == 200
        assert await response.read() == data
    assert liar.count("GET", f"/v2/oci/blobs/{layer}") == 1
    through = tmp_path / "through"
    await skopeo_copy_async(f"docker://{mirror.host}/oci:{TAG}", f"dir:{through}")
    assert (through / "manifest.json").read_bytes() == image.manifest


async def test_a_404_from_the_upstream_is_an_answer_and_no_fallback_is_asked(
    make_mirror: MirrorFactory,
    upstream: Upstream,
    aiohttp_server: StartServer,
    http: aiohttp.ClientSession,
) -> None:
    primary = FakeUpstream()  # 404 NAME_UNKNOWN to everything
    mirror = await make_mirror(
        {
            "hub": {
                "url": await start_fake(aiohttp_server, primary),
                "fallbacks": [f"{upstream.url}/test"],
            }
        }
    )
    mark = upstream.registry.mark()
    image = upstream.images["docker"]
    async with http.get(f"{mirror.url}/v2/docker/manifests/{TAG}") as response:
        assert response.status == 404
    async with http.get(f"{mirror.url}/v2/docker/blobs/{image.layer_digests[0]}") as response:
        assert response.status == 404
    assert len(primary.requests) >= 2
    assert upstream.registry.requests(since=mark) == []


async def test_the_upstream_is_used_again_once_its_retry_after_has_passed(
    make_mirror: MirrorFactory,
    upstream: Upstream,
    aiohttp_server: StartServer,
    http: aiohttp.ClientSession,
) -> None:
    blobs = upstream.images["docker-list"].all_blobs()
    first, second, third = list(blobs)[:3]
    primary = FakeUpstream()
    primary.on("GET", f"/v2/docker-list/blobs/{first}", status(429, {"Retry-After": "1"}))
    for digest in (second, third):
        primary.on("GET", f"/v2/docker-list/blobs/{digest}", serve(blobs[digest]))
    mirror = await make_mirror(
        {
            "hub": {
                "url": await start_fake(aiohttp_server, primary),
                "fallbacks": [f"{upstream.url}/test"],
            }
        }
    )
    client = cast(FailoverClient, mirror.server.app[UPSTREAMS]["hub"])

    for digest in (first, second):  # the 429, then skipped: both from the fallback
        async with http.get(f"{mirror.url}/v2/docker-list/blobs/{digest}") as response:
            assert response.status == 200
            assert await response.read() == blobs[digest]
    assert primary.count("GET", f"/v2/docker-list/blobs/{second}") == 0
    mark = upstream.registry.mark()

    await eventually(lambda: not client.primary_paused, timeout=5)
    async with http.get(f"{mirror.url}/v2/docker-list/blobs/{third}") as response:
        assert response.status == 200
        assert await response.read() == blobs[third]
    assert primary.count("GET", f"/v2/docker-list/blobs/{third}") == 1
    assert upstream.registry.requests(path_contains="/blobs/", since=mark) == []
