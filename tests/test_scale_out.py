"""Several mirror processes sharing one Redis and one storage root, as several nodes would.

The upstream must see each blob once whichever process a client reaches; a lease
holder that dies hands over to another process once its lease lapses, and no client
gets wrong bytes; a Redis outage leaves pulls working (cold ones too) and `/readyz`
honest, and the records written meanwhile reach Redis by themselves when it returns.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from conftest import TAG, MirrorFactory, Upstream
from support.fake_upstream import FakeUpstream
from support.images import Image
from support.mirror_process import MirrorProcess
from support.net import eventually, http_request
from support.redis_server import RedisServer
from support.skopeo import skopeo_copy_async

from mirror.metadata.redis import RedisMetadataStore

pytestmark = pytest.mark.slow  # starts registries, servers or processes

ServerFactory = Callable[..., Awaitable[TestServer]]


def redis_settings(redis: RedisServer, **extra: object) -> dict[str, object]:
    prefix = f"scale{time.monotonic_ns()}:"
    return {"metadata": {"backend": "redis", "redis_url": redis.url, "key_prefix": prefix, **extra}}


def two_mirrors(
    tmp_path: Path, upstreams: dict[str, dict[str, object]], settings: dict[str, object]
) -> tuple[MirrorProcess, MirrorProcess]:
    shared = tmp_path / "shared-storage"
    return (
        MirrorProcess(tmp_path / "a", upstreams, storage=shared, **settings),
        MirrorProcess(tmp_path / "b", upstreams, storage=shared, **settings),
    )


async def test_sixteen_cold_pulls_across_two_processes_fetch_each_blob_once(
    tmp_path: Path, fresh_upstream: Upstream, redis_server: RedisServer
) -> None:
    upstreams = {"local": {"url": fresh_upstream.url, "tag_ttl": "1h"}}
    first, second = two_mirrors(tmp_path, upstreams, redis_settings(redis_server))
    with first, second:
        mark = fresh_upstream.registry.mark()
        image = fresh_upstream.images["oci-index"]
        pulls = [
            skopeo_copy_async(
                f"docker://{mirror.host}/{Upstream.repo('oci-index')}:{TAG}",
                f"dir:{tmp_path / f'pull-{i}'}",
            )
            for i, mirror in enumerate([first, second] * 8)
        ]
        await asyncio.gather(*pulls)
        for i in range(16):
            for digest, data in image.all_blobs().items():
                assert (
                    tmp_path / f"pull-{i}" / digest.removeprefix("sha256:")
                ).read_bytes() == data

        registry = fresh_upstream.registry
        for digest in image.all_blobs():
            await asyncio.to_thread(registry.wait_for_access, "GET", f"/blobs/{digest}", 1, mark)
        fetched = Counter(
            e.route.rsplit("/", 1)[-1] for e in registry.requests("GET", "/blobs/", since=mark)
        )
        assert fetched == dict.fromkeys(image.all_blobs(), 1)
        # Both processes really served: each wrote access lines for blob requests.
        assert "/blobs/" in first.log_text()
        assert "/blobs/" in second.log_text()


def committed_blobs(storage: Path) -> list[Path]:
    return [p for p in (storage / "blobs").rglob("*") if p.is_file()]


async def test_another_process_serves_the_holders_growing_download(
    tmp_path: Path,
    redis_server: RedisServer,
    stalled_blob: tuple[FakeUpstream, str, bytes, asyncio.Event, str],
) -> None:
    fake, path, blob, release, url = stalled_blob
    holder, follower = two_mirrors(tmp_path, {"fake": {"url": url}}, redis_settings(redis_server))
    with holder, follower:
        async with aiohttp.ClientSession() as http:
            first = await http.get(holder.url + path)
            await first.content.readexactly(1024)
            second = await http.get(follower.url + path)
            assert second.status == 200
            # Bytes reach the second process's client while the upstream still holds
            # back most of the blob: it is reading the holder's temp file.
            await second.content.readexactly(1024)
            assert not release.is_set()
            release.set()
            assert (await first.read()) == blob[1024:]
            assert (await second.read()) == blob[1024:]
            first.release()
            second.release()
    assert fake.count("GET", path) == 1


async def test_lease_holder_killed_mid_download_hands_over(
    tmp_path: Path,
    redis_server: RedisServer,
    stalled_blob: tuple[FakeUpstream, str, bytes, asyncio.Event, str],
) -> None:
    fake, path, blob, release, url = stalled_blob
    settings = redis_settings(redis_server, lease_ttl="2s")
    holder, other = two_mirrors(tmp_path, {"fake": {"url": url}}, settings)
    try:
        holder.start()
        other.start()
        async with aiohttp.ClientSession() as http:
            first = await http.get(holder.url + path)
            assert first.status == 200
            await first.content.readexactly(1024)  # the holder is mid-download
            second = await http.get(other.url + path)  # follows the holder's temp file
            assert second.status == 200

            holder.kill()
            # Both transfers are cut off: never a short body taken for a whole one, and
            # never bytes nobody verified passed off as a blob.
            with pytest.raises(aiohttp.ClientPayloadError):
                await first.read()
            with pytest.raises(aiohttp.ClientPayloadError):
                await second.read()
            first.release()
            second.release()

            # Once the lease lapsed, the other process fetched the layer itself.
            await eventually(lambda: len(committed_blobs(tmp_path / "shared-storage")) == 1)
            async with http.get(other.url + path) as again:
                assert again.status == 200
                assert await again.read() == blob
        assert fake.count("GET", path) == 2
        # The cache holds the whole, right blob and nothing else (the holder's partial
        # temp file never became a blob).
        assert [p.read_bytes() == blob for p in committed_blobs(tmp_path / "shared-storage")] == [
            True
        ]
    finally:
        release.set()
        holder.stop()
        other.stop()


def all_digests(image: Image) -> set[str]:
    """The image's manifest and every blob it reaches, children included."""
    found = {image.digest, *image.blobs}
    for child in image.children:
        found |= all_digests(child)
    return found


