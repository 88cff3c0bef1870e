"""Fixtures shared by the suite: real upstream registries seeded with our images, and mirrors.

Two session-wide upstreams run the CNCF distribution registry: one open, one behind
`auth: token` with a token server, both seeded with `standard_images()` under
`test/<kind>:v1`. Each test gets its own mirror (fresh storage root) served in-process
on a free loopback port, so real clients like skopeo can pull through it while the test
inspects its state.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from aiohttp.web_runner import BaseRunner
from support.cloud import moto_ecr_server
from support.fake_upstream import FakeUpstream, digest_of, serve, stall_after
from support.images import Image, push, push_with_token, standard_images
from support.net import eventually
from support.redis_server import RedisServer
from support.registry import Registry
from support.seaweedfs import SeaweedS3
from support.tokenserver import TokenServer

from mirror.api.services import SERVICES
from mirror.app import create_app
from mirror.config import MirrorConfig, load_config
from mirror.logging import AccessLogger
from mirror.server import MirrorRunner

PUSHER, PUSHER_PASSWORD = "pusher", "pusher-secret"
TAG = "v1"
ServerFactory = Callable[..., Awaitable[TestServer]]
# Everything a mirror may create under its storage root (blobstore.py draws the layout).
STORAGE_ENTRIES = {
    "blobs",
    "corrupt",
    "layout-version",
    "ledger.json",
    "ledger.json.tmp",
    "ledger.lock",
    "meta",
    "tmp",
}
# Fixtures that start a registry, Redis, a token server or a mirror on a port: a test
# that uses one (itself or through another fixture) is an integration test, `slow`.
# Tests that start such things in their own body are marked where they are written.
SERVER_FIXTURES = frozenset(
    {
        "upstream",
        "token_upstream",
        "redis_server",
        "s3_server",
        "s3_bucket",
        "s3_storage",
        "make_mirror",
        "mirror",
        "aiohttp_server",
    }
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@dataclass
class Upstream:
    registry: Registry
    images: dict[str, Image]
    token_server: TokenServer | None = None

    @property
    def url(self) -> str:
        return self.registry.url

    @staticmethod
    def repo(kind: str) -> str:
        return f"test/{kind}"


@pytest.fixture(scope="session")
def images() -> dict[str, Image]:
    return standard_images()


@pytest.fixture(scope="session")
def upstream(
    tmp_path_factory: pytest.TempPathFactory, images: dict[str, Image]
) -> Iterator[Upstream]:
    with Registry(tmp_path_factory.mktemp("upstream")) as registry:
        for kind, image in images.items():
            push(registry.url, Upstream.repo(kind), image, TAG)
        yield Upstream(registry, images)


@pytest.fixture(scope="session")
def token_upstream(
    tmp_path_factory: pytest.TempPathFactory, images: dict[str, Image]
) -> Iterator[Upstream]:
    workdir = tmp_path_factory.mktemp("token-upstream")
    with (
        TokenServer(users={PUSHER: PUSHER_PASSWORD}, workdir=workdir / "tokens") as tokens,
        Registry(workdir / "registry", token_auth=tokens.registry_settings()) as registry,
    ):
        for kind, image in images.items():
            push_with_token(
                registry.url, Upstream.repo(kind), image, TAG, tokens, PUSHER, PUSHER_PASSWORD
            )
        yield Upstream(registry, images, tokens)


@pytest.fixture
def fresh_upstream(tmp_path: Path) -> Iterator[Upstream]:
    """An open registry of this test's own, holding images no other test pushed (so
    its access log counts only this test's pulls)."""
    images = standard_images(seed_base=int(time.monotonic_ns() % 1000) + 20)
    with Registry(tmp_path / "upstream") as registry:
        for kind in ("oci", "oci-index"):
            push(registry.url, Upstream.repo(kind), images[kind], TAG)
        yield Upstream(registry, images)


@pytest.fixture
async def stalled_blob(
    aiohttp_server: ServerFactory,
) -> tuple[FakeUpstream, str, bytes, asyncio.Event, str]:
    """A fake upstream whose first download of a blob stalls after 256 KiB until released;
    whoever asks after that gets the whole blob at once."""
    blob = os.urandom(2 * 1024 * 1024 + 3)
    path = f"/v2/team/app/blobs/{digest_of(blob)}"
    release = asyncio.Event()
    fake = FakeUpstream()
    fake.on("GET", path, stall_after(blob, 256 * 1024, release), serve(blob))
    server = await aiohttp_server(fake.app(), host="127.0.0.1")
    return fake, path, blob, release, str(server.make_url("")).rstrip("/")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server for the session; tests keep apart by key prefix."""
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """One real SeaweedFS S3 gateway for the session; tests keep apart by bucket."""
    with SeaweedS3(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


@pytest.fixture
def s3_bucket(s3_server: SeaweedS3) -> str:
    """A fresh, empty bucket of this test's own on `s3_server`."""
    name = f"test-{uuid.uuid4().hex[:20]}"
    s3_server.make_bucket(name)
    return name


