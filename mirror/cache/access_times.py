"""When blobs and repositories were last served: noted in memory on every hit, written
in batches.

Eviction needs least-recently-used order, and the console each repository's last pull,
but a hit must never wait on a metadata write: `AccessTimes.note` and `note_pull` only
update a dict, and `run` writes them to the store every few seconds (also `flush`,
before eviction reads the order). A batch the store could not take is kept for the next
flush, so LRU order survives an outage.
"""

from __future__ import annotations

import asyncio
from typing import TypeVar

import structlog

from mirror.errors import MetadataUnavailable
from mirror.metadata.base import MetadataStore

K = TypeVar("K")

log = structlog.get_logger(__name__)

FLUSH_EVERY = 5.0


class AccessTimes:
    def __init__(self, metadata: MetadataStore):
        self._metadata = metadata
        self._pending: dict[str, float] = {}
        self._pulls: dict[tuple[str, str], float] = {}

    def note(self, digest: str, when: float) -> None:
        self._pending[digest] = when

    def note_pull(self, upstream: str, repository: str, when: float) -> None:
        self._pulls[upstream, repository] = when

    async def flush(self) -> None:
        """Write what was noted since the last flush; MetadataUnavailable keeps it."""
        batch, self._pending = self._pending, {}
        pulls, self._pulls = self._pulls, {}
        try:
            if batch:
                await self._metadata.touch_blobs(batch)
        except MetadataUnavailable:
            _keep(self._pending, batch)
            _keep(self._pulls, pulls)
            raise
        try:
            if pulls:
                await self._metadata.touch_repositories(pulls)
        except MetadataUnavailable:
            _keep(self._pulls, pulls)
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


def _keep(pending: dict[K, float], batch: dict[K, float]) -> None:
    """Put back a batch the store did not take, beside what was noted meanwhile."""
    for key, when in batch.items():
        pending[key] = max(when, pending.get(key, 0.0))