async def test_redis_outage_keeps_pulls_working_and_records_catch_up(
    tmp_path: Path, fresh_upstream: Upstream
) -> None:
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    upstreams = {"local": {"url": fresh_upstream.url, "tag_ttl": "1h"}}
    settings = redis_settings(redis)
    try:
        with MirrorProcess(tmp_path / "m", upstreams, **settings) as mirror:
            cached = f"docker://{mirror.host}/{Upstream.repo('oci')}:{TAG}"
            await skopeo_copy_async(cached, f"dir:{tmp_path / 'before'}")
            assert http_request("GET", f"{mirror.url}/readyz").status == 200

            redis.stop()
            await skopeo_copy_async(cached, f"dir:{tmp_path / 'during'}")
            expected = fresh_upstream.images["oci"].manifest
            assert (tmp_path / "during" / "manifest.json").read_bytes() == expected
            assert http_request("GET", f"{mirror.url}/healthz").status == 200

            # A cold pull while the store is away: fetched anyway, never a 503.
            index = fresh_upstream.images["oci-index"]
            uncached = f"docker://{mirror.host}/{Upstream.repo('oci-index')}:{TAG}"
            await skopeo_copy_async(uncached, f"dir:{tmp_path / 'cold-during-outage'}")
            ready = http_request("GET", f"{mirror.url}/readyz")
            # Still ready (a Redis outage must not empty the Service), and honest about it.
            assert ready.status == 200
            assert json.loads(ready.body)["checks"]["metadata"] == "unreachable"
            assert "metadata" in json.loads(ready.body)["degraded"]
            metrics = http_request("GET", f"{mirror.url}/metrics").body.decode()
            assert metric_value(metrics, "mirror_uncoordinated_fetches_total") >= 1
            assert metric_value(metrics, "mirror_metadata_writes_pending") >= 1

            redis.start()  # same port, empty: the mirror catches up on its own
            prefix = str(settings["metadata"]["key_prefix"])  # type: ignore[index]

            async def recorded() -> bool:
                store = RedisMetadataStore(redis.url, prefix)
                try:
                    tag = await store.get_tag("local", Upstream.repo("oci-index"), TAG)
                    blobs = [await store.get_blob(d) for d in all_digests(index)]
                finally:
                    await store.close()
                return tag is not None and tag.digest == index.digest and all(blobs)

            # Polled from eventually's worker thread, on a loop of its own.
            await eventually(lambda: asyncio.run(recorded()), timeout=30)
            body = json.loads(http_request("GET", f"{mirror.url}/readyz").body)
            assert body["checks"]["metadata"] == "ok"
            assert "degraded" not in body

            mark = fresh_upstream.registry.mark()
            await skopeo_copy_async(uncached, f"dir:{tmp_path / 'again'}")
            assert fresh_upstream.registry.requests("GET", "/blobs/", since=mark) == []
            assert fresh_upstream.registry.requests("GET", "/manifests/", since=mark) == []
    finally:
        redis.stop()


def metric_value(exposition: str, name: str) -> float:
    for line in exposition.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


async def test_mirrors_sharing_redis_ask_the_token_server_once(
    make_mirror: MirrorFactory,
    token_upstream: Upstream,
    redis_server: RedisServer,
    http: aiohttp.ClientSession,
) -> None:
    tokens = token_upstream.token_server
    assert tokens is not None
    settings = redis_settings(redis_server)
    upstreams = {"hub": {"url": token_upstream.url}}
    first = await make_mirror(upstreams, **settings)
    second = await make_mirror(upstreams, **settings)  # another node: its own memory
    path = f"/v2/{Upstream.repo('oci')}/manifests/{TAG}"
    before = len(tokens.requests)
    for mirror in (first, second):
        async with http.get(mirror.url + path) as response:
            assert response.status == 200
    asked = tokens.requests[before:]
    assert len(asked) == 1, asked  # the second mirror found the token in Redis
