"""The blob store contract, run once per backend: local disk (`FilesystemBlobStore`) and
an S3 bucket on a real SeaweedFS (`S3BlobStore`).

The cache relies on the same things from both: only verified bytes are committed, a
blob is committed once and counted once, committed blobs can be read whole or by range,
listed, counted, deleted and moved aside, and a blob whose stored bytes changed is found
out. Where a backend differs by design (a local file to send; an object store's
multipart uploads), the test says which backend and why.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.seaweedfs import SeaweedS3

from mirror.config import S3Config
from mirror.errors import DigestMismatch, ObjectStoreUnavailable
from mirror.oci import Digest
from mirror.storage.blobstore import BlobStore, FilesystemBlobStore, StoredInfo
from mirror.storage.s3store import S3BlobStore

KIB = 1024
# How a read of a committed blob fails: local disk raises OSError, an object store
# `ObjectStoreUnavailable` (which the transport turns into an aborted connection).
READ_FAILED = (OSError, ObjectStoreUnavailable)


def digest_of(data: bytes) -> Digest:
    return Digest.parse("sha256:" + hashlib.sha256(data).hexdigest())


@dataclass
class Backend:
    """A started store, and how to reach behind its back (as a failing disk would)."""

    name: str
    store: BlobStore
    # Replace the committed bytes of a blob with other bytes, as corruption would.
    overwrite: Callable[[Digest, bytes], None]
    # Start a multipart upload the store never finishes (S3 only; None elsewhere).
    start_raw_upload: Callable[[Digest], str] | None = None


@pytest.fixture(params=["filesystem", pytest.param("s3", marks=pytest.mark.slow)])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    root = tmp_path / "root"
    if request.param == "filesystem":
        fs_store = FilesystemBlobStore(root)

        def overwrite_file(digest: Digest, data: bytes) -> None:
            fs_store.path(digest).write_bytes(data)

        found = Backend("filesystem", fs_store, overwrite_file)
    else:
        server: SeaweedS3 = request.getfixturevalue("s3_server")
        bucket: str = request.getfixturevalue("s3_bucket")
        settings = S3Config(
            endpoint=server.endpoint,
            bucket=bucket,
            path_style=True,
            access_key=server.access_key,
            secret_key=server.secret_key,  # type: ignore[arg-type]
            # Small parts, so a modest blob goes through the multipart path too.
            multipart_chunk=5 * 1024 * KIB,
        )
        s3_store = S3BlobStore(root, settings)
        client = server.client()

        def put_object(digest: Digest, data: bytes) -> None:
            client.put_object(Bucket=bucket, Key=s3_store.key(digest), Body=data)

        def start_upload(digest: Digest) -> str:
            created = client.create_multipart_upload(Bucket=bucket, Key=s3_store.key(digest))
            return str(created["UploadId"])

        found = Backend("s3", s3_store, put_object, start_upload)
    found.store.prepare()
    await found.store.start()
    await found.store.scan_usage()
    yield found
    await found.store.close()


async def commit_bytes(store: BlobStore, data: bytes) -> bool:
    """Write and commit a blob through a reserved writer, as a download does."""
    reservation = store.reserve(len(data))
    assert reservation is not None
    writer = store.new_writer(digest_of(data), len(data), reservation)
    try:
        for start in range(0, len(data), 64 * KIB):
            writer.write(data[start : start + 64 * KIB])
        return await store.commit(writer)
    finally:
        writer.discard()


async def listed(store: BlobStore) -> dict[Digest, StoredInfo]:
    return {info.digest: info async for info in store.list_committed()}


def temp_files(store: BlobStore) -> list[Path]:
    return sorted(store.tmp_dir.iterdir())


async def test_a_committed_blob_reads_back_whole_and_by_range(backend: Backend) -> None:
    store = backend.store
    data = os.urandom(300 * KIB + 7)
    digest = digest_of(data)
    assert await store.size(digest) is None
    assert await store.open_committed(digest) is None
    assert await store.read_bytes(digest) is None

    assert await commit_bytes(store, data) is True
    assert await store.size(digest) == len(data)
    assert await store.read_bytes(digest) == data
    blob = await store.open_committed(digest, expected_size=len(data))
    assert blob is not None
    try:
        assert blob.size == len(data)
        whole = b"".join([c async for c in blob.chunks(0, blob.size, 64 * KIB)])
        assert whole == data
        middle = b"".join([c async for c in blob.chunks(1000, 200 * KIB, 4 * KIB)])
        assert middle == data[1000 : 200 * KIB]
        assert b"".join([c async for c in blob.chunks(len(data) - 1, len(data), 10)]) == data[-1:]
        assert [c async for c in blob.chunks(5, 5, 10)] == []
        if store.local_blobs:
            # Local disk: an open file to send with sendfile.
            assert blob.file is not None
            blob.file.seek(0)
            assert blob.file.read() == data
        else:
            assert blob.file is None
    finally:
        blob.close()

    infos = await listed(store)
    assert list(infos) == [digest]
    assert infos[digest].size == len(data)
    assert infos[digest].modified > 0
    assert store.usage == len(data)
    assert await store.scan_usage() == len(data)
    assert store.usage == len(data)
    assert temp_files(store) == []


async def test_a_blob_larger_than_a_part_is_committed_whole(backend: Backend) -> None:
    # On S3, above multipart_chunk (5 MiB here): uploaded in parts, then read back.
    data = os.urandom(11 * 1024 * KIB + 5)
    digest = digest_of(data)
    assert await commit_bytes(backend.store, data) is True
    assert await backend.store.read_bytes(digest) == data
    assert await backend.store.abandoned_uploads(0, float("inf")) == []


async def test_wrong_bytes_are_never_committed(backend: Backend) -> None:
    store = backend.store
    data = os.urandom(50 * KIB)
    claimed = digest_of(b"something else entirely")
    reservation = store.reserve(len(data))
    assert reservation is not None
    writer = store.new_writer(claimed, len(data), reservation)
    writer.write(data)
    with pytest.raises(DigestMismatch):
        await store.commit(writer)
    assert await store.size(claimed) is None
    assert await listed(store) == {}
    writer.discard()
    assert not writer.temp_path.exists()
    assert temp_files(store) == []
    assert reservation.released
    assert store.usage == 0
    # The reservation is back: the whole limit is free again.
    assert store.excess(0, "max") == 0


async def test_a_download_discarded_on_a_full_disk_leaves_no_temp_file(
    backend: Backend,
) -> None:
    store = backend.store
    data = os.urandom(KIB)  # less than a buffer: it stays in the writer's
    reservation = store.reserve(len(data))
    assert reservation is not None
    writer = store.new_writer(digest_of(data), len(data), reservation)
    # The bytes still in the writer's buffer meet a full disk when it closes: /dev/full
    # answers every write with ENOSPC, as a filled volume does.
    writer._file.close()
    writer._file = open("/dev/full", "wb")  # noqa: SIM115 - closed by discard
    writer._file.write(data)
    writer.discard()
    assert writer._file.closed
    assert not writer.temp_path.exists()
    assert temp_files(store) == []
    assert reservation.released
    assert store.usage == 0


async def test_right_bytes_of_the_wrong_size_are_never_committed(backend: Backend) -> None:
    store = backend.store
    data = os.urandom(10 * KIB)
    writer = store.new_writer(digest_of(data), len(data) + 1)
    writer.write(data)
    with pytest.raises(DigestMismatch):
        await store.commit(writer)
    writer.discard()
    assert await store.size(digest_of(data)) is None
    assert temp_files(store) == []


async def test_committing_a_blob_twice_counts_it_once(backend: Backend) -> None:
    store = backend.store
    data = os.urandom(20 * KIB)
    assert await commit_bytes(store, data) is True
    assert await commit_bytes(store, data) is False
    assert store.usage == len(data)
    assert list(await listed(store)) == [digest_of(data)]
    assert await store.scan_usage() == len(data)
    assert temp_files(store) == []
    assert store.excess(0, "max") == 0


async def test_a_blob_of_another_size_than_expected_is_not_opened(backend: Backend) -> None:
    store = backend.store
    data = os.urandom(4 * KIB)
    await commit_bytes(store, data)
    assert await store.open_committed(digest_of(data), expected_size=len(data) + 1) is None
    assert await store.open_committed(digest_of(data), expected_size=len(data) - 1) is None
    blob = await store.open_committed(digest_of(data), expected_size=len(data))
    assert blob is not None
    blob.close()


async def test_delete_frees_the_bytes(backend: Backend) -> None:
    store = backend.store
    kept, gone = os.urandom(30 * KIB), os.urandom(40 * KIB)
    await commit_bytes(store, kept)
    await commit_bytes(store, gone)
    assert store.usage == len(kept) + len(gone)
    assert await store.delete(digest_of(gone)) == len(gone)
    assert await store.size(digest_of(gone)) is None
    assert await store.read_bytes(digest_of(gone)) is None
    assert list(await listed(store)) == [digest_of(kept)]
    assert store.usage == len(kept)
    assert await store.delete(digest_of(gone)) == 0  # already gone: nothing freed
    assert store.usage == len(kept)
    assert await store.scan_usage() == len(kept)


async def test_a_blob_is_moved_aside_out_of_the_cache(backend: Backend) -> None:
    store = backend.store
    data = os.urandom(12 * KIB)
    digest = digest_of(data)
    await commit_bytes(store, data)
    kept = await store.move_aside(digest)
    assert kept is not None
    assert digest.hex in kept
    assert await store.size(digest) is None
    assert await listed(store) == {}
    assert store.usage == 0
    assert await store.move_aside(digest) is None  # nothing left to move
    if backend.name == "filesystem":
        assert Path(kept).read_bytes() == data
    else:
        # S3: kept under corrupt/ in the same bucket, outside blobs/.
        assert kept.endswith(f"corrupt/sha256-{digest.hex}")


async def test_hash_matches_until_the_stored_bytes_change(backend: Backend) -> None:
    store = backend.store
    data = os.urandom(64 * KIB)
    digest = digest_of(data)
    await commit_bytes(store, data)
    assert await store.hash_matches(digest) is True
    # Same size, other bytes: nothing but the hash can tell.
    backend.overwrite(digest, os.urandom(len(data)))
    assert await store.size(digest) == len(data)
    assert await store.hash_matches(digest) is False
    assert await store.hash_matches(digest_of(b"never stored")) is False


async def test_put_bytes_commits_a_small_blob(backend: Backend) -> None:
    store = backend.store
    manifest = b'{"schemaVersion": 2, "layers": []}'
    assert await store.put_bytes(digest_of(manifest), manifest) is True
    assert await store.read_bytes(digest_of(manifest)) == manifest
    assert store.usage == len(manifest)
    # Bytes that are not the blob: the caller is told, nothing is committed.
    with pytest.raises(DigestMismatch):
        await store.put_bytes(digest_of(b"other"), manifest)
    assert await store.size(digest_of(b"other")) is None
    assert temp_files(store) == []
    assert store.usage == len(manifest)


async def test_local_copy_yields_the_bytes(backend: Backend) -> None:
    store = backend.store
    data = os.urandom(100 * KIB)
    digest = digest_of(data)
    await commit_bytes(store, data)
    async with store.local_copy(digest) as path:
        assert path is not None
        assert path.read_bytes() == data
    if not store.local_blobs:
        # A temporary copy, gone after the block.
        assert not path.exists()
        assert temp_files(store) == []
    async with store.local_copy(digest_of(b"absent")) as missing:
        assert missing is None


async def test_abandoned_uploads_are_listed_and_aborted(backend: Backend) -> None:
    store = backend.store
    if backend.start_raw_upload is None:
        # Local disk has no uploads of its own: what is in flight is swept from tmp/.
        assert await store.abandoned_uploads(0, float("inf")) == []
        assert await store.sweep_uploads(0) == 0
        return
    # S3 only: a multipart upload a crashed replica left behind.
    digest = digest_of(b"never finished")
    upload_id = backend.start_raw_upload(digest)
    names = await store.abandoned_uploads(0, float("inf"))
    assert len(names) == 1
    assert upload_id in names[0]
    # Not old enough yet: left alone (a live upload of another replica).
    assert await store.abandoned_uploads(3600, 0) == []
    await store.abort_upload(names[0])
    assert await store.abandoned_uploads(0, float("inf")) == []
    assert await store.size(digest) is None


async def test_sweep_uploads_at_start(backend: Backend) -> None:
    store = backend.store
    assert await store.sweep_uploads(None) == 0
    if backend.start_raw_upload is None:
        assert await store.sweep_uploads(0) == 0
        return
    # S3 only: alone at start (0), every unfinished upload is aborted.
    backend.start_raw_upload(digest_of(b"one"))
    backend.start_raw_upload(digest_of(b"two"))
    assert await store.sweep_uploads(None) == 0
    assert len(await store.abandoned_uploads(0, float("inf"))) == 2
    assert await store.sweep_uploads(0) == 2
    assert await store.abandoned_uploads(0, float("inf")) == []


async def test_a_blob_that_shrinks_while_open_is_never_read_short(backend: Backend) -> None:
    store = backend.store
    data = os.urandom(200 * KIB)
    digest = digest_of(data)
    await commit_bytes(store, data)
    blob = await store.open_committed(digest, expected_size=len(data))
    assert blob is not None
    try:
        # Truncated behind the store's back after it was opened: a reader must fail
        # (its client's connection is then aborted), never end early as if whole.
        backend.overwrite(digest, data[: 50 * KIB])
        with pytest.raises(READ_FAILED):
            async for _ in blob.chunks(0, blob.size, 64 * KIB):
                pass
    finally:
        blob.close()


async def test_a_blob_deleted_while_open(backend: Backend) -> None:
    store = backend.store
    data = os.urandom(100 * KIB)
    digest = digest_of(data)
    await commit_bytes(store, data)
    blob = await store.open_committed(digest)
    assert blob is not None
    try:
        assert await store.delete(digest) == len(data)
        if store.local_blobs:
            # Local disk: the open file outlives its name, and is read whole.
            assert b"".join([c async for c in blob.chunks(0, blob.size, 16 * KIB)]) == data
        else:
            # S3 only: an opened blob is a HEAD, its bytes are fetched when read; once
            # the object is gone, reading fails (never a short, clean end).
            with pytest.raises(ObjectStoreUnavailable):
                async for _ in blob.chunks(0, blob.size, 16 * KIB):
                    pass
    finally:
        blob.close()


async def test_a_copy_of_the_wrong_size_is_replaced_and_counted_once(backend: Backend) -> None:
    store = backend.store
    data = os.urandom(80 * KIB)
    digest = digest_of(data)
    await commit_bytes(store, data)
    backend.overwrite(digest, data[: 30 * KIB])  # changed behind the store's back
    assert await store.scan_usage() == 30 * KIB
    assert await store.open_committed(digest, expected_size=len(data)) is None
    # Fetched again and committed over it: the blob is back, counted at its own size.
    assert await commit_bytes(store, data) is True
    assert await store.read_bytes(digest) == data
    assert store.usage == len(data)
    assert await store.scan_usage() == len(data)
