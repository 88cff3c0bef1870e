"""The embedded metadata backend: diskcache (SQLite) in `<root>/meta`, zero set-up.

diskcache is synchronous and process-safe: each call runs in a worker thread,
and multi-step updates run inside `Cache.transact()` so several processes on
one host can share the store. Leases use `Cache.add`, which is atomic and
honours expiry, the equivalent of Redis `SET NX PX`; leases and download records carry
the diskcache tag `transient`, so a lone process drops them all at start through the tag
index instead of walking every key.

Eviction order and `mirror stats` totals come from two small tables this module keeps in
diskcache's own SQLite database, written through its connection inside the same
`transact()` as the records, so a crash leaves records, index and totals agreeing:
`MirrorLru` (one row per blob: last access, size, manifest, pinned; indexed by
last access), `MirrorTotals` (counts and bytes, kept by triggers on `MirrorLru`; the
tag count; the flags below) and `MirrorPulls` (each repository's last pull, for the
console's list). SQLite rather than a second diskcache or a side file: an ordered range
query with an index, and atomicity with the records, come for free. A store written
before these tables existed lacks their flags (`indexed`, `pulls`): it answers from full
listings (the pulls: from its tags) until `rebuild_indexes` (run in the background at
start) has filled them.
"""

from __future__ import annotations

import asyncio
import functools
import json
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import diskcache

from mirror.errors import MetadataUnavailable
from mirror.metadata.base import (
    LOOKUP_BATCH,
    BlobRecord,
    CachedResponse,
    DownloadRecord,
    LruPosition,
    RepositoryFigures,
    StoreTotals,
    TagRecord,
    after_position,
    pulls_from_tags,
    seed_pulls,
    totals_of,
)

T = TypeVar("T")

# Leases and download records: dropped together by `forget_downloads`.
TRANSIENT = "transient"
REBUILD_BATCH = 1_000
KEY_PAGE = 1_000  # keys read at a time by a walk of one kind of record
_TOTALS = ("blobs", "blob_bytes", "manifests", "pinned", "tags")
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS MirrorLru (digest TEXT PRIMARY KEY,"
    " last_access REAL NOT NULL, size INTEGER NOT NULL, manifest INTEGER NOT NULL,"
    " pinned INTEGER NOT NULL) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS MirrorLru_order ON MirrorLru (last_access, digest)",
    "CREATE TABLE IF NOT EXISTS MirrorTotals (name TEXT PRIMARY KEY,"
    " value INTEGER NOT NULL) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS MirrorPulls (repository TEXT PRIMARY KEY,"
    " last_pulled REAL NOT NULL) WITHOUT ROWID",
    # The running totals follow every change of a row, in its transaction.
    "CREATE TRIGGER IF NOT EXISTS MirrorLru_insert AFTER INSERT ON MirrorLru BEGIN"
    " UPDATE MirrorTotals SET value = value + CASE name WHEN 'blobs' THEN 1"
    " WHEN 'blob_bytes' THEN NEW.size WHEN 'manifests' THEN NEW.manifest"
    " WHEN 'pinned' THEN NEW.pinned END"
    " WHERE name IN ('blobs', 'blob_bytes', 'manifests', 'pinned'); END",
    "CREATE TRIGGER IF NOT EXISTS MirrorLru_delete AFTER DELETE ON MirrorLru BEGIN"
    " UPDATE MirrorTotals SET value = value - CASE name WHEN 'blobs' THEN 1"
    " WHEN 'blob_bytes' THEN OLD.size WHEN 'manifests' THEN OLD.manifest"
    " WHEN 'pinned' THEN OLD.pinned END"
    " WHERE name IN ('blobs', 'blob_bytes', 'manifests', 'pinned'); END",
    "CREATE TRIGGER IF NOT EXISTS MirrorLru_update AFTER UPDATE ON MirrorLru BEGIN"
    " UPDATE MirrorTotals SET value = value + CASE name WHEN 'blob_bytes'"
    " THEN NEW.size - OLD.size WHEN 'manifests' THEN NEW.manifest - OLD.manifest"
    " WHEN 'pinned' THEN NEW.pinned - OLD.pinned END"
    " WHERE name IN ('blob_bytes', 'manifests', 'pinned'); END",
)
# Flags in MirrorTotals: the LRU index and totals are built; the last pulls are kept.
INDEXED, PULLS = "indexed", "pulls"
_PULL_UPSERT = (
    "INSERT INTO MirrorPulls VALUES (?, ?) ON CONFLICT (repository) DO UPDATE SET"
    " last_pulled = max(last_pulled, excluded.last_pulled)"
)
_UPSERT = (
    "INSERT INTO MirrorLru VALUES (?, ?, ?, ?, ?) ON CONFLICT (digest) DO UPDATE SET"
    " last_access = excluded.last_access, size = excluded.size,"
    " manifest = excluded.manifest, pinned = excluded.pinned"
)


