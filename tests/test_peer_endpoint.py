"""The peer endpoint on `cluster.listen`: the blobs this replica holds or is downloading,
by digest, for holders of the cluster secret, and nothing else.

In-process mirrors (Redis metadata, a fake upstream that can stall or lie) with the peer
app served on its own port as `mirror serve` does; one real `mirror serve` process for
the ports as deployed and its log.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from conftest import Mirror, MirrorFactory, MirrorTestServer
from support.fake_upstream import FakeUpstream, digest_of, serve, stall_after
from support.mirror_process import MirrorProcess
from support.net import free_port, http_request, wait_until
from support.redis_server import RedisServer

from mirror.app import create_peer_app

pytestmark = pytest.mark.slow  # starts servers

REPO = "team/app"
BLOB = os.urandom(1024 * 1024 + 7)
BLOB_DIGEST = digest_of(BLOB)
SECRET = "s3cret-of-the-fleet-0123456789"
ServerFactory = Callable[..., Awaitable[TestServer]]


@dataclass
class Replica:
    mirror: Mirror
    peer: TestServer
    secret_file: Path

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer.port}"

    def blob_url(self, digest: str = BLOB_DIGEST) -> str:
        return f"{self.peer_url}/cluster/v1/blobs/{digest}"

    def public_blob_url(self, digest: str = BLOB_DIGEST) -> str:
        return f"{self.mirror.url}/v2/{REPO}/blobs/{digest}"


def bearer(secret: str = SECRET) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def upstream_path(digest: str = BLOB_DIGEST) -> str:
    return f"/v2/{REPO}/blobs/{digest}"


@pytest.fixture
def fake() -> FakeUpstream:
    return FakeUpstream()


@pytest.fixture
async def replica(
    fake: FakeUpstream,
    aiohttp_server: ServerFactory,
    make_mirror: MirrorFactory,
    redis_server: RedisServer,
    tmp_path: Path,
) -> AsyncIterator[Replica]:
    upstream = await aiohttp_server(fake.app(), host="127.0.0.1")
    secret_file = tmp_path / "cluster-secret"
    secret_file.write_text(SECRET + "\n")
    peer_port = free_port()
    mirror = await make_mirror(
        {"fake": {"url": str(upstream.make_url("")).rstrip("/"), "read_timeout": "5s"}},
        metadata={
            "backend": "redis",
            "redis_url": redis_server.url,
            "key_prefix": f"peer{time.monotonic_ns()}:",
        },
        cluster={"listen": f"127.0.0.1:{peer_port}", "secret_file": str(secret_file)},
    )
    # Served as `mirror serve` serves it: its own app and runner, from the started mirror.
    peer = MirrorTestServer(create_peer_app(mirror.server.app), host="127.0.0.1", port=peer_port)
    await peer.start_server()
    yield Replica(mirror, peer, secret_file)
    await peer.close()


async def error_code(response: aiohttp.ClientResponse) -> str:
    assert response.content_type == "application/json"
    code: str = (await response.json())["errors"][0]["code"]
    return code


async def cache_blob(replica: Replica, http: aiohttp.ClientSession) -> None:
    async with http.get(replica.public_blob_url()) as response:
        assert response.status == 200
        assert await response.read() == BLOB
    await replica.mirror.settled()
    assert len(replica.mirror.blob_files()) == 1


async def test_committed_blob_with_get_head_and_range(
    fake: FakeUpstream, replica: Replica, http: aiohttp.ClientSession
) -> None:
    fake.on("GET", upstream_path(), serve(BLOB))
    await cache_blob(replica, http)

    async with http.get(replica.blob_url(), headers=bearer()) as response:
        assert response.status == 200
        assert response.headers["Docker-Content-Digest"] == BLOB_DIGEST
        assert response.headers["Content-Length"] == str(len(BLOB))
        assert await response.read() == BLOB
    async with http.head(replica.blob_url(), headers=bearer()) as response:
        assert response.status == 200
        assert response.headers["Docker-Content-Digest"] == BLOB_DIGEST
        assert response.headers["Content-Length"] == str(len(BLOB))
        assert await response.read() == b""
    async with http.get(replica.blob_url(), headers={**bearer(), "Range": "bytes=10-99"}) as r:
        assert r.status == 206
        assert r.headers["Content-Range"] == f"bytes 10-99/{len(BLOB)}"
        assert await r.read() == BLOB[10:100]
    async with http.get(replica.blob_url(), headers={**bearer(), "Range": "bytes=-5"}) as r:
        assert r.status == 206
        assert await r.read() == BLOB[-5:]
    # Served from disk: the upstream saw the one fetch that cached it.
    assert fake.count("GET", upstream_path()) == 1


async def test_without_the_secret_is_401(
    fake: FakeUpstream, replica: Replica, http: aiohttp.ClientSession
) -> None:
    fake.on("GET", upstream_path(), serve(BLOB))
    await cache_blob(replica, http)
    refused = [
        {},
        bearer("not-the-secret-0123456789"),
        bearer(SECRET + "x"),
        bearer(""),
        {"Authorization": f"Basic {SECRET}"},
        {"Authorization": SECRET},
    ]
    for headers in refused:
        for url in (replica.blob_url(), f"{replica.peer_url}/nothing"):
            async with http.get(url, headers=headers) as response:
                assert response.status == 401, headers
                assert await error_code(response) == "UNAUTHORIZED"
                assert "Docker-Content-Digest" not in response.headers
    # The scheme's name is case-insensitive (RFC 9110).
    async with http.get(replica.blob_url(), headers={"Authorization": f"bearer {SECRET}"}) as r:
        assert r.status == 200


async def test_unknown_digests_and_other_paths_are_404_and_never_fetched(
    fake: FakeUpstream, replica: Replica, http: aiohttp.ClientSession
) -> None:
    # The upstream has it; the replica does not, and a peer request must not fetch it.
    fake.on("GET", upstream_path(), serve(BLOB))
    async with http.get(replica.blob_url(), headers=bearer()) as response:
        assert response.status == 404
        assert await error_code(response) == "BLOB_UNKNOWN"
    async with http.head(replica.blob_url(), headers=bearer()) as response:
        assert response.status == 404
    assert fake.requests == []
    assert replica.mirror.blob_files() == []

    for path in (
        "/",
        "/cluster/v1/blobs",
        f"/cluster/v1/manifests/{BLOB_DIGEST}",
        f"/cluster/v1/blobs/{BLOB_DIGEST}/more",
        "/v2/",
        upstream_path(),
        f"/v2/{REPO}/manifests/latest",
        "/metrics",
        "/healthz",
    ):
        async with http.get(replica.peer_url + path, headers=bearer()) as response:
            assert response.status == 404, path
            assert await error_code(response) == "NAME_UNKNOWN"
    async with http.get(replica.blob_url("sha256:nothex"), headers=bearer()) as response:
        assert response.status == 400
        assert await error_code(response) == "DIGEST_INVALID"
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        async with http.request(method, replica.blob_url(), headers=bearer()) as response:
            assert response.status == 405, method
            assert await error_code(response) == "UNSUPPORTED"
    assert fake.requests == []


async def test_public_port_has_no_peer_path(
    fake: FakeUpstream, replica: Replica, http: aiohttp.ClientSession
) -> None:
    fake.on("GET", upstream_path(), serve(BLOB))
    await cache_blob(replica, http)
    public = f"{replica.mirror.url}/cluster/v1/blobs/{BLOB_DIGEST}"
    for method in ("GET", "HEAD"):
        async with http.request(method, public, headers=bearer()) as response:
            assert response.status == 404
            assert "Docker-Content-Digest" not in response.headers


async def test_download_in_progress_streams_and_holds_its_last_byte(
    fake: FakeUpstream, replica: Replica, http: aiohttp.ClientSession
) -> None:
    release = asyncio.Event()
    first_part = 256 * 1024
    fake.on("GET", upstream_path(), stall_after(BLOB, first_part, release))
    client = await http.get(replica.public_blob_url())
    await client.content.readexactly(1024)  # the download runs, stalled after first_part

    async with http.get(replica.blob_url(), headers=bearer()) as response:
        assert response.status == 200
        assert response.headers["Content-Length"] == str(len(BLOB))
        # What has arrived streams to the peer while the upstream withholds the rest.
        received = await response.content.readexactly(first_part - 1)
        assert received == BLOB[: first_part - 1]
        assert not release.is_set()
        assert replica.mirror.blob_files() == []
        release.set()
        assert received + await response.read() == BLOB
    assert await client.read() == BLOB[1024:]
    client.release()
    assert fake.count("GET", upstream_path()) == 1


async def test_unverified_download_never_reaches_a_peer_whole(
    fake: FakeUpstream, replica: Replica, http: aiohttp.ClientSession
) -> None:
    release = asyncio.Event()
    corrupted = bytearray(BLOB)
    corrupted[-1] ^= 0xFF  # only the last byte is wrong: everything before it is right
    fake.on("GET", upstream_path(), stall_after(bytes(corrupted), 64 * 1024, release))
    client = await http.get(replica.public_blob_url())
    await client.content.readexactly(1024)

    received = bytearray()

    async def read_all(response: aiohttp.ClientResponse) -> None:
        async for chunk in response.content.iter_any():
            received.extend(chunk)

    async with http.get(replica.blob_url(), headers=bearer()) as response:
        assert response.status == 200
        release.set()
        with pytest.raises(aiohttp.ClientPayloadError):
            await read_all(response)
    # Every byte but the wrong one could have arrived; the transfer broke before it.
    assert len(received) < len(BLOB)
    assert bytes(received) == BLOB[: len(received)]
    client.close()
    await replica.mirror.settled()
    assert replica.mirror.blob_files() == []


async def test_rotated_secret_file_is_honoured_without_restart(
    fake: FakeUpstream, replica: Replica, http: aiohttp.ClientSession
) -> None:
    fake.on("GET", upstream_path(), serve(BLOB))
    await cache_blob(replica, http)
    rotated = "the-next-secret-of-the-fleet-42"
    replica.secret_file.write_text(rotated)
    async with http.get(replica.blob_url(), headers=bearer()) as response:
        assert response.status == 401
    async with http.get(replica.blob_url(), headers=bearer(rotated)) as response:
        assert response.status == 200
        assert await response.read() == BLOB
    # A secret file that went away refuses everyone, the empty secret included.
    replica.secret_file.unlink()
    for secret in (rotated, ""):
        async with http.get(replica.blob_url(), headers=bearer(secret)) as response:
            assert response.status == 401


def test_served_process_keeps_the_ports_apart_and_the_secret_out_of_its_log(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    peer_port = free_port()
    process = MirrorProcess(
        tmp_path,
        {"local": {"url": "http://127.0.0.1:9"}},
        metadata={
            "backend": "redis",
            "redis_url": redis_server.url,
            "key_prefix": f"peerproc{time.monotonic_ns()}:",
        },
        cluster={"listen": f"127.0.0.1:{peer_port}", "secret_env": "FLEET_SECRET"},
        env={"FLEET_SECRET": SECRET},
    )
    peer_url = f"http://127.0.0.1:{peer_port}"
    with process:
        blob_path = f"/cluster/v1/blobs/{BLOB_DIGEST}"
        assert http_request("GET", peer_url + blob_path).status == 401
        wrong = http_request("GET", peer_url + blob_path, headers=bearer("wrong-secret-0123456789"))
        assert wrong.status == 401
        # Bytes that are not UTF-8 (http.client sends latin-1) are a wrong secret too.
        garbled = http_request("GET", peer_url + blob_path, headers=bearer("\xff\xfe" * 8))
        assert garbled.status == 401
        held = http_request("GET", peer_url + blob_path, headers=bearer())
        assert held.status == 404  # authenticated; the replica holds nothing
        assert http_request("GET", process.url + blob_path, headers=bearer()).status == 404
        assert http_request("GET", peer_url + "/v2/", headers=bearer()).status == 404
        assert http_request("GET", process.url + "/v2/").status == 200
        # An access line is written once its response is out: wait for the five.
        wait_until(lambda: process.log_text().count('"kind": "peer"') == 5, timeout=10)
        log = process.log_text()
    assert blob_path in log
    assert SECRET not in log
    assert "wrong-secret-0123456789" not in log
