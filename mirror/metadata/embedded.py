"""The embedded metadata backend: diskcache (SQLite) in `<root>/meta`, zero set-up.

diskcache is synchronous and process-safe: each call runs in a worker thread,
and multi-step updates run inside `Cache.transact()` so several processes on
one host can share the store. Leases use `Cache.add`, which is atomic and
honours expiry, the equivalent of Redis `SET NX PX`.
"""

from __future__ import annotations

import asyncio
import functools
import json
import sqlite3
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import diskcache

from mirror.errors import MetadataUnavailable
from mirror.metadata.base import BlobRecord, CachedResponse, DownloadRecord, TagRecord

T = TypeVar("T")


def _tag_key(upstream: str, repository: str, tag: str) -> str:
    return f"tag:{upstream}/{repository}:{tag}"


def _repo_key(upstream: str, repository: str) -> str:
    return f"{upstream}/{repository}"


class EmbeddedMetadataStore:
    """`MetadataStore` on a diskcache directory."""

    def __init__(self, directory: Path):
        # A generous SQLite timeout: several worker processes may write at once.
        self._cache = diskcache.Cache(str(directory), timeout=30, eviction_policy="none")

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
        self._cache.set(_tag_key(upstream, repository, tag), record.to_json())
        self._add_to_set_sync(f"tags:{_repo_key(upstream, repository)}", tag)

    async def list_tags(self, upstream: str, repository: str) -> list[str]:
        raw = await self._run(self._cache.get, f"tags:{_repo_key(upstream, repository)}")
        return sorted(json.loads(raw)) if raw else []

    async def tag_records(self) -> list[tuple[str, str, str, TagRecord]]:
        return await self._run(self._tag_records_sync)

    def _tag_records_sync(self) -> list[tuple[str, str, str, TagRecord]]:
        found = []
        for key in self._cache.iterkeys():
            if isinstance(key, str) and key.startswith("tag:"):
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
            self._cache.delete(_tag_key(upstream, repository, tag))
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

    async def counters(self) -> dict[str, int]:
        return await self._run(self._counters_sync)

    def _counters_sync(self) -> dict[str, int]:
        found = {}
        for key in self._cache.iterkeys():
            if isinstance(key, str) and key.startswith("counter:"):
                value = self._cache.get(key)
                if value is not None:
                    found[key.removeprefix("counter:")] = int(value)
        return found

    # Blobs

    async def get_blob(self, digest: str) -> BlobRecord | None:
        raw = await self._run(self._cache.get, f"blob:{digest}")
        return BlobRecord.from_json(raw) if raw is not None else None

    async def put_blob(self, digest: str, record: BlobRecord) -> None:
        await self._run(self._cache.set, f"blob:{digest}", record.to_json())

    async def delete_blob(self, digest: str) -> None:
        await self._run(self._delete_blob_sync, digest)

    def _delete_blob_sync(self, digest: str) -> None:
        with self._cache.transact():
            self._cache.delete(f"blob:{digest}")
            self._cache.delete(f"blobrepos:{digest}")

    async def list_blobs(self) -> list[tuple[str, BlobRecord]]:
        return await self._run(self._list_blobs_sync)

    def _list_blobs_sync(self) -> list[tuple[str, BlobRecord]]:
        found = []
        for key in self._cache.iterkeys():
            if isinstance(key, str) and key.startswith("blob:"):
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
                    self._cache.set(f"blob:{digest}", replace(record, last_access=when).to_json())

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
            functools.partial(self._cache.add, f"lease:{name}", owner, expire=ttl)
        )

    async def renew_lease(self, name: str, owner: str, ttl: float) -> bool:
        return await self._run(self._renew_sync, name, owner, ttl)

    def _renew_sync(self, name: str, owner: str, ttl: float) -> bool:
        with self._cache.transact():
            if self._cache.get(f"lease:{name}") != owner:
                return False
            self._cache.set(f"lease:{name}", owner, expire=ttl)
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
            functools.partial(self._cache.set, f"download:{digest}", record.to_json(), expire=ttl)
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
        dropped = 0
        for key in list(self._cache.iterkeys()):
            if isinstance(key, str) and key.startswith(("lease:", "download:")):
                dropped += int(self._cache.delete(key))
        return dropped

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
        for key in list(self._cache.iterkeys()):
            if isinstance(key, str) and key.startswith("holders:"):
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


def _split_repo_keys(keys: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for key in keys:
        upstream, _, repository = key.partition("/")
        pairs.append((upstream, repository))
    return sorted(pairs)
