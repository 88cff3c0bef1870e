"""The blob policy: serve from disk, or fetch once and share the download.

`BlobCache.open` answers "give me this blob for this repository" and never
makes the HTTP layer ask whether it is cached: it returns a `BlobSource`
that is either a committed file (sent with sendfile) or a running
`BlobDownload` (read as it grows).

Exactly one upstream download per digest: in this process through the registry
of running downloads here; across processes and nodes through `Coordinator`
(coordination.py), which says whether this process fetches, follows another's
download, or finds the blob committed. If a followed holder dies, its clients see a
broken transfer and the blob is fetched again for whoever asks next.

In fleet mode the coordinator may also answer "fill from this peer" (`peers.py`): the
peer's bytes go through the same `BlobDownload` as upstream bytes. A peer that cannot
start (unreachable, 404, 401) is left out and the next source is tried before any byte
reached a client; one that breaks mid-way or sends wrong bytes fails this download's
clients (never with an unverified last byte) and is left out for the next request.

Who may be served what is `ContentAccess`'s rule (provenance.py); when blobs were
last served is `AccessTimes`' (access_times.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import structlog

from mirror.cache.access_times import AccessTimes
from mirror.cache.context import CacheContext
from mirror.cache.coordination import Coordinator, Decision, Role
from mirror.cache.fetch import BlobDownload, Reserve
from mirror.cache.manifests import OFFLINE_MISS
from mirror.cache.peers import Fleet, OpenedResponse
from mirror.concurrency import TaskOwner, cancel_and_wait
from mirror.errors import (
    BlobUnknown,
    DigestMismatch,
    MetadataUnavailable,
    MirrorError,
    ObjectStoreUnavailable,
    UpstreamUnavailable,
)
from mirror.metadata.base import BlobRecord, DownloadRecord
from mirror.oci import Digest
from mirror.routing import Route
from mirror.storage.blobstore import StoredBlob
from mirror.upstream.client import UpstreamClient

log = structlog.get_logger(__name__)

SHUTDOWN_GRACE = 10.0
# How often a blob another process committed may vanish (evicted) before we adopt it.
ADOPT_ATTEMPTS = 3
# Seeding a blob a peer is putting into a shared store: how often to look for it there.
COMMIT_POLL = 0.2


@dataclass(frozen=True, slots=True)
class BlobSource:
    """Where a blob's bytes come from for one response. Close it when done."""

    digest: Digest
    size: int | None
    cache_result: str  # "hit", "miss", or "peer" (a miss filled from a peer replica)
    stored: StoredBlob | None = None  # a committed blob, already open: eviction cannot pull
    # a local file away, and an object store's blob was checked to be there
    download: BlobDownload | None = None  # a download in progress
    redirect: str | None = None  # a hit the client fetches from this URL (object store)

    def close(self) -> None:
        if self.stored is not None:
            self.stored.close()
        if self.download is not None:
            self.download.leave()


