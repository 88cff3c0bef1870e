"""What the console's overview shows of the metadata store: how many blobs the cache
holds and the lasting byte counters, and the list of repositories the browse pages
search and page through. An owned background task reads the figures (`Catalog.run`) at
most every `interval` seconds, sooner when a pull brought new content (`changed`), and
stretches its interval should reading them take long. Requests read the last snapshot
and never wait for one.

Both figures are kept by the store (`MetadataStore.totals`, `counters`): no record is
listed. A repository's tag count and last pull are read for a page of the list at a
time (`MetadataStore.repository_figures`), so nothing here grows with the tags.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from mirror.concurrency import SingleFlight
from mirror.errors import MetadataUnavailable
from mirror.metadata.base import MetadataStore

log = structlog.get_logger(__name__)

INTERVAL = 60.0
# The list of repositories (one read, but thousands of names to parse and sort) is shared
# by the requests of this many seconds: paging and searching do not read it each time.
NAMES_FRESH = 5.0
MIN_GAP = 2.0  # between two scans, however often pulls bring new content
# A scan that takes long stretches both: the store is scanned at most this share of the
# time when idle, and of the time while pulls keep bringing new content.
IDLE_SHARE, BUSY_SHARE = 0.05, 0.2


@dataclass(frozen=True, slots=True)
class Snapshot:
    taken_at: float
    blobs: int
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
        self._names: tuple[float, list[tuple[str, str, str]]] | None = None
        self._reading_names: SingleFlight[str, list[tuple[str, str, str]]] = SingleFlight()

    async def repository_names(self) -> list[tuple[str, str, str]]:
        """Every repository as (`upstream/repository`, upstream, repository), sorted by the
        first: at most `NAMES_FRESH` seconds old."""
        if self._names is not None and time.monotonic() - self._names[0] < NAMES_FRESH:
            return self._names[1]
        return await self._reading_names.run("names", self._read_names)

    async def _read_names(self) -> list[tuple[str, str, str]]:
        read_at = time.monotonic()
        names = sorted(
            (f"{upstream}/{repository}", upstream, repository)
            for upstream, repository in await self._metadata.list_repositories()
        )
        self._names = (read_at, names)
        return names

    def changed(self) -> None:
        """New content was cached: take the next snapshot soon, and read the repositories
        afresh."""
        self._names = None
        self._changed.set()

    async def refresh(self) -> Snapshot:
        started = self._clock()
        # Kept figures only: a listing of every blob record, parsed on the event loop,
        # held up the requests sharing it (bench/console.py, Redis: 100-180 ms), and one
        # of every tag, in a worker thread, doubled the tail latency of pulls at 50,000
        # tags (bench/scale.py: the loop waits on the GIL).
        totals = await self._metadata.totals()
        counters = await self._metadata.counters()
        self.snapshot = Snapshot(
            started,
            totals.blobs,
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
