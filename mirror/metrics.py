"""Prometheus metrics, served at `/metrics`.

Events are counted as they happen (requests by upstream, kind and cache result, and
their duration by kind and cache result; bytes sent from the cache, from a peer
replica's copy or straight from the upstream; upstream requests by status and their
latency). State is read when scraped, from the objects that own it (in-flight
downloads, cache bytes and limit, evictions, stale answers, peer fills by outcome,
Docker Hub rate-limit allowance, credential failures by upstream, upstream requests
that got no answer by cause), so no module below the HTTP layer knows Prometheus exists.
Each app has its own registry. With `--workers`, the event counters are summed across
the workers (prometheus_client's multiprocess files, under the directory the supervisor
sets), so any worker's `/metrics` reports the whole server's counts; the state gauges
are the answering worker's view of the shared storage and metadata.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from mirror.errors import MetadataUnavailable
from mirror.metadata.base import MetadataStore, each_blob
from mirror.storage.blobstore import BlobStore
from mirror.upstream.client import RateLimit

# Set by the supervisor of `serve --workers` (prometheus_client's multiprocess mode).
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
UPSTREAM_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# Client requests: a manifest hit takes about a millisecond, a large layer's miss minutes.
REQUEST_BUCKETS = (0.001, 0.0025, *UPSTREAM_BUCKETS, 60, 300)


@dataclass(frozen=True, slots=True)
class StateSources:
    """Where the scrape-time values come from."""

    downloads_in_flight: Callable[[], int]
    cache_bytes: Callable[[], int]
    cache_limit: Callable[[], int | None]
    evictions: Callable[[], tuple[int, int]]  # (blobs, bytes)
    stale_answers: Callable[[], Mapping[str, int]]
    rate_limits: Callable[[], Mapping[str, RateLimit | None]]
    metadata_writes_pending: Callable[[], int] = lambda: 0
    uncoordinated_fetches: Callable[[], int] = lambda: 0
    not_cached: Callable[[], int] = lambda: 0  # blobs streamed without caching: no room
    peer_fills: Callable[[], Mapping[str, int]] = dict  # by outcome, in fleet mode
    credential_errors: Callable[[], Mapping[str, int]] = dict  # by upstream
    # By upstream, then cause (connect, tls, timeout, request, transfer).
    upstream_errors: Callable[[], Mapping[str, Mapping[str, int]]] = dict


class _StateCollector(Collector):
    def __init__(self, sources: StateSources):
        self._sources = sources

    def collect(self) -> Iterator[Metric]:
        s = self._sources
        yield GaugeMetricFamily(
            "mirror_downloads_in_flight",
            "Blob downloads from upstreams now running",
            value=s.downloads_in_flight(),
        )
        yield GaugeMetricFamily(
            "mirror_cache_bytes", "Bytes of blobs in the cache", value=s.cache_bytes()
        )
        limit = s.cache_limit()
        if limit is not None:
            yield GaugeMetricFamily("mirror_cache_limit_bytes", "storage.max_size", value=limit)
        blobs, freed = s.evictions()
        yield CounterMetricFamily(
            "mirror_evictions", "Blobs evicted to keep under max_size", value=blobs
        )
        yield CounterMetricFamily("mirror_evicted_bytes", "Bytes evicted", value=freed)
        yield CounterMetricFamily(
            "mirror_blobs_not_cached",
            "Blobs streamed to clients without caching: no room even after eviction",
            value=s.not_cached(),
        )
        stale = CounterMetricFamily(
            "mirror_stale_answers",
            "Tags served stale because the upstream failed",
            labels=["upstream"],
        )
        for upstream, count in s.stale_answers().items():
            stale.add_metric([upstream], count)
        yield stale
        fills = CounterMetricFamily(
            "mirror_peer_fills",
            "Blob fills from peer replicas, by outcome (ok, unavailable, failed, corrupt)",
            labels=["outcome"],
        )
        for outcome, count in s.peer_fills().items():
            fills.add_metric([outcome], count)
        yield fills
        credential_errors = CounterMetricFamily(
            "mirror_upstream_credential_errors",
            "Failures to get an upstream's credentials (helper, ECR, Google)",
            labels=["upstream"],
        )
        for upstream, count in s.credential_errors().items():
            credential_errors.add_metric([upstream], count)
        yield credential_errors
        remaining = GaugeMetricFamily(
            "mirror_upstream_ratelimit_remaining",
            "Pulls left in the upstream's rate-limit window, as it last said",
            labels=["upstream"],
        )
        for upstream, rate_limit in s.rate_limits().items():
            if rate_limit is not None and rate_limit.remaining is not None:
                remaining.add_metric([upstream], rate_limit.remaining)
        yield remaining
        yield GaugeMetricFamily(
            "mirror_metadata_writes_pending",
            "Metadata records waiting for the metadata store to come back",
            value=s.metadata_writes_pending(),
        )
        yield CounterMetricFamily(
            "mirror_uncoordinated_fetches",
            "Blob misses fetched without a lease because the metadata store was away",
            value=s.uncoordinated_fetches(),
        )
        # Answers with an error status are in mirror_upstream_requests_total{status}.
        upstream_errors = CounterMetricFamily(
            "mirror_upstream_errors",
            "Upstream requests that got no answer (connect, tls, timeout, request) or whose"
            " body broke off (transfer), by cause",
            labels=["upstream", "cause"],
        )
        for upstream, causes in s.upstream_errors().items():
            for cause, count in causes.items():
                upstream_errors.add_metric([upstream, cause], count)
        yield upstream_errors


class Metrics:
    """The app's metrics; see the module docstring."""

    def __init__(self) -> None:
        self.pending: collections.Counter[str] = collections.Counter()
        # Labelled children by label values (see _child).
        self._request_counts: dict[tuple[str, ...], Counter] = {}
        self._served_counts: dict[tuple[str, ...], Counter] = {}
        self._state: _StateCollector | None = None
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "mirror_requests",
            "Requests answered, by upstream, kind and cache result",
            ["upstream", "kind", "cache"],
            registry=self.registry,
        )
        self.served_bytes = Counter(
            "mirror_served_bytes",
            "Blob and manifest body bytes sent to clients, by where they came from",
            ["source"],
            registry=self.registry,
        )
        self.upstream_requests = Counter(
            "mirror_upstream_requests",
            "Requests sent to upstreams, by status",
            ["upstream", "method", "status"],
            registry=self.registry,
        )
        self.upstream_fallbacks = Counter(
            "mirror_upstream_fallbacks",
            "Requests a fallback answered for its failing upstream, by outcome"
            " (served, failed, mismatch)",
            ["upstream", "fallback", "outcome"],
            registry=self.registry,
        )
        self.upstream_seconds = Histogram(
            "mirror_upstream_request_seconds",
            "Time to an upstream's response headers",
            ["upstream"],
            buckets=UPSTREAM_BUCKETS,
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "mirror_request_seconds",
            "Time to answer a client's request, body included, by kind and cache result",
            ["kind", "cache"],
            buckets=REQUEST_BUCKETS,
            registry=self.registry,
        )
        # Its children by (kind, cache) (see _child).
        self._request_seconds: dict[tuple[str, ...], Histogram] = {}

    def watch(self, sources: StateSources) -> None:
        self._state = _StateCollector(sources)
        self.registry.register(self._state)

    def observe_request(
        self,
        upstream: str | None,
        repository: str | None,
        kind: str,
        cache: str | None,
        body_bytes: int,
        seconds: float = 0.0,
    ) -> None:
        _child(self._request_counts, self.requests, upstream or "", kind, cache or "none").inc()
        _child(self._request_seconds, self.request_seconds, kind, cache or "none").observe(seconds)
        if kind not in ("blob", "manifest"):
            return
        self.pending[f"requests:{kind}:{cache or 'none'}"] += 1
        if body_bytes:
            source = (
                "cache"
                if cache in ("hit", "revalidated", "stale")
                else "peer"
                if cache == "peer"
                else "upstream"
            )
            _child(self._served_counts, self.served_bytes, source).inc(body_bytes)
            self.pending[f"bytes:{source}"] += body_bytes
        if kind == "manifest" and upstream and repository:
            self.pending[f"pulls:{upstream}/{repository}"] += 1

    async def flush(self, metadata: MetadataStore) -> None:
        """Add what was counted since the last flush to the store's lasting counters,
        which `mirror stats` reports across restarts and processes."""
        if not self.pending:
            return
        batch, self.pending = self.pending, collections.Counter()
        try:
            await metadata.add_counters(batch)
        except MetadataUnavailable:
            self.pending.update(batch)  # kept for the next try

    def observe_upstream(self, upstream: str, method: str, status: int, seconds: float) -> None:
        self.upstream_requests.labels(upstream, method, str(status)).inc()
        self.upstream_seconds.labels(upstream).observe(seconds)

    def observe_fallback(self, upstream: str, fallback: str, outcome: str) -> None:
        self.upstream_fallbacks.labels(upstream, fallback, outcome).inc()

    def render(self) -> tuple[bytes, str]:
        directory = os.environ.get(MULTIPROCESS_ENV)
        if directory and self._state is not None:
            # Under `serve --workers`: the event counts of every worker, from their shared
            # files, and this worker's view of the state.
            combined = CollectorRegistry()
            MultiProcessCollector(combined, path=directory)  # type: ignore[no-untyped-call]
            combined.register(self._state)
            return generate_latest(combined), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


