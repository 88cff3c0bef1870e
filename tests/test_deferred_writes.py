"""Records that wait out a metadata outage (mirror/metadata/deferred.py), without sockets:
the embedded store behind a switch that makes every call fail as an unreachable Redis
would."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from mirror.errors import MetadataUnavailable
from mirror.metadata.base import BlobRecord, MetadataStore, TagRecord
from mirror.metadata.deferred import DeferredWrites
from mirror.metadata.embedded import EmbeddedMetadataStore

DIGEST = "sha256:" + "a" * 64


class SwitchedStore:
    """Delegates to a real store while `up`; raises MetadataUnavailable while down."""

    def __init__(self, store: MetadataStore):
        self.store = store
        self.up = True
        self.calls = 0

    def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]:
        method = getattr(self.store, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            if not self.up:
                raise MetadataUnavailable("switched off")
            return await method(*args, **kwargs)

        return call


@pytest.fixture
async def switched(tmp_path: Path) -> AsyncIterator[SwitchedStore]:
    store = EmbeddedMetadataStore(tmp_path / "meta")
    yield SwitchedStore(store)
    await store.close()


def deferred_for(switched: SwitchedStore, limit: int = 100) -> DeferredWrites:
    return DeferredWrites(switched, limit=limit)  # type: ignore[arg-type]


def tag(digest: str, checked_at: float) -> TagRecord:
    return TagRecord(digest=digest, media_type="application/json", checked_at=checked_at)


async def test_writes_go_straight_through_while_the_store_answers(
    switched: SwitchedStore,
) -> None:
    deferred = deferred_for(switched)
    await deferred.put_tag("hub", "library/a", "1", tag(DIGEST, 1.0))
    assert deferred.pending == 0
    assert await switched.store.get_tag("hub", "library/a", "1") == tag(DIGEST, 1.0)


async def test_an_outage_queues_writes_without_asking_the_store_again(
    switched: SwitchedStore,
) -> None:
    deferred = deferred_for(switched)
    switched.up = False
    await deferred.put_blob(DIGEST, BlobRecord(size=3, created_at=1.0, last_access=1.0))
    asked = switched.calls
    await deferred.add_blob_repository(DIGEST, "hub", "library/a")
    await deferred.add_repository("hub", "library/a")
    assert switched.calls == asked  # queued behind the first: no timeout per request
    assert deferred.pending == 3

    with pytest.raises(MetadataUnavailable):
        await deferred.replay()
    assert deferred.pending == 3

    switched.up = True
    assert await deferred.replay() == 3
    assert deferred.pending == 0
    assert (await switched.store.get_blob(DIGEST)) is not None
    assert await switched.store.blob_repositories(DIGEST) == [("hub", "library/a")]
    assert await switched.store.list_repositories() == [("hub", "library/a")]


async def test_replays_never_undo_newer_records(switched: SwitchedStore) -> None:
    deferred = deferred_for(switched)
    switched.up = False
    await deferred.put_tag("hub", "library/a", "1", tag(DIGEST, 10.0))
    await deferred.put_blob(DIGEST, BlobRecord(size=3, created_at=1.0, last_access=1.0))
    switched.up = True
    # Meanwhile another process wrote newer facts.
    newer_tag = tag("sha256:" + "b" * 64, 20.0)
    await switched.store.put_tag("hub", "library/a", "1", newer_tag)
    pinned = BlobRecord(size=3, created_at=1.0, last_access=5.0, pinned=True)
    await switched.store.put_blob(DIGEST, pinned)

    await deferred.replay()
    assert await switched.store.get_tag("hub", "library/a", "1") == newer_tag
    assert await switched.store.get_blob(DIGEST) == pinned


async def test_the_newest_write_of_a_fact_wins_and_the_queue_is_bounded(
    switched: SwitchedStore,
) -> None:
    deferred = deferred_for(switched, limit=2)
    switched.up = False
    await deferred.put_tag("hub", "library/a", "1", tag(DIGEST, 1.0))
    await deferred.put_tag("hub", "library/a", "1", tag(DIGEST, 2.0))
    assert deferred.pending == 1
    await deferred.add_repository("hub", "library/b")
    await deferred.add_repository("hub", "library/c")
    assert (deferred.pending, deferred.dropped) == (2, 1)  # the oldest went

    switched.up = True
    await deferred.replay()
    assert await switched.store.get_tag("hub", "library/a", "1") is None
    assert await switched.store.list_repositories() == [("hub", "library/b"), ("hub", "library/c")]