def s3_storage_settings(server: SeaweedS3, bucket: str, **s3: Any) -> dict[str, Any]:
    """`storage` settings that put a mirror's blobs in `bucket` on `server`."""
    return server.storage_settings(bucket, **s3)


@pytest.fixture
def s3_storage(s3_server: SeaweedS3, s3_bucket: str) -> dict[str, Any]:
    """`storage` settings for a mirror on this test's own bucket."""
    return s3_storage_settings(s3_server, s3_bucket)


@dataclass
class Mirror:
    server: TestServer
    config: MirrorConfig

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def root(self) -> Path:
        return self.config.storage.root

    def blob_files(self) -> list[Path]:
        return sorted(p for p in (self.root / "blobs").rglob("*") if p.is_file())

    def temp_files(self) -> list[Path]:
        return sorted((self.root / "tmp").iterdir())

    async def settled(self) -> None:
        """Wait until no download runs: the last byte reaches a client before the fsync,
        the rename and the record."""
        blobs = self.server.app[SERVICES].blobs
        await eventually(lambda: blobs.downloads_in_flight == 0)


MirrorFactory = Callable[..., Awaitable[Mirror]]


class MirrorTestServer(TestServer):
    """An in-process server with the connection layer and access lines `mirror serve`
    uses."""

    async def _make_runner(self, **kwargs: Any) -> BaseRunner:
        kwargs.setdefault("access_log_class", AccessLogger)
        return MirrorRunner(self.app, **kwargs)


def mirror_config(
    root: Path, upstreams: dict[str, dict[str, Any]], **settings: Any
) -> MirrorConfig:
    storage = {"root": str(root), **settings.pop("storage", {})}
    return load_config(
        None,
        listen="127.0.0.1:0",
        storage=storage,
        upstreams=upstreams,
        log={"level": "debug", "format": "json"},
        **settings,
    )


# `MIRROR_TEST_BLOB_BACKEND=s3 ./scripts/test` runs every in-process mirror that does not
# choose its storage backend on a bucket of its own, as devpi reruns its suite per
# backend. Tests that look at blob files on local disk fail there by design.
BLOB_BACKEND = os.environ.get("MIRROR_TEST_BLOB_BACKEND", "filesystem")


@pytest.fixture
async def make_mirror(
    tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[MirrorFactory]:
    """Start a mirror in-process: `await make_mirror({"name": {"url": ...}}, **settings)`."""
    servers: list[TestServer] = []
    count = 0

    async def factory(upstreams: dict[str, dict[str, Any]], **settings: Any) -> Mirror:
        nonlocal count
        count += 1
        settings.setdefault("default_upstream", next(iter(upstreams)))
        if BLOB_BACKEND == "s3" and "backend" not in settings.get("storage", {}):
            server: SeaweedS3 = request.getfixturevalue("s3_server")
            bucket = f"all-{uuid.uuid4().hex[:20]}"
            server.make_bucket(bucket)
            settings["storage"] = {
                **settings.get("storage", {}),
                **s3_storage_settings(server, bucket),
            }
        ssl_context = settings.pop("ssl_context", None)
        config = mirror_config(tmp_path / f"mirror-{count}", upstreams, **settings)
        test_server = MirrorTestServer(create_app(config), host="127.0.0.1")
        await test_server.start_server(ssl=ssl_context)
        servers.append(test_server)
        return Mirror(test_server, config)

    yield factory
    for server in servers:
        await server.close()


@pytest.fixture
async def mirror(make_mirror: MirrorFactory, upstream: Upstream) -> Mirror:
    """A mirror of the open upstream, with a long tag TTL."""
    return await make_mirror({"local": {"url": upstream.url, "tag_ttl": "1h"}})


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


@pytest.fixture
def moto_ecr(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """ECR's GetAuthorizationToken on moto's server (support/cloud.py)."""
    with moto_ecr_server(monkeypatch, tmp_path) as issued:
        yield issued