_Metric = TypeVar("_Metric", Counter, Histogram)


def _child(children: dict[tuple[str, ...], _Metric], metric: _Metric, *labels: str) -> _Metric:
    """`metric.labels(*labels)`, remembered in `children`: asked on every request, it
    costs more than the count itself. Label values come from a bounded set."""
    child = children.get(labels)
    if child is None:
        child = children[labels] = metric.labels(*labels)
    return child


METRICS = web.AppKey("metrics", Metrics)


async def handle_metrics(request: web.Request) -> web.Response:
    body, content_type = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": content_type})


async def fleet_stats(metadata: MetadataStore, digests: list[str]) -> dict[str, int]:
    """Replicas alive, and how many of `digests` live holders keep once or several times
    (per blob, so it is not a metric: one label per blob would be unbounded)."""
    alive = await metadata.alive_replicas()
    held: collections.Counter[int] = collections.Counter()
    for digest in digests:
        held[len(await metadata.holders(digest) & alive)] += 1
    return {
        "replicas_alive": len(alive),
        "blobs_held_once": held[1],
        "blobs_held_several_times": sum(n for count, n in held.items() if count > 1),
        "blobs_held_by_none_alive": held[0],
    }


async def _layers(metadata: MetadataStore) -> list[str]:
    return [digest async for digest, record in each_blob(metadata) if record.media_type is None]


