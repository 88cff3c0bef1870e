"""`S3Objects` against a real SeaweedFS S3 gateway: objects, ranges, multipart uploads
(and their clean-up when a server dies mid-upload), listings, presigned URLs fetched by a
plain HTTP client, credentials and missing buckets."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from support.net import eventually, http_request
from support.seaweedfs import SeaweedS3

import mirror.storage.s3 as s3_module
from mirror.config import S3Config
from mirror.errors import ObjectStoreUnavailable
from mirror.storage.s3 import S3Objects

pytestmark = pytest.mark.slow  # every test talks to a server on a socket

MiB = 1024 * 1024
# A dead server must fail a request within this many seconds.
FAILURE_BOUND = 15

ObjectsFactory = Callable[..., Awaitable[S3Objects]]


def settings(server: SeaweedS3, bucket: str, **overrides: Any) -> S3Config:
    values: dict[str, Any] = {
        "endpoint": server.endpoint,
        "bucket": bucket,
        "path_style": True,
        "access_key": server.access_key,
        "secret_key": server.secret_key,
        "multipart_chunk": 5 * MiB,
        **overrides,
    }
    return S3Config(**values)


@pytest.fixture
async def make_objects() -> AsyncIterator[ObjectsFactory]:
    """Started `S3Objects`, closed after the test."""
    opened: list[S3Objects] = []

    async def factory(server: SeaweedS3, bucket: str, **overrides: Any) -> S3Objects:
        timeouts = {
            name: overrides.pop(name)
            for name in ("connect_timeout", "read_timeout", "max_attempts")
            if name in overrides
        }
        objects = S3Objects(settings(server, bucket, **overrides), **timeouts)
        await objects.start()
        opened.append(objects)
        return objects

    yield factory
    for objects in opened:
        await objects.close()


@pytest.fixture
async def objects(make_objects: ObjectsFactory, s3_server: SeaweedS3, s3_bucket: str) -> S3Objects:
    return await make_objects(s3_server, s3_bucket)


async def read_all(objects: S3Objects, key: str, start: int = 0, end: int | None = None) -> bytes:
    opened = await objects.open_range(key, start, end)
    assert opened is not None
    async with opened:
        return b"".join([chunk async for chunk in opened.iter_chunks(64 * 1024)])


async def test_put_get_head_delete(objects: S3Objects) -> None:
    assert await objects.head("a/b") is None
    assert await objects.get_bytes("a/b") is None
    assert await objects.open_range("a/b") is None
    await objects.put_bytes("a/b", b"hello object")
    assert await objects.head("a/b") == 12
    assert await objects.get_bytes("a/b") == b"hello object"
    await objects.put_bytes("empty", b"")
    assert await objects.head("empty") == 0
    assert await objects.get_bytes("empty") == b""
    await objects.delete("a/b")
    assert await objects.head("a/b") is None
    await objects.delete("a/b")  # absent: no error, as S3 itself
    await objects.check()


async def test_ranges_stream_part_of_an_object(objects: S3Objects) -> None:
    data = os.urandom(300_000)
    await objects.put_bytes("ranged", data)
    opened = await objects.open_range("ranged", 1000)
    assert opened is not None
    async with opened:
        assert opened.size == len(data)
        assert opened.length == len(data) - 1000
        assert b"".join([c async for c in opened.iter_chunks(4096)]) == data[1000:]
    assert await read_all(objects, "ranged", 10, 20) == data[10:20]
    assert await read_all(objects, "ranged", len(data) - 1) == data[-1:]
    assert await read_all(objects, "ranged", 0, len(data)) == data
    last = await objects.open_range("ranged", len(data) - 1, len(data))
    assert last is not None
    async with last:
        assert (last.size, last.length) == (len(data), 1)


async def test_large_file_goes_up_in_parts_and_reads_back_exact(
    objects: S3Objects, s3_server: SeaweedS3, s3_bucket: str, tmp_path: Path
) -> None:
    data = os.urandom(12 * MiB + 12345)
    path = tmp_path / "big"
    path.write_bytes(data)
    await objects.put_file("big", path, len(data))
    head = s3_server.client().head_object(Bucket=s3_bucket, Key="big")
    assert head["ETag"].strip('"').endswith("-3")  # a multipart object of 3 parts
    assert await objects.head("big") == len(data)
    assert await read_all(objects, "big") == data
    assert (
        await read_all(objects, "big", 5 * MiB - 3, 10 * MiB + 3)
        == data[5 * MiB - 3 : 10 * MiB + 3]
    )
    assert await objects.list_uploads() == []

    small = tmp_path / "small"
    small.write_bytes(data[: 5 * MiB - 1])
    await objects.put_file("small", small, 5 * MiB - 1)
    head = s3_server.client().head_object(Bucket=s3_bucket, Key="small")
    assert "-" not in head["ETag"]  # one PutObject
    assert await objects.get_bytes("small") == data[: 5 * MiB - 1]


async def test_list_by_prefix_and_the_configured_prefix(
    make_objects: ObjectsFactory, s3_server: SeaweedS3, s3_bucket: str
) -> None:
    objects = await make_objects(s3_server, s3_bucket, prefix="/team/mirror")
    for key in ("blobs/aa/1", "blobs/aa/2", "blobs/bb/3", "other"):
        await objects.put_bytes(key, key.encode())
    listed = [info async for info in objects.list("blobs/aa/")]
    assert [(info.key, info.size) for info in listed] == [("blobs/aa/1", 10), ("blobs/aa/2", 10)]
    assert all(abs(info.last_modified - time.time()) < 300 for info in listed)
    assert len([info async for info in objects.list()]) == 4
    raw = s3_server.client().list_objects_v2(Bucket=s3_bucket)
    assert sorted(entry["Key"] for entry in raw["Contents"]) == [
        "team/mirror/blobs/aa/1",
        "team/mirror/blobs/aa/2",
        "team/mirror/blobs/bb/3",
        "team/mirror/other",
    ]
    unprefixed = await make_objects(s3_server, s3_bucket)
    assert await unprefixed.get_bytes("team/mirror/other") == b"other"


async def test_presigned_url_serves_a_plain_client_until_it_expires(objects: S3Objects) -> None:
    data = os.urandom(100_000)
    await objects.put_bytes("shared", data)
    url = await objects.presign_get("shared", 600)
    assert objects.settings.secret_key is not None
    assert objects.settings.secret_key.get_secret_value() not in url
    whole = await asyncio.to_thread(http_request, "GET", url)
    assert (whole.status, whole.body) == (200, data)
    ranged = await asyncio.to_thread(http_request, "GET", url, headers={"Range": "bytes=100-199"})
    assert (ranged.status, ranged.body) == (206, data[100:200])
    assert ranged.header("Content-Range") == f"bytes 100-199/{len(data)}"

    forged = url.replace("X-Amz-Signature=", "X-Amz-Signature=0")
    refused = await asyncio.to_thread(http_request, "GET", forged)
    assert refused.status == 403
    assert data not in refused.body
    other_key = url.replace("/shared?", "/other?")
    assert (await asyncio.to_thread(http_request, "GET", other_key)).status == 403

    expiring = await objects.presign_get("shared", 1)
    assert (await asyncio.to_thread(http_request, "GET", expiring)).status == 200
    await eventually(
        lambda: http_request("GET", expiring).status == 403,
        timeout=10,
        message="an expired presigned URL was still honoured",
    )


async def test_abandoned_multipart_upload_is_listed_and_aborted(
    objects: S3Objects, s3_server: SeaweedS3, s3_bucket: str
) -> None:
    client = s3_server.client()
    started = client.create_multipart_upload(Bucket=s3_bucket, Key="uploads/left")
    client.upload_part(
        Bucket=s3_bucket,
        Key="uploads/left",
        UploadId=started["UploadId"],
        PartNumber=1,
        Body=b"x" * (5 * MiB),
    )
    uploads = await objects.list_uploads("uploads/")
    assert [(u.key, u.upload_id) for u in uploads] == [("uploads/left", started["UploadId"])]
    assert abs(uploads[0].initiated - time.time()) < 300
    assert await objects.list_uploads("elsewhere/") == []
    await objects.abort_upload("uploads/left", started["UploadId"])
    assert await objects.list_uploads("uploads/") == []
    await objects.abort_upload("uploads/left", started["UploadId"])  # gone already: fine
    assert await objects.head("uploads/left") is None


async def test_cancelled_upload_is_aborted(
    objects: S3Objects,
    s3_server: SeaweedS3,
    s3_bucket: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = tmp_path / "big"
    path.write_bytes(os.urandom(11 * MiB))
    release, reading = threading.Event(), threading.Event()
    open_part = s3_module._open_part

    def held_open(path: Path, offset: int, length: int) -> s3_module.FilePart:
        reading.set()
        release.wait(timeout=30)
        return open_part(path, offset, length)

    monkeypatch.setattr(s3_module, "_open_part", held_open)
    upload = asyncio.create_task(objects.put_file("blobs/cancelled", path, 11 * MiB))
    # Parts are being read: the upload exists and its id is known to put_file. (A
    # cancellation before CreateMultipartUpload answers cannot abort; the sweep can.)
    await eventually(reading.is_set, timeout=10)
    client = s3_server.client()
    assert client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads")
    upload.cancel()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await upload
    assert await objects.list_uploads() == []
    assert await objects.head("blobs/cancelled") is None


async def test_server_killed_mid_upload_fails_fast_and_leaves_no_object(
    make_objects: ObjectsFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with SeaweedS3(tmp_path / "seaweedfs") as server:
        server.make_bucket("doomed")
        objects = await make_objects(
            server, "doomed", connect_timeout=2, read_timeout=5, max_attempts=2
        )
        data = os.urandom(16 * MiB)
        path = tmp_path / "big"
        path.write_bytes(data)
        # Hold every part's read until the server is dead, so the kill lands mid-upload
        # (after CreateMultipartUpload, before any UploadPart), whatever the timing.
        server_dead, reading = threading.Event(), threading.Event()
        open_part = s3_module._open_part

        def held_open(path: Path, offset: int, length: int) -> s3_module.FilePart:
            reading.set()
            assert server_dead.wait(timeout=30)
            return open_part(path, offset, length)

        monkeypatch.setattr(s3_module, "_open_part", held_open)
        upload = asyncio.create_task(objects.put_file("blobs/big", path, len(data)))
        await eventually(reading.is_set, timeout=10)
        assert server.client().list_multipart_uploads(Bucket="doomed").get("Uploads")
        server.kill()
        server_dead.set()
        began = time.monotonic()
        with pytest.raises(ObjectStoreUnavailable):
            async with asyncio.timeout(FAILURE_BOUND):
                await upload
        assert time.monotonic() - began < FAILURE_BOUND
        began = time.monotonic()
        with pytest.raises(ObjectStoreUnavailable):
            await objects.check()
        assert time.monotonic() - began < FAILURE_BOUND

        monkeypatch.setattr(s3_module, "_open_part", open_part)
        server.restart()
        assert await objects.head("blobs/big") is None
        # The abort could not reach a dead server; the sweep finds what it left.
        for upload in await objects.list_uploads("blobs/"):
            await objects.abort_upload(upload.key, upload.upload_id)
        assert await objects.list_uploads() == []
        assert [info async for info in objects.list()] == []
        # And the same client works again once the server is back.
        await objects.put_file("blobs/big", path, len(data))
        assert await objects.head("blobs/big") == len(data)


async def test_wrong_credentials_stop_start(s3_server: SeaweedS3, s3_bucket: str) -> None:
    objects = S3Objects(settings(s3_server, s3_bucket, secret_key="not-the-secret"))
    with pytest.raises(ObjectStoreUnavailable) as caught:
        await objects.start()
    assert "storage.s3.bucket" in str(caught.value)
    assert "not-the-secret" not in str(caught.value)
    assert s3_server.secret_key not in str(caught.value)


async def test_missing_bucket_fails_start_unless_create_bucket(
    make_objects: ObjectsFactory, s3_server: SeaweedS3
) -> None:
    name = f"missing-{time.monotonic_ns()}"
    objects = S3Objects(settings(s3_server, name))
    with pytest.raises(ObjectStoreUnavailable) as caught:
        await objects.start()
    assert "storage.s3.bucket" in str(caught.value)
    assert "does not exist" in str(caught.value)

    created = await make_objects(s3_server, name, create_bucket=True)
    s3_server.client().head_bucket(Bucket=name)  # raises if absent
    await created.put_bytes("k", b"v")
    assert await created.get_bytes("k") == b"v"
    # A second start finds the bucket there and leaves it alone.
    again = await make_objects(s3_server, name, create_bucket=True)
    assert await again.get_bytes("k") == b"v"


async def test_unreachable_endpoint_fails_start_quickly(tmp_path: Path) -> None:
    from support.net import free_port

    config = S3Config(
        endpoint=f"http://127.0.0.1:{free_port()}",
        bucket="nowhere",
        path_style=True,
        access_key="a",
        secret_key="b",
    )
    objects = S3Objects(config, connect_timeout=1, max_attempts=1)
    began = time.monotonic()
    with pytest.raises(ObjectStoreUnavailable, match=r"storage\.s3\.bucket"):
        await objects.start()
    assert time.monotonic() - began < FAILURE_BOUND
