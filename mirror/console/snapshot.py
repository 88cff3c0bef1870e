"""What the console shows that would cost a scan of the metadata store per request:
how many blobs the cache holds, each repository's tag count and last pull, and the
lasting byte counters. An owned background task computes it (`Catalog.run`) at most
every `interval` seconds, sooner when a pull brought new content (`changed`), and
stretches its interval on a store so large that the scan itself takes long. Requests
read the last snapshot and never wait for one.

When the metadata stores keep maintained totals, the blob count here can come from
them instead; the per-repository figures stay a snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from mirror.errors import MetadataUnavailable
from mirror.metadata.base import MetadataStore

log = structlog.get_logger(__name__)

INTERVAL = 60.0
MIN_GAP = 2.0  # between two scans, however often pulls bring new content
# A scan that takes long stretches both: the store is scanned at most this share of the
# time when idle, and of the time while pulls keep bringing new content.
IDLE_SHARE, BUSY_SHARE = 0.05, 0.2


@dataclass(frozen=True, slots=True)
class RepositoryFigures:
    tags: int
    last_pulled: float | None


@dataclass(frozen=True, slots=True)
class Snapshot:
    taken_at: float
    blobs: int
    repositories: dict[tuple[str, str], RepositoryFigures] = field(default_factory=dict)
    bytes_saved: int = 0  # lasting counters: bytes from the cache or a peer, ever


class Catalog:
    def __init__(
        self,
        metadata: MetadataStore,
        interval: float = INTERVAL,
        clock: Callable[[], float] = time.time,
    ):
        self._metadata = metadata
        self._interval = interval
        self._clock = clock
        self._changed = asyncio.Event()
        self.snapshot: Snapshot | None = None

    def changed(self) -> None:
        """New content was cached: take the next snapshot soon."""
        self._changed.set()

    async def refresh(self) -> Snapshot:
        started = self._clock()
        records = dict(await self._metadata.list_blobs())
        figures: dict[tuple[str, str], tuple[int, float | None]] = {}
        for upstream, repository, _tag, tag in await self._metadata.tag_records():
            count, last = figures.get((upstream, repository), (0, None))
            record = records.get(tag.digest)
            pulled = None if record is None else record.last_access
            if pulled is not None and (last is None or pulled > last):
                last = pulled
            figures[upstream, repository] = (count + 1, last)
        counters = await self._metadata.counters()
        self.snapshot = Snapshot(
            started,
            len(records),
            {key: RepositoryFigures(*value) for key, value in figures.items()},
            counters.get("bytes:cache", 0) + counters.get("bytes:peer", 0),
        )
        return self.snapshot

    async def run(self) -> None:
        while True:
            self._changed.clear()
            started = time.monotonic()
            try:
                await self.refresh()
            except MetadataUnavailable as exc:
                log.warning("console_snapshot_skipped", error=exc.message)
            took = time.monotonic() - started
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._changed.wait(), timeout=max(self._interval, took / IDLE_SHARE)
                )
            await asyncio.sleep(max(MIN_GAP, took / BUSY_SHARE))
