"""The metadata store: its records and the async interface both backends implement.

The store holds what the blob files cannot say themselves: tag records
(upstream, repository, tag → digest), blob records (size, media type for
manifests, access times, pinning), which repositories are known to hold a
blob, the repositories held locally and when each was last pulled, short-lived
cached upstream responses (tags lists, referrers), leases for single-flight
downloads, and where a running download writes, so other processes on a shared
volume can follow it.

In fleet mode (replicas with their own disks) it is also the fleet's directory: which
replicas are alive (a heartbeat with a lapse time), which hold each committed blob, and
the advertise URL of the replica downloading one (`DownloadRecord.peer_url`).

Backends (`embedded.py` on diskcache, `redis.py` on Redis) pass the same
contract suite in `tests/test_metadata_contract.py`. Records travel as JSON so
every backend stores the same bytes.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, Self


class _JsonRecord:
    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True)  # type: ignore[call-overload]

    @classmethod
    def from_json(cls, text: str | bytes) -> Self:
        data: dict[str, Any] = json.loads(text)
        return cls(**data)


# Digests asked of a store in one query (`last_accesses`): SQLite binds at most 999.
LOOKUP_BATCH = 500


@dataclass(frozen=True, slots=True)
class TagRecord(_JsonRecord):
    """What a tag pointed at when the upstream last confirmed it."""

    digest: str
    media_type: str
    checked_at: float


@dataclass(frozen=True, slots=True)
class BlobRecord(_JsonRecord):
    """A committed blob; `media_type` is set when the blob is a manifest."""

    size: int
    created_at: float
    last_access: float
    media_type: str | None = None
    pinned: bool = False


@dataclass(frozen=True, slots=True)
class CachedResponse(_JsonRecord):
    """An upstream JSON answer (tags list, referrers) kept for a short TTL and for outages."""

    status: int
    body: str
    content_type: str
    stored_at: float
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class DownloadRecord(_JsonRecord):
    """A blob download in progress: who holds it and its temp file, for followers."""

    owner: str
    temp_name: str
    size: int | None
    # The downloading replica's peer endpoint, in fleet mode: followers without a shared
    # volume stream the download from there.
    peer_url: str | None = None


@dataclass(frozen=True, slots=True)
class StoreTotals:
    """Counts a store keeps as its records change, so reading them costs the same at
    a thousand blobs as at a million (`mirror stats`)."""

    blobs: int
    blob_bytes: int  # the sizes the blob records give (the disk's account is the ledger)
    manifests: int
    pinned: int
    tags: int
    repositories: int


@dataclass(frozen=True, slots=True)
class RepositoryFigures:
    """What the console lists beside a repository's name."""

    tags: int
    last_pulled: float | None  # when a client last pulled one of its manifests


# Where eviction stopped: (last_access, digest) of the last record it was given.
LruPosition = tuple[float, str]


class MetadataStore(Protocol):
    """What the cache needs from a metadata backend. Every method may raise
    `MetadataUnavailable` when the backend cannot be reached."""

    async def get_tag(self, upstream: str, repository: str, tag: str) -> TagRecord | None: ...

    async def put_tag(
        self, upstream: str, repository: str, tag: str, record: TagRecord
    ) -> None: ...

    async def list_tags(self, upstream: str, repository: str) -> list[str]: ...

    async def tag_records(self) -> list[tuple[str, str, str, TagRecord]]:
        """Every (upstream, repository, tag, record)."""

    async def delete_tag(self, upstream: str, repository: str, tag: str) -> None: ...

    async def add_counters(self, counts: Mapping[str, int]) -> None: ...

    async def counters(self) -> dict[str, int]: ...

    async def get_blob(self, digest: str) -> BlobRecord | None: ...

    async def get_blobs(self, digests: Sequence[str]) -> dict[str, BlobRecord]:
        """The records of those of `digests` that have one, in one round trip (a page
        of the console reads an image's every layer)."""

    async def put_blob(self, digest: str, record: BlobRecord) -> None: ...

    async def delete_blob(self, digest: str) -> None: ...

    async def list_blobs(self) -> list[tuple[str, BlobRecord]]:
        """Every blob record, least recently used first (eviction's order)."""

    async def touch_blobs(self, accessed: Mapping[str, float]) -> None:
        """Move each blob's `last_access` forward to the given time (never back)."""

    async def add_blob_repository(self, digest: str, upstream: str, repository: str) -> None: ...

    async def blob_repositories(self, digest: str) -> list[tuple[str, str]]: ...

    async def add_repository(self, upstream: str, repository: str) -> None: ...

    async def list_repositories(self) -> list[tuple[str, str]]: ...

    async def touch_repositories(self, pulled: Mapping[tuple[str, str], float]) -> None:
        """Move each (upstream, repository)'s last pull forward to the given time (never
        back)."""

    async def repository_figures(
        self, repositories: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], RepositoryFigures]:
        """The tag count and last pull of each of `repositories` (every one asked has an
        entry), in one round trip: a page of the console's list, at any store size."""

    async def get_response(self, key: str) -> CachedResponse | None: ...

    async def put_response(self, key: str, response: CachedResponse) -> None: ...

    async def acquire_lease(self, name: str, owner: str, ttl: float) -> bool:
        """Take the lease if nobody holds it (or the holder let it lapse)."""

    async def renew_lease(self, name: str, owner: str, ttl: float) -> bool:
        """Extend a lease we hold; False if it lapsed and someone else took it."""

    async def release_lease(self, name: str, owner: str) -> None: ...

    async def lease_holder(self, name: str) -> str | None: ...

    async def put_download(self, digest: str, record: DownloadRecord, ttl: float) -> None: ...

    async def get_download(self, digest: str) -> DownloadRecord | None: ...

    async def delete_download(self, digest: str) -> None: ...

    async def heartbeat(self, replica_url: str, ttl: float) -> None:
        """Say the replica at `replica_url` is alive for the next `ttl` seconds."""

    async def leave(self, replica_url: str) -> None:
        """The replica stops: no longer alive, and no longer a holder of anything."""

    async def alive_replicas(self) -> set[str]:
        """The replicas whose last heartbeat has not lapsed."""

    async def add_holder(self, digest: str, replica_url: str) -> None: ...

    async def remove_holder(self, digest: str, replica_url: str) -> None: ...

    async def holders(self, digest: str) -> set[str]:
        """The replicas recorded as holding the committed blob, alive or not."""

    async def put_token(self, key: str, token: str, ttl: float) -> None:
        """Keep an upstream token for `ttl` seconds, for every process sharing the store."""

    async def get_token(self, key: str) -> tuple[str, float] | None:
        """A kept token and the seconds it has left, or None."""

    async def ping(self) -> None: ...

    async def close(self) -> None: ...

    # The console's jobs (console/jobs.py): their state, readable by every process.

    async def put_job(self, job_id: str, state: str, ttl: float) -> None:
        """Keep a job's state (JSON text) for `ttl` seconds, replacing what was kept."""

    async def get_job(self, job_id: str) -> str | None: ...

    async def list_jobs(self) -> list[str]:
        """The states of every job still kept (in no particular order)."""

    # Flat at scale: answers that do not list every record (eviction, `mirror stats`).
    # Each store keeps an index in least-recently-used order and running totals with its
    # records, in the same transaction; a store written before they existed answers
    # from full listings until `rebuild_indexes` has run (in the background at start).

    async def oldest_blobs(
        self, limit: int, after: LruPosition | None = None
    ) -> list[tuple[str, BlobRecord]]:
        """Up to `limit` blob records in eviction order (`list_blobs`' order: by
        last_access, then digest), those after the position `after` only."""

    async def totals(self) -> StoreTotals:
        """Blob, manifest, pinned, tag and repository counts and the blobs' bytes."""

    async def last_accesses(self, digests: Sequence[str]) -> dict[str, float]:
        """When each of `digests` that has a blob record was last read, from the LRU
        index (no record is parsed)."""

    async def rebuild_indexes(self) -> bool:
        """Build the LRU index, the totals and the repositories' last pulls from the
        records if the store lacks them (written by an older version); True if it had
        to. Safe while others write."""


