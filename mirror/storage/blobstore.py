"""Content-addressed blobs: the store interface, and its local-disk backend.

`BlobStore` is what the cache sees, whatever holds the committed blobs. It owns a
local root in every backend, for what is in flight and for the account of space:

    <root>/
    ├── layout-version              "1"
    ├── blobs/<algorithm>/<2 hex>/<hex>   complete, verified, immutable (filesystem)
    ├── tmp/                        in-flight downloads; emptied at start
    ├── ledger.json, ledger.lock    the shared account of space (storage/ledger.py);
    │                               ledger.json.tmp while the lock holder rewrites it
    └── meta/                       the embedded metadata store (not ours)

Every blob is written the same way: a `BlobWriter` in `tmp/` hashes what it is given,
and `commit` checks it against the expected digest (and size) before the blob
becomes committed. Where committed blobs live is the backend's: `FilesystemBlobStore`
fsyncs and renames the temp file into `blobs/` (`os.replace`, then the directory
fsynced), so a crash at any moment leaves either no file or a complete verified
one; `S3BlobStore` (storage/s3store.py) uploads it to a bucket under the digest. The
committed side is async (an object store is a network away); the local side
(reservations, writers) blocks, and async callers run it in a thread.

Space is a bound, not a wish: a write reserves its size before its first byte
(`reserve`), and committed bytes plus every process's reservations are what is
compared with the `Quota` (`max_size` and its watermarks, `min_free` of the local
filesystem). The account is the ledger every process under this root shares; a
commit turns a reservation into usage, a failure releases it. Whether to evict to
make room is the evictor's business (`excess` says how much); the store only refuses
what does not fit.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import secrets
import shutil
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

import structlog

from mirror.errors import DigestInvalid, DigestMismatch, ObjectStoreUnavailable
from mirror.oci import Digest
from mirror.storage.ledger import HEARTBEAT, Ledger, LedgerState

LAYOUT_VERSION = "1"
LIST_PAGE = 2000  # committed blobs listed per hop to a worker thread

log = structlog.get_logger(__name__)

# Which bound a write is measured against: "high" (above it, evict first), "low" (what
# eviction aims for), "max" (the hard limit: beyond it a write is refused).
Level = Literal["high", "low", "max"]


@dataclass(frozen=True, slots=True)
class Quota:
    """How much the store may hold: `max_size` bytes under `blobs/` plus reservations,
    and at least `min_free` bytes (or `min_free_ratio` of the filesystem) left free."""

    max_size: int | None = None
    high_watermark: float = 0.95
    low_watermark: float = 0.85
    min_free: int | None = None
    min_free_ratio: float | None = None

    @property
    def bounded(self) -> bool:
        return (
            self.max_size is not None
            or self.min_free is not None
            or self.min_free_ratio is not None
        )

    def ceiling(self, level: Level) -> int | None:
        if self.max_size is None:
            return None
        if level == "max":
            return self.max_size
        fraction = self.high_watermark if level == "high" else self.low_watermark
        return int(self.max_size * fraction)

    def floor(self, total: int, level: Level) -> int | None:
        """Bytes to keep free on a filesystem of `total` bytes; eviction ("low") aims
        past the floor by the watermarks' gap, so it does not run for every write."""
        if self.min_free is None and self.min_free_ratio is None:
            return None
        floor = max(self.min_free or 0, int(total * (self.min_free_ratio or 0.0)))
        if level == "low":
            floor += int(floor * (self.high_watermark - self.low_watermark))
        return floor


class Reservation:
    """Bytes promised to one write before its first byte; released on commit or failure."""

    __slots__ = ("released", "size", "written")

    def __init__(self, size: int):
        self.size = size
        self.written = 0  # what has reached the disk: no longer pending against min_free
        self.released = False


@dataclass(frozen=True, slots=True)
class StoredInfo:
    """One committed blob as a listing of the store sees it."""

    digest: Digest
    size: int
    modified: float  # epoch seconds: when it was committed (or last rewritten)


class StoredBlob(ABC):
    """A committed blob opened for reading. Close it when done.

    `file` is set when the bytes are in a local file (served with sendfile or pread);
    otherwise `chunks` streams them from wherever the backend keeps them."""

    size: int
    file: BinaryIO | None = None

    @abstractmethod
    def chunks(self, start: int, end: int, chunk: int) -> AsyncGenerator[bytes, None]:
        """Bytes [start, end) of the blob, up to `chunk` at a time."""

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


