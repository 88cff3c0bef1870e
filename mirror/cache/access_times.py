"""When blobs were last served: noted in memory on every hit, written in batches.

Eviction needs least-recently-used order, but a hit must never wait on a metadata
write: `AccessTimes.note` only updates a dict, and `run` writes it to the store every
few seconds (also `flush`, before eviction reads the order). A batch the store could
not take is kept for the next flush, so LRU order survives an outage.
"""

from __future__ import annotations

import asyncio

import structlog

from mirror.errors import MetadataUnavailable
from mirror.metadata.base import MetadataStore

log = structlog.get_logger(__name__)

FLUSH_EVERY = 5.0


class AccessTimes:
    def __init__(self, metadata: MetadataStore):
        self._metadata = metadata
        self._pending: dict[str, float] = {}

    def note(self, digest: str, when: float) -> None:
        self._pending[digest] = when

    async def flush(self) -> None:
        """Write what was noted since the last flush; MetadataUnavailable keeps it."""
        if not self._pending:
            return
        batch, self._pending = self._pending, {}
        try:
            await self._metadata.touch_blobs(batch)
        except MetadataUnavailable:
            for digest, when in batch.items():
                self._pending[digest] = max(when, self._pending.get(digest, 0.0))
            raise

    async def flush_logged(self) -> None:
        """`flush`, an outage logged rather than raised (background and shut-down)."""
        try:
            await self.flush()
        except MetadataUnavailable as exc:
            log.warning("access_flush_failed", error=exc.message)

    async def run(self, every: float = FLUSH_EVERY) -> None:
        while True:
            await asyncio.sleep(every)
            await self.flush_logged()
