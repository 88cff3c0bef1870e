"""An eviction pass reads the metadata store's LRU index a page at a time: it never lists
every record, skips pinned and busy blobs across page boundaries, and stops once it has
freed what it wanted. Real blob files, real metadata backends, no sockets."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from support.redis_server import RedisServer

from mirror import eviction
from mirror.eviction import Evictor
from mirror.metadata.base import BlobRecord, MetadataStore
from mirror.metadata.embedded import EmbeddedMetadataStore
from mirror.metadata.redis import RedisMetadataStore
from mirror.oci import Digest
from mirror.storage.blobstore import FilesystemBlobStore, Quota

SIZE = 100


class NoListing:
    """Fails the test if eviction asks for every record."""

    async def list_blobs(self) -> list[tuple[str, BlobRecord]]:
        raise AssertionError("an eviction pass listed every blob record")


class EmbeddedNoListing(NoListing, EmbeddedMetadataStore):
    pass


class RedisNoListing(NoListing, RedisMetadataStore):
    pass


@pytest.fixture(params=["embedded", pytest.param("redis", marks=pytest.mark.slow)])
async def metadata(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[MetadataStore]:
    store: MetadataStore
    if request.param == "embedded":
        store = EmbeddedNoListing(tmp_path / "meta")
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        # A prefix unique to the test: an id() is reused once its object is gone.
        store = RedisNoListing(server.url, prefix=f"evict-{tmp_path.name}:")
    yield store
    await store.close()


async def test_a_pass_pages_through_the_oldest_and_skips_pinned_and_busy(
    metadata: MetadataStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(eviction, "EVICT_PAGE", 3)  # several pages for a few blobs
    # 20 blobs of 100 bytes, at the limit: a pass frees down to 1,500 bytes, 5 blobs.
    store = FilesystemBlobStore(
        tmp_path / "root", Quota(max_size=20 * SIZE, high_watermark=0.9, low_watermark=0.75)
    )
    store.prepare()
    digests = []
    for n in range(20):
        data = n.to_bytes(2, "big") * (SIZE // 2)
        digest = Digest.parse("sha256:" + hashlib.sha256(data).hexdigest())
        assert await store.put_bytes(digest, data)
        # Access order is the reverse of creation: blob 19 is the least recently used.
        record = BlobRecord(SIZE, created_at=1.0, last_access=100.0 - n, pinned=n in (19, 17))
        await metadata.put_blob(str(digest), record)
        digests.append(str(digest))
    busy = {digests[16], digests[14]}
    evictor = Evictor(store, metadata, lambda: busy)
    assert await evictor.evict() == 5 * SIZE
    gone = {d for d in digests if await store.size(Digest.parse(d)) is None}
    assert gone == {digests[n] for n in (18, 15, 13, 12, 11)}
    assert {d for d in gone if await metadata.get_blob(d) is not None} == set()
    totals = await metadata.totals()
    assert (totals.blobs, totals.blob_bytes, totals.pinned) == (15, 15 * SIZE, 2)
    assert await evictor.evict() == 0  # under the high watermark now


async def test_reconcile_pages_both_ways_and_keeps_what_records_say(
    metadata: MetadataStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files without records get one, records without files go (unless a download holds
    them), and a record that exists keeps its access time and pin: over several pages each
    way, without listing every record."""
    monkeypatch.setattr(eviction, "RECONCILE_PAGE", 3)
    store = FilesystemBlobStore(tmp_path / "root", Quota(max_size=None))
    store.prepare()
    files = []
    for n in range(10):
        data = b"file %d" % n
        digest = Digest.parse("sha256:" + hashlib.sha256(data).hexdigest())
        assert await store.put_bytes(digest, data)
        files.append(str(digest))
    kept = BlobRecord(6, created_at=1.0, last_access=42.0, pinned=True)
    for digest in files[:4]:  # the other six files have no record
        await metadata.put_blob(digest, kept)
    ghosts = ["sha256:" + hashlib.sha256(b"ghost %d" % n).hexdigest() for n in range(7)]
    for n, digest in enumerate(ghosts):
        await metadata.put_blob(digest, BlobRecord(9, created_at=1.0, last_access=float(n)))
    busy = {ghosts[5]}  # its download is writing the file now

    outcome = await Evictor(store, metadata, lambda: busy).reconcile()

    assert (outcome.records_added, outcome.records_dropped) == (6, 6)
    for digest in files[:4]:
        assert await metadata.get_blob(digest) == kept
    for digest in files[4:]:
        record = await metadata.get_blob(digest)
        assert record is not None
        assert (record.size, record.pinned) == (6, False)
    assert set(await metadata.get_blobs(ghosts)) == {ghosts[5]}
    totals = await metadata.totals()
    assert (totals.blobs, totals.pinned) == (11, 4)