class LocalBlob(StoredBlob):
    """A committed blob in an open local file: eviction cannot pull it away meanwhile."""

    def __init__(self, file: BinaryIO, size: int):
        self.file = file
        self.size = size

    async def chunks(self, start: int, end: int, chunk: int) -> AsyncGenerator[bytes, None]:
        assert self.file is not None
        fd = self.file.fileno()
        position = start
        while position < end:
            data = os.pread(fd, min(chunk, end - position), position)
            if not data:
                raise OSError(f"blob file ended at {position} of {end} bytes")
            position += len(data)
            yield data


class BlobStore(ABC):
    """Verified, content-addressed blobs, with a local root for what is in flight."""

    # Whether a committed blob's bytes are in a local file (`local_path`): a shared
    # volume's followers and `seed`/`export` can then use them directly.
    local_blobs = True

    def __init__(self, root: Path, quota: Quota | None = None):
        quota = quota or Quota()
        self.root = root
        self.blobs_dir = root / "blobs"
        self.tmp_dir = root / "tmp"
        self.meta_dir = root / "meta"
        self.corrupt_dir = root / "corrupt"
        self.quota = quota
        self._ledger = Ledger(root)
        # This process's live reservations: what they have not written yet still has to
        # come out of the filesystem's free space.
        self._reservations: set[Reservation] = set()
        self._reservations_lock = threading.Lock()
        self._last_heartbeat = 0.0
        self._usage = 0
        # Called (from any thread) when a commit took usage above the high watermark.
        self.on_over_high: Callable[[], None] | None = None

    @property
    def usage(self) -> int:
        """Committed bytes, as the shared ledger counts them."""
        committed = self._ledger.read().committed
        return self._usage if committed is None else committed

    @property
    def usage_known(self) -> bool:
        """Whether the shared ledger has a count (a new or damaged one has none)."""
        return self._ledger.read().committed is not None

    # Lifecycle

    async def start(self) -> None:
        """Connect to where committed blobs live (nothing to do on local disk)."""
        return None

    async def close(self) -> None:
        """Let go of connections opened by `start`."""
        return None

    async def check_backend(self) -> None:
        """Raise `ObjectStoreUnavailable` unless the committed blobs can be reached now
        (readiness detail; local disk is always there)."""
        return None

    # Space

    def reserve(self, size: int, level: Level = "max") -> Reservation | None:
        """Reserve `size` bytes for a write if they fit under `level`; None if not."""
        reservation = Reservation(size)
        with self._ledger.transaction() as state:
            self._know_committed(state)
            if self._shortfall(state, size, level) > 0:
                return None
            state.adjust(self._ledger.owner, size, time.time())
        with self._reservations_lock:
            self._reservations.add(reservation)
        return reservation

    def release(self, reservation: Reservation) -> None:
        """Give back a reservation whose write failed or was abandoned. Idempotent."""
        if reservation.released:
            return
        reservation.released = True
        with self._reservations_lock:
            self._reservations.discard(reservation)
        with self._ledger.transaction() as state:
            state.adjust(self._ledger.owner, -reservation.size, time.time())

    def excess(self, incoming: int = 0, level: Level = "high") -> int:
        """Bytes to free so that `incoming` more bytes fit under `level` (0: they do)."""
        with self._ledger.transaction() as state:
            self._know_committed(state)
            return self._shortfall(state, incoming, level)

    def heartbeat(self) -> None:
        """Keep this process's reservations alive in the ledger (others age them out)."""
        self._last_heartbeat = time.monotonic()
        with self._ledger.transaction() as state:
            state.adjust(self._ledger.owner, 0, time.time())

    def _heartbeat_due(self) -> None:
        if time.monotonic() - self._last_heartbeat > HEARTBEAT:
            self.heartbeat()

    def _shortfall(self, state: LedgerState, incoming: int, level: Level) -> int:
        assert state.committed is not None
        short = 0
        ceiling = self.quota.ceiling(level)
        if ceiling is not None:
            short = state.committed + state.reserved() + incoming - ceiling
        stat = os.statvfs(self.root) if self.quota.floor(0, level) is not None else None
        if stat is not None:
            floor = self.quota.floor(stat.f_blocks * stat.f_frsize, level)
            assert floor is not None
            with self._reservations_lock:
                unwritten = sum(max(r.size - r.written, 0) for r in self._reservations)
            # Other processes' reservations count whole: how much of them is written
            # (and so already out of the free space) is not known here.
            pending = state.reserved(excluding=self._ledger.owner) + unwritten
            free = stat.f_bavail * stat.f_frsize
            short = max(short, floor + pending + incoming - free)
        return max(short, 0)

    def _know_committed(self, state: LedgerState) -> None:
        """A ledger that lost count (new, or unreadable) is recounted, under its lock."""
        if state.committed is None:
            state.committed = self._count_committed()
        self._usage = state.committed

    @abstractmethod
    def _count_committed(self) -> int:
        """Committed bytes, counted afresh (blocking; called under the ledger's lock)."""

    def _set_committed(self, total: int) -> None:
        """The committed bytes as a fresh count found them."""
        with self._ledger.transaction() as state:
            state.committed = total
            self._usage = total

    def _account_commit(self, writer: BlobWriter, added: bool, replaced: int = 0) -> None:
        """A writer's blob is committed: its bytes count (unless they were there already;
        in place of the `replaced` bytes of a wrong-sized copy it overwrote) and its
        reservation is spent. Wakes eviction if that crossed the high watermark."""
        with self._ledger.transaction() as state:
            self._know_committed(state)
            assert state.committed is not None
            if added:
                state.committed = max(state.committed + writer.written - replaced, 0)
            if writer.reservation is not None:
                state.adjust(self._ledger.owner, -writer.reservation.size, time.time())
                writer._forget_reservation()
            self._usage = state.committed
            over_high = self.quota.bounded and self._shortfall(state, 0, "high") > 0
        if over_high and self.on_over_high is not None:
            self.on_over_high()

    def _account_removal(self, size: int) -> None:
        with self._ledger.transaction() as state:
            self._know_committed(state)
            assert state.committed is not None
            state.committed = max(state.committed - size, 0)
            self._usage = state.committed

    # The local root

    def prepare(self, sweep_older_than: float | None = 0.0) -> int:
        """Create the layout and sweep left-over temp files; return how many were swept.

        Only this process writes here: sweep everything (`0`). Other processes or nodes
        may be downloading into a shared tmp/: sweep only files idle for longer than
        `sweep_older_than` seconds (a live download touches its file continually).
        `None` sweeps nothing.
        """
        for directory in (self.root, self.blobs_dir, self.tmp_dir, self.meta_dir):
            directory.mkdir(parents=True, exist_ok=True)
        version_file = self.root / "layout-version"
        if version_file.exists():
            found = version_file.read_text(encoding="utf-8").strip()
            if found != LAYOUT_VERSION:
                raise RuntimeError(
                    f"storage root {self.root} has layout version {found}; "
                    f"this mirror uses {LAYOUT_VERSION}"
                )
        else:
            version_file.write_text(LAYOUT_VERSION + "\n", encoding="utf-8")
        if sweep_older_than is None:
            return 0
        swept = 0
        cutoff = time.time() - sweep_older_than
        for entry in self.tmp_dir.iterdir():
            # Nothing in tmp/ survives its writer: an in-flight download is unverified.
            try:
                if sweep_older_than and entry.lstat().st_mtime > cutoff:
                    continue
            except FileNotFoundError:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            swept += 1
        return swept

    def check_writable(self) -> None:
        """Raise OSError unless a file can be created in tmp/ (readiness)."""
        probe = self.tmp_dir / f".ready-{secrets.token_hex(4)}"
        probe.write_bytes(b"")
        probe.unlink()

    def new_writer(
        self,
        digest: Digest,
        expected_size: int | None = None,
        reservation: Reservation | None = None,
    ) -> BlobWriter:
        """A writer for one blob; it owns `reservation` from now on (released when the
        writer commits or is discarded, or here if the temp file cannot be made)."""
        try:
            return BlobWriter(self, digest, expected_size, reservation)
        except BaseException:
            if reservation is not None:
                self.release(reservation)
            raise

    async def put_bytes(self, digest: Digest, data: bytes) -> bool:
        """Verify and commit a small blob (a manifest) held in memory. False if it could
        not be stored (no room, or the store failed): the caller still has the bytes, and
        serves them; only the caching is lost."""
        reservation = await asyncio.to_thread(self.reserve, len(data))
        if reservation is None:
            log.warning("blob_not_cached", digest=str(digest), bytes=len(data), reason="no room")
            return False
        writer: BlobWriter | None = None
        try:
            writer = await asyncio.to_thread(self.new_writer, digest, len(data), reservation)
            await asyncio.to_thread(writer.write, data)
            await self.commit(writer)
            return True
        except (OSError, ObjectStoreUnavailable) as exc:
            log.warning(
                "blob_not_cached", digest=str(digest), reason="write failed", error=str(exc)
            )
            return False
        finally:
            if writer is not None:
                await asyncio.to_thread(writer.discard)

    # The committed blobs: the backend's

    @abstractmethod
    async def size(self, digest: Digest) -> int | None:
        """The size of a committed blob, or None if it is not here."""

    @abstractmethod
    async def open_committed(
        self, digest: Digest, expected_size: int | None = None
    ) -> StoredBlob | None:
        """The committed blob opened for reading; None if it is not here (or is not of
        `expected_size`, when that is known: such an object is not the blob)."""

    async def read_bytes(self, digest: Digest) -> bytes | None:
        blob = await self.open_committed(digest)
        if blob is None:
            return None
        try:
            return b"".join([chunk async for chunk in blob.chunks(0, blob.size, 1024 * 1024)])
        finally:
            blob.close()

    @abstractmethod
    async def commit(self, writer: BlobWriter) -> bool:
        """Verify the writer's bytes and make them the committed blob; True if they are
        new here, False if the blob was committed already. Raises `DigestMismatch`,
        OSError or `ObjectStoreUnavailable`, and then nothing is committed."""

    @abstractmethod
    async def delete(self, digest: Digest) -> int:
        """Remove a committed blob; return the bytes freed. Readers that opened it before
        keep reading it whole on local disk; on an object store their reads fail (an
        aborted transfer, never a short one)."""

    @abstractmethod
    async def move_aside(self, digest: Digest) -> str | None:
        """Take a (corrupt) blob out of the cache; say where it was kept to inspect."""

    async def hash_matches(self, digest: Digest) -> bool:
        """Re-read a committed blob and check it still hashes to its name."""
        blob = await self.open_committed(digest)
        if blob is None:
            return False
        hasher = digest.hasher()
        try:
            async for chunk in blob.chunks(0, blob.size, 1024 * 1024):
                await asyncio.to_thread(hasher.update, chunk)
        finally:
            blob.close()
        return hasher.hexdigest() == digest.hex

    @abstractmethod
    def list_committed(self) -> AsyncIterator[StoredInfo]:
        """Every committed blob, with its size and modification time."""

    async def scan_usage(self) -> int:
        """Count the committed bytes afresh and make that the shared count."""
        total = 0
        async for info in self.list_committed():
            total += info.size
        await asyncio.to_thread(self._set_committed, total)
        return total

    def local_path(self, digest: Digest) -> Path | None:
        """Where the committed blob's bytes are on local disk (None: not local)."""
        return None

    async def abandoned_uploads(self, older_than: float, now: float) -> list[str]:
        """Uploads to the backend started more than `older_than` seconds ago and never
        finished (an object store's multipart uploads; none on local disk)."""
        return []

    async def abort_upload(self, name: str) -> None:
        """Abort one of `abandoned_uploads`, freeing what it holds."""
        return None

    async def sweep_uploads(self, older_than: float | None) -> int:
        """At start, as `prepare` sweeps tmp/: abort the backend's uploads idle for more
        than `older_than` seconds (0: every one, this process is alone; None: none)."""
        if older_than is None:
            return 0
        names = await self.abandoned_uploads(older_than, time.time())
        for name in names:
            await self.abort_upload(name)
        return len(names)

    @contextlib.asynccontextmanager
    async def local_copy(self, digest: Digest) -> AsyncIterator[Path | None]:
        """A local file with the committed blob's bytes while the block runs (None if the
        blob is not here): the file itself on local disk, a temporary copy otherwise."""
        path = self.local_path(digest)
        if path is not None:
            yield path if path.exists() else None
            return
        blob = await self.open_committed(digest)
        if blob is None:
            yield None
            return
        copy = self.tmp_dir / f"copy-{digest.hex[:16]}.{secrets.token_hex(8)}"
        try:
            with open(copy, "xb") as out:  # noqa: ASYNC230 - one local file, written in chunks
                async for chunk in blob.chunks(0, blob.size, 1024 * 1024):
                    await asyncio.to_thread(out.write, chunk)
            yield copy
        finally:
            blob.close()
            copy.unlink(missing_ok=True)

    async def redirect_url(self, digest: Digest) -> str | None:
        """A URL clients can fetch the committed blob from directly (None: serve it)."""
        return None


