"""Replicas sharing one bucket, and the bucket failing under them.

Real `mirror serve` processes with their own local roots (no shared disk), one real
Redis (a key prefix per test) and one real SeaweedFS bucket: a cold image pulled
through both replicas at once crosses the upstream once per blob, and a replica that
lost its disk serves the bucket's blobs at once. The object store killed in the middle
of a multipart upload costs the caching only: clients get the verified bytes, no record
and no object claim a blob that is not there, and once the store is back the blob is
cached by the next pull. With the store down, hits and misses still pull.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import TAG, ServerFactory, s3_storage_settings
from support.fake_upstream import FakeUpstream, digest_of, serve
from support.images import OCI_MANIFEST, Image, oci_image, push
from support.mirror_process import MirrorProcess
from support.net import eventually, eventually_async, free_port, http_request
from support.redis_server import RedisServer
from support.registry import Registry
from support.seaweedfs import SeaweedS3

from mirror.metadata.redis import RedisMetadataStore

pytestmark = pytest.mark.slow  # starts SeaweedFS, a registry, Redis and mirror processes

SECRET = "s3-fleet-secret-for-the-tests-0123"
MIB = 1024 * 1024
REPO = "team/app"


def bucket_keys(server: SeaweedS3, bucket: str) -> set[str]:
    listing = server.client().list_objects_v2(Bucket=bucket, Prefix="blobs/")
    return {entry["Key"] for entry in listing.get("Contents", [])}


def blob_key(digest: str) -> str:
    algorithm, _, hex_digest = digest.partition(":")
    return f"blobs/{algorithm}/{hex_digest}"


def upstream_blob_gets(registry: Registry, since: int) -> Counter[str]:
    return Counter(
        e.route.rsplit("/", 1)[-1] for e in registry.requests("GET", "/blobs/", since=since)
    )


class Records:
    """The blob records of one key prefix in the shared Redis."""

    def __init__(self, redis: RedisServer):
        self.url = redis.url
        self.prefix = f"s3fleet{time.monotonic_ns()}:"

    def metadata(self) -> dict[str, str]:
        return {"backend": "redis", "redis_url": self.url, "key_prefix": self.prefix}

    async def recorded(self, digest: str) -> bool:
        store = RedisMetadataStore(self.url, prefix=self.prefix)
        try:
            return await store.get_blob(digest) is not None
        finally:
            await store.close()


def replica(
    workdir: Path, upstream_url: str, storage: dict[str, Any], records: Records, *, fleet: bool
) -> MirrorProcess:
    settings: dict[str, Any] = {"metadata": records.metadata()}
    if fleet:
        settings["cluster"] = {"listen": f"127.0.0.1:{free_port()}", "secret": SECRET}
    process = MirrorProcess(workdir, {"local": {"url": upstream_url, "tag_ttl": "1h"}}, **settings)
    process.config["storage"].update(storage)
    return process


async def pull(session: aiohttp.ClientSession, host: str, image: Image) -> dict[str, bytes]:
    """The manifest by tag, then every blob it names, as a client pulls an image."""
    base = f"http://{host}/v2/{REPO}"
    async with session.get(f"{base}/manifests/{TAG}", headers={"Accept": OCI_MANIFEST}) as answer:
        assert answer.status == 200, await answer.text()
        pulled = {"manifest": await answer.read()}

    async def blob(digest: str) -> None:
        async with session.get(f"{base}/blobs/{digest}") as answer:
            assert answer.status == 200, digest
            pulled[digest] = await answer.read()

    await asyncio.gather(*(blob(digest) for digest in image.all_blobs()))
    return pulled


def expected(image: Image) -> dict[str, bytes]:
    return {"manifest": image.manifest, **image.all_blobs()}


async def await_cached(server: SeaweedS3, bucket: str, records: Records, digest: str) -> None:
    """Committed: the object is in the bucket and the record in Redis (a moment after
    the client got its last byte)."""
    await eventually(lambda: blob_key(digest) in bucket_keys(server, bucket), timeout=20)
    await eventually_async(lambda: records.recorded(digest), message=f"no record of {digest}")


@pytest.fixture
def big_image(tmp_path: Path) -> tuple[Registry, Image]:
    """A registry of the test's own holding one image of several MiB-sized layers."""
    image = oci_image([3 * MIB, 4 * MIB, 5 * MIB, 2 * MIB], seed=time.monotonic_ns() % 100_000)
    return Registry(tmp_path / "upstream"), image