def _tag_key(upstream: str, repository: str, tag: str) -> str:
    return f"tag:{upstream}/{repository}:{tag}"


def _repo_key(upstream: str, repository: str) -> str:
    return f"{upstream}/{repository}"


class EmbeddedMetadataStore:
    """`MetadataStore` on a diskcache directory."""

    def __init__(self, directory: Path):
        # A generous SQLite timeout: several worker processes may write at once.
        self._cache = diskcache.Cache(
            str(directory), timeout=30, eviction_policy="none", tag_index=True
        )
        self._flags: set[str] = set()  # those seen set: once set, never cleared
        self._create_index_tables()

    def _sql(self, statement: str, *args: Any) -> list[Any]:
        # diskcache's own connection for this thread: inside `transact()` these
        # statements commit (or roll back) with the records written beside them.
        rows: list[Any] = self._cache._sql(statement, args).fetchall()
        return rows

    def _keys_with(self, prefix: str) -> Iterator[str]:
        """Every key that starts with `prefix`, a page at a time along the key index.
        diskcache's `iterkeys` walks every key, and pages with an OR query SQLite does
        not answer from its index: over a million records, a walk took longer than 15
        minutes (bench/scale.py)."""
        end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        after = prefix
        while rows := self._sql(
            "SELECT key FROM Cache WHERE key > ? AND key < ? AND raw = 1 ORDER BY key LIMIT ?",
            after,
            end,
            KEY_PAGE,
        ):
            for (key,) in rows:
                yield key
            after = rows[-1][0]

    def _create_index_tables(self) -> None:
        with self._cache.transact():
            for statement in _SCHEMA:
                self._sql(statement)
            for name in _TOTALS:
                self._sql("INSERT OR IGNORE INTO MirrorTotals VALUES (?, 0)", name)
            if len(self._cache) == 0:  # a new store: nothing to index
                for flag in (INDEXED, PULLS):
                    self._set_flag(flag)

    def _set_flag(self, flag: str) -> None:
        self._sql("INSERT OR IGNORE INTO MirrorTotals VALUES (?, 1)", flag)

    def _has_flag(self, flag: str) -> bool:
        # Once built, always kept: only a store from before the tables needs asking
        # again (another process may have finished the rebuild).
        if flag not in self._flags and self._sql("SELECT 1 FROM MirrorTotals WHERE name = ?", flag):
            self._flags.add(flag)
        return flag in self._flags

    def _is_indexed(self) -> bool:
        return self._has_flag(INDEXED)

    async def _run(self, func: Callable[..., T], *args: Any) -> T:
        try:
            return await asyncio.to_thread(func, *args)
        except (sqlite3.Error, diskcache.Timeout, OSError) as exc:
            raise MetadataUnavailable("metadata store unavailable", detail=str(exc)) from exc

    # Tags

    async def get_tag(self, upstream: str, repository: str, tag: str) -> TagRecord | None:
        raw = await self._run(self._cache.get, _tag_key(upstream, repository, tag))
        return TagRecord.from_json(raw) if raw is not None else None

    async def put_tag(self, upstream: str, repository: str, tag: str, record: TagRecord) -> None:
        await self._run(self._put_tag_sync, upstream, repository, tag, record)

    def _put_tag_sync(self, upstream: str, repository: str, tag: str, record: TagRecord) -> None:
        key = _tag_key(upstream, repository, tag)
        with self._cache.transact():
            if key not in self._cache:
                self._count_tags(1)
            self._cache.set(key, record.to_json())
            self._add_to_set_sync(f"tags:{_repo_key(upstream, repository)}", tag)

    def _count_tags(self, change: int) -> None:
        self._sql("UPDATE MirrorTotals SET value = value + ? WHERE name = 'tags'", change)

    async def list_tags(self, upstream: str, repository: str) -> list[str]:
        raw = await self._run(self._cache.get, f"tags:{_repo_key(upstream, repository)}")
        return sorted(json.loads(raw)) if raw else []

    async def tag_records(self) -> list[tuple[str, str, str, TagRecord]]:
        return await self._run(self._tag_records_sync)

    def _tag_records_sync(self) -> list[tuple[str, str, str, TagRecord]]:
        found = []
        for key in self._keys_with("tag:"):
            raw = self._cache.get(key)
            if raw is None:
                continue
            repo_key, _, tag = key.removeprefix("tag:").rpartition(":")
            upstream, _, repository = repo_key.partition("/")
            found.append((upstream, repository, tag, TagRecord.from_json(raw)))
        return sorted(found, key=lambda item: item[:3])

    async def delete_tag(self, upstream: str, repository: str, tag: str) -> None:
        await self._run(self._delete_tag_sync, upstream, repository, tag)

    def _delete_tag_sync(self, upstream: str, repository: str, tag: str) -> None:
        with self._cache.transact():
            if self._cache.delete(_tag_key(upstream, repository, tag)):
                self._count_tags(-1)
            key = f"tags:{_repo_key(upstream, repository)}"
            raw = self._cache.get(key)
            if raw:
                self._cache.set(key, json.dumps(sorted(set(json.loads(raw)) - {tag})))

    async def add_counters(self, counts: Mapping[str, int]) -> None:
        await self._run(self._add_counters_sync, dict(counts))

    def _add_counters_sync(self, counts: dict[str, int]) -> None:
        with self._cache.transact():
            for name, amount in counts.items():
                self._cache.incr(f"counter:{name}", amount, default=0)
                # The names, so `counters` reads them without walking every key.
                self._add_to_set_sync("counter-names", name)

    async def counters(self) -> dict[str, int]:
        return await self._run(self._counters_sync)

    def _counters_sync(self) -> dict[str, int]:
        if self._is_indexed():
            raw = self._cache.get("counter-names")
            kept = {}
            for name in json.loads(raw) if raw else []:
                value = self._cache.get(f"counter:{name}")
                if value is not None:
                    kept[name] = int(value)
            return kept
        found = {}
        for key in self._keys_with("counter:"):
            value = self._cache.get(key)
            if value is not None:
                found[key.removeprefix("counter:")] = int(value)
        return found

    # Blobs

    async def get_blob(self, digest: str) -> BlobRecord | None:
        raw = await self._run(self._cache.get, f"blob:{digest}")
        return BlobRecord.from_json(raw) if raw is not None else None

    async def get_blobs(self, digests: Sequence[str]) -> dict[str, BlobRecord]:
        return await self._run(self._get_blobs_sync, list(digests))

    def _get_blobs_sync(self, digests: list[str]) -> dict[str, BlobRecord]:
        found = {}
        for digest in digests:
            raw = self._cache.get(f"blob:{digest}")
            if raw is not None:
                found[digest] = BlobRecord.from_json(raw)
        return found

    async def put_blob(self, digest: str, record: BlobRecord) -> None:
        await self._run(self._put_blob_sync, digest, record)

    def _put_blob_sync(self, digest: str, record: BlobRecord) -> None:
        with self._cache.transact():
            self._cache.set(f"blob:{digest}", record.to_json())
            self._index_blob(digest, record)

    def _index_blob(self, digest: str, record: BlobRecord) -> None:
        """The blob's row in MirrorLru (call inside the transaction writing the record)."""
        self._sql(
            _UPSERT,
            digest,
            record.last_access,
            record.size,
            int(record.media_type is not None),
            int(record.pinned),
        )

    async def delete_blob(self, digest: str) -> None:
        await self._run(self._delete_blob_sync, digest)

    def _delete_blob_sync(self, digest: str) -> None:
        with self._cache.transact():
            self._cache.delete(f"blob:{digest}")
            self._cache.delete(f"blobrepos:{digest}")
            self._sql("DELETE FROM MirrorLru WHERE digest = ?", digest)

    async def list_blobs(self) -> list[tuple[str, BlobRecord]]:
        return await self._run(self._list_blobs_sync)

    def _list_blobs_sync(self) -> list[tuple[str, BlobRecord]]:
        found = []
        for key in self._keys_with("blob:"):
            raw = self._cache.get(key)
            if raw is not None:
                found.append((key.removeprefix("blob:"), BlobRecord.from_json(raw)))
        return sorted(found, key=lambda item: (item[1].last_access, item[0]))

    async def touch_blobs(self, accessed: Mapping[str, float]) -> None:
        await self._run(self._touch_sync, dict(accessed))

    def _touch_sync(self, accessed: dict[str, float]) -> None:
        with self._cache.transact():
            for digest, when in accessed.items():
                raw = self._cache.get(f"blob:{digest}")
                if raw is None:
                    continue
                record = BlobRecord.from_json(raw)
                if when > record.last_access:
                    record = replace(record, last_access=when)
                    self._cache.set(f"blob:{digest}", record.to_json())
                    self._index_blob(digest, record)

    async def add_blob_repository(self, digest: str, upstream: str, repository: str) -> None:
        await self._run(
            self._add_to_set_sync, f"blobrepos:{digest}", _repo_key(upstream, repository)
        )

    async def blob_repositories(self, digest: str) -> list[tuple[str, str]]:
        raw = await self._run(self._cache.get, f"blobrepos:{digest}")
        return _split_repo_keys(json.loads(raw) if raw else [])

    # Repositories

    async def add_repository(self, upstream: str, repository: str) -> None:
        await self._run(self._add_to_set_sync, "repositories", _repo_key(upstream, repository))

    async def list_repositories(self) -> list[tuple[str, str]]:
        raw = await self._run(self._cache.get, "repositories")
        return _split_repo_keys(json.loads(raw) if raw else [])

    async def touch_repositories(self, pulled: Mapping[tuple[str, str], float]) -> None:
        if pulled:
            await self._run(self._touch_repositories_sync, dict(pulled))

    def _touch_repositories_sync(self, pulled: dict[tuple[str, str], float]) -> None:
        with self._cache.transact():
            for (upstream, repository), when in pulled.items():
                self._sql(_PULL_UPSERT, _repo_key(upstream, repository), when)

    async def repository_figures(
        self, repositories: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], RepositoryFigures]:
        asked = list(repositories)
        tags, pulled, seeded = await self._run(self._repository_figures_sync, asked)
        if not seeded:
            pulled = await pulls_from_tags(self, asked, pulled)
        return {key: RepositoryFigures(tags[key], pulled.get(key)) for key in asked}

    def _repository_figures_sync(
        self, repositories: list[tuple[str, str]]
    ) -> tuple[dict[tuple[str, str], int], dict[tuple[str, str], float], bool]:
        """Tag counts from each repository's list of tags, last pulls from `MirrorPulls`,
        and whether those were seeded (a store from before them answers from its tags)."""
        tags = {}
        for upstream, repository in repositories:
            raw = self._cache.get(f"tags:{_repo_key(upstream, repository)}")
            tags[upstream, repository] = len(json.loads(raw)) if raw else 0
        names = {_repo_key(*key): key for key in repositories}
        rows = self._rows_in(
            "SELECT repository, last_pulled FROM MirrorPulls WHERE repository", list(names)
        )
        pulled = {names[name]: float(when) for name, when in rows}
        return tags, pulled, self._has_flag(PULLS)

    def _add_to_set_sync(self, key: str, member: str) -> None:
        # Read first without the write lock: the member is almost always there already.
        raw = self._cache.get(key)
        if raw is not None and member in json.loads(raw):
            return
        with self._cache.transact():
            raw = self._cache.get(key)
            members = set(json.loads(raw)) if raw else set()
            if member not in members:
                members.add(member)
                self._cache.set(key, json.dumps(sorted(members)))

    # Cached upstream responses

    async def get_response(self, key: str) -> CachedResponse | None:
        raw = await self._run(self._cache.get, f"response:{key}")
        return CachedResponse.from_json(raw) if raw is not None else None

    async def put_response(self, key: str, response: CachedResponse) -> None:
        await self._run(self._cache.set, f"response:{key}", response.to_json())

    # Leases

    async def acquire_lease(self, name: str, owner: str, ttl: float) -> bool:
        return await self._run(
            functools.partial(self._cache.add, f"lease:{name}", owner, expire=ttl, tag=TRANSIENT)
        )

    async def renew_lease(self, name: str, owner: str, ttl: float) -> bool:
        return await self._run(self._renew_sync, name, owner, ttl)

    def _renew_sync(self, name: str, owner: str, ttl: float) -> bool:
        with self._cache.transact():
            if self._cache.get(f"lease:{name}") != owner:
                return False
            self._cache.set(f"lease:{name}", owner, expire=ttl, tag=TRANSIENT)
            return True

    async def release_lease(self, name: str, owner: str) -> None:
        await self._run(self._release_sync, name, owner)

    def _release_sync(self, name: str, owner: str) -> None:
        with self._cache.transact():
            if self._cache.get(f"lease:{name}") == owner:
                self._cache.delete(f"lease:{name}")

    async def lease_holder(self, name: str) -> str | None:
        holder = await self._run(self._cache.get, f"lease:{name}")
        return str(holder) if holder is not None else None

    async def put_download(self, digest: str, record: DownloadRecord, ttl: float) -> None:
        await self._run(
            functools.partial(
                self._cache.set, f"download:{digest}", record.to_json(), expire=ttl, tag=TRANSIENT
            )
        )

    async def get_download(self, digest: str) -> DownloadRecord | None:
        raw = await self._run(self._cache.get, f"download:{digest}")
        return DownloadRecord.from_json(raw) if raw is not None else None

    async def delete_download(self, digest: str) -> None:
        await self._run(self._cache.delete, f"download:{digest}")

    async def forget_downloads(self) -> int:
        """Drop every lease and download record: for a process that knows it is alone on
        this store at start, so nothing a crashed predecessor held can delay it."""
        return await self._run(self._forget_downloads_sync)

    def _forget_downloads_sync(self) -> int:
        # Through the tag index: a walk of every key would delay start-up on a big store.
        # (Untagged ones, written by a version before the tag, lapse with their TTL.)
        return int(self._cache.evict(TRANSIENT))

    # The fleet's directory (a fleet needs Redis; kept here so both pass one contract)

    async def heartbeat(self, replica_url: str, ttl: float) -> None:
        await self._run(self._heartbeat_sync, replica_url, time.time() + ttl)

    def _heartbeat_sync(self, replica_url: str, lapses_at: float | None) -> None:
        # One JSON dict of replica -> lapse time, rewritten under the transaction lock.
        with self._cache.transact():
            raw = self._cache.get("replicas")
            replicas: dict[str, float] = json.loads(raw) if raw else {}
            if lapses_at is None:
                replicas.pop(replica_url, None)
            else:
                replicas[replica_url] = lapses_at
            self._cache.set("replicas", json.dumps(replicas, sort_keys=True))

    async def leave(self, replica_url: str) -> None:
        await self._run(self._leave_sync, replica_url)

    def _leave_sync(self, replica_url: str) -> None:
        self._heartbeat_sync(replica_url, None)
        for key in list(self._keys_with("holders:")):
            self._remove_from_set_sync(key, replica_url)

    async def alive_replicas(self) -> set[str]:
        raw = await self._run(self._cache.get, "replicas")
        now = time.time()
        return {url for url, lapses in (json.loads(raw) if raw else {}).items() if lapses > now}

    async def add_holder(self, digest: str, replica_url: str) -> None:
        await self._run(self._add_to_set_sync, f"holders:{digest}", replica_url)

    async def remove_holder(self, digest: str, replica_url: str) -> None:
        await self._run(self._remove_from_set_sync, f"holders:{digest}", replica_url)

    def _remove_from_set_sync(self, key: str, member: str) -> None:
        with self._cache.transact():
            raw = self._cache.get(key)
            if raw is None:
                return
            members = set(json.loads(raw)) - {member}
            if members:
                self._cache.set(key, json.dumps(sorted(members)))
            else:
                self._cache.delete(key)

    async def holders(self, digest: str) -> set[str]:
        raw = await self._run(self._cache.get, f"holders:{digest}")
        return set(json.loads(raw)) if raw else set()

    async def put_token(self, key: str, token: str, ttl: float) -> None:
        await self._run(functools.partial(self._cache.set, f"token:{key}", token, expire=ttl))

    async def get_token(self, key: str) -> tuple[str, float] | None:
        found = await self._run(
            functools.partial(self._cache.get, f"token:{key}", expire_time=True)
        )
        token, expires = found if isinstance(found, tuple) else (None, None)
        if token is None or expires is None:
            return None
        return str(token), max(float(expires) - time.time(), 0.0)

    async def ping(self) -> None:
        await self._run(self._cache.get, "ping")

    async def close(self) -> None:
        await asyncio.to_thread(self._cache.close)

    # The console's jobs

    async def put_job(self, job_id: str, state: str, ttl: float) -> None:
        await self._run(self._put_job_sync, job_id, state, ttl)

    def _put_job_sync(self, job_id: str, state: str, ttl: float) -> None:
        # An index of ids (with when each lapses) spares listing a scan of every key.
        with self._cache.transact():
            self._cache.set(f"job:{job_id}", state, expire=ttl)
            raw = self._cache.get("jobs")
            now = time.time()
            lapses = {k: v for k, v in (json.loads(raw) if raw else {}).items() if v > now}
            lapses[job_id] = now + ttl
            self._cache.set("jobs", json.dumps(lapses, sort_keys=True))

    async def get_job(self, job_id: str) -> str | None:
        raw = await self._run(self._cache.get, f"job:{job_id}")
        return None if raw is None else str(raw)

    async def list_jobs(self) -> list[str]:
        return await self._run(self._list_jobs_sync)

    def _list_jobs_sync(self) -> list[str]:
        raw = self._cache.get("jobs")
        found = (self._cache.get(f"job:{job_id}") for job_id in (json.loads(raw) if raw else {}))
        return [str(state) for state in found if state is not None]

    # Flat at scale

    async def oldest_blobs(
        self, limit: int, after: LruPosition | None = None
    ) -> list[tuple[str, BlobRecord]]:
        return await self._run(self._oldest_sync, limit, after)

    def _oldest_sync(self, limit: int, after: LruPosition | None) -> list[tuple[str, BlobRecord]]:
        if not self._is_indexed():
            return after_position(self._list_blobs_sync(), limit, after)
        if after is None:
            rows = self._sql(
                "SELECT digest FROM MirrorLru ORDER BY last_access, digest LIMIT ?", limit
            )
        else:
            rows = self._sql(
                "SELECT digest FROM MirrorLru WHERE (last_access, digest) > (?, ?)"
                " ORDER BY last_access, digest LIMIT ?",
                *after,
                limit,
            )
        found = []
        for (digest,) in rows:
            raw = self._cache.get(f"blob:{digest}")
            if raw is not None:  # deleted since the query: nothing to evict
                found.append((digest, BlobRecord.from_json(raw)))
        return found

    async def totals(self) -> StoreTotals:
        return await self._run(self._totals_sync)

    def _totals_sync(self) -> StoreTotals:
        raw = self._cache.get("repositories")
        repositories = len(json.loads(raw)) if raw else 0
        if not self._is_indexed():
            return totals_of(self._list_blobs_sync(), len(self._tag_records_sync()), repositories)
        kept = dict(self._sql("SELECT name, value FROM MirrorTotals"))
        return StoreTotals(
            blobs=kept["blobs"],
            blob_bytes=kept["blob_bytes"],
            manifests=kept["manifests"],
            pinned=kept["pinned"],
            tags=kept["tags"],
            repositories=repositories,
        )

    async def last_accesses(self, digests: Sequence[str]) -> dict[str, float]:
        return await self._run(self._last_accesses_sync, list(digests))

    def _last_accesses_sync(self, digests: list[str]) -> dict[str, float]:
        if not self._is_indexed():
            records = ((d, self._cache.get(f"blob:{d}")) for d in digests)
            return {d: BlobRecord.from_json(raw).last_access for d, raw in records if raw}
        rows = self._rows_in("SELECT digest, last_access FROM MirrorLru WHERE digest", digests)
        return {digest: float(when) for digest, when in rows}

    def _rows_in(self, select: str, values: list[str]) -> Iterator[Any]:
        """The rows of `<select> IN (values)`, a query per `LOOKUP_BATCH` values."""
        for start in range(0, len(values), LOOKUP_BATCH):
            batch = values[start : start + LOOKUP_BATCH]
            marks = ",".join("?" * len(batch))  # placeholders only: the values are bound
            yield from self._sql(f"{select} IN ({marks})", *batch)

    async def rebuild_indexes(self) -> bool:
        seeding = not await self._run(self._has_flag, PULLS)
        if seeding:
            await seed_pulls(self)
            await self._run(self._set_flag, PULLS)  # a crash before it: seeded again
        return await self._run(self._build_index) or seeding

    def _build_index(self) -> bool:
        if self._is_indexed():
            return False
        # Batches of records, each indexed in one transaction with a fresh read of them,
        # so writers are held up for a batch at most, and a record written meanwhile is
        # indexed by its own write. The tag count is a count of this walk: tags written
        # during it may be counted twice or missed (a report's figure, not a bound).
        tags = sum(1 for _ in self._keys_with("tag:"))
        for key in list(self._keys_with("counter:")):
            self._add_to_set_sync("counter-names", key.removeprefix("counter:"))
        batch: list[str] = []
        for key in self._keys_with("blob:"):
            batch.append(key)
            if len(batch) >= REBUILD_BATCH:
                self._index_keys(batch)
                batch = []
        self._index_keys(batch)
        with self._cache.transact():
            self._sql("UPDATE MirrorTotals SET value = ? WHERE name = 'tags'", tags)
            self._set_flag(INDEXED)
        return True

    def _index_keys(self, keys: list[str]) -> None:
        with self._cache.transact():
            for key in keys:
                raw = self._cache.get(key)
                if raw is not None:
                    self._index_blob(key.removeprefix("blob:"), BlobRecord.from_json(raw))


def _split_repo_keys(keys: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for key in keys:
        upstream, _, repository = key.partition("/")
        pairs.append((upstream, repository))
    return sorted(pairs)