class FilesystemBlobStore(BlobStore):
    """Committed blobs as files under `<root>/blobs/`."""

    def path(self, digest: Digest) -> Path:
        # Digest.parse has already restricted algorithm and hex to [a-z0-9], so this
        # path cannot leave blobs/.
        return self.blobs_dir / digest.algorithm / digest.hex[:2] / digest.hex

    def local_path(self, digest: Digest) -> Path:
        return self.path(digest)

    def _count_committed(self) -> int:
        return sum(stat.st_size for _, stat in self.iter_digests())

    async def size(self, digest: Digest) -> int | None:
        # A stat of a file whose directory is in the page cache: not worth a thread hop.
        try:
            return self.path(digest).stat().st_size
        except FileNotFoundError:
            return None

    async def open_committed(
        self, digest: Digest, expected_size: int | None = None
    ) -> StoredBlob | None:
        try:
            file = open(self.path(digest), "rb")  # noqa: SIM115, ASYNC230 - the caller owns it
        except FileNotFoundError:
            return None
        size = os.fstat(file.fileno()).st_size
        if expected_size is not None and size != expected_size:
            # Only a verified file is ever renamed into blobs/; this one was changed since.
            file.close()
            log.warning("blob_wrong_size", digest=str(digest), size=size, expected=expected_size)
            return None
        return LocalBlob(file, size)

    async def read_bytes(self, digest: Digest) -> bytes | None:
        try:
            return await asyncio.to_thread(self.path(digest).read_bytes)
        except FileNotFoundError:
            return None

    async def commit(self, writer: BlobWriter) -> bool:
        return await asyncio.to_thread(self._commit_file, writer)

    def _commit_file(self, writer: BlobWriter) -> bool:
        """Verify, fsync, and move into `blobs/`: only now is the blob in the cache. The
        rename and the account change together, under the ledger's lock."""
        writer.seal()
        final = self.path(writer.digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        with self._ledger.transaction() as state:
            self._know_committed(state)
            assert state.committed is not None
            # Another process's copy is already counted; a copy of the wrong size (changed
            # since it was committed) is overwritten, and its count replaced.
            try:
                existing: int | None = final.stat().st_size
            except FileNotFoundError:
                existing = None
            added = existing != writer.written
            if added:
                state.committed = max(state.committed + writer.written - (existing or 0), 0)
            os.replace(writer.temp_path, final)
            writer.committed = True
            if writer.reservation is not None:
                state.adjust(self._ledger.owner, -writer.reservation.size, time.time())
                writer._forget_reservation()
            self._usage = state.committed
            over_high = self.quota.bounded and self._shortfall(state, 0, "high") > 0
        _fsync_dir(final.parent)
        if over_high and self.on_over_high is not None:
            self.on_over_high()
        return added

    async def delete(self, digest: Digest) -> int:
        return await asyncio.to_thread(self._delete_file, digest)

    def _delete_file(self, digest: Digest) -> int:
        # Readers with the file open keep reading it whole: the inode lives until they
        # close it.
        path = self.path(digest)
        with self._ledger.transaction() as state:
            self._know_committed(state)
            assert state.committed is not None
            try:
                size = path.stat().st_size
                path.unlink()
            except FileNotFoundError:
                return 0
            state.committed = max(state.committed - size, 0)
            self._usage = state.committed
        return size

    async def move_aside(self, digest: Digest) -> str | None:
        return await asyncio.to_thread(self._move_file_aside, digest)

    def _move_file_aside(self, digest: Digest) -> str | None:
        """Keep a (corrupt) blob under corrupt/ to inspect, out of the cache."""
        self.corrupt_dir.mkdir(exist_ok=True)
        target = self.corrupt_dir / f"{digest.algorithm}-{digest.hex}"
        with self._ledger.transaction() as state:
            self._know_committed(state)
            assert state.committed is not None
            try:
                size = self.path(digest).stat().st_size
                os.replace(self.path(digest), target)
            except FileNotFoundError:
                return None
            state.committed = max(state.committed - size, 0)
            self._usage = state.committed
        return str(target)

    async def hash_matches(self, digest: Digest) -> bool:
        return await asyncio.to_thread(self._file_hash_matches, digest)

    def _file_hash_matches(self, digest: Digest) -> bool:
        hasher = digest.hasher()
        try:
            with open(self.path(digest), "rb") as file:
                while chunk := file.read(1024 * 1024):
                    hasher.update(chunk)
        except FileNotFoundError:
            return False
        return hasher.hexdigest() == digest.hex

    async def list_committed(self) -> AsyncIterator[StoredInfo]:
        # A page of the walk per hop to a thread: a million files listed in one piece
        # held the event loop for seconds while the caller went through them.
        walk = self.iter_digests()
        while page := await asyncio.to_thread(list, itertools.islice(walk, LIST_PAGE)):
            for digest, stat in page:
                yield StoredInfo(digest, stat.st_size, stat.st_mtime)

    async def scan_usage(self) -> int:
        """Walk blobs/ and set the shared count to the bytes it holds (under the lock,
        so no commit or delete slips between the walk and the count)."""
        return await asyncio.to_thread(self.scan_usage_blocking)

    def scan_usage_blocking(self) -> int:
        with self._ledger.transaction() as state:
            state.committed = None
            self._know_committed(state)
        return self._usage

    def iter_digests(self) -> Iterator[tuple[Digest, os.stat_result]]:
        """Every committed blob with its stat (size, mtime)."""
        for algorithm_dir in sorted(self.blobs_dir.iterdir()):
            for prefix_dir in sorted(algorithm_dir.iterdir()):
                with os.scandir(prefix_dir) as entries:
                    for entry in entries:
                        try:
                            digest = Digest.parse(f"{algorithm_dir.name}:{entry.name}")
                        except DigestInvalid:
                            continue  # not ours: a stray file someone put there
                        with contextlib.suppress(FileNotFoundError):
                            yield digest, entry.stat()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DigestCheck:
    """Hashes bytes as they pass and says whether they are the blob they claim to be."""

    def __init__(self, digest: Digest, expected_size: int | None):
        self.digest = digest
        self.expected_size = expected_size
        self._hasher = digest.hasher()
        self.seen = 0
        self._verified = False

    def update(self, chunk: bytes) -> None:
        self._hasher.update(chunk)
        self.seen += len(chunk)

    def verify(self) -> None:
        """Raise `DigestMismatch` unless what passed hashes to the digest (and size)."""
        if self._verified:
            return
        actual = self._hasher.hexdigest()
        if actual != self.digest.hex:
            raise DigestMismatch(
                "upstream content does not match its digest",
                detail={
                    "expected": str(self.digest),
                    "actual": f"{self.digest.algorithm}:{actual}",
                },
            )
        if self.expected_size is not None and self.seen != self.expected_size:
            raise DigestMismatch(
                "upstream content has the wrong size",
                detail={"expected": self.expected_size, "actual": self.seen},
            )
        self._verified = True


class BlobWriter:
    """A temp file that hashes what is written and commits only a verified blob."""

    def __init__(
        self,
        store: BlobStore,
        digest: Digest,
        expected_size: int | None,
        reservation: Reservation | None = None,
    ):
        self.store = store
        self.digest = digest
        self.expected_size = expected_size
        self.reservation = reservation
        self.temp_path = store.tmp_dir / f"{digest.hex[:16]}.{secrets.token_hex(8)}"
        self._check = DigestCheck(digest, expected_size)
        self._file = open(self.temp_path, "xb")  # noqa: SIM115 - owned until commit/discard
        self.written = 0
        self.committed = False  # the temp file became the committed blob (renamed)

    def write(self, chunk: bytes) -> None:
        self._file.write(chunk)
        self._check.update(chunk)
        self.written += len(chunk)
        if self.reservation is not None:
            self.reservation.written = self.written
            self.store._heartbeat_due()

    def flush(self) -> None:
        """Make written bytes visible to readers of the temp file."""
        self._file.flush()

    def verify(self) -> None:
        """Raise `DigestMismatch` unless what was written hashes to the digest (and size)."""
        self._check.verify()

    def seal(self) -> None:
        """Verify what was written, then fsync and close the temp file: its bytes are
        the blob's, ready to be committed (`BlobStore.commit`)."""
        self.verify()
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()

    def _forget_reservation(self) -> None:
        reservation, self.reservation = self.reservation, None
        if reservation is not None:
            reservation.released = True
            with self.store._reservations_lock:
                self.store._reservations.discard(reservation)

    def discard(self) -> None:
        """Close and delete the temp file unless it became the committed blob, and give
        back the reservation. Safe to call twice."""
        if not self._file.closed:
            # Closing flushes what is buffered, which fails on a full disk (ENOSPC). Those
            # bytes are being thrown away, and the file is closed all the same.
            with contextlib.suppress(OSError):
                self._file.close()
        if not self.committed:
            self.temp_path.unlink(missing_ok=True)
        if self.reservation is not None:
            reservation, self.reservation = self.reservation, None
            self.store.release(reservation)
