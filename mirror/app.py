"""The composition root: `create_app(config)` builds the whole mirror.

Shared resources (the upstream session, the metadata store, the caches) are
created when the app starts and closed when it stops, in one `cleanup_ctx`;
they live behind typed `AppKey`s. Nothing happens at import time.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import structlog
from aiohttp import web

from mirror.api.errors import oci_errors
from mirror.api.v2 import SERVICES, Services, handle_v2, on_prepare, request_context
from mirror.cache.blobs import BlobCache
from mirror.cache.listings import Listings
from mirror.cache.manifests import ManifestCache
from mirror.concurrency import TaskOwner
from mirror.config import MirrorConfig
from mirror.eviction import Evictor, SizeLimit
from mirror.metadata.base import MetadataStore, MetadataUnavailable
from mirror.metadata.embedded import EmbeddedMetadataStore
from mirror.metrics import METRICS, Metrics, StateSources, handle_metrics
from mirror.policy import UpstreamPolicy
from mirror.routing import Router, UpstreamNames
from mirror.storage.blobstore import BlobStore
from mirror.upstream.client import UpstreamClient, UpstreamSettings
from mirror.upstream.tokens import TokenCache

log = structlog.get_logger(__name__)

READY_TIMEOUT = 2.0
COUNTER_FLUSH_EVERY = 5.0

CONFIG = web.AppKey("config", MirrorConfig)
METADATA = web.AppKey("metadata", MetadataStore)
STORE = web.AppKey("store", BlobStore)
EVICTOR = web.AppKey("evictor", Evictor)


@dataclass(frozen=True, slots=True)
class TempSweep:
    """How much of tmp/ to sweep at start: files idle this many seconds; None: nothing."""

    older_than: float | None


SWEEP_TEMP = web.AppKey("sweep_temp", TempSweep)
# Shared storage (several processes or nodes on one volume): leave others' downloads be.
STALE_TEMP_AGE = 15 * 60.0


def build_router(config: MirrorConfig) -> Router:
    default = config.default_upstream
    if default is None and len(config.upstreams) == 1:
        default = next(iter(config.upstreams))
    return Router(
        (
            UpstreamNames(
                name, upstream.aliases, upstream.is_docker_hub, UpstreamPolicy.from_config(upstream)
            )
            for name, upstream in config.upstreams.items()
        ),
        default,
    )


def open_metadata(config: MirrorConfig, store: BlobStore) -> MetadataStore:
    if config.metadata.backend == "redis":
        from mirror.metadata.redis import RedisMetadataStore

        assert config.metadata.redis_url is not None
        return RedisMetadataStore(config.metadata.redis_url, config.metadata.key_prefix)
    return EmbeddedMetadataStore(store.meta_dir)


async def _resources(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    store = BlobStore(config.storage.root)
    swept = await asyncio.to_thread(store.prepare, app[SWEEP_TEMP].older_than)
    metadata = open_metadata(config, store)
    if app[SWEEP_TEMP].older_than == 0 and isinstance(metadata, EmbeddedMetadataStore):
        # Alone on this store (tmp/ was swept whole): leases of a crashed predecessor
        # would only make us wait out their TTL.
        await metadata.forget_downloads()
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=256, limit_per_host=64, ttl_dns_cache=300),
        auto_decompress=False,
        trust_env=False,
    )
    tokens = (
        TokenCache.for_redis(config.metadata.redis_url, config.metadata.key_prefix)
        if config.metadata.backend == "redis" and config.metadata.redis_url
        else TokenCache()
    )
    clients = {
        name: UpstreamClient(
            UpstreamSettings(
                name=name,
                url=upstream.url,
                credentials=upstream.credentials,
                connect_timeout=upstream.connect_timeout,
                read_timeout=upstream.read_timeout,
            ),
            session,
            tokens,
            observe=app[METRICS].observe_upstream,
        )
        for name, upstream in config.upstreams.items()
    }
    policies = {name: UpstreamPolicy.from_config(u) for name, u in config.upstreams.items()}
    credentialed = frozenset(
        name for name, upstream in config.upstreams.items() if upstream.username
    )
    blobs = BlobCache(store, metadata, clients, credentialed, config.metadata.lease_ttl)
    manifests = ManifestCache(
        store,
        metadata,
        clients,
        policies,
    )
    router = build_router(config)
    listings = Listings(
        metadata,
        clients,
        {name: u.tags_list_ttl for name, u in config.upstreams.items()},
        config.default_upstream,
    )
    app[SERVICES] = Services(router, blobs, manifests, listings, clients)
    app[METADATA] = metadata
    app[STORE] = store
    await blobs.start()
    storage = config.storage
    limit = (
        SizeLimit(int(storage.max_size), storage.high_watermark, storage.low_watermark)
        if storage.max_size is not None
        else None
    )
    evictor = Evictor(store, metadata, limit, blobs.in_use, blobs.flush_access)
    app[EVICTOR] = evictor
    app[METRICS].watch(
        StateSources(
            downloads_in_flight=lambda: blobs.downloads_in_flight,
            cache_bytes=lambda: store.usage,
            cache_limit=lambda: limit.max_size if limit else None,
            evictions=lambda: (evictor.evicted_blobs, evictor.evicted_bytes),
            stale_answers=lambda: manifests.stale_answers,
            rate_limits=lambda: {name: client.rate_limit for name, client in clients.items()},
        )
    )
    background = TaskOwner("lifecycle")
    background.spawn(evictor.run(storage.eviction_interval), name="evictor")
    background.spawn(_flush_counters(app[METRICS], metadata), name="counters")
    log.info(
        "mirror_started",
        storage=str(store.root),
        metadata=config.metadata.backend,
        upstreams=sorted(config.upstreams),
        temp_files_swept=swept,
    )
    try:
        yield
    finally:
        await background.close()
        await blobs.close()
        await manifests.close()
        await session.close()
        await tokens.close()
        await metadata.close()


async def _flush_counters(metrics: Metrics, metadata: MetadataStore) -> None:
    try:
        while True:
            await asyncio.sleep(COUNTER_FLUSH_EVERY)
            await metrics.flush(metadata)
    finally:
        await metrics.flush(metadata)  # what the last seconds counted, at shut-down


def default_sweep(config: MirrorConfig) -> TempSweep:
    """Sweep all of tmp/ when this process is alone on its storage, else only stale files."""
    return TempSweep(STALE_TEMP_AGE if config.metadata.backend == "redis" else 0.0)


def create_app(config: MirrorConfig, *, sweep: TempSweep | None = None) -> web.Application:
    app = web.Application(middlewares=[request_context, oci_errors], client_max_size=1024)
    app[CONFIG] = config
    app[SWEEP_TEMP] = sweep or default_sweep(config)
    app[METRICS] = Metrics()
    app.cleanup_ctx.append(_resources)
    app.on_response_prepare.append(on_prepare)
    app.router.add_route("*", "/v2", handle_v2)
    app.router.add_route("*", "/v2/{tail:.*}", handle_v2)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", handle_metrics)
    return app


async def _healthz(request: web.Request) -> web.Response:
    """Alive: the process answers. Nothing else is checked, so a Redis outage never
    makes an orchestrator restart a mirror that still serves its cache."""
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    """Ready: storage is writable and the metadata store answers."""
    checks: dict[str, str] = {}
    try:
        await asyncio.to_thread(request.app[STORE].check_writable)
        checks["storage"] = "ok"
    except OSError as exc:
        checks["storage"] = f"not writable: {exc.strerror}"
    try:
        await asyncio.wait_for(request.app[METADATA].ping(), timeout=READY_TIMEOUT)
        checks["metadata"] = "ok"
    except (MetadataUnavailable, TimeoutError):
        checks["metadata"] = "unreachable"
    ready = all(value == "ok" for value in checks.values())
    return web.json_response(
        {"status": "ready" if ready else "not ready", "checks": checks},
        status=200 if ready else 503,
    )
