"""The composition root: `create_app(config)` builds the whole mirror.

Shared resources (the upstream session, the metadata store, the caches) are
created when the app starts and closed when it stops, in one `cleanup_ctx`;
they live behind typed `AppKey`s. Nothing happens at import time.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Mapping

import structlog
from aiohttp import web

from mirror.access import AccessControl
from mirror.api import peer, v2
from mirror.api.errors import expect_handler, oci_errors
from mirror.api.middleware import authenticate, on_prepare, request_context
from mirror.api.services import SERVICES, Services
from mirror.api.transport import remember_prepared
from mirror.concurrency import TaskOwner
from mirror.config import MirrorConfig, TlsConfig
from mirror.core import MirrorCore, TempSweep, default_sweep, open_core
from mirror.errors import MetadataUnavailable, NameUnknown, ObjectStoreUnavailable
from mirror.eviction import Evictor
from mirror.memory import MemoryRelease
from mirror.metadata.base import MetadataStore
from mirror.metadata.deferred import DeferredWrites
from mirror.metrics import METRICS, Metrics, StateSources, handle_metrics
from mirror.storage.blobstore import BlobStore
from mirror.upstream.client import UpstreamClient
from mirror.upstream.guard import NetworkOverrides

log = structlog.get_logger(__name__)

READY_TIMEOUT = 2.0
COUNTER_FLUSH_EVERY = 5.0

CONFIG = web.AppKey("config", MirrorConfig)
METADATA = web.AppKey("metadata", MetadataStore)
STORE = web.AppKey("store", BlobStore)
EVICTOR = web.AppKey("evictor", Evictor)
DEFERRED = web.AppKey("deferred", DeferredWrites)
# The upstream clients, each with the rate limit its upstream last announced.
UPSTREAMS = web.AppKey[Mapping[str, UpstreamClient]]("upstreams")


SWEEP_TEMP = web.AppKey("sweep_temp", TempSweep)
NETWORK = web.AppKey("network", NetworkOverrides)
# The whole core, for what works on the cache as `mirror seed` does (the console's jobs).
CORE = web.AppKey("core", MirrorCore)


async def _resources(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    async with open_core(
        config,
        sweep=app[SWEEP_TEMP],
        observe=app[METRICS].observe_upstream,
        observe_fallback=app[METRICS].observe_fallback,
        network=app.get(NETWORK),
    ) as core:
        blobs, manifests, store, metadata = core.blobs, core.manifests, core.store, core.metadata
        app[SERVICES] = Services(
            core.router, blobs, manifests, core.listings, AccessControl(config.auth)
        )
        app[UPSTREAMS] = core.clients
        app[METADATA] = metadata
        app[STORE] = store
        storage = config.storage
        fleet = core.fleet
        evictor = Evictor(
            store,
            metadata,
            blobs.in_use,
            blobs.flush_access,
            on_removed=None if fleet is None else fleet.removed,
        )
        blobs.reserve_space = evictor.reserve  # downloads make room before their first byte
        app[EVICTOR] = evictor
        app[METRICS].watch(
            StateSources(
                downloads_in_flight=lambda: blobs.downloads_in_flight,
                cache_bytes=lambda: store.usage,
                cache_limit=lambda: store.quota.max_size,
                evictions=lambda: (evictor.evicted_blobs, evictor.evicted_bytes),
                not_cached=lambda: evictor.refused_blobs,
                stale_answers=lambda: manifests.stale_answers,
                rate_limits=lambda: {n: c.rate_limit for n, c in core.clients.items()},
                metadata_writes_pending=lambda: core.deferred.pending,
                uncoordinated_fetches=lambda: blobs.uncoordinated_fetches,
                peer_fills=lambda: {} if fleet is None else fleet.fills,
                credential_errors=lambda: {
                    n: c.settings.credentials.state.errors for n, c in core.clients.items()
                },
            )
        )
        app[DEFERRED] = core.deferred
        app[CORE] = core
        background = TaskOwner("lifecycle")
        background.spawn(evictor.run(storage.eviction_interval), name="evictor")
        # Once the store is back: what waited, then files the records do not know yet.
        background.spawn(core.deferred.run(evictor.reconcile), name="deferred-writes")
        background.spawn(_flush_counters(app[METRICS], metadata), name="counters")
        background.spawn(MemoryRelease().run(), name="memory_release")
        log.info(
            "mirror_started",
            storage=str(store.root),
            metadata=config.metadata.backend,
            upstreams=sorted(config.upstreams),
            offline=config.offline,
            temp_files_swept=core.swept,
        )
        try:
            yield
        finally:
            await background.close()


async def _flush_counters(metrics: Metrics, metadata: MetadataStore) -> None:
    try:
        while True:
            await asyncio.sleep(COUNTER_FLUSH_EVERY)
            await metrics.flush(metadata)
    finally:
        await metrics.flush(metadata)  # what the last seconds counted, at shut-down


def create_app(
    config: MirrorConfig,
    *,
    sweep: TempSweep | None = None,
    network: NetworkOverrides | None = None,
) -> web.Application:
    """The whole mirror as an aiohttp app, built from `config` and nothing else.

    Middlewares (request context and access line, OCI error JSON, client
    authentication), the routes (`/v2/`, `/healthz`, `/readyz`, `/metrics`, and every
    other GET answered in OCI form), and the shared resources: the core (storage,
    metadata, upstream clients, caches) and the background tasks (eviction, deferred
    metadata writes, counter flushes, memory release) are opened when the app starts
    and closed when it stops, in one `cleanup_ctx`. `sweep` says which temp files
    start-up removes (default: by the metadata backend, `default_sweep`); `network` is
    the test seam of `upstream/guard.py`.
    """
    app = web.Application(
        middlewares=[request_context, oci_errors, authenticate], client_max_size=1024
    )
    app[CONFIG] = config
    app[SWEEP_TEMP] = sweep or default_sweep(config)
    if network is not None:
        app[NETWORK] = network
    app[METRICS] = Metrics()
    app.cleanup_ctx.append(_resources)
    app.on_response_prepare.append(on_prepare)
    app.on_response_prepare.append(remember_prepared)
    routes = app.router
    v2.add_routes(routes)
    routes.add_get("/healthz", _healthz, expect_handler=expect_handler)
    routes.add_get("/readyz", _readyz, expect_handler=expect_handler)
    routes.add_get("/metrics", handle_metrics, expect_handler=expect_handler)
    if config.ui.enabled:
        from mirror.console import setup_console  # the console imports this module

        setup_console(app)
    # Every other path too, so that even its `Expect` is answered in OCI form. GET and
    # HEAD only: another method on a known path stays 405, not 404.
    routes.add_get("/{tail:.*}", _no_such_endpoint, expect_handler=expect_handler)
    return app


def create_peer_app(app: web.Application) -> web.Application:
    """The peer endpoint (`api/peer.py`) of `app`, a started mirror app in fleet mode,
    over the same blob cache. It is a separate app for its own runner on
    `cluster.listen`, so that no path of the public port can reach it."""
    config = app[CONFIG]
    assert config.fleet, "the peer endpoint is served in fleet mode only"
    return peer.create_peer_app(app[SERVICES].blobs, config.cluster.secret_value, app[METRICS])


async def _no_such_endpoint(request: web.Request) -> web.StreamResponse:
    raise NameUnknown("no such endpoint")


def server_ssl_context(tls: TlsConfig) -> ssl.SSLContext | None:
    """HTTPS with `tls.cert` and `tls.key`; mutual TLS when `tls.client_ca` is set."""
    if tls.cert is None or tls.key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(tls.cert, tls.key)
    if tls.client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(tls.client_ca)
    return context


async def _healthz(request: web.Request) -> web.Response:
    """Alive: the process answers. Nothing else is checked, so a Redis outage never
    makes an orchestrator restart a mirror that still serves its cache."""
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    """Ready: storage is writable. The metadata store, an object store and upstream
    credential sources are reported, but their outage leaves the mirror ready
    (degraded): pulls go on without them (or from the cache), and
    taking every replica out of its Service would turn a Redis outage into an outage."""
    checks: dict[str, str] = {}
    degraded: dict[str, object] = {}
    try:
        await asyncio.to_thread(request.app[STORE].check_writable)
        checks["storage"] = "ok"
    except OSError as exc:
        checks["storage"] = f"not writable: {exc.strerror}"
    store = request.app[STORE]
    if not store.local_blobs:
        try:
            await asyncio.wait_for(store.check_backend(), timeout=READY_TIMEOUT)
            checks["object_store"] = "ok"
        except (ObjectStoreUnavailable, TimeoutError):
            # Like the metadata store: pulls go on (fetched and streamed, not cached).
            checks["object_store"] = "unreachable"
            degraded["object_store"] = "pulls are fetched from the upstream and not cached"
    try:
        await asyncio.wait_for(request.app[METADATA].ping(), timeout=READY_TIMEOUT)
        checks["metadata"] = "ok"
    except (MetadataUnavailable, TimeoutError):
        checks["metadata"] = "unreachable"
        degraded["metadata"] = (
            "pulls are fetched without coordination; "
            f"{request.app[DEFERRED].pending} records wait for the store"
        )
    # A credential source that fails leaves what is cached servable: degraded, not down.
    credentials = {
        name: f"credentials failing: {state.last_error}; cached content is still served"
        for name, client in request.app[UPSTREAMS].items()
        if (state := client.settings.credentials.state).failing
    }
    if credentials:
        degraded["credentials"] = credentials
    ready = checks["storage"] == "ok"
    body: dict[str, object] = {"status": "ready" if ready else "not ready", "checks": checks}
    if degraded:
        body["degraded"] = degraded
    return web.json_response(body, status=200 if ready else 503)
