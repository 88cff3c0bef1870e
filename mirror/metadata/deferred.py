"""Metadata writes that wait out an outage of the store.

Availability comes before coordination: while the metadata store is away, pulls go
on (fetched, verified and committed as usual) and the records they would have written
wait here. The write is tried at once; if the store does not answer, it is kept and
replayed when the store answers again (`run`), after which the caller's
`after_replay` (a reconcile of files against records) catches up on anything the
queue could not hold.

While writes wait, new ones queue behind them without trying the store, so an outage
costs each request no connection timeout. Each write has a key naming the fact it
records (a newer write of the same fact replaces the older one), and the queue is
bounded: past the bound the oldest write is dropped, which costs efficiency (a tag
revalidated once more, a record rebuilt by reconcile), never correctness.

Replays never undo newer data written meanwhile by another process: a blob record is
written only if none exists, a tag record only if it is newer than the stored one;
adding a repository to a set is idempotent.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable

import structlog

from mirror.errors import MetadataUnavailable
from mirror.metadata.base import BlobRecord, MetadataStore, TagRecord

log = structlog.get_logger(__name__)

DEFAULT_LIMIT = 10_000
REPLAY_EVERY = 2.0

Write = Callable[[], Awaitable[None]]


class DeferredWrites:
    """Record writes for one metadata store that survive its outages."""

    def __init__(self, metadata: MetadataStore, limit: int = DEFAULT_LIMIT):
        self._metadata = metadata
        self._limit = limit
        self._pending: OrderedDict[tuple[str, ...], Write] = OrderedDict()
        self.dropped = 0

    @property
    def pending(self) -> int:
        """Writes waiting for the store."""
        return len(self._pending)

    # The writes the caches make

    async def put_blob(self, digest: str, record: BlobRecord) -> None:
        async def write() -> None:
            if await self._metadata.get_blob(digest) is None:
                await self._metadata.put_blob(digest, record)

        await self._write(("blob", digest), write)

    async def put_tag(self, upstream: str, repository: str, tag: str, record: TagRecord) -> None:
        async def write() -> None:
            stored = await self._metadata.get_tag(upstream, repository, tag)
            if stored is None or stored.checked_at < record.checked_at:
                await self._metadata.put_tag(upstream, repository, tag, record)

        await self._write(("tag", upstream, repository, tag), write)

    async def add_blob_repository(self, digest: str, upstream: str, repository: str) -> None:
        await self._write(
            ("holds", digest, upstream, repository),
            lambda: self._metadata.add_blob_repository(digest, upstream, repository),
        )

    async def add_repository(self, upstream: str, repository: str) -> None:
        await self._write(
            ("repository", upstream, repository),
            lambda: self._metadata.add_repository(upstream, repository),
        )

    # Mechanism

    async def _write(self, key: tuple[str, ...], write: Write) -> None:
        if not self._pending:
            try:
                await write()
                return
            except MetadataUnavailable as exc:
                log.warning("metadata_write_deferred", error=exc.message)
        self._pending.pop(key, None)
        self._pending[key] = write
        while len(self._pending) > self._limit:
            self._pending.popitem(last=False)
            self.dropped += 1

    async def replay(self) -> int:
        """Write what waits, oldest first; stop (keeping the rest) if the store is still
        away. Returns how many were written."""
        written = 0
        while self._pending:
            key, write = next(iter(self._pending.items()))
            await write()
            if self._pending.get(key) is write:  # not replaced while we wrote it
                del self._pending[key]
            written += 1
        return written

    async def run(
        self, after_replay: Callable[[], Awaitable[object]], interval: float = REPLAY_EVERY
    ) -> None:
        """Replay whenever writes wait and the store answers; then `after_replay`."""
        while True:
            await asyncio.sleep(interval)
            if not self._pending:
                continue
            try:
                written = await self.replay()
                await after_replay()
            except MetadataUnavailable:
                continue
            log.info("metadata_writes_replayed", written=written, dropped=self.dropped)
