"""Redis without a single point of failure: `metadata.redis_url` as `redis+sentinel://`.

A real primary, replica and three sentinels; a real `mirror serve`. The primary is
SIGKILLed while clients pull; Sentinel promotes the replica; every pull succeeds with the
right bytes, the mirror is the same process, and what it records afterwards lands on the
new primary. The URL's forms are checked here too, at config load.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from support.images import ALL_MANIFEST_TYPES, Image, oci_image, push
from support.mirror_process import MirrorProcess
from support.net import eventually, http_request
from support.registry import Registry
from support.sentinel import SentinelRedis

from mirror.config import ConfigError, load_config
from mirror.metadata.redis import RedisMetadataStore
from mirror.metadata.redis_url import (
    PlainRedisURL,
    SentinelRedisURL,
    parse_redis_url,
)

REPO = "test/failover"
BATCH = 10  # cold images released at each stage: before the kill, during, after
UPSTREAMS = {"local": {"url": "http://127.0.0.1:5001"}}
IMAGES = 3 * BATCH + 1  # and one more, pulled last, whose records are looked for


# URL forms: no servers, milliseconds.


def test_sentinel_url_full_form() -> None:
    parsed = parse_redis_url(
        "redis+sentinel://app:p%40ss@s1:26380,s2,[::1]:5000/mymaster/3?sentinel_password=sp"
    )
    assert parsed == SentinelRedisURL(
        sentinels=(("s1", 26380), ("s2", 26379), ("::1", 5000)),
        service_name="mymaster",
        db=3,
        username="app",
        password="p@ss",
        sentinel_password="sp",
    )
    assert "p@ss" not in repr(parsed)
    assert "'sp'" not in repr(parsed)


def test_sentinel_url_short_forms() -> None:
    assert parse_redis_url("redis+sentinel://sentinel/mymaster") == SentinelRedisURL(
        sentinels=(("sentinel", 26379),), service_name="mymaster"
    )
    with_password = parse_redis_url("redis+sentinel://:secret@10.0.0.1:26379/m/")
    assert isinstance(with_password, SentinelRedisURL)
    assert with_password.password == "secret"
    assert with_password.username is None
    assert parse_redis_url("redis://127.0.0.1:6379/0") == PlainRedisURL("redis://127.0.0.1:6379/0")
    assert isinstance(parse_redis_url("unix:///run/redis.sock"), PlainRedisURL)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+sentinel://:hunter2@s1", "needs the service name"),
        ("redis+sentinel://:hunter2@s1/", "needs the service name"),
        ("redis+sentinel://:hunter2@/mymaster", "empty sentinel address"),
        ("redis+sentinel://s1,,s2/mymaster", "empty sentinel address"),
        ("redis+sentinel://:hunter2@s1:0/mymaster", "not a port number"),
        ("redis+sentinel://s1:http/mymaster", "not a port number"),
        ("redis+sentinel://s_1/mymaster", "not a host name"),
        ("redis+sentinel://[::1/mymaster", "not [v6]:port"),
        ("redis+sentinel://s1/mymaster/zero", "not a non-negative integer"),
        ("redis+sentinel://s1/mymaster/0/extra", "/service_name[/db]"),
        ("redis+sentinel://s1/my%20master", "not a Sentinel master name"),
        ("redis+sentinel://s1/mymaster?password=hunter2", "unknown redis+sentinel URL parameter"),
        ("redis+sentinel://s1/m?sentinel_password=a&sentinel_password=b", "more than once"),
        ("redis+sentinel://s1/mymaster#frag", "no fragment"),
        ("sentinel://:hunter2@s1/mymaster", "unsupported scheme"),
        ("s1:26379", "expected redis://"),
        ("redis://:hunter2@host:port/0", "not a valid Redis URL"),
    ],
)
def test_bad_redis_urls_stop_config_load_naming_the_key(url: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, upstreams=UPSTREAMS, metadata={"backend": "redis", "redis_url": url})
    text = str(caught.value)
    assert "metadata.redis_url:" in text
    assert message in text
    assert "hunter2" not in text  # a password in a bad URL is never repeated


def test_sentinel_url_loads() -> None:
    url = "redis+sentinel://:pw@127.0.0.1:26379,127.0.0.1:26380/mymaster/0"
    config = load_config(None, upstreams=UPSTREAMS, metadata={"backend": "redis", "redis_url": url})
    assert config.metadata.redis_url == url


# A real failover.


@pytest.fixture
def sentinel_redis(tmp_path: Path) -> Iterator[SentinelRedis]:
    with SentinelRedis(tmp_path / "redis") as group:
        yield group


@pytest.fixture
def failover_upstream(tmp_path: Path) -> Iterator[tuple[Registry, list[Image]]]:
    seed = int(time.monotonic_ns() % 100_000) * 100
    images = [oci_image([700, 1500], seed=seed + n) for n in range(IMAGES)]
    with Registry(tmp_path / "upstream") as registry:
        for n, image in enumerate(images):
            push(registry.url, REPO, image, f"v{n}")
        yield registry, images


async def pull(http: aiohttp.ClientSession, base: str, tag: str, image: Image) -> None:
    """Manifest by tag and every blob, each checked byte for byte; raises on anything else."""
    headers = {"Accept": ", ".join(ALL_MANIFEST_TYPES)}
    async with http.get(f"{base}/v2/{REPO}/manifests/{tag}", headers=headers) as resp:
        body = await resp.read()
        if resp.status != 200 or body != image.manifest:
            raise AssertionError(f"manifest {tag}: {resp.status}, {len(body)} bytes")
    for digest in image.blobs:
        async with http.get(f"{base}/v2/{REPO}/blobs/{digest}") as resp:
            data = await resp.read()
            if resp.status != 200 or "sha256:" + hashlib.sha256(data).hexdigest() != digest:
                raise AssertionError(f"blob {digest} of {tag}: {resp.status}")


@pytest.mark.slow
async def test_primary_killed_during_pulls_sentinel_promotes_and_pulls_carry_on(
    tmp_path: Path,
    sentinel_redis: SentinelRedis,
    failover_upstream: tuple[Registry, list[Image]],
) -> None:
    registry, images = failover_upstream
    prefix = f"sentinel{time.monotonic_ns()}:"
    metadata = {"backend": "redis", "redis_url": sentinel_redis.url, "key_prefix": prefix}
    upstreams = {"local": {"url": registry.url, "tag_ttl": "1h"}}
    with MirrorProcess(tmp_path / "mirror", upstreams, metadata=metadata) as mirror:
        pid = mirror.pid
        failures: list[str] = []
        pulled: list[tuple[float, int]] = []  # (when, image) of every successful pull
        # Cold images are released in batches at each stage (before the kill, while no
        # primary answers, after the promotion); between batches the pullers re-pull
        # what they have, so the load never stops.
        cold: asyncio.Queue[int] = asyncio.Queue()
        released: list[int] = []
        stop = asyncio.Event()

        def release(batch: int) -> None:
            for n in range(batch * BATCH, (batch + 1) * BATCH):
                cold.put_nowait(n)
                released.append(n)

        async def puller(http: aiohttp.ClientSession) -> None:
            warm = 0
            while not stop.is_set():
                if not cold.empty():
                    n = cold.get_nowait()
                else:
                    n, warm = released[warm % len(released)], warm + 1
                try:
                    await pull(http, mirror.url, f"v{n}", images[n])
                except (AssertionError, aiohttp.ClientError) as exc:
                    failures.append(f"v{n}: {exc!r}")
                else:
                    pulled.append((time.monotonic(), n))

        def done(batch: int) -> bool:
            return set(range(batch * BATCH, (batch + 1) * BATCH)) <= {n for _, n in pulled}

        async with aiohttp.ClientSession() as http:
            release(0)
            pullers = [asyncio.create_task(puller(http)) for _ in range(4)]
            try:
                await eventually(lambda: done(0), timeout=30)
                old_primary = sentinel_redis.primary.port
                sentinel_redis.primary.kill()
                killed_at = time.monotonic()
                release(1)
                await eventually(lambda: done(1), timeout=30)
                await eventually(
                    lambda: sentinel_redis.primary_port() == sentinel_redis.replica.port,
                    timeout=30,
                    message="Sentinel did not promote the replica",
                )
                promoted_at = time.monotonic()
                release(2)
                await eventually(lambda: done(2), timeout=30)
            finally:
                stop.set()
                await asyncio.gather(*pullers)

            assert failures == []
            during = [n for when, n in pulled if killed_at < when < promoted_at]
            assert set(range(BATCH, 2 * BATCH)) & set(during), "no cold pull met the outage"
            assert sentinel_redis.primary_port() != old_primary

            # The same process throughout, and it found the new primary on its own.
            assert mirror.pid == pid
            assert mirror._process is not None
            assert mirror._process.poll() is None

            def metadata_ok() -> bool:
                body = json.loads(http_request("GET", f"{mirror.url}/readyz").body)
                return bool(body["checks"]["metadata"] == "ok")

            await eventually(
                metadata_ok, timeout=30, message="mirror never reached the new primary"
            )

            last = IMAGES - 1
            await pull(http, mirror.url, f"v{last}", images[last])

        # Read the new primary directly, not through Sentinel: the records are there.
        direct = f"redis://127.0.0.1:{sentinel_redis.replica.port}/0"

        async def recorded() -> bool:
            store = RedisMetadataStore(direct, prefix)
            try:
                tag = await store.get_tag("local", REPO, f"v{last}")
                blobs = [
                    await store.get_blob(d) for d in (images[last].digest, *images[last].blobs)
                ]
            finally:
                await store.close()
            return tag is not None and tag.digest == images[last].digest and all(blobs)

        await eventually(lambda: asyncio.run(recorded()), timeout=30)
