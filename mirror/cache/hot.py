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

Times come from the clock the manifest policy is given (an injected one in tests).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from mirror.metadata.base import TagRecord

CONFIRM_EVERY = 5.0  # seconds an entry is answered from memory before the stores are asked
# What an entry costs beyond its body (keys, record, bookkeeping): a rough, fixed share,
# so that many tiny entries are bounded too.
ENTRY_OVERHEAD = 256

TagKey = tuple[str, str, str]  # upstream, repository, tag


@dataclass(slots=True)
class _HotManifest:
    media_type: str
    body: bytes
    until: float
    allowed: set[tuple[str, str]] = field(default_factory=set)  # (upstream, repository)


@dataclass(frozen=True, slots=True)
class _HotTag:
    record: TagRecord
    until: float


_Entry = TypeVar("_Entry", _HotManifest, _HotTag)


class HotManifests:
    """See the module docstring. Not thread-safe: used from the event loop only."""

    def __init__(self, max_bytes: int, clock: Callable[[], float]):
        self.max_bytes = max_bytes
        self._clock = clock
        self._entries: OrderedDict[str | TagKey, _HotManifest | _HotTag] = OrderedDict()
        self._sizes: dict[str | TagKey, int] = {}
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
        entry = _HotManifest(media_type, body, self._clock() + CONFIRM_EVERY, allowed)
        self._put(digest, entry, len(body) + ENTRY_OVERHEAD)

    def allowed(self, digest: str, upstream: str, repository: str) -> bool:
        """True if this (upstream, repository) passed the access rule for the digest."""
        entry = self._entries.get(digest)
        return isinstance(entry, _HotManifest) and (upstream, repository) in entry.allowed

    def allow(self, digest: str, upstream: str, repository: str) -> None:
        entry = self._entries.get(digest)
        if isinstance(entry, _HotManifest):
            entry.allowed.add((upstream, repository))

    def forget(self, digest: str) -> None:
        """The blob left the cache: memory must not outlive it."""
        self._drop(digest)

    # Tag records

    def tag(self, key: TagKey) -> TagRecord | None:
        entry = self._live(key, _HotTag)
        return None if entry is None else entry.record

    def put_tag(self, key: TagKey, record: TagRecord, fresh_until: float) -> None:
        """Remember a tag record read from the store, while it is fresh (`fresh_until`:
        its last confirmation plus its TTL)."""
        until = min(fresh_until, self._clock() + CONFIRM_EVERY)
        if until > self._clock():
            self._put(key, _HotTag(record, until), ENTRY_OVERHEAD)

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