async def each_blob(
    metadata: MetadataStore, page: int = 500
) -> AsyncIterator[tuple[str, BlobRecord]]:
    """Every blob record in LRU order, read a page at a time from the index: a walk of a
    million records that never holds the event loop for more than one page. A record
    touched during the walk may come twice (it moved later), and one touched just as its
    page was read may move the next page's start past a few others: a walk is a sweep
    for reconcile and reports, not an exact census."""
    position: LruPosition | None = None
    while batch := await metadata.oldest_blobs(page, after=position):
        for item in batch:
            yield item
        digest, record = batch[-1]
        position = (record.last_access, digest)


def after_position(
    records: list[tuple[str, BlobRecord]], limit: int, after: LruPosition | None
) -> list[tuple[str, BlobRecord]]:
    """`oldest_blobs` from a full listing in LRU order: a store whose index is not built
    yet answers this way (slow, but right)."""
    if after is not None:
        records = [item for item in records if (item[1].last_access, item[0]) > after]
    return records[:limit]


async def pulls_from_tags(
    metadata: MetadataStore,
    repositories: Sequence[tuple[str, str]],
    kept: Mapping[tuple[str, str], float],
) -> dict[tuple[str, str], float]:
    """`kept` last pulls, and for the repositories it lacks, as a store from before the
    pulls were kept can tell it (until `rebuild_indexes` has seeded them): the latest
    access of a manifest one of its tags names. A round trip per tag, so for a page of
    repositories only."""
    tagged: list[tuple[tuple[str, str], str]] = []
    for upstream, repository in repositories:
        if (upstream, repository) in kept:  # pulled since: later than any from the tags
            continue
        for tag in await metadata.list_tags(upstream, repository):
            record = await metadata.get_tag(upstream, repository, tag)
            if record is not None:
                tagged.append(((upstream, repository), record.digest))
    return {**await _latest_pulls(metadata, tagged), **kept}


async def seed_pulls(metadata: MetadataStore) -> None:
    """Every repository's last pull, for a store from before they were kept (its
    `rebuild_indexes`): as `pulls_from_tags` tells it, from one listing of every tag. A
    pull meanwhile stays, as touches never move a pull back."""
    tagged = [((up, repo), record.digest) for up, repo, _, record in await metadata.tag_records()]
    await metadata.touch_repositories(await _latest_pulls(metadata, tagged))


async def _latest_pulls(
    metadata: MetadataStore, tagged: Sequence[tuple[tuple[str, str], str]]
) -> dict[tuple[str, str], float]:
    """Per repository, the latest access of the manifests its tags name."""
    accessed = await metadata.last_accesses(sorted({digest for _, digest in tagged}))
    latest: dict[tuple[str, str], float] = {}
    for repository, digest in tagged:
        when = accessed.get(digest)
        if when is not None and when > latest.get(repository, -math.inf):
            latest[repository] = when
    return latest


def totals_of(blobs: list[tuple[str, BlobRecord]], tags: int, repositories: int) -> StoreTotals:
    """`totals` counted from full listings, for a store whose totals are not built yet."""
    return StoreTotals(
        blobs=len(blobs),
        blob_bytes=sum(record.size for _, record in blobs),
        manifests=sum(1 for _, record in blobs if record.media_type),
        pinned=sum(1 for _, record in blobs if record.pinned),
        tags=tags,
        repositories=repositories,
    )