class BlobCache:
    def __init__(self, context: CacheContext, lease_ttl: float = 30.0, fleet: Fleet | None = None):
        self._ctx = context
        self._fleet = fleet
        self._coordinator = Coordinator(context.store, context.metadata, lease_ttl, fleet)
        self._lease_ttl = lease_ttl
        self._access_times = AccessTimes(context.metadata)
        self._downloads: dict[Digest, tuple[BlobDownload, Route]] = {}
        self._tasks = TaskOwner("blob-downloads")
        self._readers: Counter[Digest] = Counter()
        self._flusher: asyncio.Task[None] | None = None
        # Room for a download before its first byte (the evictor's, which evicts to make
        # it); unset, the store alone says whether it fits.
        self.reserve_space: Reserve | None = None

    # Lifecycle

    async def start(self) -> None:
        self._flusher = asyncio.create_task(self._access_times.run(), name="blob-access-flush")
        if self._fleet is not None:
            await self._fleet.start()

    async def close(self) -> None:
        if self._flusher is not None:
            await cancel_and_wait(self._flusher)
        # A download close to its end is worth finishing: its clients get their bytes
        # and the cache keeps the blob.
        await self._tasks.close(grace=SHUTDOWN_GRACE)
        await self._access_times.flush_logged()
        if self._fleet is not None:
            await self._fleet.close()  # after the downloads: their commits are recorded

    async def flush_access(self) -> None:
        """Write the access times noted so far (eviction's order must be current)."""
        await self._access_times.flush()

    @property
    def downloads_in_flight(self) -> int:
        return len(self._downloads)

    @property
    def uncoordinated_fetches(self) -> int:
        """Misses fetched without a lease because the metadata store was away."""
        return self._coordinator.uncoordinated

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
        stored = await self._open_committed(digest)
        if stored is not None:
            try:
                await self._ctx.access.check(route, "blobs", digest)
            except BaseException:
                stored.close()
                raise
            self._access_times.note(str(digest), time.time())
            redirect = await self._ctx.store.redirect_url(digest)
            if redirect is not None:
                stored.close()
                return BlobSource(digest, stored.size, "hit", redirect=redirect)
            return BlobSource(digest, stored.size, "hit", stored=stored)
        if self._ctx.offline:
            raise BlobUnknown(OFFLINE_MISS, detail={"digest": str(digest)})
        running = self._downloads.get(digest)
        if running is not None and running[0].error is None and running[0].joinable:
            if not self._ctx.access.may_share(route, running[1]):
                # Fetched for another repository of a credentialed upstream: join it
                # only once this repository is known to hold the blob too.
                await self._ctx.access.confirm(route, "blobs", digest)
            download = running[0]
        else:
            download = await self._start_download(route, digest)
        return await _joined(download)

    async def held(self, digest: Digest) -> BlobSource | None:
        """The blob as this process has it, for a peer replica: committed, or a download
        running here; None otherwise. Never fetches and checks no access rule (a peer
        serves its fleet, not a client); the download's last byte still waits for its
        verification."""
        stored = await self._open_committed(digest)
        if stored is not None:
            return BlobSource(digest, stored.size, "hit", stored=stored)
        running = self._downloads.get(digest)
        if running is None or running[0].error is not None or not running[0].joinable:
            return None
        return await _joined(running[0])

    async def ensure(self, route: Route, digest: Digest) -> tuple[int, bool]:
        """Have the blob committed and recorded, fetching it if need be (seeding).
        Returns its size and whether it was fetched now."""
        source = await self.open(route, digest)
        source.close()
        if source.download is None:
            assert source.size is not None
            return source.size, False
        await source.download.settled.wait()
        size = await self._committed_size(digest)
        if size is None and not source.download.keep:
            # A peer's download into the store the fleet shares: its commit is the copy.
            size = await self._await_committed(digest)
        if size is None:
            raise source.download.error or BlobUnknown("blob could not be fetched")
        return size, True

    async def _await_committed(self, digest: Digest) -> int | None:
        deadline = time.monotonic() + self._lease_ttl
        while (size := await self._committed_size(digest)) is None:
            if time.monotonic() > deadline:
                return None
            await asyncio.sleep(COMMIT_POLL)
        return size

    async def head(self, route: Route, digest: Digest) -> tuple[int | None, str]:
        """The blob's size and the cache result, without fetching its bytes."""
        size = await self._committed_size(digest)
        if size is not None:
            await self._ctx.access.check(route, "blobs", digest)
            return size, "hit"
        running = self._downloads.get(digest)
        if running is not None and self._ctx.access.may_share(route, running[1]):
            download = running[0]
            if download.error is None and download.size is not None:
                # Being fetched (or verified and about to be committed): no need to ask.
                return download.size, "hit" if download.verified else "miss"
        if self._ctx.offline:
            raise BlobUnknown(OFFLINE_MISS, detail={"digest": str(digest)})
        length = await self._ctx.access.confirm(route, "blobs", digest)
        await self._ctx.access.record(route, digest)
        return length, "pass-through"

    async def _open_committed(self, digest: Digest) -> StoredBlob | None:
        """The committed blob, opened; None if it is not in the store, or the store cannot
        be reached (an object store's outage costs a fetch, never a pull). An object
        store is told the size recorded for the blob: an object of another size is not it."""
        store = self._ctx.store
        try:
            if store.local_blobs:
                return await store.open_committed(digest)
            return await store.open_committed(digest, await self._recorded_size(digest))
        except ObjectStoreUnavailable as exc:
            log.warning("blob_store_unavailable", digest=str(digest), error=exc.message)
            return None

    async def _committed_size(self, digest: Digest) -> int | None:
        stored = await self._open_committed(digest)
        if stored is None:
            return None
        stored.close()
        return stored.size

    async def _recorded_size(self, digest: Digest) -> int | None:
        try:
            record = await self._ctx.metadata.get_blob(str(digest))
        except MetadataUnavailable:
            return None
        return None if record is None else record.size

    def _client(self, route: Route) -> UpstreamClient:
        return self._ctx.clients[route.upstream]

    # Fetching

    async def _start_download(self, route: Route, digest: Digest) -> BlobDownload:
        download = BlobDownload(self._ctx.store, digest, self.reserve_space)
        self._downloads[digest] = (download, route)
        self._tasks.spawn(self._download(download, route), name=f"download:{digest}")
        return download

    async def _download(self, download: BlobDownload, route: Route) -> None:
        digest = download.digest
        try:
            decision = await self._decide(download, route)
            for _again in range(ADOPT_ATTEMPTS):
                if decision is None:
                    return  # filled from a peer (or failed doing so)
                if decision.role is not Role.COMMITTED or await download.adopt_committed():
                    break
                # Another process committed it while we waited, and it was evicted before
                # our readers got to it (a full cache): ask again who fetches.
                log.info("blob_evicted_before_adopted", digest=str(digest))
                decision = await self._decide(download, route)
            if decision is None:
                return
            if decision.role is Role.FOLLOW:
                assert decision.holder is not None
                await self._follow(download, decision.holder, route)
            elif decision.role is not Role.COMMITTED:
                await self._fetch(download, route, leased=decision.role is Role.FETCH)
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

    async def _decide(self, download: BlobDownload, route: Route) -> Decision | None:
        """Who provides the blob; peers are tried here, one after another, until one
        starts sending (None: a peer fill ran) or the coordinator names another source."""
        access_checked = False
        while True:
            decision = await self._coordinator.decide(download.digest)
            if decision.role is not Role.PEER:
                return decision
            assert decision.peer_url is not None
            if not access_checked:
                # The peer checks no client's rights: this route must be allowed the blob
                # as if it were committed here.
                await self._ctx.access.check(route, "blobs", download.digest)
                access_checked = True
            if await self._from_peer(download, route, decision.peer_url):
                return None

    async def _from_peer(self, download: BlobDownload, route: Route, peer_url: str) -> bool:
        """Fill from `peer_url`. False, with nothing exposed to clients, if the peer would
        not start sending; True once the fill ran, whatever its outcome."""
        assert self._fleet is not None
        fleet, digest = self._fleet, download.digest
        try:
            response = await fleet.client(peer_url).open("GET", route.repository, f"blobs/{digest}")
        except UpstreamUnavailable as exc:
            await fleet.leave_out(peer_url, digest, "unavailable", exc.message)
            return False
        if response.status != 200:
            response.close()
            await fleet.leave_out(peer_url, digest, "unavailable", f"status {response.status}")
            return False
        download.source = "peer"
        # On a store the fleet shares (a bucket), the peer's own commit is the one copy:
        # its bytes pass through here without a second upload.
        download.keep = self._ctx.store.local_blobs
        await download.run(OpenedResponse(response), route.repository)
        if not download.keep and download.verified:
            fleet.count("ok")
            log.info("blob_streamed_from_peer", digest=str(digest), peer=peer_url)
        elif download.committed:
            fleet.count("ok")
            log.info("blob_filled_from_peer", digest=str(digest), peer=peer_url)
            now = time.time()
            await self._ctx.deferred.put_blob(
                str(digest), BlobRecord(size=download.written, created_at=now, last_access=now)
            )
            await self._ctx.access.record(route, digest)
            await fleet.committed(digest)
        elif isinstance(download.error, DigestMismatch):
            await fleet.leave_out(peer_url, digest, "corrupt", repr(download.error))
        elif download.error is not None:
            await fleet.leave_out(peer_url, digest, "failed", repr(download.error))
        return True

    async def _fetch(self, download: BlobDownload, route: Route, *, leased: bool) -> None:
        """Download from the upstream, under the lease when there is one."""
        async with self._coordinator.holding(download.digest, leased=leased) as lease:
            await download.run(self._client(route), route.repository, lease.announce)
            if download.committed:
                now = time.time()
                await self._ctx.deferred.put_blob(
                    str(download.digest),
                    BlobRecord(size=download.written, created_at=now, last_access=now),
                )
                await self._ctx.access.record(route, download.digest)
                if self._fleet is not None and self._ctx.store.local_blobs:
                    # Recorded before the lease goes: a replica that finds neither the
                    # lease nor a holder would fetch the blob again. (A shared store is
                    # every replica's: nobody need fill from us.)
                    await self._fleet.committed(download.digest)

    async def _follow(self, download: BlobDownload, holder: DownloadRecord, route: Route) -> None:
        """Serve from another process's download; fetch again if that process dies."""
        if await self._coordinator.follow(download, holder):
            return
        # Its readers were cut off (they may hold bytes nobody verified). The layer is
        # still wanted: fetch it now for whoever asks next.
        log.warning("download_holder_lost", digest=str(download.digest), holder=holder.owner)
        if (
            download.digest not in self._downloads
            or self._downloads[download.digest][0] is download
        ):
            await self._start_download(route, download.digest)

    # Read-only views, for the console

    def in_flight(self) -> list[InFlight]:
        """The downloads running in this process, oldest first."""
        found = [
            InFlight(
                str(digest),
                route.upstream,
                route.repository,
                download.written,
                download.size,
                download.clients,
                download.started,
            )
            for digest, (download, route) in self._downloads.items()
        ]
        return sorted(found, key=lambda item: item.started)

    def note_pull(self, route: Route, digest: str) -> None:
        """Note that a manifest was just served from the route's repository: its last
        access (eviction's order) and the repository's last pull (the console's)."""
        now = time.time()
        self._access_times.note(digest, now)
        self._access_times.note_pull(route.upstream, route.repository, now)


@dataclass(frozen=True, slots=True)
class InFlight:
    """One running download, as the console shows it."""

    digest: str
    upstream: str
    repository: str
    received: int
    size: int | None
    clients: int
    started: float


async def _joined(download: BlobDownload) -> BlobSource:
    """A source reading `download` once its upstream answered (left in `close`)."""
    download.join()
    try:
        await download.wait_started()
    except BaseException:
        download.leave()
        raise
    return BlobSource(download.digest, download.size, download.source_result, download=download)
