"""Upstream faults a real registry cannot produce, through a programmable fake upstream.

A blob cut off mid-transfer or with the wrong digest must reach the client as a failed
transfer and leave nothing in the cache; manifests that do not match their digest are
refused; 5xx, 429 and silence become clear OCI errors or stale answers, never a hang.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections.abc import Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import Mirror, MirrorFactory
from redis.asyncio import Redis
from support.fake_upstream import (
    FakeUpstream,
    digest_of,
    drop_connection,
    hang,
    reset_after,
    serve,
    stall_after,
    status,
)
from support.net import eventually, free_port
from support.redis_server import RedisServer

from mirror.api.services import SERVICES
from mirror.app import UPSTREAMS
from mirror.oci import OCI_MANIFEST

pytestmark = pytest.mark.slow  # starts registries, servers or processes

REPO = "team/app"
BLOB = os.urandom(3 * 1024 * 1024 + 17)
BLOB_DIGEST = digest_of(BLOB)
BLOB_PATH = f"/v2/{REPO}/blobs/{BLOB_DIGEST}"
MANIFEST = json.dumps(
    {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": {}, "layers": []}, indent=2
).encode()
MANIFEST_DIGEST = digest_of(MANIFEST)

ServerFactory = Callable[..., Awaitable[TestServer]]


@pytest.fixture
def fake() -> FakeUpstream:
    return FakeUpstream()


@pytest.fixture
async def fake_mirror(
    fake: FakeUpstream, aiohttp_server: ServerFactory, make_mirror: MirrorFactory
) -> Mirror:
    server = await aiohttp_server(fake.app(), host="127.0.0.1")
    return await make_mirror(
        {"fake": {"url": str(server.make_url("")).rstrip("/"), "tag_ttl": 0, "read_timeout": "2s"}}
    )


async def read_blob(http: aiohttp.ClientSession, mirror: Mirror) -> bytes:
    async with http.get(f"{mirror.url}{BLOB_PATH}") as response:
        assert response.status == 200
        return await response.read()


async def test_reset_mid_blob_fails_the_transfer_and_commits_nothing(
    fake: FakeUpstream, fake_mirror: Mirror, http: aiohttp.ClientSession
) -> None:
    fake.on("GET", BLOB_PATH, reset_after(BLOB, len(BLOB) // 2), serve(BLOB))
    with pytest.raises(aiohttp.ClientPayloadError):
        await read_blob(http, fake_mirror)
    assert fake_mirror.blob_files() == []
    await eventually(lambda: fake_mirror.temp_files() == [], timeout=5)
    # Counted for mirror_upstream_errors_total{cause="transfer"}.
    assert fake_mirror.server.app[UPSTREAMS]["fake"].failures == {"transfer": 1}

    assert await read_blob(http, fake_mirror) == BLOB
    assert fake.count("GET", BLOB_PATH) == 2


async def test_wrong_digest_fails_the_transfer_and_commits_nothing(
    fake: FakeUpstream, fake_mirror: Mirror, http: aiohttp.ClientSession
) -> None:
    corrupted = bytearray(BLOB)
    corrupted[12345] ^= 0xFF
    fake.on("GET", BLOB_PATH, serve(bytes(corrupted), digest=BLOB_DIGEST), serve(BLOB))
    with pytest.raises(aiohttp.ClientPayloadError):
        await read_blob(http, fake_mirror)
    assert fake_mirror.blob_files() == []
    await eventually(lambda: fake_mirror.temp_files() == [], timeout=5)

    assert await read_blob(http, fake_mirror) == BLOB
    await eventually(lambda: len(fake_mirror.blob_files()) == 1, timeout=10)


async def test_short_body_with_right_prefix_is_never_served_whole(
    fake: FakeUpstream, fake_mirror: Mirror, http: aiohttp.ClientSession
) -> None:
    # Every byte the client gets is right, but the last one never comes: the client must
    # see a broken transfer, not a short blob.
    fake.on("GET", BLOB_PATH, reset_after(BLOB, len(BLOB) - 1))
    with pytest.raises(aiohttp.ClientPayloadError):
        await read_blob(http, fake_mirror)
    assert fake_mirror.blob_files() == []


async def test_clients_get_first_bytes_before_a_slow_download_completes(
    fake: FakeUpstream, fake_mirror: Mirror, http: aiohttp.ClientSession
) -> None:
    release = asyncio.Event()
    first_part = 256 * 1024
    fake.on("GET", BLOB_PATH, stall_after(BLOB, first_part, release))
    clients = 8
    got_first_bytes = 0
    all_started = asyncio.Event()

    async def client() -> bytes:
        nonlocal got_first_bytes
        async with http.get(f"{fake_mirror.url}{BLOB_PATH}") as response:
            assert response.status == 200
            assert response.headers["Content-Length"] == str(len(BLOB))
            received = await response.content.readexactly(1024)
            got_first_bytes += 1
            if got_first_bytes == clients:
                all_started.set()
            return received + await response.read()

    tasks = [asyncio.create_task(client()) for _ in range(clients)]
    # Every client has bytes while the upstream still withholds most of the blob.
    await asyncio.wait_for(all_started.wait(), timeout=10)
    assert not release.is_set()
    assert fake_mirror.blob_files() == []
    release.set()
    bodies = await asyncio.gather(*tasks)
    assert all(body == BLOB for body in bodies)
    assert fake.count("GET", BLOB_PATH) == 1


async def test_client_hanging_up_does_not_stop_the_download(
    fake: FakeUpstream, fake_mirror: Mirror, http: aiohttp.ClientSession
) -> None:
    release = asyncio.Event()
    fake.on("GET", BLOB_PATH, stall_after(BLOB, 64 * 1024, release))
    async with http.get(f"{fake_mirror.url}{BLOB_PATH}") as response:
        await response.content.readexactly(1024)
        response.close()
    release.set()
    await eventually(lambda: len(fake_mirror.blob_files()) == 1, timeout=10)
    assert fake_mirror.blob_files()[0].read_bytes() == BLOB
    assert await read_blob(http, fake_mirror) == BLOB
    assert fake.count("GET", BLOB_PATH) == 1


async def test_manifest_with_wrong_digest_is_refused_and_not_cached(
    fake: FakeUpstream, fake_mirror: Mirror, http: aiohttp.ClientSession
) -> None:
    path = f"/v2/{REPO}/manifests/{MANIFEST_DIGEST}"
    tampered = MANIFEST.replace(b"2", b"3", 1)
    fake.on(
        "GET",
        path,
        serve(tampered, content_type=OCI_MANIFEST, digest=MANIFEST_DIGEST),
        serve(MANIFEST, content_type=OCI_MANIFEST),
    )
    async with http.get(f"{fake_mirror.url}{path}") as response:
        assert response.status == 502
        assert (await response.json())["errors"][0]["code"] == "UNAVAILABLE"
    assert fake_mirror.blob_files() == []
    async with http.get(f"{fake_mirror.url}{path}") as response:
        assert response.status == 200
        assert await response.read() == MANIFEST


async def test_tag_whose_body_contradicts_the_upstream_digest_header_is_refused(
    fake: FakeUpstream, fake_mirror: Mirror, http: aiohttp.ClientSession
) -> None:
    path = f"/v2/{REPO}/manifests/latest"
    other = digest_of(b"something else")

    async def head_without_digest(request: web.Request) -> web.StreamResponse:
        # No Docker-Content-Digest: the mirror must GET by tag to learn the digest.
        return web.Response(content_type=OCI_MANIFEST)

    fake.on("HEAD", path, head_without_digest)
    fake.on("GET", path, serve(MANIFEST, content_type=OCI_MANIFEST, digest=other))
    async with http.get(f"{fake_mirror.url}{path}") as response:
        assert response.status in (502, 503)
    # Refused for the contradiction, not for an upstream failure before it.
    assert fake.count("GET", path) == 1
    assert fake_mirror.blob_files() == []


@pytest.mark.parametrize("code", [500, 502, 503])
async def test_upstream_5xx_with_nothing_cached_is_503(
    code: int, fake: FakeUpstream, fake_mirror: Mirror, http: aiohttp.ClientSession
) -> None:
    path = f"/v2/{REPO}/manifests/latest"
    fake.on("HEAD", path, status(code))
    async with http.get(f"{fake_mirror.url}{path}") as response:
        assert response.status == 503
        assert (await response.json())["errors"][0]["code"] == "UNAVAILABLE"


async def test_upstream_429_with_nothing_cached_is_429_with_retry_after(
    fake: FakeUpstream, fake_mirror: Mirror, http: aiohttp.ClientSession
) -> None:
    path = f"/v2/{REPO}/manifests/latest"
    fake.on("HEAD", path, status(429, {"Retry-After": "42"}))
    async with http.get(f"{fake_mirror.url}{path}") as response:
        assert response.status == 429
        assert response.headers["Retry-After"] == "42"
        assert (await response.json())["errors"][0]["code"] == "TOOMANYREQUESTS"


@pytest.mark.parametrize("failure", ["429", "503", "silence"])
async def test_cached_tag_is_served_stale_when_the_upstream_fails(
    failure: str, fake: FakeUpstream, fake_mirror: Mirror, http: aiohttp.ClientSession
) -> None:
    path = f"/v2/{REPO}/manifests/latest"
    fake.on("HEAD", path, serve(MANIFEST, content_type=OCI_MANIFEST))
    fake.on(
        "GET", f"/v2/{REPO}/manifests/{MANIFEST_DIGEST}", serve(MANIFEST, content_type=OCI_MANIFEST)
    )
    async with http.get(f"{fake_mirror.url}{path}") as response:
        assert response.status == 200
        assert response.headers["X-Cache"] == "MISS"

    release = asyncio.Event()
    broken = {"429": status(429), "503": status(503), "silence": hang(release)}[failure]
    fake.on("HEAD", path, broken)
    try:
        async with http.get(f"{fake_mirror.url}{path}") as response:
            assert response.status == 200
            assert response.headers["X-Cache"] == "STALE"
            assert response.headers["Docker-Content-Digest"] == MANIFEST_DIGEST
            assert await response.read() == MANIFEST
    finally:
        release.set()


async def test_unreachable_upstream_fails_fast_for_uncached_content(
    make_mirror: MirrorFactory, http: aiohttp.ClientSession
) -> None:
    closed = free_port()  # nothing listens here
    mirror = await make_mirror({"gone": {"url": f"http://127.0.0.1:{closed}"}})
    for path in (f"/v2/{REPO}/manifests/latest", BLOB_PATH, f"/v2/{REPO}/tags/list"):
        async with http.get(
            f"{mirror.url}{path}", timeout=aiohttp.ClientTimeout(total=10)
        ) as response:
            assert response.status == 503, path
            assert (await response.json())["errors"][0]["code"] == "UNAVAILABLE"
    # Each connection refused, retried once: mirror_upstream_errors_total{cause="connect"}.
    assert mirror.server.app[UPSTREAMS]["gone"].failures == {"connect": 6}


async def test_redirects_keep_credentials_home_and_expired_presigned_urls_are_reasked(
    aiohttp_server: ServerFactory, make_mirror: MirrorFactory, http: aiohttp.ClientSession
) -> None:
    storage = FakeUpstream()
    storage_server = await aiohttp_server(storage.app(), host="127.0.0.1")
    seen_authorization: list[str | None] = []

    async def presigned(request: web.Request) -> web.StreamResponse:
        seen_authorization.append(request.headers.get("Authorization"))
        return await serve(BLOB)(request)

    storage.on("GET", "/v2/storage/blob", status(403), presigned)

    registry = FakeUpstream()

    async def registry_blob(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != "Basic " + base64.b64encode(b"bot:pw").decode():
            return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="r"'})
        location = str(storage_server.make_url("/v2/storage/blob")) + "?X-Signature=secret"
        return web.Response(status=307, headers={"Location": location})

    registry.on("GET", BLOB_PATH, registry_blob)
    registry_server = await aiohttp_server(registry.app(), host="127.0.0.1")
    mirror = await make_mirror(
        {
            "private": {
                "url": str(registry_server.make_url("")).rstrip("/"),
                "username": "bot",
                "password": "pw",
            }
        }
    )
    assert await read_blob(http, mirror) == BLOB
    # The first storage answer was a 403 (an expired URL): the registry was asked again.
    assert registry.count("GET", BLOB_PATH) == 3  # 401 challenge, then two authorised asks
    assert storage.count("GET", "/v2/storage/blob") == 2
    assert seen_authorization == [None]


async def test_a_connection_lost_before_any_byte_is_retried_once(
    fake: FakeUpstream, fake_mirror: Mirror, http: aiohttp.ClientSession
) -> None:
    fake.on("GET", BLOB_PATH, drop_connection(), serve(BLOB))
    assert await read_blob(http, fake_mirror) == BLOB
    assert fake.count("GET", BLOB_PATH) == 2

    # A request that keeps failing is not retried for ever.
    path = f"/v2/{REPO}/manifests/{MANIFEST_DIGEST}"
    fake.on("GET", path, drop_connection())
    async with http.get(f"{fake_mirror.url}{path}") as response:
        assert response.status == 503
    assert fake.count("GET", path) == 2


async def test_a_range_of_a_blob_that_fails_verification_is_never_complete(
    fake: FakeUpstream, fake_mirror: Mirror, http: aiohttp.ClientSession
) -> None:
    # The range ends long before the blob does: its last byte still waits for the whole
    # blob's verification, so a bad blob cannot yield a complete 206.
    corrupted = bytearray(BLOB)
    corrupted[len(BLOB) - 10] ^= 0xFF
    fake.on("GET", BLOB_PATH, serve(bytes(corrupted), digest=BLOB_DIGEST))
    async with http.get(
        f"{fake_mirror.url}{BLOB_PATH}", headers={"Range": "bytes=0-1023"}
    ) as response:
        assert response.status == 206
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    assert fake_mirror.blob_files() == []


async def test_an_unexpected_error_before_the_download_starts_answers_every_client(
    fake: FakeUpstream,
    aiohttp_server: ServerFactory,
    make_mirror: MirrorFactory,
    redis_server: RedisServer,
    http: aiohttp.ClientSession,
) -> None:
    """Another process holds the lease and its download record is unreadable (written by
    another version, say): the clients waiting for the download get an error at once,
    never a hang."""
    server = await aiohttp_server(fake.app(), host="127.0.0.1")
    fake.on("GET", BLOB_PATH, serve(BLOB))
    prefix = f"unexpected{os.getpid()}:"
    mirror = await make_mirror(
        {"fake": {"url": str(server.make_url("")).rstrip("/")}},
        metadata={"backend": "redis", "redis_url": redis_server.url, "key_prefix": prefix},
    )
    client = Redis.from_url(redis_server.url)
    try:
        await client.set(f"{prefix}lease:blob:{BLOB_DIGEST}", "another-process", px=60_000)
        await client.set(f"{prefix}download:{BLOB_DIGEST}", b"\x00 not a record")

        async def attempt() -> int:
            async with http.get(f"{mirror.url}{BLOB_PATH}") as response:
                return response.status

        statuses = await asyncio.wait_for(asyncio.gather(*(attempt() for _ in range(3))), 30)
        assert statuses == [503, 503, 503]
        assert fake.count("GET", BLOB_PATH) == 0
    finally:
        await client.aclose()


async def test_a_get_joining_a_heads_revalidation_gets_the_body(
    fake: FakeUpstream, fake_mirror: Mirror, http: aiohttp.ClientSession
) -> None:
    """A client HEAD of a cold tag is answered from the upstream's headers alone; a GET
    of the same tag that joins that revalidation must still get the manifest's bytes."""
    release = asyncio.Event()
    answer = serve(MANIFEST, content_type=OCI_MANIFEST)

    async def held_head(request: web.Request) -> web.StreamResponse:
        await release.wait()
        return await answer(request)

    tag_path = f"/v2/{REPO}/manifests/latest"
    fake.on("HEAD", tag_path, held_head)
    fake.on("GET", f"/v2/{REPO}/manifests/{MANIFEST_DIGEST}", answer)
    head = asyncio.create_task(http.head(f"{fake_mirror.url}{tag_path}"))
    await eventually(lambda: fake.count("HEAD", tag_path) == 1)
    get = asyncio.create_task(http.get(f"{fake_mirror.url}{tag_path}"))
    # The GET joins the revalidation before the upstream answers it.
    flights = fake_mirror.server.app[SERVICES].manifests._by_tag
    await eventually(lambda: flights.waiting(("fake", REPO, "latest")) == 2)
    release.set()
    async with await asyncio.wait_for(get, 10) as response:
        assert response.status == 200
        assert await asyncio.wait_for(response.read(), 10) == MANIFEST
    async with await head as response:
        assert response.status == 200
        assert response.headers["Docker-Content-Digest"] == MANIFEST_DIGEST
    assert fake.count("HEAD", tag_path) == 1  # one revalidation for both
