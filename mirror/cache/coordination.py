"""Who fetches a blob when several processes or nodes want it: leases, download records,
following another process's download, taking over when its holder dies.

The blob policy (`blobs.py`) decides what a miss needs; this module decides how the
processes sharing a metadata store agree on it. `Coordinator.decide` answers, for one
digest, with a `Role`:

- `FETCH`: this process holds the lease (`SET NX PX` in Redis, the embedded store's
  process-safe lock) and downloads; `holding` renews the lease meanwhile, announces
  the temp file for followers, and releases both when done.
- `COMMITTED`: another process committed the blob while we waited.
- `FOLLOW`: another process is downloading into a temp file this process can see (a
  shared volume): our clients tail it (`follow`), and if its holder's lease lapses
  first, the caller fetches the blob itself.
- `FETCH_UNLEASED`: the store cannot be asked. Availability comes before coordination:
  fetching costs at worst a duplicate download, refusing would fail a pull the
  upstream can answer.

- `PEER` (fleet mode, `peers.py`): another live replica holds the blob, or is
  downloading it into a temp file this process cannot see: fill from its peer endpoint,
  without a lease (the fleet's one upstream fetch is that replica's). Holders are looked
  for before the lease and again right after taking it, so a commit that lands meanwhile
  is not fetched a second time.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import structlog

from mirror.cache.fetch import BlobDownload
from mirror.cache.peers import Fleet
from mirror.concurrency import cancel_and_wait
from mirror.errors import MetadataUnavailable, ObjectStoreUnavailable
from mirror.metadata.base import DownloadRecord, MetadataStore
from mirror.oci import Digest
from mirror.storage.blobstore import BlobStore

log = structlog.get_logger(__name__)

# A download record outlives a dead holder harmlessly: followers check the lease too.
DOWNLOAD_RECORD_TTL = 3600.0
# Waiting for another process's download: first and longest pause between looks.
WAIT_FIRST, WAIT_MAX = 0.05, 0.5


def process_owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}"


def lease_name(digest: Digest) -> str:
    return f"blob:{digest}"


class Role(enum.Enum):
    FETCH = "fetch"
    FETCH_UNLEASED = "fetch-unleased"
    COMMITTED = "committed"
    FOLLOW = "follow"
    PEER = "peer"


@dataclass(frozen=True, slots=True)
class Decision:
    role: Role
    holder: DownloadRecord | None = None  # for FOLLOW: the download to tail
    peer_url: str | None = None  # for PEER: the replica to fill from


class Lease:
    """This process's right to fetch one blob, while `Coordinator.holding` runs."""

    def __init__(self, coordinator: Coordinator, digest: Digest, held: bool):
        self._coordinator = coordinator
        self.digest = digest
        self.held = held
        self.renewer: asyncio.Task[None] | None = None

    async def announce(self, temp_path: Path | None, size: int | None) -> None:
        """Tell other processes where the download writes (None: it is not cached)."""
        if not self.held:
            return
        if temp_path is None:
            # Not cached: nothing for others to follow or wait for. They fetch their own
            # (each client of a blob refused room costs an upstream read).
            await self._coordinator.give_up(self)
            return
        fleet = self._coordinator.fleet
        record = DownloadRecord(
            owner=self._coordinator.owner,
            temp_name=temp_path.name,
            size=size,
            peer_url=None if fleet is None else fleet.own_url,
        )
        with contextlib.suppress(MetadataUnavailable):  # followers then wait for the commit
            await self._coordinator.metadata.put_download(
                str(self.digest), record, DOWNLOAD_RECORD_TTL
            )


