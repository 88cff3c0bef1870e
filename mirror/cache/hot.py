"""Hot manifests and fresh tag records in memory, bounded by bytes.

A warm pull asks for the same few manifests over and over; reading each from the
metadata store and the blob store (two thread hops, a diskcache or Redis read and a
file read) cost more than the rest of the request. `HotManifests` keeps them in this
process, least recently used out first once `max_bytes` is reached.

What it holds is never more than a short-lived copy of what the stores say:
- a manifest (digest → media type and verified bytes) is answered from memory for
  `CONFIRM_EVERY` seconds after it was read from the stores; then it is read again, so
  a manifest evicted or collected by another process (a worker, `mirror gc`) leaves
  this one's memory within that time. This process's own evictions drop it at once
  (`forget`);
- the (upstream, repository) pairs that passed the content access rule for it
  (`mirror/cache/provenance.py`) are remembered with it: a repository that has not
  is checked as before, whatever memory holds;
- a tag record, only while it is fresh (within its `tag_ttl`) and for at most
  `CONFIRM_EVERY` seconds, so a tag another process moved is seen as soon as it would
  be without this memory, give or take those seconds.

An entry asked for once it is `REFRESH_FROM` to `REFRESH_BY` old is read again in the
background (`due`; the manifest policy does the reading: a tag's record, a manifest's
record alone, as the bytes of a digest never change), so that a manifest pulled all day
never makes a request wait on the stores: those reads were the slowest 1% of hot pulls
(bench/scale.py, tag hit p99), and the slower the bigger the store.

Times come from the clock the manifest policy is given (an injected one in tests).
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from mirror.metadata.base import TagRecord

CONFIRM_EVERY = 5.0  # seconds an entry is answered from memory before the stores are asked
# Age from which an entry asked for is read again in the background: a random one in this
# range, so that a hot set read together does not come due together, and a second before
# it would lapse at the latest (time for the read). Each hot entry is read at most twice
# as often as it would be without this.
REFRESH_FROM, REFRESH_BY = CONFIRM_EVERY / 2, CONFIRM_EVERY - 1.0
# What an entry costs beyond its body (keys, record, bookkeeping): a rough, fixed share,
# so that many tiny entries are bounded too.
ENTRY_OVERHEAD = 256

TagKey = tuple[str, str, str]  # upstream, repository, tag


@dataclass(slots=True)
class _HotManifest:
    media_type: str
    body: bytes
    refresh_at: float
    until: float
    allowed: set[tuple[str, str]] = field(default_factory=set)  # (upstream, repository)


@dataclass(frozen=True, slots=True)
class _HotTag:
    record: TagRecord
    refresh_at: float
    until: float


_Entry = TypeVar("_Entry", _HotManifest, _HotTag)


class HotManifests:
    """See the module docstring. Not thread-safe: used from the event loop only."""

    def __init__(self, max_bytes: int, clock: Callable[[], float]):
        self.max_bytes = max_bytes
        self._clock = clock
        self._entries: OrderedDict[str | TagKey, _HotManifest | _HotTag] = OrderedDict()
        self._sizes: dict[str | TagKey, int] = {}
        self._refreshing: set[str | TagKey] = set()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    # Manifests by digest

    def manifest(self, digest: str) -> tuple[str, bytes] | None:
        """(media type, body) if memory holds the manifest and it was read recently."""
        entry = self._live(digest, _HotManifest)
        return None if entry is None else (entry.media_type, entry.body)

    def put_manifest(self, digest: str, media_type: str, body: bytes) -> None:
        """Remember a manifest just read from the stores (verified bytes only)."""
        previous = self._entries.get(digest)
        allowed = previous.allowed if isinstance(previous, _HotManifest) else set()
        now = self._clock()
        entry = _HotManifest(media_type, body, _refresh_at(now), now + CONFIRM_EVERY, allowed)
        self._put(digest, entry, len(body) + ENTRY_OVERHEAD)

    def confirm_manifest(self, digest: str) -> None:
        """The stores still hold it (its record was just read): as if read now."""
        entry = self._entries.get(digest)
        if isinstance(entry, _HotManifest):
            now = self._clock()
            entry.refresh_at, entry.until = _refresh_at(now), now + CONFIRM_EVERY

    def allowed(self, digest: str, upstream: str, repository: str) -> bool:
        """True if this (upstream, repository) passed the access rule for the digest."""
        entry = self._entries.get(digest)
        return isinstance(entry, _HotManifest) and (upstream, repository) in entry.allowed

    def allow(self, digest: str, upstream: str, repository: str) -> None:
        entry = self._entries.get(digest)
        if isinstance(entry, _HotManifest):
            entry.allowed.add((upstream, repository))

    def forget(self, digest: str) -> None:
        """The blob left the cache: memory must not outlive it (nor a read of the stores
        that began before)."""
        self._drop(digest)
        self._refreshing.discard(digest)

    # Tag records

    def tag(self, key: TagKey) -> TagRecord | None:
        entry = self._live(key, _HotTag)
        return None if entry is None else entry.record

    def put_tag(self, key: TagKey, record: TagRecord, fresh_until: float) -> None:
        """Remember a tag record read from the store, while it is fresh (`fresh_until`:
        its last confirmation plus its TTL)."""
        now = self._clock()
        until = min(fresh_until, now + CONFIRM_EVERY)
        if until > now:
            self._put(key, _HotTag(record, _refresh_at(now), until), ENTRY_OVERHEAD)

    def drop_tag(self, key: TagKey) -> None:
        """The store no longer holds the tag."""
        self._drop(key)

    # Reading again before an entry lapses

    def due(self, key: str | TagKey) -> bool:
        """True if a hit on this entry should start a background read of the stores: it
        is old enough (`REFRESH_FROM` to `REFRESH_BY`) and none runs for it. It counts as
        running from then until `refreshed`."""
        entry = self._entries.get(key)
        if entry is None or key in self._refreshing:
            return False
        if self._clock() < entry.refresh_at:
            return False
        self._refreshing.add(key)
        return True

    def refreshed(self, key: str | TagKey) -> bool:
        """The background read ended; False if its answer is void (forgotten meanwhile)."""
        if key not in self._refreshing:
            return False
        self._refreshing.discard(key)
        return True

    # Bookkeeping

    def _live(self, key: str | TagKey, kind: type[_Entry]) -> _Entry | None:
        """The entry if it is of this kind and still valid, now the most recently used."""
        entry = self._entries.get(key)
        if not isinstance(entry, kind):
            return None
        if self._clock() >= entry.until:
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return entry

    def _put(self, key: str | TagKey, entry: _HotManifest | _HotTag, size: int) -> None:
        self._drop(key)
        if size > self.max_bytes:
            return  # bigger than the whole memory: not worth anything else's room
        self._entries[key] = entry
        self._sizes[key] = size
        self.bytes += size
        while self.bytes > self.max_bytes:
            oldest = next(iter(self._entries))
            self._drop(oldest)

    def _drop(self, key: str | TagKey) -> None:
        if self._entries.pop(key, None) is not None:
            self.bytes -= self._sizes.pop(key)


def _refresh_at(read_at: float) -> float:
    return read_at + random.uniform(REFRESH_FROM, REFRESH_BY)
