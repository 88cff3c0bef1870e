"""Real clients pulling through a mirror whose blobs live in a real S3 bucket (SeaweedFS).

skopeo and containerd must get every test image byte-exact; a second pull must not
touch the upstream's blobs; the local root keeps no committed blob (only what is in
flight); with `redirect: true`, blob hits are 307s to presigned URLs that skopeo
follows, and the mirror itself sends none of their bytes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from conftest import TAG, Mirror, MirrorFactory, Upstream
from support.containerd import Containerd
from support.seaweedfs import SeaweedS3
from support.skopeo import skopeo_copy_async

pytestmark = pytest.mark.slow  # starts registries, servers or processes

KINDS = ["oci", "oci-index", "docker", "docker-list"]


def tree_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


async def pull_dir(host: str, kind: str, dest: Path) -> dict[str, bytes]:
    await skopeo_copy_async(f"docker://{host}/{Upstream.repo(kind)}:{TAG}", f"dir:{dest}")
    return tree_bytes(dest)


def bucket_keys(server: SeaweedS3, bucket: str) -> set[str]:
    listing = server.client().list_objects_v2(Bucket=bucket)
    return {entry["Key"] for entry in listing.get("Contents", [])}


async def s3_mirror(
    make_mirror: MirrorFactory, upstream: Upstream, storage: dict[str, Any]
) -> Mirror:
    return await make_mirror({"local": {"url": upstream.url, "tag_ttl": "1h"}}, storage=storage)


async def test_skopeo_pulls_every_image_through_the_bucket_and_again_without_the_upstream(
    make_mirror: MirrorFactory,
    upstream: Upstream,
    s3_server: SeaweedS3,
    s3_bucket: str,
    s3_storage: dict[str, Any],
    tmp_path: Path,
) -> None:
    mirror = await s3_mirror(make_mirror, upstream, s3_storage)
    for kind in KINDS:
        image = upstream.images[kind]
        cold = await pull_dir(mirror.host, kind, tmp_path / f"{kind}-cold")
        assert cold["manifest.json"] == image.manifest
        for digest, data in image.blobs.items():
            assert cold[digest.removeprefix("sha256:")] == data
        await mirror.settled()

        mark = upstream.registry.mark()
        warm = await pull_dir(mirror.host, kind, tmp_path / f"{kind}-warm")
        assert warm == cold
        assert upstream.registry.requests(path_contains="/blobs/", since=mark) == []

        keys = bucket_keys(s3_server, s3_bucket)
        for digest in image.all_blobs():
            assert f"blobs/sha256/{digest.removeprefix('sha256:')}" in keys
    # Nothing committed on local disk: the root only holds what is in flight.
    assert mirror.blob_files() == []
    assert mirror.temp_files() == []


async def test_hits_stream_from_the_bucket_whole_by_range_and_by_head(
    make_mirror: MirrorFactory,
    upstream: Upstream,
    s3_storage: dict[str, Any],
    http: aiohttp.ClientSession,
) -> None:
    mirror = await s3_mirror(make_mirror, upstream, s3_storage)
    image = upstream.images["oci"]
    digest, data = max(image.blobs.items(), key=lambda item: len(item[1]))
    url = f"{mirror.url}/v2/{Upstream.repo('oci')}/blobs/{digest}"
    async with http.get(url) as response:  # the miss: fetched, uploaded, recorded
        assert await response.read() == data
    await mirror.settled()
    mark = upstream.registry.mark()
    async with http.get(url) as response:
        assert response.status == 200
        assert response.headers["X-Cache"].startswith("HIT")
        assert await response.read() == data
    async with http.get(url, headers={"Range": "bytes=100-4195"}) as response:
        assert response.status == 206
        assert response.headers["Content-Range"] == f"bytes 100-4195/{len(data)}"
        assert await response.read() == data[100:4196]
    async with http.get(url, headers={"Range": "bytes=-10"}) as response:
        assert response.status == 206
        assert await response.read() == data[-10:]
    async with http.head(url) as response:
        assert response.status == 200
        assert response.content_length == len(data)
    assert upstream.registry.requests(path_contains="/blobs/", since=mark) == []


@pytest.fixture(scope="module")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Containerd]:
    with Containerd(tmp_path_factory.mktemp("ctd")) as daemon:
        yield daemon


def hosts_dir(tmp_path: Path, upstream: Upstream, mirror: Mirror) -> Path:
    """containerd's hosts.toml for the upstream's host: the mirror, and no fallback."""
    directory = tmp_path / "certs.d"
    host_dir = directory / upstream.registry.host
    host_dir.mkdir(parents=True)
    closed = "http://127.0.0.1:1"  # nothing listens: pulls can only succeed via the mirror
    (host_dir / "hosts.toml").write_text(
        f'server = "{closed}"\n\n[host."{mirror.url}"]\n  capabilities = ["pull", "resolve"]\n',
        encoding="utf-8",
    )
    return directory


async def test_containerd_pulls_every_image_through_the_bucket(
    make_mirror: MirrorFactory,
    upstream: Upstream,
    s3_storage: dict[str, Any],
    containerd: Containerd,
    tmp_path: Path,
) -> None:
    # containerd names the upstream by its host (`?ns=127.0.0.1:PORT`): an alias.
    mirror = await make_mirror(
        {"local": {"url": upstream.url, "tag_ttl": "1h", "aliases": [upstream.registry.host]}},
        storage=s3_storage,
    )
    certs = hosts_dir(tmp_path, upstream, mirror)
    for kind in KINDS:
        reference = f"{upstream.registry.host}/{Upstream.repo(kind)}:{TAG}"
        # In a thread: the mirror answering ctr runs on this test's event loop.
        await asyncio.to_thread(containerd.pull, reference, certs)
        assert containerd.image_digest(reference) == upstream.images[kind].digest, kind
    await mirror.settled()
    # Pulled again after containerd forgot them: the bucket answers, not the upstream.
    mark = upstream.registry.mark()
    for kind in KINDS:
        reference = f"{upstream.registry.host}/{Upstream.repo(kind)}:{TAG}"
        await asyncio.to_thread(containerd.remove, reference)
        await asyncio.to_thread(containerd.pull, reference, certs)
        assert containerd.image_digest(reference) == upstream.images[kind].digest, kind
    assert upstream.registry.requests(path_contains="/blobs/", since=mark) == []
    agents = {entry.user_agent for entry in upstream.registry.access_log() if entry.route != "/v2/"}
    assert not any(agent.startswith("containerd") for agent in agents)


async def test_redirected_hits_are_fetched_from_the_bucket_by_skopeo(
    make_mirror: MirrorFactory,
    upstream: Upstream,
    s3_server: SeaweedS3,
    s3_bucket: str,
    tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    from conftest import s3_storage_settings

    storage = s3_storage_settings(s3_server, s3_bucket, redirect=True, redirect_expiry="5m")
    mirror = await s3_mirror(make_mirror, upstream, storage)
    image = upstream.images["oci"]
    cold = await pull_dir(mirror.host, "oci", tmp_path / "cold")
    await mirror.settled()

    with structlog.testing.capture_logs() as logs:
        warm = await pull_dir(mirror.host, "oci", tmp_path / "warm")
    assert warm == cold
    assert warm["manifest.json"] == image.manifest
    # The mirror answered every blob GET with a redirect to the bucket, not with bytes.
    blob_lines = [line for line in logs if line["event"] == "request" and "/blobs/" in line["path"]]
    assert {line["reference"] for line in blob_lines} == set(image.blobs)
    assert {(line["status"], line["bytes"]) for line in blob_lines} == {(307, 0)}
    digest = next(iter(image.blobs))
    url = f"{mirror.url}/v2/{Upstream.repo('oci')}/blobs/{digest}"
    async with http.get(url, allow_redirects=False) as response:
        assert response.status == 307
        location = response.headers["Location"]
        assert location.startswith(s3_server.endpoint + "/")
        assert "X-Amz-Signature=" in location
        assert await response.read() == b""
    async with http.get(location, headers={"Range": "bytes=1-4"}) as response:
        assert response.status == 206
        assert await response.read() == image.blobs[digest][1:5]


async def test_without_keys_in_the_config_the_standard_aws_chain_is_used(
    make_mirror: MirrorFactory,
    upstream: Upstream,
    s3_server: SeaweedS3,
    s3_bucket: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from conftest import s3_storage_settings

    storage = s3_storage_settings(s3_server, s3_bucket)
    del storage["s3"]["access_key"], storage["s3"]["secret_key"]
    # The chain's first link: the environment (as a pod's AWS_* variables would be).
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    mirror = await s3_mirror(make_mirror, upstream, storage)
    pulled = await pull_dir(mirror.host, "oci", tmp_path / "pulled")
    assert pulled["manifest.json"] == upstream.images["oci"].manifest
    await mirror.settled()
    keys = bucket_keys(s3_server, s3_bucket)
    assert {
        f"blobs/sha256/{d.removeprefix('sha256:')}" for d in upstream.images["oci"].blobs
    } <= keys