async def cache_stats(
    store: BlobStore, metadata: MetadataStore, top: int = 10, *, fleet: bool = False
) -> dict[str, Any]:
    """What `mirror stats` prints: usage, counts, hit ratio, busiest repositories, and in
    fleet mode the fleet."""
    # Kept counts, not listings: as quick with a million blobs as with a thousand. Usage
    # on local disk is the shared ledger's account (a walk only when it has none); a
    # bucket is counted, as replicas with ledgers of their own share it.
    local = store.local_blobs and store.usage_known
    usage = store.usage if local else await store.scan_usage()
    totals = await metadata.totals()
    counts = await metadata.counters()
    hits = sum(
        v
        for k, v in counts.items()
        if k.startswith("requests:") and k.endswith((":hit", ":revalidated", ":stale"))
    )
    answered = sum(v for k, v in counts.items() if k.startswith("requests:"))
    pulls = sorted(
        ((k.removeprefix("pulls:"), v) for k, v in counts.items() if k.startswith("pulls:")),
        key=lambda item: (-item[1], item[0]),
    )
    return {
        "usage_bytes": usage,
        "blobs": totals.blobs,
        "manifests": totals.manifests,
        "pinned": totals.pinned,
        "tags": totals.tags,
        "repositories": totals.repositories,
        "requests": answered,
        "hit_ratio": round(hits / answered, 4) if answered else None,
        "bytes_from_cache": counts.get("bytes:cache", 0),
        "bytes_from_upstream": counts.get("bytes:upstream", 0),
        "bytes_from_peers": counts.get("bytes:peer", 0),
        "top_repositories": [{"repository": name, "pulls": n} for name, n in pulls[:top]],
        # Manifests have no holders: each replica keeps its own.
        **({"fleet": await fleet_stats(metadata, await _layers(metadata))} if fleet else {}),
    }
