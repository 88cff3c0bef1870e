"""The metadata store contract, run once per backend: embedded (diskcache), Redis, and
Redis reached through Sentinel (`redis+sentinel://`).

Both backends must behave identically for everything the cache relies on: tag and blob
records, repository sets, cached responses, access times that only move forward, and
leases that exclude, lapse and can only be renewed or released by their owner.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from support.redis_server import RedisServer
from support.sentinel import SentinelRedis

from mirror.metadata.base import (
    BlobRecord,
    CachedResponse,
    DownloadRecord,
    MetadataStore,
    RepositoryFigures,
    StoreTotals,
    TagRecord,
)
from mirror.metadata.embedded import EmbeddedMetadataStore
from mirror.metadata.redis import RedisMetadataStore

DIGEST = "sha256:" + "1" * 64
OTHER = "sha256:" + "2" * 64


@pytest.fixture(scope="module")
def sentinel_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelRedis]:
    with SentinelRedis(tmp_path_factory.mktemp("sentinel")) as group:
        yield group


@pytest.fixture(
    params=[
        "embedded",
        pytest.param("redis", marks=pytest.mark.slow),
        pytest.param("redis-sentinel", marks=pytest.mark.slow),
    ]
)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[MetadataStore]:
    backend: MetadataStore
    # A prefix per test keeps tests apart on a shared server.
    prefix = f"t{time.monotonic_ns()}:"
    if request.param == "embedded":
        backend = EmbeddedMetadataStore(tmp_path / "meta")
    elif request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        backend = RedisMetadataStore(server.url, prefix=prefix)
    else:
        group: SentinelRedis = request.getfixturevalue("sentinel_redis")
        backend = RedisMetadataStore(group.url, prefix=prefix)
    yield backend
    await backend.close()


async def test_tags(store: MetadataStore) -> None:
    assert await store.get_tag("hub", "library/alpine", "3") is None
    record = TagRecord(digest=DIGEST, media_type="application/x", checked_at=1.5)
    await store.put_tag("hub", "library/alpine", "3", record)
    await store.put_tag("hub", "library/alpine", "latest", record)
    await store.put_tag("ghcr", "library/alpine", "other", record)
    assert await store.get_tag("hub", "library/alpine", "3") == record
    assert await store.get_tag("ghcr", "library/alpine", "3") is None
    assert await store.list_tags("hub", "library/alpine") == ["3", "latest"]
    newer = TagRecord(digest=OTHER, media_type="application/y", checked_at=2.0)
    await store.put_tag("hub", "library/alpine", "3", newer)
    assert await store.get_tag("hub", "library/alpine", "3") == newer


async def test_blobs_and_access_times(store: MetadataStore) -> None:
    assert await store.get_blob(DIGEST) is None
    record = BlobRecord(size=10, created_at=100.0, last_access=100.0, media_type=None)
    await store.put_blob(DIGEST, record)
    assert await store.get_blob(DIGEST) == record

    await store.touch_blobs({DIGEST: 150.0, OTHER: 150.0})
    touched = await store.get_blob(DIGEST)
    assert touched is not None
    assert touched.last_access == 150.0
    assert await store.get_blob(OTHER) is None  # touching never creates a record
    await store.touch_blobs({DIGEST: 120.0})  # never moves back
    touched = await store.get_blob(DIGEST)
    assert touched is not None
    assert touched.last_access == 150.0

    manifest = BlobRecord(
        size=5, created_at=1, last_access=1, media_type="application/m", pinned=True
    )
    await store.put_blob(OTHER, manifest)
    assert await store.get_blob(OTHER) == manifest

    # Several at once: the same records as one by one (access times included), and no
    # entry for a digest without one.
    missing = "sha256:" + "3" * 64
    assert await store.get_blobs([DIGEST, missing, OTHER]) == {
        DIGEST: await store.get_blob(DIGEST),
        OTHER: manifest,
    }
    assert await store.get_blobs([]) == {}

    await store.add_blob_repository(DIGEST, "hub", "a/b")
    await store.delete_blob(DIGEST)
    assert await store.get_blob(DIGEST) is None
    assert await store.get_blobs([DIGEST]) == {}
    assert await store.blob_repositories(DIGEST) == []


async def test_repositories(store: MetadataStore) -> None:
    await store.add_blob_repository(DIGEST, "hub", "library/alpine")
    await store.add_blob_repository(DIGEST, "hub", "library/alpine")
    await store.add_blob_repository(DIGEST, "ghcr", "org/app")
    assert await store.blob_repositories(DIGEST) == [("ghcr", "org/app"), ("hub", "library/alpine")]
    assert await store.blob_repositories(OTHER) == []

    assert await store.list_repositories() == []
    await store.add_repository("hub", "library/alpine")
    await store.add_repository("ghcr", "org/app")
    await store.add_repository("hub", "library/alpine")
    assert await store.list_repositories() == [("ghcr", "org/app"), ("hub", "library/alpine")]


async def test_repository_figures_count_tags_and_keep_the_latest_pull(
    store: MetadataStore,
) -> None:
    tag = TagRecord(digest=DIGEST, media_type="m", checked_at=1.0)
    for name in ("1", "2", "3"):
        await store.put_tag("hub", "a/b", name, tag)
    await store.put_tag("hub", "a/b", "1", tag)  # rewritten: still one tag
    await store.delete_tag("hub", "a/b", "3")
    await store.put_tag("ghcr", "c/d", "x", tag)
    await store.touch_repositories({("hub", "a/b"): 50.0, ("ghcr", "c/d"): 20.0})
    # Never back: an earlier pull (another node's, flushed late) leaves the later one.
    await store.touch_repositories({("hub", "a/b"): 40.0, ("ghcr", "c/d"): 30.0})
    await store.touch_repositories({})
    asked = [("hub", "a/b"), ("ghcr", "c/d"), ("hub", "never/seen")]
    assert await store.repository_figures(asked) == {
        ("hub", "a/b"): RepositoryFigures(tags=2, last_pulled=50.0),
        ("ghcr", "c/d"): RepositoryFigures(tags=1, last_pulled=30.0),
        ("hub", "never/seen"): RepositoryFigures(tags=0, last_pulled=None),
    }
    assert await store.repository_figures([]) == {}


async def test_cached_responses(store: MetadataStore) -> None:
    assert await store.get_response("tags:hub/x?") is None
    response = CachedResponse(200, '{"tags":[]}', "application/json", 3.0, {"Link": "<a>"})
    await store.put_response("tags:hub/x?", response)
    assert await store.get_response("tags:hub/x?") == response


async def test_leases_exclude_and_check_the_owner(store: MetadataStore) -> None:
    assert await store.acquire_lease("blob:x", "one", ttl=30)
    assert not await store.acquire_lease("blob:x", "two", ttl=30)
    assert await store.lease_holder("blob:x") == "one"
    assert not await store.renew_lease("blob:x", "two", ttl=30)
    await store.release_lease("blob:x", "two")  # not the owner: no effect
    assert await store.lease_holder("blob:x") == "one"
    assert await store.renew_lease("blob:x", "one", ttl=30)
    await store.release_lease("blob:x", "one")
    assert await store.lease_holder("blob:x") is None
    assert await store.acquire_lease("blob:x", "two", ttl=30)


async def test_leases_lapse(store: MetadataStore) -> None:
    assert await store.acquire_lease("blob:y", "one", ttl=0.2)
    # Each attempt is a round trip to the store; keep trying, within a bound, until it lapses.
    deadline = time.monotonic() + 5
    while not await store.acquire_lease("blob:y", "two", ttl=30):
        assert time.monotonic() < deadline, "lease never lapsed"
    assert await store.lease_holder("blob:y") == "two"
    assert not await store.renew_lease("blob:y", "one", ttl=30)


async def test_concurrent_lease_attempts_have_one_winner(store: MetadataStore) -> None:
    results = await asyncio.gather(
        *(store.acquire_lease("blob:z", f"o{i}", ttl=30) for i in range(20))
    )
    assert sum(results) == 1


async def test_download_records(store: MetadataStore) -> None:
    assert await store.get_download(DIGEST) is None
    record = DownloadRecord(owner="host:1:ab", temp_name="abc.123", size=42)
    await store.put_download(DIGEST, record, ttl=30)
    assert await store.get_download(DIGEST) == record
    await store.delete_download(DIGEST)
    assert await store.get_download(DIGEST) is None
    fleet = DownloadRecord(owner="host:2:cd", temp_name="abc.456", size=7, peer_url="http://a:1")
    await store.put_download(OTHER, fleet, ttl=30)
    assert await store.get_download(OTHER) == fleet


async def test_replicas_alive_until_their_heartbeat_lapses(store: MetadataStore) -> None:
    assert await store.alive_replicas() == set()
    await store.heartbeat("http://a:1", ttl=30)
    await store.heartbeat("http://b:1", ttl=0.3)
    assert await store.alive_replicas() == {"http://a:1", "http://b:1"}
    deadline = time.monotonic() + 10
    while await store.alive_replicas() != {"http://a:1"}:  # b's heartbeat lapses
        assert time.monotonic() < deadline, "a lapsed heartbeat still counts as alive"
        await asyncio.sleep(0.05)
    await store.heartbeat("http://b:1", ttl=30)  # back
    assert await store.alive_replicas() == {"http://a:1", "http://b:1"}
    await store.leave("http://a:1")
    assert await store.alive_replicas() == {"http://b:1"}


async def test_holders_of_a_blob(store: MetadataStore) -> None:
    assert await store.holders(DIGEST) == set()
    await store.add_holder(DIGEST, "http://a:1")
    await store.add_holder(DIGEST, "http://a:1")
    await store.add_holder(DIGEST, "http://b:1")
    await store.add_holder(OTHER, "http://a:1")
    assert await store.holders(DIGEST) == {"http://a:1", "http://b:1"}
    await store.remove_holder(DIGEST, "http://b:1")
    await store.remove_holder(DIGEST, "http://never:1")
    assert await store.holders(DIGEST) == {"http://a:1"}
    # Leaving drops the replica from every blob it held, and only that replica.
    await store.add_holder(OTHER, "http://b:1")
    await store.heartbeat("http://a:1", ttl=30)
    await store.leave("http://a:1")
    assert await store.holders(DIGEST) == set()
    assert await store.holders(OTHER) == {"http://b:1"}
    assert await store.alive_replicas() == set()


async def test_blobs_listed_least_recently_used_first(store: MetadataStore) -> None:
    assert await store.list_blobs() == []
    for digest, when in ((DIGEST, 300.0), (OTHER, 100.0)):
        await store.put_blob(digest, BlobRecord(size=1, created_at=1.0, last_access=when))
    assert [digest for digest, _ in await store.list_blobs()] == [OTHER, DIGEST]
    await store.touch_blobs({OTHER: 500.0})
    listed = await store.list_blobs()
    assert [digest for digest, _ in listed] == [DIGEST, OTHER]
    assert listed[1][1].last_access == 500.0


async def test_tag_records_listing_and_deletion(store: MetadataStore) -> None:
    record = TagRecord(digest=DIGEST, media_type="application/x", checked_at=1.0)
    await store.put_tag("hub", "library/alpine", "3.20", record)
    await store.put_tag("hub", "library/alpine", "latest", record)
    await store.put_tag("ghcr", "org/app", "v1", record)
    assert await store.tag_records() == [
        ("ghcr", "org/app", "v1", record),
        ("hub", "library/alpine", "3.20", record),
        ("hub", "library/alpine", "latest", record),
    ]
    await store.delete_tag("hub", "library/alpine", "3.20")
    assert await store.get_tag("hub", "library/alpine", "3.20") is None
    assert await store.list_tags("hub", "library/alpine") == ["latest"]


async def test_counters_add_up(store: MetadataStore) -> None:
    assert await store.counters() == {}
    await store.add_counters({"requests:hit": 3, "requests:miss": 1})
    await store.add_counters({"requests:hit": 2})
    assert await store.counters() == {"requests:hit": 5, "requests:miss": 1}


async def test_tokens_are_kept_for_their_lifetime(store: MetadataStore) -> None:
    assert await store.get_token("hub:realm:scope") is None
    await store.put_token("hub:realm:scope", "secret-token", ttl=60)
    found = await store.get_token("hub:realm:scope")
    assert found is not None
    token, left = found
    assert token == "secret-token"
    assert 50 < left <= 60
    await store.put_token("short", "x", ttl=0.05)
    deadline = time.monotonic() + 5
    while await store.get_token("short") is not None:
        assert time.monotonic() < deadline, "the token never expired"


async def test_jobs_are_kept_for_their_lifetime(store: MetadataStore) -> None:
    assert await store.list_jobs() == []
    assert await store.get_job("1-ab") is None
    await store.put_job("1-ab", '{"state": "running"}', ttl=60)
    await store.put_job("1-ab", '{"state": "done"}', ttl=60)  # replaced
    await store.put_job("2-cd", '{"state": "running"}', ttl=0.05)
    assert await store.get_job("1-ab") == '{"state": "done"}'
    deadline = time.monotonic() + 5
    while await store.get_job("2-cd") is not None:
        assert time.monotonic() < deadline, "the job never lapsed"
        await asyncio.sleep(0.02)
    assert await store.list_jobs() == ['{"state": "done"}']


# Flat at scale: the LRU index and the running totals


def _digest(n: int) -> str:
    return f"sha256:{n:064x}"


async def test_oldest_blobs_page_through_the_lru_order(store: MetadataStore) -> None:
    # Ties on the access time are ordered by digest, and a page starts after a position.
    for n, accessed in enumerate([50.0, 10.0, 30.0, 10.0, 20.0]):
        await store.put_blob(_digest(n), BlobRecord(size=n, created_at=1.0, last_access=accessed))
    await store.touch_blobs({_digest(1): 60.0})
    await store.delete_blob(_digest(2))
    expected = [_digest(3), _digest(4), _digest(0), _digest(1)]
    assert [d for d, _ in await store.list_blobs()] == expected
    first = await store.oldest_blobs(2)
    assert [d for d, _ in first] == expected[:2]
    digest, record = first[-1]
    rest = await store.oldest_blobs(10, after=(record.last_access, digest))
    assert [d for d, _ in rest] == expected[2:]
    assert rest[-1][1].last_access == 60.0  # the record carries its touched time
    assert await store.oldest_blobs(10, after=(60.0, _digest(1))) == []


async def test_last_accesses_come_from_the_index(store: MetadataStore) -> None:
    for n in range(3):
        await store.put_blob(_digest(n), BlobRecord(size=n, created_at=1.0, last_access=10.0))
    await store.touch_blobs({_digest(1): 70.0})
    await store.delete_blob(_digest(2))
    asked = [_digest(n) for n in range(4)]  # 2 deleted, 3 never there
    assert await store.last_accesses(asked) == {_digest(0): 10.0, _digest(1): 70.0}
    assert await store.last_accesses([]) == {}


async def test_totals_follow_every_change(store: MetadataStore) -> None:
    await store.put_blob(DIGEST, BlobRecord(size=100, created_at=1.0, last_access=1.0))
    manifest = BlobRecord(size=7, created_at=1.0, last_access=1.0, media_type="application/x")
    await store.put_blob(OTHER, manifest)
    await store.put_blob(_digest(9), BlobRecord(size=5, created_at=1.0, last_access=1.0))
    # Rewritten (pinned, resized) and touched: counted once, with its new figures.
    await store.put_blob(DIGEST, BlobRecord(size=90, created_at=1.0, last_access=2.0, pinned=True))
    await store.touch_blobs({DIGEST: 3.0})
    await store.delete_blob(_digest(9))
    await store.delete_blob(_digest(10))  # never there
    tag = TagRecord(digest=OTHER, media_type="application/x", checked_at=1.0)
    await store.put_tag("hub", "a/b", "1", tag)
    await store.put_tag("hub", "a/b", "1", tag)
    await store.put_tag("hub", "a/b", "2", tag)
    await store.put_tag("hub", "c/d", "1", tag)
    await store.delete_tag("hub", "c/d", "1")
    await store.delete_tag("hub", "c/d", "1")
    await store.add_repository("hub", "a/b")
    await store.add_repository("hub", "c/d")
    await store.rebuild_indexes()  # a fresh store: nothing changes either way
    assert await store.totals() == StoreTotals(
        blobs=2, blob_bytes=97, manifests=1, pinned=1, tags=2, repositories=2
    )


async def _forget_indexes(store: MetadataStore) -> None:
    """Make the store look as a version before the index and totals left it."""
    if isinstance(store, EmbeddedMetadataStore):
        store._sql("DROP TABLE MirrorLru")
        store._sql("DROP TABLE MirrorTotals")
        store._sql("DROP TABLE MirrorPulls")
        store._cache.delete("counter-names")
        store._create_index_tables()  # as opening it does
        store._flags.clear()
    else:
        assert isinstance(store, RedisMetadataStore)
        await store._redis.delete(store._k("totals"), store._k("repo-pulled"))


async def test_a_store_from_before_the_indexes_answers_and_rebuilds(
    store: MetadataStore,
) -> None:
    for n in range(5):
        record = BlobRecord(size=10, created_at=1.0, last_access=float(5 - n), pinned=n == 0)
        await store.put_blob(_digest(n), record)
    await store.put_tag("hub", "a/b", "1", TagRecord(digest=DIGEST, media_type="m", checked_at=1))
    # Two tags: the repository's last pull is the later access of the two manifests.
    for name, n in (("old", 3), ("new", 1)):
        await store.put_tag("hub", "c/d", name, TagRecord(_digest(n), "m", checked_at=1))
    await store.add_counters({"requests:hit": 2})
    await _forget_indexes(store)
    want = StoreTotals(blobs=5, blob_bytes=50, manifests=0, pinned=1, tags=3, repositories=0)
    order = [_digest(n) for n in (4, 3, 2, 1, 0)]
    figures = {
        ("hub", "a/b"): RepositoryFigures(tags=1, last_pulled=None),  # DIGEST has no record
        ("hub", "c/d"): RepositoryFigures(tags=2, last_pulled=4.0),
    }
    # Before the rebuild: right, from the full listings (the last pulls from the tags).
    assert await store.repository_figures(list(figures)) == figures
    assert await store.totals() == want
    assert [d for d, _ in await store.oldest_blobs(3, after=(5 - 4.0, _digest(4)))] == order[1:4]
    # Built now, by the rebuild (or, in Redis, by counting for that first `totals`).
    await store.rebuild_indexes()
    assert await store.rebuild_indexes() is False
    assert await store.counters() == {"requests:hit": 2}
    assert await store.repository_figures(list(figures)) == figures  # seeded from the tags
    await store.touch_repositories({("hub", "a/b"): 9.0})
    assert (await store.repository_figures([("hub", "a/b")]))["hub", "a/b"].last_pulled == 9.0
    await store.delete_blob(_digest(2))
    assert await store.totals() == StoreTotals(
        blobs=4, blob_bytes=40, manifests=0, pinned=1, tags=3, repositories=0
    )
    assert [d for d, _ in await store.oldest_blobs(10)] == [order[0], order[1], order[3], order[4]]


async def test_embedded_start_forgets_leases_and_downloads_only(tmp_path: Path) -> None:
    # Through the tag index, not a walk of every key: a big store starts as fast.
    store = EmbeddedMetadataStore(tmp_path / "meta")
    try:
        assert await store.acquire_lease("blob:a", "crashed", ttl=60)
        assert await store.renew_lease("blob:a", "crashed", ttl=60)
        await store.put_download(DIGEST, DownloadRecord("crashed", "tmp-a", 10), ttl=60)
        await store.put_blob(DIGEST, BlobRecord(size=1, created_at=1.0, last_access=1.0))
        await store.put_token("hub", "token", ttl=60)
        assert await store.forget_downloads() == 2
        assert await store.lease_holder("blob:a") is None
        assert await store.get_download(DIGEST) is None
        assert await store.get_blob(DIGEST) is not None
        assert await store.get_token("hub") is not None
    finally:
        await store.close()
