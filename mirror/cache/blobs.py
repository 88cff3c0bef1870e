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

Access rule: a blob reached through a credentialed upstream is served for
another repository only once that repository is known to hold it (the
upstream said so to a HEAD or a GET); content from public upstreams is
content-addressed and served for any repository of a public upstream.
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

from mirror.cache.fetch import BlobDownload, raise_for_upstream_status
from mirror.cache.manifests import OFFLINE_MISS
from mirror.concurrency import TaskOwner
from mirror.errors import BlobUnknown, UpstreamUnavailable
from mirror.metadata.base import BlobRecord, DownloadRecord, MetadataStore, MetadataUnavailable
from mirror.oci import Digest
from mirror.routing import Route
from mirror.storage.blobstore import BlobStore
from mirror.upstream.client import UpstreamClient

log = structlog.get_logger(__name__)

ACCESS_FLUSH_EVERY = 5.0
SHUTDOWN_GRACE = 10.0
# A download record outlives a dead holder harmlessly: followers check the lease too.
DOWNLOAD_RECORD_TTL = 3600.0


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


def process_owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}"


class BlobCache:
    def __init__(
        self,
        store: BlobStore,
        metadata: MetadataStore,
        clients: Mapping[str, UpstreamClient],
        credentialed: frozenset[str],
        lease_ttl: float = 30.0,
        *,
        offline: bool = False,
    ):
        self._offline = offline
        self._store = store
        self._metadata = metadata
        self._clients = clients
        self._credentialed = credentialed
        # A holder that dies stops renewing; others take over once the lease lapses.
        self._lease_ttl = lease_ttl
        self._downloads: dict[Digest, tuple[BlobDownload, Route]] = {}
        self._tasks = TaskOwner("blob-downloads")
        self._owner = process_owner_id()
        self._accessed: dict[str, float] = {}
        self._readers: Counter[Digest] = Counter()
        self._flusher: asyncio.Task[None] | None = None

    # Lifecycle

    async def start(self) -> None:
        self._flusher = asyncio.create_task(self._flush_access_loop(), name="blob-access-flush")

    async def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
        # A download close to its end is worth finishing: its clients get their bytes
        # and the cache keeps the blob.
        await self._tasks.close(grace=SHUTDOWN_GRACE)
        await self.flush_access()

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
                await self._check_may_serve(route, digest)
            except BaseException:
                file.close()
                raise
            self._accessed[str(digest)] = time.time()
            return BlobSource(digest, size, "hit", file=file)
        if self._offline:
            raise BlobUnknown(OFFLINE_MISS, detail={"digest": str(digest)})
        running = self._downloads.get(digest)
        if running is not None and running[0].error is None:
            if not self._may_join(route, running[1]):
                # Fetched for another repository of a credentialed upstream: join it
                # only once this repository is known to hold the blob too.
                await self._confirm_upstream_holds(route, digest)
            download = running[0]
        else:
            download = await self._start_download(route, digest)
        await download.wait_started()
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
            await self._check_may_serve(route, digest)
            return size, "hit"
        running = self._downloads.get(digest)
        if running is not None and self._may_join(route, running[1]):
            download = running[0]
            if download.error is None and download.size is not None:
                # Being fetched (or verified and about to be committed): no need to ask.
                return download.size, "hit" if download.verified else "miss"
        if self._offline:
            raise BlobUnknown(OFFLINE_MISS, detail={"digest": str(digest)})
        length = await self._confirm_upstream_holds(route, digest)
        await self._metadata.add_blob_repository(str(digest), route.upstream, route.repository)
        return length, "pass-through"

    def _client(self, route: Route) -> UpstreamClient:
        return self._clients[route.upstream]

    def _may_join(self, route: Route, started_for: Route) -> bool:
        if started_for.upstream == route.upstream and started_for.repository == route.repository:
            return True
        return not ({route.upstream, started_for.upstream} & self._credentialed)

    async def _check_may_serve(self, route: Route, digest: Digest) -> None:
        """Raise BLOB_UNKNOWN unless this repository may be served the cached blob."""
        if not self._credentialed:
            # Only public content is cached: any repository may have it, and the hot
            # path makes no metadata round trip to find that out.
            return
        try:
            holders = await self._metadata.blob_repositories(str(digest))
        except MetadataUnavailable:
            # Degraded: blobs on disk keep being served once the upstream says this
            # repository holds them (not recorded: the store is away).
            await self._confirm_upstream_holds(route, digest)
            return
        if (route.upstream, route.repository) in holders:
            return
        public = route.upstream not in self._credentialed and not any(
            upstream in self._credentialed for upstream, _ in holders
        )
        if public:
            return
        # Ask the upstream whether this repository holds the blob, and remember a yes.
        await self._confirm_upstream_holds(route, digest)
        await self._metadata.add_blob_repository(str(digest), route.upstream, route.repository)

    async def _confirm_upstream_holds(self, route: Route, digest: Digest) -> int | None:
        """HEAD the blob in this repository upstream (BLOB_UNKNOWN if it is not there);
        returns its size."""
        async with await self._client(route).open(
            "HEAD", route.repository, f"blobs/{digest}"
        ) as response:
            raise_for_upstream_status(response, BlobUnknown)
            return response.content_length

    # Fetching

    async def _start_download(self, route: Route, digest: Digest) -> BlobDownload:
        download = BlobDownload(self._store, digest)
        self._downloads[digest] = (download, route)
        self._tasks.spawn(self._download(download, route), name=f"download:{digest}")
        return download

    async def _download(self, download: BlobDownload, route: Route) -> None:
        digest = download.digest
        lease = f"blob:{digest}"
        try:
            role, holder = await self._hold_or_observe(lease, digest)
            if role == "committed":
                # Another process committed it while we waited: serve our readers from disk.
                await download.adopt_committed()
            elif role == "follow":
                assert holder is not None
                await self._follow(download, lease, holder, route)
            else:
                await self._fetch(download, lease, route)
        except UpstreamUnavailable as exc:
            await download.fail(exc)
        finally:
            if self._downloads.get(digest, (None,))[0] is download:
                del self._downloads[digest]
            download.settled.set()

    async def _fetch(self, download: BlobDownload, lease: str, route: Route) -> None:
        """Hold the lease and download from the upstream."""
        digest = str(download.digest)

        async def announce(temp_path: Path, size: int | None) -> None:
            record = DownloadRecord(owner=self._owner, temp_name=temp_path.name, size=size)
            with contextlib.suppress(MetadataUnavailable):  # followers then wait for the commit
                await self._metadata.put_download(digest, record, DOWNLOAD_RECORD_TTL)

        renewer = asyncio.create_task(self._renew_lease(lease), name=f"lease:{digest}")
        try:
            await download.run(self._client(route), route.repository, announce)
        finally:
            renewer.cancel()
            await asyncio.gather(renewer, return_exceptions=True)
            with contextlib.suppress(MetadataUnavailable):
                await self._metadata.delete_download(digest)
            await self._metadata.release_lease(lease, self._owner)
        if download.committed:
            now = time.time()
            await self._metadata.put_blob(
                digest, BlobRecord(size=download.written, created_at=now, last_access=now)
            )
            await self._metadata.add_blob_repository(digest, route.upstream, route.repository)

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
            if not await self._metadata.renew_lease(lease, self._owner, self._lease_ttl):
                log.warning("lease_lost", lease=lease)
                return

    # Access times, batched so a hit never waits on a metadata write.

    async def _flush_access_loop(self) -> None:
        while True:
            await asyncio.sleep(ACCESS_FLUSH_EVERY)
            try:
                await self.flush_access()
            except UpstreamUnavailable as exc:
                log.warning("access_flush_failed", error=repr(exc))

    async def flush_access(self) -> None:
        if not self._accessed:
            return
        batch, self._accessed = self._accessed, {}
        await self._metadata.touch_blobs(batch)
