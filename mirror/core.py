"""The mirror without its HTTP server: storage, metadata, upstream clients and caches.

`open_core(config)` builds them and closes them again. The server (`app.py`) and the
commands that work on the cache directly (`seed`, `export`, `import`) all stand on it,
so a seeded blob goes through exactly the path a pulled one does.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import structlog

from mirror.cache.blobs import BlobCache
from mirror.cache.context import CacheContext
from mirror.cache.listings import Listings
from mirror.cache.manifests import ManifestCache
from mirror.cache.peers import Fleet
from mirror.cache.provenance import ContentAccess
from mirror.config import (
    EcrCredentialsConfig,
    GcpCredentialsConfig,
    HelperCredentialsConfig,
    MirrorConfig,
    UpstreamConfig,
)
from mirror.errors import MetadataUnavailable, ObjectStoreUnavailable
from mirror.metadata.base import MetadataStore
from mirror.metadata.deferred import DeferredWrites
from mirror.metadata.embedded import EmbeddedMetadataStore
from mirror.policy import UpstreamPolicy
from mirror.routing import Router, UpstreamNames
from mirror.storage.blobstore import BlobStore, FilesystemBlobStore, Quota
from mirror.upstream.client import UpstreamClient, UpstreamSettings
from mirror.upstream.credentials import (
    CredentialSource,
    EcrCredentials,
    GcpCredentials,
    HelperCredentials,
    StaticCredentials,
    helper_server,
)
from mirror.upstream.failover import FailoverClient, ObserveFallback
from mirror.upstream.guard import NetworkOverrides, UpstreamNetwork
from mirror.upstream.tokens import TokenCache

log = structlog.get_logger(__name__)

# Shared storage (several processes or nodes on one volume): leave others' downloads be.
STALE_TEMP_AGE = 15 * 60.0


@dataclass(frozen=True, slots=True)
class TempSweep:
    """How much of tmp/ to sweep at start: files idle this many seconds; None: nothing."""

    older_than: float | None


def default_sweep(config: MirrorConfig) -> TempSweep:
    """Sweep all of tmp/ when this process is alone on its storage, else only stale files."""
    return TempSweep(STALE_TEMP_AGE if config.metadata.backend == "redis" else 0.0)


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


def storage_quota(config: MirrorConfig) -> Quota:
    storage = config.storage
    return Quota(
        max_size=None if storage.max_size is None else int(storage.max_size),
        high_watermark=storage.high_watermark,
        low_watermark=storage.low_watermark,
        min_free=storage.min_free_bytes,
        min_free_ratio=storage.min_free_ratio,
    )


def make_blob_store(config: MirrorConfig, quota: Quota | None = None) -> BlobStore:
    """The blob store `storage.backend` names, rooted at `storage.root` (call `start`)."""
    if config.storage.backend == "s3":
        from mirror.storage.s3store import S3BlobStore

        assert config.storage.s3 is not None  # the config requires it with backend s3
        return S3BlobStore(config.storage.root, config.storage.s3, quota)
    return FilesystemBlobStore(config.storage.root, quota)


def open_metadata(config: MirrorConfig, store: BlobStore) -> MetadataStore:
    if config.metadata.backend == "redis":
        from mirror.metadata.redis import RedisMetadataStore

        assert config.metadata.redis_url is not None
        return RedisMetadataStore(config.metadata.redis_url, config.metadata.key_prefix)
    return EmbeddedMetadataStore(store.meta_dir)


@dataclass(frozen=True, slots=True)
class MirrorCore:
    config: MirrorConfig
    store: BlobStore
    metadata: MetadataStore
    deferred: DeferredWrites
    clients: dict[str, UpstreamClient]
    router: Router
    blobs: BlobCache
    manifests: ManifestCache
    listings: Listings
    swept: int
    fleet: Fleet | None = None  # fleet mode: this replica's membership


def credential_source(name: str, upstream: UpstreamConfig) -> CredentialSource:
    """The source `upstreams.<name>` names: static username/password unless
    `credentials` says a helper, ECR or Google."""
    chosen = upstream.credentials
    if isinstance(chosen, HelperCredentialsConfig):
        return HelperCredentials(
            name, chosen.helper, helper_server(upstream.url), chosen.lifetime, chosen.timeout
        )
    if isinstance(chosen, EcrCredentialsConfig):
        ecr = chosen.ecr
        return EcrCredentials(
            name, ecr.region, ecr.registry_id, ecr.endpoint, upstream.connect_timeout
        )
    if isinstance(chosen, GcpCredentialsConfig):
        return GcpCredentials(name, chosen.gcp.scopes)
    return StaticCredentials(upstream.static_credentials)


@contextlib.asynccontextmanager
async def open_core(
    config: MirrorConfig,
    *,
    sweep: TempSweep | None = None,
    observe: Callable[[str, str, int, float], None] | None = None,
    network: NetworkOverrides | None = None,
    observe_fallback: ObserveFallback | None = None,
) -> AsyncIterator[MirrorCore]:
    sweep = sweep or default_sweep(config)
    store = make_blob_store(config, storage_quota(config))
    swept = await asyncio.to_thread(store.prepare, sweep.older_than)
    await store.start()
    try:
        swept += await store.sweep_uploads(sweep.older_than)
    except ObjectStoreUnavailable as exc:
        log.warning("upload_sweep_skipped", error=exc.message)
    metadata = open_metadata(config, store)
    if sweep.older_than == 0 and isinstance(metadata, EmbeddedMetadataStore):
        # Alone on this store (tmp/ was swept whole): leases of a crashed predecessor
        # would only make us wait out their TTL.
        await metadata.forget_downloads()
    # One session per upstream: its resolver enforces where that upstream may send us.
    networks = {
        name: UpstreamNetwork(name, upstream.url, network)
        for name, upstream in config.upstreams.items()
    }
    # Shared through the store: a fleet on one Redis (or workers on one host) asks each
    # token server once.
    tokens = TokenCache(metadata)
    # A fallback is a configured upstream too: its own session and guard, no credentials.
    fallback_networks = {
        (name, fallback.label): UpstreamNetwork(name, fallback.url, network)
        for name, upstream in config.upstreams.items()
        for fallback in upstream.fallbacks
    }
    clients: dict[str, UpstreamClient] = {
        name: FailoverClient(
            UpstreamSettings(
                name=name,
                url=upstream.url,
                credentials=credential_source(name, upstream),
                connect_timeout=upstream.connect_timeout,
                read_timeout=upstream.read_timeout,
                offline=config.offline,
                repository_prefix=upstream.repository_prefix,
            ),
            networks[name],
            tokens,
            {
                fallback.label: UpstreamClient(
                    UpstreamSettings(
                        name=f"{name} fallback {fallback.label}",
                        url=fallback.url,
                        # Asked anonymously: the upstream's credentials are not theirs.
                        credentials=StaticCredentials(lambda: None),
                        connect_timeout=upstream.connect_timeout,
                        read_timeout=upstream.read_timeout,
                        offline=config.offline,
                        repository_prefix=fallback.repository_prefix,
                    ),
                    fallback_networks[name, fallback.label],
                    tokens,
                    observe=observe,
                )
                for fallback in upstream.fallbacks
            },
            observe=observe,
            observe_fallback=observe_fallback,
        )
        for name, upstream in config.upstreams.items()
    }
    policies = {name: UpstreamPolicy.from_config(u) for name, u in config.upstreams.items()}
    credentialed = frozenset(
        name for name, upstream in config.upstreams.items() if upstream.has_credentials
    )
    deferred = DeferredWrites(metadata)
    access = ContentAccess(metadata, deferred, clients, credentialed)
    context = CacheContext(store, metadata, deferred, clients, access, offline=config.offline)
    fleet = None
    if config.fleet:
        assert config.cluster.peer_url is not None
        fleet = Fleet(
            metadata,
            config.cluster.peer_url,
            config.cluster.secret_value,
            config.cluster.peer_timeout,
        )
    blobs = BlobCache(context, config.metadata.lease_ttl, fleet)
    manifests = ManifestCache(context, policies, memory_bytes=config.storage.memory_manifests)
    listings = Listings(
        context,
        {name: u.tags_list_ttl for name, u in config.upstreams.items()},
        config.default_upstream,
    )
    await blobs.start()
    try:
        yield MirrorCore(
            config,
            store,
            metadata,
            deferred,
            clients,
            build_router(config),
            blobs,
            manifests,
            listings,
            swept,
            fleet,
        )
    finally:
        await blobs.close()
        await manifests.close()
        if deferred.pending:
            # Last chance for records that waited out an outage (a seed run, say).
            with contextlib.suppress(MetadataUnavailable):
                await deferred.replay()
        for client in clients.values():
            await client.settings.credentials.close()
        for upstream_network in [*networks.values(), *fallback_networks.values()]:
            await upstream_network.close()
        await tokens.close()
        await metadata.close()
        await store.close()
