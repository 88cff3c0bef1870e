"""The cache lifecycle with its blobs in a real S3 bucket (SeaweedFS): LRU eviction to
`max_size`, `mirror verify`, `mirror gc`, `mirror stats`, and the air-gap commands
(`seed`, `export`, `import`) working unchanged on the s3 backend.

What the bucket holds is read behind the mirror's back with a raw botocore client, so
"evicted" or "moved aside" means the object really left `blobs/`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp.test_utils import TestServer
from conftest import TAG, Mirror, MirrorFactory, Upstream, s3_storage_settings
from support.cli import mirror_cli
from support.fake_upstream import digest_of, fake_with_blobs, get_ok
from support.net import eventually
from support.seaweedfs import SeaweedS3
from support.skopeo import skopeo_copy_async

from mirror.app import EVICTOR, METADATA, STORE

pytestmark = pytest.mark.slow  # starts registries, servers or processes

ServerFactory = Callable[..., Awaitable[TestServer]]
REPO = "team/app"
KIB = 1024


def blob_path(digest: str) -> str:
    return f"/v2/{REPO}/blobs/{digest}"


def blob_key(digest: str) -> str:
    return f"blobs/sha256/{digest.removeprefix('sha256:')}"


def bucket_objects(server: SeaweedS3, bucket: str, prefix: str = "") -> dict[str, int]:
    """Every object under `prefix`, with its size."""
    paginator = server.client().get_paginator("list_objects_v2")
    return {
        entry["Key"]: entry["Size"]
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix)
        for entry in page.get("Contents", [])
    }


def open_uploads(server: SeaweedS3, bucket: str) -> list[str]:
    listing = server.client().list_multipart_uploads(Bucket=bucket)
    return [upload["UploadId"] for upload in listing.get("Uploads", [])]


@dataclasses.dataclass
class BucketMirror:
    mirror: Mirror
    server: SeaweedS3
    bucket: str

    def objects(self) -> dict[str, int]:
        """The committed blobs in the bucket, with their sizes."""
        return bucket_objects(self.server, self.bucket, "blobs/")

    async def fetch_and_wait(self, http: aiohttp.ClientSession, digest: str) -> None:
        """GET a blob and wait until it is uploaded and recorded (the client's last byte
        comes before the upload and the record)."""
        await get_ok(http, self.mirror.url + blob_path(digest))
        await self.mirror.settled()
        metadata = self.mirror.server.app[METADATA]
        assert await metadata.get_blob(digest) is not None
        assert blob_key(digest) in self.objects()

    def write_config(self, path: Path) -> Path:
        """The mirror's config as a file for the CLI, with the bucket's real secret (the
        dump masks it)."""
        data = json.loads(self.mirror.config.model_dump_json(exclude={"listen"}))
        data["storage"]["s3"]["secret_key"] = self.server.secret_key
        path.write_text(yaml.safe_dump(data), encoding="utf-8")
        return path


async def bucket_mirror(
    make_mirror: MirrorFactory,
    url: str,
    s3_server: SeaweedS3,
    s3_bucket: str,
    **storage: Any,
) -> BucketMirror:
    mirror = await make_mirror(
        {"fake": {"url": url}},
        storage={**s3_storage_settings(s3_server, s3_bucket), **storage},
    )
    return BucketMirror(mirror, s3_server, s3_bucket)


async def test_eviction_keeps_the_bucket_under_its_limit_by_lru_sparing_pinned(
    aiohttp_server: ServerFactory,
    make_mirror: MirrorFactory,
    http: aiohttp.ClientSession,
    s3_server: SeaweedS3,
    s3_bucket: str,
) -> None:
    blobs = [os.urandom(100 * KIB) for _ in range(8)]
    digests = [digest_of(data) for data in blobs]
    _, url = await fake_with_blobs(aiohttp_server, blobs, REPO)
    # Room for all eight while they are fetched; the limit is lowered below, and the
    # evictor run when the test chooses.
    site = await bucket_mirror(
        make_mirror,
        url,
        s3_server,
        s3_bucket,
        max_size=1000 * KIB,
        high_watermark=0.9,
        low_watermark=0.7,
        eviction_interval="1h",
    )
    app = site.mirror.server.app
    for digest in digests:
        await site.fetch_and_wait(http, digest)
    assert set(site.objects()) == {blob_key(d) for d in digests}
    # The oldest is pinned; 1 and 3 are used again, so they are now the most recent.
    record = await app[METADATA].get_blob(digests[0])
    assert record is not None
    await app[METADATA].put_blob(digests[0], dataclasses.replace(record, pinned=True))
    for index in (1, 3):
        await get_ok(http, site.mirror.url + blob_path(digests[index]))

    app[STORE].quota = dataclasses.replace(app[STORE].quota, max_size=500 * KIB)
    freed = await app[EVICTOR].evict()
    assert freed == 5 * 100 * KIB
    survivors = {digests[0], digests[1], digests[3]}
    assert set(site.objects()) == {blob_key(d) for d in survivors}
    assert {digest for digest, _ in await app[METADATA].list_blobs()} == survivors
    assert app[STORE].usage <= 0.9 * 500 * KIB
    assert await app[STORE].scan_usage() == 3 * 100 * KIB
    # An evicted blob is simply fetched again.
    assert await get_ok(http, site.mirror.url + blob_path(digests[2])) == blobs[2]


async def test_verify_finds_an_overwritten_object_and_the_next_pull_heals(
    aiohttp_server: ServerFactory,
    make_mirror: MirrorFactory,
    http: aiohttp.ClientSession,
    s3_server: SeaweedS3,
    s3_bucket: str,
    tmp_path: Path,
) -> None:
    blobs = [os.urandom(200 * KIB) for _ in range(4)]
    fake, url = await fake_with_blobs(aiohttp_server, blobs, REPO)
    site = await bucket_mirror(make_mirror, url, s3_server, s3_bucket)
    for data in blobs:
        await site.fetch_and_wait(http, digest_of(data))
    config = site.write_config(tmp_path / "mirror.yaml")
    clean = mirror_cli("verify", "--config", config)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "checked 4 blobs" in clean.stdout

    victim = digest_of(blobs[1])
    # Same size, other bytes: only a re-hash can tell.
    s3_server.client().put_object(
        Bucket=s3_bucket, Key=blob_key(victim), Body=os.urandom(len(blobs[1]))
    )
    result = mirror_cli("verify", "--config", config)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"corrupt {victim}" in result.stdout
    assert "checked 4 blobs" in result.stdout
    assert blob_key(victim) not in site.objects()
    kept = bucket_objects(s3_server, s3_bucket, "corrupt/")
    assert kept == {f"corrupt/sha256-{victim.removeprefix('sha256:')}": len(blobs[1])}
    assert await site.mirror.server.app[METADATA].get_blob(victim) is None

    assert await get_ok(http, site.mirror.url + blob_path(victim)) == blobs[1]
    assert fake.count("GET", blob_path(victim)) == 2
    await site.mirror.settled()
    await eventually(lambda: blob_key(victim) in site.objects())
    body = s3_server.client().get_object(Bucket=s3_bucket, Key=blob_key(victim))["Body"]
    assert body.read() == blobs[1]

    sampled = mirror_cli("verify", "--config", config, "--sample", "50%")
    assert sampled.returncode == 0, sampled.stdout + sampled.stderr
    assert "checked 2 blobs" in sampled.stdout


async def test_gc_aborts_abandoned_uploads_and_removes_orphans_and_stats_count_the_bucket(
    aiohttp_server: ServerFactory,
    make_mirror: MirrorFactory,
    http: aiohttp.ClientSession,
    s3_server: SeaweedS3,
    s3_bucket: str,
    tmp_path: Path,
) -> None:
    kept = os.urandom(50 * KIB)
    _, url = await fake_with_blobs(aiohttp_server, [kept], REPO)
    site = await bucket_mirror(make_mirror, url, s3_server, s3_bucket)
    await site.fetch_and_wait(http, digest_of(kept))
    client = s3_server.client()
    # A replica that crashed mid-upload, and an object no record knows.
    abandoned = digest_of(b"an upload that never finished")
    upload_id = client.create_multipart_upload(Bucket=s3_bucket, Key=blob_key(abandoned))[
        "UploadId"
    ]
    orphan = os.urandom(10 * KIB)
    client.put_object(Bucket=s3_bucket, Key=blob_key(digest_of(orphan)), Body=orphan)
    config = site.write_config(tmp_path / "mirror.yaml")

    stats = mirror_cli("stats", "--config", config, "--json")
    assert stats.returncode == 0, stats.stderr
    assert json.loads(stats.stdout)["usage_bytes"] == len(kept) + len(orphan)

    dry = mirror_cli("gc", "--config", config, "--dry-run", "--temp-age", "0s")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    upload_line = re.search(r"would remove temp file (\S+)", dry.stdout)
    assert upload_line is not None, dry.stdout
    assert upload_id in upload_line.group(1)
    assert f"would remove orphan blob {digest_of(orphan)}" in dry.stdout
    assert f"would remove 2 items, {len(orphan)} bytes freed" in dry.stdout
    assert open_uploads(s3_server, s3_bucket) == [upload_id]
    assert blob_key(digest_of(orphan)) in site.objects()

    done = mirror_cli("gc", "--config", config, "--temp-age", "0s")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"removed 2 items, {len(orphan)} bytes freed" in done.stdout
    assert open_uploads(s3_server, s3_bucket) == []
    assert site.objects() == {blob_key(digest_of(kept)): len(kept)}

    stats = mirror_cli("stats", "--config", config, "--json")
    assert stats.returncode == 0, stats.stderr
    counted = json.loads(stats.stdout)
    assert counted["usage_bytes"] == sum(site.objects().values()) == len(kept)
    assert counted["blobs"] == 1
    text = mirror_cli("stats", "--config", config)
    assert f"usage:        {len(kept)} bytes" in text.stdout


REGISTRY = "reg.test"
KINDS = ("oci", "docker")


def site_config(path: Path, root: Path, storage: dict[str, Any], **settings: Any) -> Path:
    data = {
        "default_upstream": REGISTRY,
        "storage": {"root": str(root), **storage},
        **settings,
    }
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


async def test_seed_export_import_through_buckets(
    upstream: Upstream,
    make_mirror: MirrorFactory,
    s3_server: SeaweedS3,
    s3_bucket: str,
    tmp_path: Path,
) -> None:
    upstreams = {REGISTRY: {"url": upstream.url}}
    site_a = site_config(
        tmp_path / "a.yaml",
        tmp_path / "site-a",
        s3_storage_settings(s3_server, s3_bucket),
        upstreams=upstreams,
    )
    refs = [f"{REGISTRY}/{Upstream.repo(kind)}:{TAG}" for kind in KINDS]
    seeded = mirror_cli("seed", "--config", site_a, *refs)
    assert seeded.returncode == 0, seeded.stdout + seeded.stderr
    assert "seeded 2 of 2 references" in seeded.stdout
    in_a = bucket_objects(s3_server, s3_bucket, "blobs/")
    for kind in KINDS:
        for digest, data in upstream.images[kind].all_blobs().items():
            assert in_a[blob_key(digest)] == len(data)
    # Committed blobs live in the bucket only: the local root keeps none.
    assert not any(p.is_file() for p in (tmp_path / "site-a" / "blobs").rglob("*"))

    bundle = tmp_path / "bundle.tar"
    exported = mirror_cli("export", "--config", site_a, "--output", bundle, "--all")
    assert exported.returncode == 0, exported.stdout + exported.stderr

    other_bucket = f"{s3_bucket[:40]}-b"
    s3_server.make_bucket(other_bucket)
    storage_b = s3_storage_settings(s3_server, other_bucket)
    site_b = site_config(
        tmp_path / "b.yaml", tmp_path / "site-b", storage_b, upstreams=upstreams, offline=True
    )
    imported = mirror_cli("import", "--config", site_b, bundle)
    assert imported.returncode == 0, imported.stdout + imported.stderr
    assert bucket_objects(s3_server, other_bucket, "blobs/") == in_a

    # Served offline from the second bucket, byte-exact.
    mirror = await make_mirror(
        upstreams, offline=True, storage={"root": str(tmp_path / "site-b"), **storage_b}
    )
    for kind in KINDS:
        out = tmp_path / f"pulled-{kind}"
        await skopeo_copy_async(f"docker://{mirror.host}/{Upstream.repo(kind)}:{TAG}", f"dir:{out}")
        image = upstream.images[kind]
        assert (out / "manifest.json").read_bytes() == image.manifest
        for digest, data in image.all_blobs().items():
            assert (out / digest.removeprefix("sha256:")).read_bytes() == data