@pytest.mark.parametrize("fleet", [True, False], ids=["fleet", "no-fleet"])
async def test_16_cold_pulls_on_two_replicas_without_a_shared_disk_fetch_each_blob_once(
    tmp_path: Path,
    big_image: tuple[Registry, Image],
    redis_server: RedisServer,
    s3_server: SeaweedS3,
    s3_bucket: str,
    fleet: bool,
) -> None:
    registry, image = big_image
    records = Records(redis_server)
    storage = s3_storage_settings(s3_server, s3_bucket)
    with registry:
        push(registry.url, REPO, image, TAG)
        replicas = [
            replica(tmp_path / name, registry.url, storage, records, fleet=fleet)
            for name in ("a", "b")
        ]
        for started in replicas:
            started.start()
        try:
            mark = registry.mark()
            async with aiohttp.ClientSession() as session:
                pulls = await asyncio.gather(
                    *(pull(session, replicas[i % 2].host, image) for i in range(16))
                )
            for pulled in pulls:
                assert pulled == expected(image)
            for digest in image.all_blobs():
                await await_cached(s3_server, s3_bucket, records, digest)
                await asyncio.to_thread(
                    registry.wait_for_access, "GET", f"/blobs/{digest}", 1, mark
                )
            assert upstream_blob_gets(registry, mark) == dict.fromkeys(image.all_blobs(), 1)
            # Neither replica keeps a committed blob on its own disk.
            for each in replicas:
                assert not (each.storage / "blobs").exists() or not any(
                    p.is_file() for p in (each.storage / "blobs").rglob("*")
                )
        finally:
            for started in replicas:
                started.stop()


async def test_a_replica_restarted_on_an_empty_disk_serves_the_bucket_at_once(
    tmp_path: Path,
    big_image: tuple[Registry, Image],
    redis_server: RedisServer,
    s3_server: SeaweedS3,
    s3_bucket: str,
) -> None:
    registry, image = big_image
    records = Records(redis_server)
    storage = s3_storage_settings(s3_server, s3_bucket)
    with registry:
        push(registry.url, REPO, image, TAG)
        mirror = replica(tmp_path / "a", registry.url, storage, records, fleet=True)
        mirror.start()
        try:
            async with aiohttp.ClientSession() as session:
                assert await pull(session, mirror.host, image) == expected(image)
                for digest in image.all_blobs():
                    await await_cached(s3_server, s3_bucket, records, digest)
                mirror.stop()
                shutil.rmtree(mirror.storage)
                mark = registry.mark()
                mirror.start()
                ready = http_request("GET", f"{mirror.url}/readyz")
                assert ready.status == 200, ready.body
                assert json.loads(ready.body)["checks"]["object_store"] == "ok"
                assert await pull(session, mirror.host, image) == expected(image)
            assert upstream_blob_gets(registry, mark) == {}
        finally:
            mirror.stop()


# -- the bucket failing ------------------------------------------------------------------


class S3Gate:
    """A pass-through in front of a SeaweedFS S3 gateway that kills it when the first
    part of a multipart upload arrives: an upload that is certainly under way and
    certainly unfinished when the store dies.

    SigV4 signs the Host header, which is passed on unchanged; `Expect` is not signed
    and is left to this server, which answers 100-continue itself.
    """

    def __init__(self, server: SeaweedS3):
        self.server = server
        self.armed = False
        self.fired = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * MIB)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        app.cleanup_ctx.append(self._client)
        return app

    async def _client(self, app: web.Application) -> AsyncIterator[None]:
        async with aiohttp.ClientSession(auto_decompress=False) as session:
            self._session = session
            yield

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        body = await request.read()
        if self.armed and request.method == "PUT" and "partNumber" in request.query:
            self.armed = False
            await asyncio.to_thread(self.server.kill)
            self.fired.set()
        headers = {k: v for k, v in request.headers.items() if k.lower() != "expect"}
        try:
            async with self._session.request(
                request.method,
                f"{self.server.url}{request.raw_path}",
                headers=headers,
                data=io.BytesIO(body),
                skip_auto_headers=("Content-Type",),
            ) as answer:
                payload = await answer.read()
                passed = {
                    k: v
                    for k, v in answer.headers.items()
                    if k.lower() not in {"content-length", "transfer-encoding", "connection"}
                }
                if request.method != "HEAD":
                    return web.Response(status=answer.status, body=payload, headers=passed)
                # A HEAD's Content-Length is the object's size, with no body to count.
                head = web.StreamResponse(status=answer.status, headers=passed)
                head.content_length = answer.content_length
                await head.prepare(request)
                return head
        except aiohttp.ClientError:
            # The store is down: the caller sees a broken connection, as it would.
            assert request.transport is not None
            request.transport.abort()
            return web.Response(status=502)


