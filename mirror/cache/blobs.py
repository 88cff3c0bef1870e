"""The blob policy: serve from disk, or fetch once and share the download.

`BlobCache.open` answers "give me this blob for this repository" and never
makes the HTTP layer ask whether it is cached: it returns a `BlobSource`
that is either a committed file (sent with sendfile) or a running
`BlobDownload` (read as it grows).

Exactly one upstream download per digest: in this process through the
registry of running downloads; across processes and nodes through a lease in
the metadata store. A process that loses the lease serves its clients from the
holder's growing temp file when they share a volume, or else waits for the
holder's commit; if the holder dies, its lease lapses and this process fetches
the blob itself.

Availability comes before coordination: if the metadata store cannot be reached,
a miss is fetched anyway (single-flight within this process, verified and committed
as usual) and its records wait in `DeferredWrites` until the store answers.

Who may be served what is `ContentAccess`'s rule (provenance.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import structlog

from mirror.cache.fetch import BlobDownload, Reserve
from mirror.cache.manifests import OFFLINE_MISS
from mirror.cache.provenance import ContentAccess
from mirror.concurrency import TaskOwner, cancel_and_wait
from mirror.errors import BlobUnknown, MetadataUnavailable, MirrorError, UpstreamUnavailable
from mirror.metadata.base import BlobRecord, DownloadRecord, MetadataStore
from mirror.metadata.deferred import DeferredWrites
from mirror.oci import Digest
from mirror.routing import Route
from mirror.storage.blobstore import BlobStore
from mirror.upstream.client import UpstreamClient

log = structlog.get_logger(__name__)

ACCESS_FLUSH_EVERY = 5.0
SHUTDOWN_GRACE = 10.0
# A download record outlives a dead holder harmlessly: followers check the lease too.
DOWNLOAD_RECORD_TTL = 3600.0
# How often a blob another process committed may vanish (evicted) before we adopt it.
ADOPT_ATTEMPTS = 3


@dataclass(frozen=True, slots=True)
class BlobSource:
    """Where a blob's bytes come from for one response. Close it when done."""

    digest: Digest
    size: int | None
    cache_result: str  # "hit" or "miss"
    file: BinaryIO | None = None  # a committed blob, already open: eviction cannot pull it away
    download: BlobDownload | None = None  # a download in progress

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.download is not None:
            self.download.leave()


def process_owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}"


