"""What the caches stand on, as one value: built once by `core.open_core`.

The blob policy, the manifest policy and the listings all need the same collaborators
(storage, the metadata store and the writes that wait out its outages, the upstream
clients, the access rule, whether the mirror is offline); `CacheContext` carries them,
so each policy's constructor takes only what is its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from mirror.cache.provenance import ContentAccess
from mirror.metadata.base import MetadataStore
from mirror.metadata.deferred import DeferredWrites
from mirror.storage.blobstore import BlobStore
from mirror.upstream.client import UpstreamClient


@dataclass(frozen=True, slots=True)
class CacheContext:
    store: BlobStore
    metadata: MetadataStore
    deferred: DeferredWrites
    clients: Mapping[str, UpstreamClient]
    access: ContentAccess
    offline: bool = False