@pytest.fixture
def own_s3(tmp_path: Path) -> Iterator[SeaweedS3]:
    """A SeaweedFS of this test's own: killing it leaves the session's alone."""
    with SeaweedS3(tmp_path / "seaweedfs") as server:
        yield server


async def test_the_object_store_killed_mid_upload_costs_only_the_caching(
    tmp_path: Path,
    aiohttp_server: ServerFactory,
    redis_server: RedisServer,
    own_s3: SeaweedS3,
) -> None:
    bucket = "killed-mid-upload"
    own_s3.make_bucket(bucket)
    hit, big, miss = os.urandom(300 * 1024), os.urandom(24 * MIB + 7), os.urandom(200 * 1024)
    fake = FakeUpstream()
    for data in (hit, big, miss):
        fake.on("GET", f"/v2/{REPO}/blobs/{digest_of(data)}", serve(data))
    upstream: TestServer = await aiohttp_server(fake.app(), host="127.0.0.1")
    gate = S3Gate(own_s3)
    gate_server: TestServer = await aiohttp_server(gate.app(), host="127.0.0.1")
    storage = s3_storage_settings(own_s3, bucket, multipart_chunk="5MiB")
    storage["s3"]["endpoint"] = str(gate_server.make_url("")).rstrip("/")
    records = Records(redis_server)
    upstream_url = str(upstream.make_url("")).rstrip("/")
    mirror = replica(tmp_path / "m", upstream_url, storage, records, fleet=False)
    # In a thread: the mirror's store (the gate) and upstream answer on this loop.
    await asyncio.to_thread(mirror.start)

    def fetched(data: bytes) -> Callable[[], int]:
        return lambda: fake.count("GET", f"/v2/{REPO}/blobs/{digest_of(data)}")

    async def get(session: aiohttp.ClientSession, data: bytes) -> bytes:
        async with session.get(f"{mirror.url}/v2/{REPO}/blobs/{digest_of(data)}") as answer:
            assert answer.status == 200
            return await answer.read()

    try:
        async with aiohttp.ClientSession() as session:
            assert await get(session, hit) == hit
            await await_cached(own_s3, bucket, records, digest_of(hit))

            # The store dies with the big blob's multipart upload under way. The client
            # got the verified bytes first; a broken transfer would be allowed too, a
            # wrong byte never.
            gate.armed = True
            try:
                body = await get(session, big)
            except aiohttp.ClientPayloadError:
                body = None
            assert body is None or body == big
            await asyncio.wait_for(gate.fired.wait(), timeout=30)
            await eventually(lambda: "blob_not_cached" in mirror.log_text(), timeout=30)
            assert not await records.recorded(digest_of(big))

            # The store is down: ready, degraded; a hit and a miss are fetched, not cached.
            async with session.get(f"{mirror.url}/readyz") as answer:
                assert answer.status == 200
                assert "object_store" in (await answer.json())["degraded"]
            before = fetched(hit)()
            assert await get(session, hit) == hit
            assert fetched(hit)() == before + 1
            assert await get(session, miss) == miss
            assert fetched(miss)() == 1
            assert not await records.recorded(digest_of(big))
            assert not await records.recorded(digest_of(miss))

            await asyncio.to_thread(own_s3.restart)
            assert blob_key(digest_of(big)) not in bucket_keys(own_s3, bucket)
            assert not await records.recorded(digest_of(big))

            # Back: once the mirror's readiness probe sees the bucket again (a failure
            # makes it skip the bucket for a few seconds), the next pull caches the blob.
            async def bucket_ok() -> bool:
                async with session.get(f"{mirror.url}/readyz") as answer:
                    return bool((await answer.json())["checks"].get("object_store") == "ok")

            await eventually_async(bucket_ok, 30, "the mirror never saw the bucket again")
            assert await get(session, big) == big
            await await_cached(own_s3, bucket, records, digest_of(big))
            before = fetched(big)()
            assert await get(session, big) == big
            assert fetched(big)() == before
    finally:
        await asyncio.to_thread(mirror.stop)
