"""Cache lifecycle: the size limit and LRU eviction, recovery after a crash, the
maintenance commands, and metrics that match the traffic."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
import yaml
from aiohttp.test_utils import TestServer
from conftest import Mirror, MirrorFactory
from prometheus_client.parser import text_string_to_metric_families
from support.cli import mirror_cli
from support.fake_upstream import (
    FakeUpstream,
    digest_of,
    fake_with_blobs,
    get_ok,
    serve,
    stall_after,
)
from support.mirror_process import MirrorProcess
from support.net import eventually

from mirror.api.services import SERVICES
from mirror.app import EVICTOR, METADATA, METRICS, STORE
from mirror.metadata.base import BlobRecord, TagRecord
from mirror.oci import OCI_MANIFEST, Digest

pytestmark = pytest.mark.slow  # starts registries, servers or processes

ServerFactory = Callable[..., Awaitable[TestServer]]
REPO = "team/app"
KIB = 1024


def blob_path(digest: str) -> str:
    return f"/v2/{REPO}/blobs/{digest}"


def cached_digests(mirror: Mirror) -> set[str]:
    return {f"sha256:{path.name}" for path in mirror.blob_files()}


async def fetch_and_wait(http: aiohttp.ClientSession, mirror: Mirror, digest: str) -> None:
    """GET a blob and wait until it is committed and recorded (the client's last byte
    comes before the fsync and the record)."""
    await get_ok(http, mirror.url + blob_path(digest))
    blobs = mirror.server.app[SERVICES].blobs
    await eventually(lambda: digest in cached_digests(mirror) and blobs.downloads_in_flight == 0)


async def test_size_limit_keeps_the_most_recently_used(
    aiohttp_server: ServerFactory, make_mirror: MirrorFactory, http: aiohttp.ClientSession
) -> None:
    blobs = [os.urandom(100 * KIB) for _ in range(8)]
    digests = [digest_of(data) for data in blobs]
    _, url = await fake_with_blobs(aiohttp_server, blobs, REPO)
    # Room for all eight while they are fetched; the limit is lowered below (as an
    # operator does to free space) and the evictor run when the test chooses.
    storage = {"max_size": 1000 * KIB, "high_watermark": 0.9, "low_watermark": 0.7}
    mirror = await make_mirror(
        {"fake": {"url": url}}, storage={**storage, "eviction_interval": "1h"}
    )
    for digest in digests:
        await fetch_and_wait(http, mirror, digest)
    # Used again, so these two are now the most recent; 8 was fetched last.
    for index in (1, 3):
        await get_ok(http, mirror.url + blob_path(digests[index]))

    app = mirror.server.app
    app[STORE].quota = dataclasses.replace(app[STORE].quota, max_size=500 * KIB)
    freed = await app[EVICTOR].evict()
    assert freed == 5 * 100 * KIB
    assert app[STORE].usage <= 0.9 * 500 * KIB
    assert cached_digests(mirror) == {digests[1], digests[3], digests[7]}
    remaining = {digest for digest, _ in await app[METADATA].list_blobs()}
    assert remaining == {digests[1], digests[3], digests[7]}
    # An evicted blob is simply fetched again.
    assert await get_ok(http, mirror.url + blob_path(digests[0])) == blobs[0]


async def test_background_eviction_spares_pinned_blobs(
    aiohttp_server: ServerFactory, make_mirror: MirrorFactory, http: aiohttp.ClientSession
) -> None:
    blobs = [os.urandom(100 * KIB) for _ in range(6)]
    digests = [digest_of(data) for data in blobs]
    _, url = await fake_with_blobs(aiohttp_server, blobs, REPO)
    mirror = await make_mirror(
        {"fake": {"url": url}}, storage={"max_size": 300 * KIB, "eviction_interval": "0.1s"}
    )
    metadata = mirror.server.app[METADATA]
    await fetch_and_wait(http, mirror, digests[0])
    record = await metadata.get_blob(digests[0])
    assert record is not None
    await metadata.put_blob(digests[0], dataclasses.replace(record, pinned=True))
    for digest in digests[1:]:
        await fetch_and_wait(http, mirror, digest)
    high = 0.95 * 300 * KIB
    await eventually(lambda: mirror.server.app[STORE].scan_usage_blocking() <= high, timeout=10)
    assert digests[0] in cached_digests(mirror)  # pinned: never evicted, though oldest
    assert mirror.server.app[EVICTOR].evicted_blobs >= 3


async def test_a_blob_evicted_while_read_still_reaches_its_client(
    aiohttp_server: ServerFactory, make_mirror: MirrorFactory, http: aiohttp.ClientSession
) -> None:
    big = os.urandom(24 * 1024 * KIB)
    small = os.urandom(64 * KIB)
    _, url = await fake_with_blobs(aiohttp_server, [big, small], REPO)
    mirror = await make_mirror(
        {"fake": {"url": url}},
        storage={"max_size": 32 * 1024 * KIB, "eviction_interval": "1h"},
    )
    big_digest = digest_of(big)
    await fetch_and_wait(http, mirror, big_digest)
    app = mirror.server.app
    app[STORE].quota = dataclasses.replace(app[STORE].quota, max_size=1024 * KIB)
    async with http.get(mirror.url + blob_path(big_digest)) as response:
        first = await response.content.readexactly(KIB)  # the rest is still to come
        # This process never evicts a blob it is sending...
        await app[EVICTOR].evict()
        assert big_digest in cached_digests(mirror)
        # ...and when another process removes it anyway, the open file keeps serving.
        await app[STORE].delete(Digest.parse(big_digest))
        assert big_digest not in cached_digests(mirror)
        rest = await response.read()
    assert first + rest == big


async def test_restart_after_sigkill_mid_download(
    tmp_path: Path, aiohttp_server: ServerFactory
) -> None:
    blob = os.urandom(3 * 1024 * KIB)
    digest = digest_of(blob)
    release = asyncio.Event()
    fake = FakeUpstream()
    fake.on("GET", blob_path(digest), stall_after(blob, 512 * KIB, release), serve(blob))
    server = await aiohttp_server(fake.app(), host="127.0.0.1")
    upstreams = {"fake": {"url": str(server.make_url("")).rstrip("/")}}
    storage = tmp_path / "storage"
    mirror = MirrorProcess(tmp_path / "m", upstreams, storage=storage)
    try:
        mirror.start()
        async with aiohttp.ClientSession() as http:
            response = await http.get(mirror.url + blob_path(digest))
            await response.content.readexactly(KIB)
            assert mirror.temp_files(), "the download should be in tmp/"
            mirror.kill()
            response.close()

            restarted = MirrorProcess(tmp_path / "m2", upstreams, storage=storage)

            def committed() -> list[Path]:
                return [p for p in (storage / "blobs").rglob("*") if p.is_file()]

            with restarted:
                assert restarted.temp_files() == []  # the partial download was swept
                assert committed() == []  # and never became a blob
                assert await get_ok(http, restarted.url + blob_path(digest)) == blob
                await eventually(lambda: len(committed()) == 1)
            assert committed()[0].read_bytes() == blob
    finally:
        release.set()
        mirror.stop()


def write_config(mirror: Mirror, path: Path) -> Path:
    data = json.loads(mirror.config.model_dump_json(exclude={"listen"}))
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


async def test_verify_finds_a_flipped_byte_and_the_next_pull_heals(
    aiohttp_server: ServerFactory,
    make_mirror: MirrorFactory,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    blobs = [os.urandom(200 * KIB) for _ in range(3)]
    fake, url = await fake_with_blobs(aiohttp_server, blobs, REPO)
    mirror = await make_mirror({"fake": {"url": url}})
    for data in blobs:
        await fetch_and_wait(http, mirror, digest_of(data))
    config = write_config(mirror, tmp_path / "mirror.yaml")
    assert mirror_cli("verify", "--config", str(config)).returncode == 0

    victim = digest_of(blobs[1])
    path = mirror.root / "blobs" / "sha256" / victim[7:9] / victim[7:]
    corrupted = bytearray(path.read_bytes())
    corrupted[1000] ^= 0x01
    path.write_bytes(bytes(corrupted))

    result = mirror_cli("verify", "--config", str(config))
    assert result.returncode == 1
    assert f"corrupt {victim}" in result.stdout
    assert "checked 3 blobs" in result.stdout
    assert not path.exists()
    assert (mirror.root / "corrupt" / f"sha256-{victim[7:]}").exists()

    assert await get_ok(http, mirror.url + blob_path(victim)) == blobs[1]
    assert fake.count("GET", blob_path(victim)) == 2
    await eventually(lambda: path.exists())
    assert path.read_bytes() == blobs[1]


async def test_gc_removes_what_nothing_uses(
    aiohttp_server: ServerFactory,
    make_mirror: MirrorFactory,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    kept = os.urandom(50 * KIB)
    _, url = await fake_with_blobs(aiohttp_server, [kept], REPO)
    mirror = await make_mirror({"fake": {"url": url, "tag_ttl": "1m", "max_stale": "1h"}})
    await fetch_and_wait(http, mirror, digest_of(kept))
    metadata = mirror.server.app[METADATA]

    stale_temp = mirror.root / "tmp" / "left-behind.partial"
    stale_temp.write_bytes(b"x" * 1000)
    old = time.time() - 3600
    os.utime(stale_temp, (old, old))
    orphan = os.urandom(10 * KIB)
    orphan_digest = digest_of(orphan)
    orphan_path = mirror.root / "blobs" / "sha256" / orphan_digest[7:9] / orphan_digest[7:]
    orphan_path.parent.mkdir(parents=True, exist_ok=True)
    orphan_path.write_bytes(orphan)
    dangling = digest_of(b"gone")
    await metadata.put_blob(dangling, BlobRecord(size=4, created_at=old, last_access=old))
    expired = TagRecord(digest=dangling, media_type=OCI_MANIFEST, checked_at=old - 86400)
    await metadata.put_tag("fake", REPO, "old", expired)
    fresh = TagRecord(digest=dangling, media_type=OCI_MANIFEST, checked_at=time.time())
    await metadata.put_tag("fake", REPO, "new", fresh)
    config = write_config(mirror, tmp_path / "mirror.yaml")

    dry = mirror_cli("gc", "--config", str(config), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    for line in (
        "would remove temp file left-behind.partial",
        f"would remove orphan blob {orphan_digest}",
        f"would remove dangling record {dangling}",
        f"would remove expired tag fake/{REPO}:old",
        f"would remove 4 items, {1000 + 10 * KIB} bytes freed",
    ):
        assert line in dry.stdout
    assert stale_temp.exists()
    assert orphan_path.exists()

    done = mirror_cli("gc", "--config", str(config))
    assert f"removed 4 items, {1000 + 10 * KIB} bytes freed" in done.stdout
    assert not stale_temp.exists()
    assert not orphan_path.exists()
    assert await metadata.get_blob(dangling) is None
    assert await metadata.get_tag("fake", REPO, "old") is None
    assert await metadata.get_tag("fake", REPO, "new") == fresh
    assert digest_of(kept) in cached_digests(mirror)


async def test_metrics_and_stats_match_the_traffic(
    aiohttp_server: ServerFactory,
    make_mirror: MirrorFactory,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    layer = os.urandom(300 * KIB)
    manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": []}).encode()
    fake = FakeUpstream()
    fake.on("GET", blob_path(digest_of(layer)), serve(layer))
    for method in ("HEAD", "GET"):
        fake.on(method, f"/v2/{REPO}/manifests/v1", serve(manifest, content_type=OCI_MANIFEST))
        fake.on(
            method,
            f"/v2/{REPO}/manifests/{digest_of(manifest)}",
            serve(manifest, content_type=OCI_MANIFEST),
        )
    server = await aiohttp_server(fake.app(), host="127.0.0.1")
    mirror = await make_mirror({"fake": {"url": str(server.make_url("")).rstrip("/")}})

    for _ in range(2):
        await get_ok(http, f"{mirror.url}/v2/{REPO}/manifests/v1")  # a miss, then a hit
    await fetch_and_wait(http, mirror, digest_of(layer))  # a miss
    for _ in range(2):
        await get_ok(http, mirror.url + blob_path(digest_of(layer)))  # two hits

    async with http.get(f"{mirror.url}/metrics") as response:
        assert response.status == 200
        text = await response.text()
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }

    def value(name: str, **labels: str) -> float:
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    requests = "mirror_requests_total"
    assert value(requests, upstream="fake", kind="manifest", cache="miss") == 1
    assert value(requests, upstream="fake", kind="manifest", cache="hit") == 1
    assert value(requests, upstream="fake", kind="blob", cache="miss") == 1
    assert value(requests, upstream="fake", kind="blob", cache="hit") == 2
    assert value("mirror_served_bytes_total", source="cache") == len(manifest) + 2 * len(layer)
    assert value("mirror_served_bytes_total", source="upstream") == len(manifest) + len(layer)
    upstream_calls = "mirror_upstream_requests_total"
    assert value(upstream_calls, upstream="fake", method="HEAD", status="200") == 1
    assert value(upstream_calls, upstream="fake", method="GET", status="200") == 2
    assert value("mirror_cache_bytes") == len(layer) + len(manifest)
    assert value("mirror_downloads_in_flight") == 0

    await mirror.server.app[METRICS].flush(mirror.server.app[METADATA])
    config = write_config(mirror, tmp_path / "mirror.yaml")
    result = mirror_cli("stats", "--config", str(config), "--json")
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    assert stats["requests"] == 5
    assert stats["hit_ratio"] == 0.6
    assert stats["bytes_from_cache"] == len(manifest) + 2 * len(layer)
    assert stats["top_repositories"] == [{"repository": f"fake/{REPO}", "pulls": 2}]
    assert stats["blobs"] == 2
    assert stats["manifests"] == 1