class BlobCache:
    def __init__(
        self,
        store: BlobStore,
        metadata: MetadataStore,
        deferred: DeferredWrites,
        clients: Mapping[str, UpstreamClient],
        access: ContentAccess,
        lease_ttl: float = 30.0,
        *,
        offline: bool = False,
    ):
        self._offline = offline
        self._store = store
        self._metadata = metadata
        self._deferred = deferred
        self._clients = clients
        self._access = access
        # A holder that dies stops renewing; others take over once the lease lapses.
        self._lease_ttl = lease_ttl
        self._downloads: dict[Digest, tuple[BlobDownload, Route]] = {}
        self._tasks = TaskOwner("blob-downloads")
        self._owner = process_owner_id()
        self._accessed: dict[str, float] = {}
        self._readers: Counter[Digest] = Counter()
        self._flusher: asyncio.Task[None] | None = None
        # Misses fetched without a lease because the metadata store was away.
        self.uncoordinated_fetches = 0
        # Room for a download before its first byte (the evictor's, which evicts to make
        # it); unset, the store alone says whether it fits.
        self.reserve_space: Reserve | None = None

    # Lifecycle

    async def start(self) -> None:
        self._flusher = asyncio.create_task(self._flush_access_loop(), name="blob-access-flush")

    async def close(self) -> None:
        if self._flusher is not None:
            await cancel_and_wait(self._flusher)
        # A download close to its end is worth finishing: its clients get their bytes
        # and the cache keeps the blob.
        await self._tasks.close(grace=SHUTDOWN_GRACE)
        try:
            await self.flush_access()
        except MetadataUnavailable as exc:
            log.warning("access_flush_failed", error=exc.message)

    @property
    def downloads_in_flight(self) -> int:
        return len(self._downloads)

    @contextlib.contextmanager
    def reading(self, digest: Digest) -> Iterator[None]:
        """Mark a blob as being sent to a client, so eviction leaves it alone."""
        self._readers[digest] += 1
        try:
            yield
        finally:
            self._readers[digest] -= 1
            if not self._readers[digest]:
                del self._readers[digest]

    def in_use(self) -> set[str]:
        """Digests being fetched or sent right now: never evicted."""
        return {str(d) for d in self._downloads} | {str(d) for d in self._readers}

    # Reading

    async def open(self, route: Route, digest: Digest) -> BlobSource:
        """A source for the blob's bytes, fetching it if it is not here."""
        # Opened before it is served, so eviction cannot pull it away meanwhile.
        committed = self._store.open_committed(digest)
        if committed is not None:
            file, size = committed
            try:
                await self._access.check(route, "blobs", digest)
            except BaseException:
                file.close()
                raise
            self._accessed[str(digest)] = time.time()
            return BlobSource(digest, size, "hit", file=file)
        if self._offline:
            raise BlobUnknown(OFFLINE_MISS, detail={"digest": str(digest)})
        running = self._downloads.get(digest)
        if running is not None and running[0].error is None and running[0].joinable:
            if not self._access.may_share(route, running[1]):
                # Fetched for another repository of a credentialed upstream: join it
                # only once this repository is known to hold the blob too.
                await self._access.confirm(route, "blobs", digest)
            download = running[0]
        else:
            download = await self._start_download(route, digest)
        download.join()  # left in BlobSource.close
        try:
            await download.wait_started()
        except BaseException:
            download.leave()
            raise
        return BlobSource(digest, download.size, "miss", download=download)

    async def ensure(self, route: Route, digest: Digest) -> tuple[int, bool]:
        """Have the blob committed and recorded, fetching it if need be (seeding).
        Returns its size and whether it was fetched now."""
        source = await self.open(route, digest)
        source.close()
        if source.download is None:
            assert source.size is not None
            return source.size, False
        await source.download.settled.wait()
        size = self._store.size(digest)
        if size is None:
            raise source.download.error or BlobUnknown("blob could not be fetched")
        return size, True

    async def head(self, route: Route, digest: Digest) -> tuple[int | None, str]:
        """The blob's size and the cache result, without fetching its bytes."""
        size = self._store.size(digest)
        if size is not None:
            await self._access.check(route, "blobs", digest)
            return size, "hit"
        running = self._downloads.get(digest)
        if running is not None and self._access.may_share(route, running[1]):
            download = running[0]
            if download.error is None and download.size is not None:
                # Being fetched (or verified and about to be committed): no need to ask.
                return download.size, "hit" if download.verified else "miss"
        if self._offline:
            raise BlobUnknown(OFFLINE_MISS, detail={"digest": str(digest)})
        length = await self._access.confirm(route, "blobs", digest)
        await self._access.record(route, digest)
        return length, "pass-through"

    def _client(self, route: Route) -> UpstreamClient:
        return self._clients[route.upstream]

    # Fetching

    async def _start_download(self, route: Route, digest: Digest) -> BlobDownload:
        download = BlobDownload(self._store, digest, self.reserve_space)
        self._downloads[digest] = (download, route)
        self._tasks.spawn(self._download(download, route), name=f"download:{digest}")
        return download

    async def _download(self, download: BlobDownload, route: Route) -> None:
        digest = download.digest
        lease = f"blob:{digest}"
        try:
            role, holder = await self._coordinate(lease, digest)
            for _again in range(ADOPT_ATTEMPTS):
                if role != "committed" or await download.adopt_committed():
                    break
                # Another process committed it while we waited, and it was evicted before
                # our readers got to it (a full cache): ask again who fetches.
                log.info("blob_evicted_before_adopted", digest=str(digest))
                role, holder = await self._coordinate(lease, digest)
            if role == "follow":
                assert holder is not None
                await self._follow(download, lease, holder, route)
            elif role != "committed":
                await self._fetch(download, lease if role == "fetch" else None, route)
            elif not download.committed:
                raise UpstreamUnavailable("blob evicted as soon as it was committed, every time")
        except MirrorError as exc:
            await download.fail(exc)
        except Exception as exc:
            # A bug, not an outage: say so loudly, and still release the clients below.
            log.exception("blob_download_crashed", digest=str(digest))
            await download.fail(UpstreamUnavailable("blob download failed", detail=repr(exc)))
        finally:
            if not download.finished:
                # Cancelled (shutdown) before it settled: nobody may wait for it forever.
                await download.fail(UpstreamUnavailable("blob download was stopped"))
            if self._downloads.get(digest, (None,))[0] is download:
                del self._downloads[digest]
            download.settled.set()

    async def _coordinate(self, lease: str, digest: Digest) -> tuple[str, DownloadRecord | None]:
        """Who fetches: `_hold_or_observe`, or "fetch-unleased" while the store is away."""
        try:
            return await self._hold_or_observe(lease, digest)
        except MetadataUnavailable as exc:
            # Nobody can be asked who fetches: fetching anyway costs at worst a duplicate
            # download, refusing would fail a pull the upstream can answer.
            self.uncoordinated_fetches += 1
            log.warning("blob_fetch_uncoordinated", digest=str(digest), error=exc.message)
            return "fetch-unleased", None

    async def _fetch(self, download: BlobDownload, lease: str | None, route: Route) -> None:
        """Download from the upstream, holding the lease (None: the store is away)."""
        digest = str(download.digest)

        passing_through = False

        async def announce(temp_path: Path | None, size: int | None) -> None:
            nonlocal passing_through
            if temp_path is None:
                # Not cached: nothing for other processes to follow or wait for. They
                # fetch their own (each client of a refused blob costs an upstream read).
                passing_through = True
                renewer.cancel()
                assert lease is not None
                with contextlib.suppress(MetadataUnavailable):
                    await self._metadata.release_lease(lease, self._owner)
                return
            record = DownloadRecord(owner=self._owner, temp_name=temp_path.name, size=size)
            with contextlib.suppress(MetadataUnavailable):  # followers then wait for the commit
                await self._metadata.put_download(digest, record, DOWNLOAD_RECORD_TTL)

        if lease is None:
            await download.run(self._client(route), route.repository)
        else:
            renewer = asyncio.create_task(self._renew_lease(lease), name=f"lease:{digest}")
            try:
                await download.run(self._client(route), route.repository, announce)
            finally:
                await cancel_and_wait(renewer)
        if download.committed:
            # Recorded before the lease goes, so another process never finds neither.
            now = time.time()
            await self._deferred.put_blob(
                digest, BlobRecord(size=download.written, created_at=now, last_access=now)
            )
            await self._access.record(route, download.digest)
        if lease is not None and not passing_through:  # else the lease may be another's now
            # An outage here only leaves the lease to lapse on its own.
            with contextlib.suppress(MetadataUnavailable):
                await self._metadata.delete_download(digest)
                await self._metadata.release_lease(lease, self._owner)

    async def _follow(
        self, download: BlobDownload, lease: str, holder: DownloadRecord, route: Route
    ) -> None:
        """Serve from another process's download; take over if that process dies."""

        async def holder_gone() -> bool:
            try:
                return await self._metadata.lease_holder(lease) != holder.owner
            except MetadataUnavailable:
                return False  # cannot tell: keep following until the commit shows up

        temp_path = self._store.tmp_dir / holder.temp_name
        if await download.follow(temp_path, holder.size, holder_gone):
            return
        # Its readers were cut off (they may hold bytes nobody verified). The layer is
        # still wanted: fetch it now for whoever asks next.
        log.warning("download_holder_lost", digest=str(download.digest), holder=holder.owner)
        if (
            download.digest not in self._downloads
            or self._downloads[download.digest][0] is download
        ):
            await self._start_download(route, download.digest)

    async def _hold_or_observe(
        self, lease: str, digest: Digest
    ) -> tuple[str, DownloadRecord | None]:
        """("fetch", None) once we hold the lease; ("committed", None) if someone else
        committed the blob; ("follow", record) for a download we can tail on this volume."""
        delay = 0.05
        while True:
            if await self._metadata.acquire_lease(lease, self._owner, self._lease_ttl):
                if self._store.size(digest) is None:
                    return "fetch", None
                await self._metadata.release_lease(lease, self._owner)
                return "committed", None
            if self._store.size(digest) is not None:
                return "committed", None
            holder = await self._metadata.get_download(str(digest))
            # A temp file we can see means a shared volume; a bare name keeps us in tmp/.
            if (
                holder is not None
                and Path(holder.temp_name).name == holder.temp_name
                and (self._store.tmp_dir / holder.temp_name).exists()
            ):
                return "follow", holder
            # Otherwise wait for the holder's commit, or for its lease to lapse.
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

    async def _renew_lease(self, lease: str) -> None:
        while True:
            await asyncio.sleep(self._lease_ttl / 3)
            try:
                held = await self._metadata.renew_lease(lease, self._owner, self._lease_ttl)
            except MetadataUnavailable:
                continue  # the store is away: keep fetching, and renew once it answers
            if not held:
                log.warning("lease_lost", lease=lease)
                return

    # Access times, batched so a hit never waits on a metadata write.

    async def _flush_access_loop(self) -> None:
        while True:
            await asyncio.sleep(ACCESS_FLUSH_EVERY)
            try:
                await self.flush_access()
            except MetadataUnavailable as exc:
                log.warning("access_flush_failed", error=exc.message)

    async def flush_access(self) -> None:
        if not self._accessed:
            return
        batch, self._accessed = self._accessed, {}
        try:
            await self._metadata.touch_blobs(batch)
        except MetadataUnavailable:
            # Kept for the next flush: LRU order must survive an outage.
            for digest, when in batch.items():
                self._accessed[digest] = max(when, self._accessed.get(digest, 0.0))
            raise