class Coordinator:
    """Leases and download records of one process, in one metadata store."""

    def __init__(
        self,
        store: BlobStore,
        metadata: MetadataStore,
        lease_ttl: float,
        fleet: Fleet | None = None,
    ):
        self._store = store
        self.metadata = metadata
        self.fleet = fleet
        # A holder that dies stops renewing; others take over once the lease lapses.
        self._lease_ttl = lease_ttl
        self.owner = process_owner_id()
        # Misses fetched without a lease because the metadata store was away.
        self.uncoordinated = 0

    async def decide(self, digest: Digest) -> Decision:
        """What this process should do about a blob it lacks."""
        try:
            return await self._hold_or_observe(digest)
        except MetadataUnavailable as exc:
            self.uncoordinated += 1
            log.warning("blob_fetch_uncoordinated", digest=str(digest), error=exc.message)
            return Decision(Role.FETCH_UNLEASED)

    @contextlib.asynccontextmanager
    async def holding(self, digest: Digest, *, leased: bool) -> AsyncIterator[Lease]:
        """While fetching: the lease renewed (if `leased`), then released with the download
        record. Whatever the caller records inside happens before the release, so
        another process never finds neither the lease nor the result."""
        lease = Lease(self, digest, leased)
        if not leased:
            yield lease
            return
        lease.renewer = asyncio.create_task(self._renew(lease_name(digest)), name=f"lease:{digest}")
        try:
            yield lease
        finally:
            await cancel_and_wait(lease.renewer)
            if lease.held:
                # An outage here only leaves the lease to lapse on its own.
                with contextlib.suppress(MetadataUnavailable):
                    await self.metadata.delete_download(str(digest))
                    await self.metadata.release_lease(lease_name(digest), self.owner)

    async def give_up(self, lease: Lease) -> None:
        """Let the lease go before the download ends (it is not being cached)."""
        lease.held = False
        if lease.renewer is not None:
            await cancel_and_wait(lease.renewer)
        with contextlib.suppress(MetadataUnavailable):
            await self.metadata.release_lease(lease_name(lease.digest), self.owner)

    async def follow(self, download: BlobDownload, holder: DownloadRecord) -> bool:
        """Serve `download`'s readers from another process's download of the blob. True
        once it committed; False (readers failed) if its holder went away first."""
        lease = lease_name(download.digest)

        async def holder_gone() -> bool:
            try:
                return await self.metadata.lease_holder(lease) != holder.owner
            except MetadataUnavailable:
                return False  # cannot tell: keep following until the commit shows up

        temp_path = self._store.tmp_dir / holder.temp_name
        return await download.follow(temp_path, holder.size, holder_gone)

    async def _hold_or_observe(self, digest: Digest) -> Decision:
        lease = lease_name(digest)
        delay = WAIT_FIRST
        while True:
            peer = await self._peer_holding(digest)
            if peer is not None:
                return Decision(Role.PEER, peer_url=peer)
            if await self.metadata.acquire_lease(lease, self.owner, self._lease_ttl):
                if await self._committed(digest):
                    await self.metadata.release_lease(lease, self.owner)
                    return Decision(Role.COMMITTED)
                # A replica may have committed it between our look and the lease.
                peer = await self._peer_holding(digest)
                if peer is None:
                    return Decision(Role.FETCH)
                await self.metadata.release_lease(lease, self.owner)
                return Decision(Role.PEER, peer_url=peer)
            if await self._committed(digest):
                return Decision(Role.COMMITTED)
            holder = await self.metadata.get_download(str(digest))
            # A temp file we can see means a shared volume; a bare name keeps us in tmp/.
            if (
                holder is not None
                and Path(holder.temp_name).name == holder.temp_name
                and (self._store.tmp_dir / holder.temp_name).exists()
            ):
                return Decision(Role.FOLLOW, holder)
            if (
                holder is not None
                and holder.peer_url is not None
                and self.fleet is not None
                and self.fleet.usable(holder.peer_url, digest)
            ):
                # Another replica's download, on its own disk: stream it from there.
                return Decision(Role.PEER, holder, peer_url=holder.peer_url)
            # Otherwise wait for the holder's commit, or for its lease to lapse.
            await asyncio.sleep(delay)
            delay = min(delay * 2, WAIT_MAX)

    async def _committed(self, digest: Digest) -> bool:
        try:
            return await self._store.size(digest) is not None
        except ObjectStoreUnavailable:
            return False  # an object store away: fetch (uncached) rather than fail

    async def _peer_holding(self, digest: Digest) -> str | None:
        return None if self.fleet is None else await self.fleet.holder(digest)

    async def _renew(self, lease: str) -> None:
        while True:
            await asyncio.sleep(self._lease_ttl / 3)
            try:
                held = await self.metadata.renew_lease(lease, self.owner, self._lease_ttl)
            except MetadataUnavailable:
                continue  # the store is away: keep fetching, and renew once it answers
            if not held:
                log.warning("lease_lost", lease=lease)
                return
