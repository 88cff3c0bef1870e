"""A fleet of replicas with their own disks and one Redis: each fills from the others
before the upstream, so every blob crosses the upstream once for the whole fleet.

Three real `mirror serve` processes, each with its own storage root and peer endpoint
(`cluster.listen`), share one real Redis and pull from a real registry. A peer's copy
that was corrupted on its disk is rejected by the receiving replica, which serves no
wrong byte, drops that peer as a holder and gets a good copy elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from conftest import TAG, Upstream
from support.cli import mirror_cli
from support.fake_upstream import FakeUpstream, digest_of
from support.mirror_process import MirrorProcess
from support.net import eventually, free_port, http_request
from support.redis_server import RedisServer
from support.registry import Registry
from support.skopeo import skopeo_copy_async

from mirror.metadata.redis import RedisMetadataStore

pytestmark = pytest.mark.slow  # starts a registry, Redis and three mirror processes

ServerFactory = Callable[..., Awaitable[TestServer]]
SECRET = "fleet-secret-for-the-tests-0123"


class Fleet:
    """Three replicas, own disks, one Redis key prefix."""

    def __init__(
        self,
        tmp_path: Path,
        upstream_url: str,
        redis: RedisServer,
        upstream_name: str = "local",
        **metadata_settings: str,
    ):
        self.prefix = f"fleet{time.monotonic_ns()}:"
        self.redis_url = redis.url
        metadata = {
            "backend": "redis",
            "redis_url": redis.url,
            "key_prefix": self.prefix,
            **metadata_settings,
        }
        upstreams = {upstream_name: {"url": upstream_url, "tag_ttl": "1h"}}
        self.replicas = []
        for name in ("a", "b", "c"):
            peer_port = free_port()
            self.replicas.append(
                MirrorProcess(
                    tmp_path / name,
                    upstreams,
                    metadata=metadata,
                    cluster={"listen": f"127.0.0.1:{peer_port}", "secret": SECRET},
                )
            )

    def __enter__(self) -> list[MirrorProcess]:
        for replica in self.replicas:
            replica.start()
        return self.replicas

    def __exit__(self, *exc: object) -> None:
        for replica in self.replicas:
            replica.stop()

    def peer_url(self, replica: MirrorProcess) -> str:
        return f"http://{replica.config['cluster']['listen']}"

    async def holders(self, digest: str) -> set[str]:
        store = RedisMetadataStore(self.redis_url, prefix=self.prefix)
        try:
            return await store.holders(digest)
        finally:
            await store.close()

    async def await_holders(self, digest: str, expected: set[str], timeout: float = 10) -> None:
        """A commit is recorded a moment after its client got the last byte."""
        deadline = time.monotonic() + timeout
        while (found := await self.holders(digest)) != expected:
            assert time.monotonic() < deadline, f"holders of {digest}: {found} != {expected}"
            await asyncio.sleep(0.05)


def log_events(replica: MirrorProcess) -> list[dict[str, Any]]:
    events = []
    for line in replica.log_text().splitlines():
        with contextlib.suppress(ValueError):
            events.append(json.loads(line))
    return events


def metric(text: str, sample: str) -> float:
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name == sample:
            return float(value)
    raise AssertionError(f"{sample} not in /metrics")


def upstream_blob_gets(registry: Registry, since: int) -> Counter[str]:
    return Counter(
        e.route.rsplit("/", 1)[-1] for e in registry.requests("GET", "/blobs/", since=since)
    )


async def test_24_cold_pulls_across_three_replicas_fetch_each_blob_once(
    tmp_path: Path, fresh_upstream: Upstream, redis_server: RedisServer
) -> None:
    fleet = Fleet(tmp_path, fresh_upstream.url, redis_server)
    with fleet as replicas:
        registry = fresh_upstream.registry
        mark = registry.mark()
        image = fresh_upstream.images["oci-index"]
        await asyncio.gather(
            *(
                skopeo_copy_async(
                    f"docker://{replica.host}/{Upstream.repo('oci-index')}:{TAG}",
                    f"dir:{tmp_path / f'pull-{i}'}",
                )
                for i, replica in enumerate(replicas * 8)
            )
        )
        for i in range(24):
            for digest, data in image.all_blobs().items():
                assert (
                    tmp_path / f"pull-{i}" / digest.removeprefix("sha256:")
                ).read_bytes() == data
        for digest in image.all_blobs():
            await asyncio.to_thread(registry.wait_for_access, "GET", f"/blobs/{digest}", 1, mark)
        assert upstream_blob_gets(registry, mark) == dict.fromkeys(image.all_blobs(), 1)
        # The other replicas really filled from a peer rather than waiting for a commit
        # on a disk they cannot see.
        assert sum("blob_filled_from_peer" in r.log_text() for r in replicas) >= 2
        for digest in image.all_blobs():
            await fleet.await_holders(digest, {fleet.peer_url(r) for r in replicas})


async def test_an_image_one_replica_holds_is_pulled_through_another_without_the_upstream(
    tmp_path: Path, fresh_upstream: Upstream, redis_server: RedisServer
) -> None:
    fleet = Fleet(tmp_path, fresh_upstream.url, redis_server)
    with fleet as (a, _b, c):
        registry = fresh_upstream.registry
        reference = f"{Upstream.repo('oci')}:{TAG}"
        await skopeo_copy_async(f"docker://{a.host}/{reference}", f"dir:{tmp_path / 'via-a'}")
        image = fresh_upstream.images["oci"]
        for digest in image.all_blobs():
            await fleet.await_holders(digest, {fleet.peer_url(a)})
        mark = registry.mark()
        await skopeo_copy_async(f"docker://{c.host}/{reference}", f"dir:{tmp_path / 'via-c'}")
        for digest, data in image.all_blobs().items():
            assert (tmp_path / "via-c" / digest.removeprefix("sha256:")).read_bytes() == data
            await fleet.await_holders(digest, {fleet.peer_url(a), fleet.peer_url(c)})
        assert upstream_blob_gets(registry, mark) == {}
        assert c.log_text().count("blob_filled_from_peer") == len(image.all_blobs())
        metrics = http_request("GET", f"{c.url}/metrics").body.decode()
        assert metric(metrics, 'mirror_peer_fills_total{outcome="ok"}') == len(image.all_blobs())
        peer_bytes = sum(map(len, image.all_blobs().values()))
        assert metric(metrics, 'mirror_served_bytes_total{source="peer"}') == peer_bytes
        result = mirror_cli("stats", "--config", c.config_path, "--json")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["fleet"] == {
            "replicas_alive": 3,
            "blobs_held_once": 0,
            "blobs_held_several_times": len(image.all_blobs()),
            "blobs_held_by_none_alive": 0,
        }


async def test_a_corrupted_peer_copy_is_rejected_and_a_good_one_fetched(
    tmp_path: Path, fresh_upstream: Upstream, redis_server: RedisServer
) -> None:
    fleet = Fleet(tmp_path, fresh_upstream.url, redis_server)
    with fleet as (a, b, _c):
        registry = fresh_upstream.registry
        image = fresh_upstream.images["oci"]
        digest, data = max(image.all_blobs().items(), key=lambda item: len(item[1]))
        path = f"/v2/{Upstream.repo('oci')}/blobs/{digest}"
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{a.url}{path}") as response:
                assert response.status == 200
                assert await response.read() == data
            await eventually(lambda: (a.storage / "blobs").exists())
            algorithm, hex_digest = digest.split(":")
            on_a = a.storage / "blobs" / algorithm / hex_digest[:2] / hex_digest
            await eventually(on_a.exists)
            on_a.write_bytes(bytes(len(data)))  # same size, wrong bytes
            mark = registry.mark()

            # B fills from A, sees the digest is wrong, and its client never gets the
            # whole wrong body: the transfer breaks before its last byte.
            received = b""
            with pytest.raises(aiohttp.ClientPayloadError):
                async with session.get(f"{b.url}{path}") as response:
                    received = await response.read()
            assert received != bytes(len(data))
            await eventually(lambda: "peer_left_out" in b.log_text())
            left_out = [e for e in log_events(b) if e.get("event") == "peer_left_out"]
            assert [(e["peer"], e["outcome"]) for e in left_out] == [(fleet.peer_url(a), "corrupt")]
            assert fleet.peer_url(a) not in await fleet.holders(digest)

            # The next request gets a good copy, from the upstream, not from A again.
            async with session.get(f"{b.url}{path}") as response:
                assert response.status == 200
                assert await response.read() == data
        assert upstream_blob_gets(registry, mark) == {digest: 1}
        await fleet.await_holders(digest, {fleet.peer_url(b)})


async def test_a_holder_that_will_not_send_is_skipped_before_the_client_sees_anything(
    tmp_path: Path, fresh_upstream: Upstream, redis_server: RedisServer
) -> None:
    fleet = Fleet(tmp_path, fresh_upstream.url, redis_server)
    with fleet as (a, _b, _c):
        registry = fresh_upstream.registry
        image = fresh_upstream.images["oci"]
        digest, data = max(image.all_blobs().items(), key=lambda item: len(item[1]))
        # A live-looking replica recorded as holding the blob, with nothing listening.
        gone = f"http://127.0.0.1:{free_port()}"
        store = RedisMetadataStore(fleet.redis_url, prefix=fleet.prefix)
        try:
            await store.heartbeat(gone, ttl=60)
            await store.add_holder(digest, gone)
        finally:
            await store.close()
        mark = registry.mark()
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{a.url}/v2/{Upstream.repo('oci')}/blobs/{digest}") as response,
        ):
            assert response.status == 200
            assert await response.read() == data
        left_out = [e for e in log_events(a) if e.get("event") == "peer_left_out"]
        assert [(e["peer"], e["outcome"]) for e in left_out] == [(gone, "unavailable")]
        assert upstream_blob_gets(registry, mark) == {digest: 1}
        await fleet.await_holders(digest, {gone, fleet.peer_url(a)})


async def test_holder_killed_mid_download_fails_its_peer_clients_and_is_fetched_once_more(
    tmp_path: Path,
    redis_server: RedisServer,
    stalled_blob: tuple[FakeUpstream, str, bytes, asyncio.Event, str],
) -> None:
    fake, path, blob, release, url = stalled_blob
    fleet = Fleet(tmp_path, url, redis_server, "fake", lease_ttl="2s")
    holder, follower, _c = fleet.replicas
    try:
        holder.start()
        follower.start()
        async with aiohttp.ClientSession() as http:
            first = await http.get(holder.url + path)
            assert first.status == 200
            await first.content.readexactly(1024)  # the holder is mid-download
            second = await http.get(follower.url + path)  # streams it from the holder
            assert second.status == 200
            # First bytes before the upstream download completed.
            assert await second.content.readexactly(1024) == blob[:1024]
            assert not release.is_set()

            holder.kill()
            # Cut off: never a short body taken for a whole one, never wrong bytes.
            with pytest.raises(aiohttp.ClientPayloadError):
                await first.read()
            received = b""
            with pytest.raises(aiohttp.ClientPayloadError):
                received = await second.read()
            assert received == b""
            first.release()
            second.release()
            await eventually(lambda: "peer_left_out" in follower.log_text())

            # Once the dead holder's lease lapsed, the follower fetches the layer itself.
            async with http.get(follower.url + path) as again:
                assert again.status == 200
                assert await again.read() == blob
        assert fake.count("GET", path) == 2
        await fleet.await_holders(digest_of(blob), {fleet.peer_url(follower)})
    finally:
        release.set()
        holder.stop()
        follower.stop()
