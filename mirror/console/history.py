"""The console's traffic history: requests, hits, misses and bytes by source, per
minute over the last hour and per 15 minutes over the last day.

Nothing is added to the request path: the numbers are the Prometheus counters that
`metrics.py` keeps anyway (`mirror_requests_total`, `mirror_served_bytes_total`),
snapshotted once a minute by an owned background task (`TrafficHistory.run`). A bucket
is the difference between two snapshots; the bucket still open is the live counters
less its first snapshot, so a pull shows up at once. Under `serve --workers` the
counters are read through prometheus_client's multiprocess files, so every worker
reports the whole server (scope "server"); other replicas of a fleet are not included.
History starts with the process: a restart begins an empty hour.

The recent pulls (`RecentPulls`) are a bounded ring of the last blob and manifest GETs,
appended from the console's `on_response_prepare` hook (one append per such request),
per process.
"""

from __future__ import annotations

import asyncio
import bisect
import os
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from typing import Any

from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from mirror.logging import AccessInfo
from mirror.metrics import MULTIPROCESS_ENV, Metrics

MINUTE = 60.0
HOUR_STEP, HOUR_POINTS = 60, 60
DAY_STEP, DAY_POINTS = 900, 96
KEEP = 86400.0 + 2 * 3600.0  # a day of snapshots, and some slack for the oldest bucket
# The cache results that count as hits (as `mirror stats` counts them) and as misses.
HITS = frozenset({"hit", "revalidated", "stale"})
MISSES = frozenset({"miss", "peer", "pass-through", "fallback"})
RECENT_PULLS = 100


@dataclass(frozen=True, slots=True)
class Totals:
    """Blob and manifest requests and body bytes, counted since the counters began."""

    requests: int = 0
    hits: int = 0
    misses: int = 0
    cache: int = 0
    upstream: int = 0
    peer: int = 0

    def since(self, earlier: Totals) -> Totals:
        # Never negative: a counter that went back (a worker's files cleaned up) is no
        # traffic, not negative traffic.
        return Totals(
            *(max(getattr(self, f.name) - getattr(earlier, f.name), 0) for f in fields(self))
        )

    def point(self, start: float) -> dict[str, Any]:
        return {
            "t": start,
            "requests": self.requests,
            "hits": self.hits,
            "misses": self.misses,
            "bytes": {"cache": self.cache, "upstream": self.upstream, "peer": self.peer},
        }

    @property
    def hit_ratio(self) -> float | None:
        answered = self.hits + self.misses
        return round(self.hits / answered, 4) if answered else None

    @property
    def saved(self) -> int:
        """Bytes served from the cache or a peer that the upstream did not have to send."""
        return self.cache + self.peer


def totals_from(collected: Iterable[Any]) -> Totals:
    """The totals in Prometheus metric families (the requests and bytes counters)."""
    counts = dict.fromkeys(("requests", "hits", "misses", "cache", "upstream", "peer"), 0)
    for family in collected:
        if family.name == "mirror_requests":
            for sample in family.samples:
                if not sample.name.endswith("_total"):
                    continue
                if sample.labels.get("kind") not in ("blob", "manifest"):
                    continue
                value = int(sample.value)
                counts["requests"] += value
                cache = sample.labels.get("cache", "")
                if cache in HITS:
                    counts["hits"] += value
                elif cache in MISSES:
                    counts["misses"] += value
        elif family.name == "mirror_served_bytes":
            for sample in family.samples:
                source = sample.labels.get("source", "")
                if sample.name.endswith("_total") and source in counts:
                    counts[source] += int(sample.value)
    return Totals(**counts)


def metric_totals(metrics: Metrics) -> Callable[[], Totals]:
    """How to read the totals from `metrics`: this process's counters, or every
    worker's under `serve --workers`."""
    directory = os.environ.get(MULTIPROCESS_ENV)
    if directory:
        collector: Collector = MultiProcessCollector(None, path=directory)  # type: ignore[no-untyped-call]
        return lambda: totals_from(collector.collect())
    return lambda: totals_from([*metrics.requests.collect(), *metrics.served_bytes.collect()])


