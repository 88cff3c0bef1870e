"""The Redis metadata backend, for several processes or nodes sharing one cache.

Every key starts with a configurable prefix so one Redis can serve several
mirrors. Records are the same JSON the embedded backend stores. Blob access
times live in a sorted set (`ZADD GT`), which moves them forward without a
read-modify-write and gives eviction its LRU order for free. Leases are
`SET NX PX`; renewing and releasing check the owner atomically in Lua.
Redis errors become `MetadataUnavailable` here and nowhere else.

Running totals (`totals`: blobs, bytes, manifests, pinned, tags) live in one hash kept by
Lua scripts that write a record and adjust the hash atomically; `blob-access` is already
the LRU index `oldest_blobs` reads a page of, and `repo-pulled` (a sorted set too) each
repository's last pull. A store without the hash's `built` field (new, or written by an
older version) is counted once by `rebuild_indexes`, in the background at start or by the
first `totals`; one without its `pulls` field has its last pulls seeded from its tags
there, and answers from them until then.

The server is one Redis or a Sentinel-managed primary (`redis_url.py` opens either). A
command that meets a broken connection is retried once on a fresh one, which with
Sentinel means asking the sentinels again: a failover costs the commands sent while no
primary is reachable, and those the caller already works around.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, TypeVar, cast

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

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
    pulls_from_tags,
    seed_pulls,
)
from mirror.metadata.redis_url import open_redis

T = TypeVar("T")

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


# Adds ARGV[sign] times a blob record's figures to the totals hash KEYS[n].
_ADJUST = """
local function adjust(totals, raw, sign)
  local record = cjson.decode(raw)
  redis.call('HINCRBY', totals, 'blobs', sign)
  redis.call('HINCRBY', totals, 'blob_bytes', string.format('%d', sign * record.size))
  if record.media_type ~= nil and record.media_type ~= cjson.null then
    redis.call('HINCRBY', totals, 'manifests', sign)
  end
  if record.pinned == true then
    redis.call('HINCRBY', totals, 'pinned', sign)
  end
end
"""
# KEYS: blob, blob-access, totals; ARGV: record JSON, last access, digest.
_PUT_BLOB = (
    _ADJUST
    + """
local old = redis.call('GET', KEYS[1])
redis.call('SET', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], 'GT', ARGV[2], ARGV[3])
if old then adjust(KEYS[3], old, -1) end
adjust(KEYS[3], ARGV[1], 1)
return 1
"""
)
# KEYS: blob, blobrepos, blob-access, totals; ARGV: digest.
_DELETE_BLOB = (
    _ADJUST
    + """
local old = redis.call('GET', KEYS[1])
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[1])
if old then adjust(KEYS[4], old, -1) end
return 1
"""
)
# KEYS: tag, tags set, totals; ARGV: record JSON (absent: delete), tag.
_PUT_TAG = """
redis.call('SET', KEYS[1], ARGV[1])
if redis.call('SADD', KEYS[2], ARGV[2]) == 1 then
  redis.call('HINCRBY', KEYS[3], 'tags', 1)
end
return 1
"""
_DELETE_TAG = """
redis.call('DEL', KEYS[1])
if redis.call('SREM', KEYS[2], ARGV[1]) == 1 then
  redis.call('HINCRBY', KEYS[3], 'tags', -1)
