"""Keeping the cache within its bounds, and consistent with its metadata.

`Evictor` owns the size policy of a serving process. Every download asks it for room
(`reserve`) before its first byte: below the high watermark of `storage.max_size`
(and above `storage.min_free`) the bytes are reserved at once; otherwise least-
recently-used blobs are evicted then and there, down to the low watermark, and the
write is admitted if it fits under the limit itself. What cannot fit even then (a
blob bigger than the limit, or the rest pinned or in use, or no metadata store to say
which blobs are least recently used) is refused: the caller streams it to its clients
without caching it. A commit that crosses the high watermark without a reservation (an
upstream that sent no Content-Length) wakes the evictor at once; a timer remains as a
rescan of what other processes sharing the disk wrote.

Eviction never removes a pinned blob, nor one this process is fetching or sending
(and a client reading a removed file still gets it whole: its open file outlives the
name). A manifest whose layers went is still valid: they are fetched again on demand.

`collect_garbage` (`mirror gc`) and `verify_blobs` (`mirror verify`) are the offline
clean-up and scrub.

`reconcile` brings files and records together after a crash: a verified file without a
record gets one (dated by its mtime), a record without a file is dropped. It runs in
the background at start, so a large cache serves at once, after the metadata store has
built the indexes an older version did not keep (`rebuild_indexes`). It compares a page
of files or records at a time, so its memory does not grow with the cache.

An eviction pass reads the metadata store's LRU index a page at a time
(`oldest_blobs`), so its cost follows what it evicts, not the number of blobs cached.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog

from mirror.errors import MetadataUnavailable, ObjectStoreUnavailable
from mirror.metadata.base import BlobRecord, LruPosition, MetadataStore, each_blob
from mirror.oci import Digest
from mirror.storage.blobstore import BlobStore, Reservation, StoredInfo
from mirror.storage.ledger import HEARTBEAT

log = structlog.get_logger(__name__)

# Told each digest whose blob left this cache (a fleet's holder record follows it).
Removed = Callable[[str], Awaitable[None]]

RESCAN_EVERY = 10  # intervals
EVICT_PAGE = 500  # LRU candidates read at a time
RECONCILE_PAGE = 500  # files, and records, compared at a time


@dataclass
class Reconciled:
    records_added: int = 0
    records_dropped: int = 0


class Evictor:
    def __init__(
        self,
        store: BlobStore,
        metadata: MetadataStore,
        in_use: Callable[[], set[str]],
        before_evicting: Callable[[], Awaitable[None]] | None = None,
        on_removed: Removed | None = None,
    ):
        self._store = store
        self._metadata = metadata
        self._in_use = in_use
        self._before = before_evicting
        self._on_removed = on_removed
        self.evicted_blobs = 0
        self.evicted_bytes = 0
        self.refused_blobs = 0  # writes that could not fit: streamed without caching
        # One eviction pass at a time: a burst of reservations that all find the cache
        # full evicts once, and the rest find room.
        self._evicting = asyncio.Lock()

    async def reconcile(self) -> Reconciled:
        """Records for files that lack them; no records for files that are gone.

        Both ways a page at a time, so a million blobs take no more memory than a
        thousand: each page of files is asked of the LRU index (`last_accesses`), each
        page of records of the disk. An object store is asked by its listing instead,
        kept as a set of digests (asking it blob by blob costs a request each)."""
        # The walk of the records pages through the LRU index, which an older version's
        # store lacks until it is built.
        if await self._metadata.rebuild_indexes():
            log.info("metadata_indexes_built")
        outcome = Reconciled()
        listed: set[str] | None = None if self._store.local_blobs else set()
        files: list[StoredInfo] = []
        async for info in self._store.list_committed():
            files.append(info)
            if listed is not None:
                listed.add(str(info.digest))
            if len(files) >= RECONCILE_PAGE:
                outcome.records_added += await self._record_files(files)
                files = []
        outcome.records_added += await self._record_files(files)
        records: list[str] = []
        async for digest, _ in each_blob(self._metadata, RECONCILE_PAGE):
            records.append(digest)
            if len(records) >= RECONCILE_PAGE:
                outcome.records_dropped += await self._drop_records(records, listed)
                records = []
        outcome.records_dropped += await self._drop_records(records, listed)
        await self._store.scan_usage()
        return outcome

    async def _record_files(self, files: list[StoredInfo]) -> int:
        """Records for those of `files` that have none; how many were written."""
        known = await self._metadata.last_accesses([str(info.digest) for info in files])
        added = 0
        for info in files:
            digest = str(info.digest)
            # Asked again before writing: a record committed since the index was read
            # must keep its own access time and pin.
            if digest not in known and await self._metadata.get_blob(digest) is None:
                when = info.modified
                record = BlobRecord(size=info.size, created_at=when, last_access=when)
                await self._metadata.put_blob(digest, record)
                added += 1
        return added

    async def _drop_records(self, digests: list[str], listed: set[str] | None) -> int:
        """Drop the records of those of `digests` whose blob is gone; how many."""
        if listed is None:
            gone = await asyncio.to_thread(_without_local_file, self._store, digests)
        else:
            gone = [digest for digest in digests if digest not in listed]
        busy = self._in_use()
        dropped = 0
        for digest in gone:
            if digest not in busy and await self._store.size(Digest.parse(digest)) is None:
                await self._metadata.delete_blob(digest)
                if self._on_removed is not None:
                    await self._on_removed(digest)
                dropped += 1
        return dropped

    async def _rescan(self) -> None:
        """Count the store afresh: other processes (or replicas) commit and evict too."""
        try:
            await self._store.scan_usage()
        except ObjectStoreUnavailable as exc:
            log.warning("usage_scan_skipped", error=exc.message)

    async def reserve(self, size: int) -> Reservation | None:
        """Room for a write of `size` bytes, evicting first if it would cross the high
        watermark; None if it cannot fit even after eviction."""
        store = self._store
        reservation = await asyncio.to_thread(store.reserve, size, "high")
        if reservation is not None:
            return reservation
        try:
            await self.evict(size)
        except (MetadataUnavailable, ObjectStoreUnavailable) as exc:
            # No LRU order without the store: nothing is evicted; it fits or it does not.
            log.warning("eviction_skipped", error=exc.message)
        reservation = await asyncio.to_thread(store.reserve, size, "max")
        if reservation is None:
            self.refused_blobs += 1
        return reservation

    async def evict(self, incoming: int = 0) -> int:
        """If `incoming` more bytes would cross the high watermark (or min_free), evict
        least-recently-used blobs until they fit under the low one; return bytes freed."""
        store = self._store
        if not store.quota.bounded:
            return 0
        async with self._evicting:
            if await asyncio.to_thread(store.excess, incoming, "high") <= 0:
                return 0
            if self._before is not None:
                await self._before()  # fresh access times first: LRU order must be current
            target = await asyncio.to_thread(store.excess, incoming, "low")
            freed = 0
            busy = self._in_use()
            position: LruPosition | None = None
            while freed < target:
                page = await self._metadata.oldest_blobs(EVICT_PAGE, after=position)
                if not page:
                    break
                for digest, record in page:
                    position = (record.last_access, digest)
                    if freed >= target:
                        break
                    if record.pinned or digest in busy:
                        continue
                    freed += await self._evict_one(digest, record)
            log.info(
                "eviction_done",
                freed=freed,
                wanted=target,
                usage=store.usage,
                limit=store.quota.max_size,
            )
            return freed

    async def _evict_one(self, digest: str, record: BlobRecord) -> int:
        released = await self._store.delete(Digest.parse(digest))
        await self._metadata.delete_blob(digest)
        if self._on_removed is not None:
            await self._on_removed(digest)
        if released:
            self.evicted_blobs += 1
            self.evicted_bytes += released
            log.info("blob_evicted", digest=digest, bytes=released, last_access=record.last_access)
        return released

    async def run(self, interval: float) -> None:
        """Build missing metadata indexes and reconcile once, then evict whenever a
        commit crosses the high watermark, and rescan the disk (other processes' writes)
        every few `interval`s."""
        try:
            outcome = await self.reconcile()
            log.info(
                "reconciled",
                records_added=outcome.records_added,
                records_dropped=outcome.records_dropped,
                usage=self._store.usage,
            )
        except (MetadataUnavailable, ObjectStoreUnavailable) as exc:
            log.warning("reconcile_skipped", error=exc.message)
        if not self._store.quota.bounded:
            return
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()

        def over_high() -> None:  # called from the thread that committed
            with contextlib.suppress(RuntimeError):  # the loop is closing: nothing to do
                loop.call_soon_threadsafe(wake.set)

        self._store.on_over_high = over_high
        last_scan = time.monotonic()
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), timeout=min(interval, HEARTBEAT))
                wake.clear()
                await asyncio.to_thread(self._store.heartbeat)
                if time.monotonic() - last_scan > RESCAN_EVERY * interval:
                    last_scan = time.monotonic()
                    await self._rescan()
                try:
                    await self.evict()
                except (MetadataUnavailable, ObjectStoreUnavailable) as exc:
                    log.warning("eviction_skipped", error=exc.message)
        finally:
            self._store.on_over_high = None


@dataclass
class GcReport:
    temp_files: list[str] = field(default_factory=list)
    orphan_files: list[str] = field(default_factory=list)  # blobs with no record
    dangling_records: list[str] = field(default_factory=list)  # records with no blob
    expired_tags: list[str] = field(default_factory=list)
    bytes_freed: int = 0


async def collect_garbage(
    store: BlobStore,
    metadata: MetadataStore,
    usable_for: Callable[[str, str, str], float],
    *,
    temp_age: float,
    dry_run: bool,
    now: float | None = None,
    on_removed: Removed | None = None,
) -> GcReport:
    """Stale temp files, blob files no record knows, records of blobs that are gone,
    and tag records past their TTL plus max_stale (`usable_for(upstream, repo, tag)`)."""
    report = GcReport()
    now = time.time() if now is None else now
    for entry in sorted(store.tmp_dir.iterdir()):
        stat = entry.lstat()
        if now - stat.st_mtime > temp_age:
            report.temp_files.append(entry.name)
            report.bytes_freed += stat.st_size
            if not dry_run:
                entry.unlink(missing_ok=True)
    for upload in await store.abandoned_uploads(temp_age, now):
        report.temp_files.append(upload)
        if not dry_run:
            await store.abort_upload(upload)
    stored = {str(info.digest): info async for info in store.list_committed()}
    await metadata.rebuild_indexes()  # the walk below pages through the LRU index
    recorded = {digest async for digest, _ in each_blob(metadata)}
    for digest in sorted(stored.keys() - recorded):
        report.orphan_files.append(digest)
        report.bytes_freed += stored[digest].size
        if not dry_run:
            await store.delete(Digest.parse(digest))
            if on_removed is not None:
                await on_removed(digest)
    for digest in sorted(recorded - stored.keys()):
        report.dangling_records.append(digest)
        if not dry_run:
            await metadata.delete_blob(digest)
            if on_removed is not None:
                await on_removed(digest)
    for upstream, repository, tag, record in await metadata.tag_records():
        if now - record.checked_at > usable_for(upstream, repository, tag):
            report.expired_tags.append(f"{upstream}/{repository}:{tag}")
            if not dry_run:
                await metadata.delete_tag(upstream, repository, tag)
    return report


@dataclass
class VerifyReport:
    checked: int = 0
    bytes_checked: int = 0
    corrupt: list[tuple[str, str]] = field(default_factory=list)  # (digest, moved to)


async def verify_blobs(
    store: BlobStore,
    metadata: MetadataStore,
    on_removed: Removed | None = None,
    sample: float | None = None,
) -> VerifyReport:
    """Re-hash every blob, or a random `sample` of them (a fraction, 0 to 1); move a
    corrupt one aside (to corrupt/) and drop its record, so the next pull fetches a
    good copy."""
    report = VerifyReport()
    stored = [info async for info in store.list_committed()]
    if sample is not None and sample < 1:
        stored = random.sample(stored, math.ceil(len(stored) * sample))
    for info in stored:
        report.checked += 1
        report.bytes_checked += info.size
        if await store.hash_matches(info.digest):
            continue
        moved = await store.move_aside(info.digest)
        digest = str(info.digest)
        await metadata.delete_blob(digest)
        if on_removed is not None:
            await on_removed(digest)
        report.corrupt.append((digest, str(moved)))
        log.error("blob_corrupt", digest=digest, moved_to=str(moved))
    return report


def _without_local_file(store: BlobStore, digests: list[str]) -> list[str]:
    """Those of `digests` with no committed file on the store's local disk."""
    gone = []
    for digest in digests:
        path = store.local_path(Digest.parse(digest))
        if path is None or not path.exists():
            gone.append(digest)
    return gone