class TrafficHistory:
    """Snapshots of the running totals, one per minute, kept for a day."""

    scope = "server"

    def __init__(self, read: Callable[[], Totals], clock: Callable[[], float] = time.time):
        self._read = read
        self._clock = clock
        self._times: list[float] = []
        self._totals: list[Totals] = []

    def sample(self) -> None:
        """Snapshot the totals, as of the start of the current minute."""
        now = self._clock()
        minute = now - now % MINUTE
        totals = self._read()
        if self._times and self._times[-1] >= minute:
            return  # this minute has its snapshot already
        self._times.append(minute)
        self._totals.append(totals)
        drop = bisect.bisect_left(self._times, now - KEEP)
        if drop:
            del self._times[:drop], self._totals[:drop]

    def _at(self, when: float, live: Totals) -> Totals:
        """The totals as they stood at `when` (the live ones for now or later); before the
        first snapshot, the first snapshot itself: what came earlier is not known."""
        if when >= self._clock() or not self._times:
            return live
        index = bisect.bisect_right(self._times, when) - 1
        return self._totals[max(index, 0)]

    def now(self) -> float:
        return self._clock()

    def since(self, when: float) -> Totals:
        """What was counted from `when` until now."""
        live = self._read()
        return live.since(self._at(when, live))

    def buckets(self, step: int, count: int, live: Totals | None = None) -> list[Totals]:
        live = self._read() if live is None else live
        now = self._clock()
        current = now - now % step
        starts = [current - step * (count - 1 - i) for i in range(count)]
        return [self._at(start + step, live).since(self._at(start, live)) for start in starts]

    def view(self) -> dict[str, Any]:
        """The overview's `traffic`, `hit_ratio` and the hour's and day's bytes saved."""
        live = self._read()
        now = self._clock()
        series: dict[str, Any] = {"scope": self.scope}
        spans: dict[str, Totals] = {}
        for name, step, count in (("hour", HOUR_STEP, HOUR_POINTS), ("day", DAY_STEP, DAY_POINTS)):
            current = now - now % step
            points = self.buckets(step, count, live)
            series[name] = {
                "step": step,
                "points": [
                    totals.point(current - step * (count - 1 - i))
                    for i, totals in enumerate(points)
                ],
            }
            spans[name] = live.since(self._at(now - step * count, live))
        return {
            "traffic": series,
            "hit_ratio": {name: totals.hit_ratio for name, totals in spans.items()},
            "bytes_saved": {name: totals.saved for name, totals in spans.items()},
        }

    async def run(self) -> None:
        """Snapshot now, then at the start of every minute."""
        while True:
            self.sample()
            now = self._clock()
            await asyncio.sleep(MINUTE - now % MINUTE + 0.05)


@dataclass(frozen=True, slots=True)
class Pull:
    time: float
    user: str | None
    upstream: str | None
    repository: str | None
    reference: str | None
    kind: str
    cache: str | None
    status: int


class RecentPulls:
    """The last blob and manifest GETs this process answered, newest first."""

    def __init__(self, size: int = RECENT_PULLS, clock: Callable[[], float] = time.time):
        self._ring: deque[Pull] = deque(maxlen=size)
        self._clock = clock

    def add(self, pull: Pull) -> None:
        self._ring.append(pull)

    def newest_first(self) -> list[Pull]:
        return list(reversed(self._ring))

    def note(self, info: AccessInfo, status: int) -> None:
        """A blob or manifest GET is being answered with `status`."""
        self._ring.append(
            Pull(
                self._clock(),
                info.user,
                info.upstream,
                info.repository,
                info.reference,
                info.kind,
                info.cache,
                status,
            )
        )