end
return 1
"""
TOTALS_FIELDS = ("blobs", "blob_bytes", "manifests", "pinned", "tags")
# Fields of the totals hash that say what was built: the counts, the last pulls.
BUILT, PULLS = "built", "pulls"
SCAN_BATCH = 1_000


class RedisMetadataStore:
    """`MetadataStore` on Redis."""

    def __init__(self, url: str, prefix: str = "mirror:"):
        # `url` is redis:// or redis+sentinel:// (redis_url.py); with Sentinel every new
        # connection asks where the primary is, so the retry in `_run` follows a failover.
        self._handle = open_redis(
            url,
            socket_timeout=5,
            socket_connect_timeout=2,
            health_check_interval=15,
        )
        self._redis: aioredis.Redis = self._handle.client
        self._p = prefix
        self._renew = self._redis.register_script(_RENEW)
        self._release = self._redis.register_script(_RELEASE)
        self._put_blob = self._redis.register_script(_PUT_BLOB)
        self._delete_blob = self._redis.register_script(_DELETE_BLOB)
        self._put_tag = self._redis.register_script(_PUT_TAG)
        self._delete_tag = self._redis.register_script(_DELETE_TAG)

    def _k(self, *parts: str) -> str:
        return self._p + ":".join(parts)

    async def _run(self, command: Callable[[], Awaitable[T]]) -> T:
        try:
            try:
                return await command()
            except RedisConnectionError:
                # A Redis that restarted leaves dead connections in the pool: drop them
                # all and try once more on a fresh one.
                await self._redis.connection_pool.disconnect()
                return await command()
        except (RedisError, OSError) as exc:
            raise MetadataUnavailable(
                "metadata store unavailable", detail=type(exc).__name__
            ) from exc

    # Tags

    async def get_tag(self, upstream: str, repository: str, tag: str) -> TagRecord | None:
        raw = await self._run(
            lambda: self._redis.get(self._k("tag", f"{upstream}/{repository}", tag))
        )
        return TagRecord.from_json(raw) if raw is not None else None

    async def put_tag(self, upstream: str, repository: str, tag: str, record: TagRecord) -> None:
        repo = f"{upstream}/{repository}"
        await self._run(
            lambda: self._put_tag(
                keys=[self._k("tag", repo, tag), self._k("tags", repo), self._k("totals")],
                args=[record.to_json(), tag],
            )
        )

    async def list_tags(self, upstream: str, repository: str) -> list[str]:
        members = await self._run(
            lambda: self._redis.smembers(self._k("tags", f"{upstream}/{repository}"))
        )
        return sorted(_text(m) for m in members)

    async def tag_records(self) -> list[tuple[str, str, str, TagRecord]]:
        async def read() -> list[tuple[str, str, str, TagRecord]]:
            found = []
            prefix = self._k("tag", "")
            cursor: int | None = None
            while cursor != 0:  # a page of keys, and their records in one MGET
                cursor, keys = await self._redis.scan(cursor or 0, f"{prefix}*", SCAN_BATCH)
                raws = await self._redis.mget(keys) if keys else []
                for key, raw in zip(keys, raws, strict=True):
                    if raw is None:
                        continue
                    repo_key, _, tag = _text(key).removeprefix(prefix).rpartition(":")
                    upstream, _, repository = repo_key.partition("/")
                    found.append((upstream, repository, tag, TagRecord.from_json(raw)))
            return sorted(found, key=lambda item: item[:3])

        return await self._run(read)

    async def delete_tag(self, upstream: str, repository: str, tag: str) -> None:
        repo = f"{upstream}/{repository}"
        await self._run(
            lambda: self._delete_tag(
                keys=[self._k("tag", repo, tag), self._k("tags", repo), self._k("totals")],
                args=[tag],
            )
        )

    async def add_counters(self, counts: Mapping[str, int]) -> None:
        if not counts:
            return

        async def write() -> None:
            async with self._redis.pipeline(transaction=False) as pipe:
                for name, amount in counts.items():
                    pipe.hincrby(self._k("counters"), name, amount)
                await pipe.execute()

        await self._run(write)

    async def counters(self) -> dict[str, int]:
        raw = await self._run(lambda: self._redis.hgetall(self._k("counters")))
        return {_text(name): int(value) for name, value in raw.items()}

    # Blobs

    async def get_blob(self, digest: str) -> BlobRecord | None:
        async def read() -> list[Any]:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.get(self._k("blob", digest))
                pipe.zscore(self._k("blob-access"), digest)
                return await pipe.execute()

        raw, accessed = await self._run(read)
        return None if raw is None else _with_access(BlobRecord.from_json(raw), accessed)

    async def get_blobs(self, digests: Sequence[str]) -> dict[str, BlobRecord]:
        async def read() -> dict[str, BlobRecord]:
            found: dict[str, BlobRecord] = {}
            for start in range(0, len(digests), LOOKUP_BATCH):
                batch = list(digests[start : start + LOOKUP_BATCH])
                async with self._redis.pipeline(transaction=False) as pipe:
                    pipe.mget([self._k("blob", d) for d in batch])
                    pipe.zmscore(self._k("blob-access"), batch)
                    raws, scores = await pipe.execute()
                for digest, raw, accessed in zip(batch, raws, scores, strict=True):
                    if raw is not None:
                        found[digest] = _with_access(BlobRecord.from_json(raw), accessed)
            return found

        return await self._run(read)

    async def put_blob(self, digest: str, record: BlobRecord) -> None:
        await self._run(
            lambda: self._put_blob(
                keys=[self._k("blob", digest), self._k("blob-access"), self._k("totals")],
                args=[record.to_json(), repr(record.last_access), digest],
            )
        )

    async def delete_blob(self, digest: str) -> None:
        await self._run(
            lambda: self._delete_blob(
                keys=[
                    self._k("blob", digest),
                    self._k("blobrepos", digest),
                    self._k("blob-access"),
                    self._k("totals"),
                ],
                args=[digest],
            )
        )

    async def list_blobs(self) -> list[tuple[str, BlobRecord]]:
        async def read() -> list[tuple[str, BlobRecord]]:
            ordered = cast(
                list[tuple[Any, float]],
                await self._redis.zrange(self._k("blob-access"), 0, -1, withscores=True),
            )
            found = []
            for start in range(0, len(ordered), 500):
                batch = ordered[start : start + 500]
                raws = await self._redis.mget([self._k("blob", _text(d)) for d, _ in batch])
                for (digest, accessed), raw in zip(batch, raws, strict=True):
                    if raw is not None:
                        record = BlobRecord.from_json(raw)
                        found.append((_text(digest), replace(record, last_access=float(accessed))))
            return found

        return await self._run(read)

    async def touch_blobs(self, accessed: Mapping[str, float]) -> None:
        if accessed:
            # Only blobs that still have a record: ZADD XX would skip new members, and
            # GT keeps a later time another node wrote.
            await self._run(
                lambda: self._redis.zadd(self._k("blob-access"), dict(accessed), xx=True, gt=True)
            )

    async def add_blob_repository(self, digest: str, upstream: str, repository: str) -> None:
        await self._run(
            lambda: self._redis.sadd(self._k("blobrepos", digest), f"{upstream}/{repository}")
        )

    async def blob_repositories(self, digest: str) -> list[tuple[str, str]]:
        members = await self._run(lambda: self._redis.smembers(self._k("blobrepos", digest)))
        return _split(members)

    # Repositories

    async def add_repository(self, upstream: str, repository: str) -> None:
        await self._run(
            lambda: self._redis.sadd(self._k("repositories"), f"{upstream}/{repository}")
        )

    async def list_repositories(self) -> list[tuple[str, str]]:
        return _split(await self._run(lambda: self._redis.smembers(self._k("repositories"))))

    async def touch_repositories(self, pulled: Mapping[tuple[str, str], float]) -> None:
        if pulled:
            # GT: a later pull another node wrote stays.
            members = {f"{up}/{repo}": when for (up, repo), when in pulled.items()}
            await self._run(lambda: self._redis.zadd(self._k("repo-pulled"), members, gt=True))

    async def repository_figures(
        self, repositories: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], RepositoryFigures]:
        asked = list(repositories)
        if not asked:
            return {}
        names = [f"{upstream}/{repository}" for upstream, repository in asked]

        async def read() -> list[Any]:
            async with self._redis.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.scard(self._k("tags", name))
                pipe.zmscore(self._k("repo-pulled"), names)
                pipe.hexists(self._k("totals"), PULLS)
                return await pipe.execute()

        *tags, scores, seeded = await self._run(read)
        pulled = {key: float(s) for key, s in zip(asked, scores, strict=True) if s is not None}
        if not seeded:
            pulled = await pulls_from_tags(self, asked, pulled)
        return {
            key: RepositoryFigures(int(count), pulled.get(key))
            for key, count in zip(asked, tags, strict=True)
        }

    # Cached upstream responses

    async def get_response(self, key: str) -> CachedResponse | None:
        raw = await self._run(lambda: self._redis.get(self._k("response", key)))
        return CachedResponse.from_json(raw) if raw is not None else None

    async def put_response(self, key: str, response: CachedResponse) -> None:
        await self._run(lambda: self._redis.set(self._k("response", key), response.to_json()))

    # Leases

    async def acquire_lease(self, name: str, owner: str, ttl: float) -> bool:
        taken = await self._run(
            lambda: self._redis.set(self._k("lease", name), owner, nx=True, px=int(ttl * 1000))
        )
        # After a retried SET NX the first attempt may have been the one that took it.
        return bool(taken) or await self.lease_holder(name) == owner

    async def renew_lease(self, name: str, owner: str, ttl: float) -> bool:
        renewed = await self._run(
            lambda: self._renew(keys=[self._k("lease", name)], args=[owner, int(ttl * 1000)])
        )
        return bool(renewed)

    async def release_lease(self, name: str, owner: str) -> None:
        await self._run(lambda: self._release(keys=[self._k("lease", name)], args=[owner]))

    async def lease_holder(self, name: str) -> str | None:
        holder = await self._run(lambda: self._redis.get(self._k("lease", name)))
        return _text(holder) if holder is not None else None

    async def put_download(self, digest: str, record: DownloadRecord, ttl: float) -> None:
        await self._run(
            lambda: self._redis.set(
                self._k("download", digest), record.to_json(), px=int(ttl * 1000)
            )
        )

    async def get_download(self, digest: str) -> DownloadRecord | None:
        raw = await self._run(lambda: self._redis.get(self._k("download", digest)))
        return DownloadRecord.from_json(raw) if raw is not None else None

    async def delete_download(self, digest: str) -> None:
        await self._run(lambda: self._redis.delete(self._k("download", digest)))

    # The fleet's directory

    async def heartbeat(self, replica_url: str, ttl: float) -> None:
        # Scored by lapse time: the live ones are a range query, and a dead replica's
        # entry needs no cleanup to stop counting.
        await self._run(
            lambda: self._redis.zadd(self._k("replicas"), {replica_url: time.time() + ttl})
        )

    async def leave(self, replica_url: str) -> None:
        async def write() -> None:
            await self._redis.zrem(self._k("replicas"), replica_url)
            held = self._k("held-by", replica_url)
            async for digest in self._redis.sscan_iter(held, count=500):
                await self._redis.srem(self._k("holders", _text(digest)), replica_url)
            await self._redis.delete(held)

        await self._run(write)

    async def alive_replicas(self) -> set[str]:
        members = await self._run(
            lambda: self._redis.zrangebyscore(self._k("replicas"), time.time(), "+inf")
        )
        return {_text(m) for m in members}

    async def add_holder(self, digest: str, replica_url: str) -> None:
        async def write() -> None:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.sadd(self._k("holders", digest), replica_url)
                # The reverse index lets `leave` drop a replica from every blob it held.
                pipe.sadd(self._k("held-by", replica_url), digest)
                await pipe.execute()

        await self._run(write)

    async def remove_holder(self, digest: str, replica_url: str) -> None:
        async def write() -> None:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.srem(self._k("holders", digest), replica_url)
                pipe.srem(self._k("held-by", replica_url), digest)
                await pipe.execute()

        await self._run(write)

    async def holders(self, digest: str) -> set[str]:
        members = await self._run(lambda: self._redis.smembers(self._k("holders", digest)))
        return {_text(m) for m in members}

    async def put_token(self, key: str, token: str, ttl: float) -> None:
        await self._run(
            lambda: self._redis.set(self._k("token", key), token, px=max(int(ttl * 1000), 1))
        )

    async def get_token(self, key: str) -> tuple[str, float] | None:
        async def read() -> list[Any]:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.get(self._k("token", key))
                pipe.pttl(self._k("token", key))
                return await pipe.execute()

        token, left_ms = await self._run(read)
        if token is None or left_ms is None or int(left_ms) <= 0:
            return None
        return _text(token), int(left_ms) / 1000

    async def ping(self) -> None:
        await self._run(lambda: self._redis.ping())

    async def close(self) -> None:
        await self._handle.aclose()

    # The console's jobs

    async def put_job(self, job_id: str, state: str, ttl: float) -> None:
        async def write() -> None:
            now = time.time()
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.set(self._k("job", job_id), state, px=max(int(ttl * 1000), 1))
                # The index of ids, scored by when each lapses; lapsed ones are dropped.
                pipe.zadd(self._k("jobs"), {job_id: now + ttl})
                pipe.zremrangebyscore(self._k("jobs"), "-inf", now)
                await pipe.execute()

        await self._run(write)

    async def get_job(self, job_id: str) -> str | None:
        raw = await self._run(lambda: self._redis.get(self._k("job", job_id)))
        return None if raw is None else _text(raw)

    async def list_jobs(self) -> list[str]:
        async def read() -> list[str]:
            ids = await self._redis.zrangebyscore(self._k("jobs"), time.time(), "+inf")
            if not ids:
                return []
            states = await self._redis.mget([self._k("job", _text(i)) for i in ids])
            return [_text(state) for state in states if state is not None]

        return await self._run(read)

    # Flat at scale

    async def oldest_blobs(
        self, limit: int, after: LruPosition | None = None
    ) -> list[tuple[str, BlobRecord]]:
        async def read() -> list[tuple[str, BlobRecord]]:
            # By score from `after`'s access time; members with that very time sort by
            # digest, and those up to `after` are skipped (paging past ties).
            low: float | str = "-inf" if after is None else after[0]
            found: list[tuple[str, BlobRecord]] = []
            offset = 0
            while len(found) < limit:
                page = cast(
                    list[tuple[Any, float]],
                    await self._redis.zrangebyscore(
                        self._k("blob-access"),
                        low,
                        "+inf",
                        start=offset,
                        num=limit,
                        withscores=True,
                    ),
                )
                if not page:
                    break
                offset += len(page)
                fresh = [
                    (_text(member), float(score))
                    for member, score in page
                    if after is None or (float(score), _text(member)) > after
                ]
                if not fresh:
                    continue
                raws = await self._redis.mget([self._k("blob", d) for d, _ in fresh])
                for (digest, accessed), raw in zip(fresh, raws, strict=True):
                    if raw is not None and len(found) < limit:
                        record = replace(BlobRecord.from_json(raw), last_access=accessed)
                        found.append((digest, record))
            return found

        return await self._run(read)

    async def totals(self) -> StoreTotals:
        async def read() -> list[Any]:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.hgetall(self._k("totals"))
                pipe.scard(self._k("repositories"))
                return await pipe.execute()

        raw, repositories = await self._run(read)
        kept = {_text(name): int(value) for name, value in raw.items()}
        if BUILT not in kept:
            # Never counted (a new store, or one from an older version): counting once
            # costs what answering from the listings would, and is kept from then on.
            await self.rebuild_indexes()
            return await self.totals()
        return StoreTotals(
            blobs=kept.get("blobs", 0),
            blob_bytes=kept.get("blob_bytes", 0),
            manifests=kept.get("manifests", 0),
            pinned=kept.get("pinned", 0),
            tags=kept.get("tags", 0),
            repositories=int(repositories),
        )

    async def last_accesses(self, digests: Sequence[str]) -> dict[str, float]:
        async def read() -> dict[str, float]:
            found: dict[str, float] = {}
            for start in range(0, len(digests), LOOKUP_BATCH):
                batch = list(digests[start : start + LOOKUP_BATCH])
                scores = await self._redis.zmscore(self._k("blob-access"), batch)
                found.update(
                    (digest, float(score))
                    for digest, score in zip(batch, scores, strict=True)
                    if score is not None
                )
            return found

        return await self._run(read)

    async def rebuild_indexes(self) -> bool:
        async def count() -> dict[str, int]:
            counted = dict.fromkeys(TOTALS_FIELDS, 0)
            async for key in self._redis.scan_iter(match=f"{self._k('tags', '')}*", count=500):
                counted["tags"] += int(await self._redis.scard(key))
            # A page of the access index at a time: one reply of a million members would
            # outlast the socket timeout.
            start = 0
            while batch := [
                _text(d)
                for d in await self._redis.zrange(
                    self._k("blob-access"), start, start + SCAN_BATCH - 1
                )
            ]:
                start += len(batch)
                for raw in await self._redis.mget([self._k("blob", d) for d in batch]):
                    if raw is None:
                        continue
                    record = BlobRecord.from_json(raw)
                    counted["blobs"] += 1
                    counted["blob_bytes"] += record.size
                    counted["manifests"] += record.media_type is not None
                    counted["pinned"] += record.pinned
            return counted

        built, seeded = await self._run(lambda: self._redis.hmget(self._k("totals"), BUILT, PULLS))
        if seeded is None:
            await seed_pulls(self)
            await self._run(lambda: self._redis.hset(self._k("totals"), PULLS, 1))
        if built is None:
            # Writes during the count may be counted twice or missed: the totals are a
            # report's figures, and only a store from an older version is ever counted.
            counted = await self._run(count)
            fields: dict[Any, Any] = {**counted, BUILT: 1}
            await self._run(lambda: self._redis.hset(self._k("totals"), mapping=fields))
        return built is None or seeded is None


def _with_access(record: BlobRecord, accessed: Any) -> BlobRecord:
    """The record with its access time from the LRU index, where that is later (touches
    move only the index)."""
    if accessed is not None and float(accessed) > record.last_access:
        return replace(record, last_access=float(accessed))
    return record


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _split(members: Any) -> list[tuple[str, str]]:
    pairs = []
    for member in members:
        upstream, _, repository = _text(member).partition("/")
        pairs.append((upstream, repository))
    return sorted(pairs)
