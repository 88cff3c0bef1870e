"""One upstream blob download, shared by every client that wants the blob meanwhile.

A `BlobDownload` streams the upstream body into a temp file through a
`BlobWriter` (hashing as it goes) and publishes how many bytes are on disk.
Each client reads the growing temp file from its own offset as bytes arrive,
so no client waits for the whole layer, and a client that joins late starts
from the file rather than the network. A client hanging up stops only its own
reader; the download runs on in a task the blob cache owns.

The last byte is held back from every reader until the digest and size are
verified, so a client can never receive a complete body of unverified bytes;
the fsync and rename into `blobs/` follow without holding clients up. On a
mismatch or an upstream error the temp file is deleted and every reader raises,
which the HTTP layer turns into an aborted connection. A failed write (ENOSPC or any
other OSError) is such an error: nothing partial is committed.

Before the first byte the download reserves the upstream's Content-Length (`reserve`,
the evictor's, which makes room by evicting). A blob refused room is still served by
this same mechanism, only without a disk: its bytes pass through a bounded window in
memory (`_PassThrough`), hashed as they pass, the last one held back until the
digest is verified, dropped once every reader has them, never stored. The upstream is
read no faster than the slowest reader, and when every reader has gone the download
stops: nobody else can join it once its first bytes were dropped.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import os
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Protocol

import structlog

from mirror.errors import (
    BlobUnknown,
    MirrorError,
    ObjectStoreUnavailable,
    StorageFull,
    UpstreamBadResponse,
    UpstreamUnavailable,
)
from mirror.oci import Digest
from mirror.storage.blobstore import BlobStore, BlobWriter, DigestCheck, Reservation
from mirror.upstream.client import UpstreamResponse
from mirror.upstream.status import raise_for_upstream_status

log = structlog.get_logger(__name__)

# What has arrived is written in one hop to the worker thread, up to this much.
WRITE_BATCH = 1024 * 1024
READ_CHUNK = 512 * 1024
# Following another process's download: how often its temp file is looked at, and how
# often its lease.
FOLLOW_POLL = 0.02
FOLLOW_HOLDER_CHECK = 0.5
# An uncached download holds at most this much beyond its slowest reader, and gives up
# when no reader has taken a byte for this long.
PASS_THROUGH_WINDOW = 8 * 1024 * 1024
PASS_THROUGH_IDLE = 60.0

Reserve = Callable[[int], Awaitable[Reservation | None]]
# Told the temp file and size once the upstream answered; None: not cached, no file.
Announce = Callable[[Path | None, int | None], Awaitable[None]]


class SourceClient(Protocol):
    """Where a download's bytes come from: an upstream, or a peer replica (`peers.py`)."""

    async def open(
        self,
        method: str,
        repository: str,
        path: str,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> UpstreamResponse: ...


class _PassThrough:
    """The bytes of a download that is not cached, held only until every reader has
    them (`trim`)."""

    def __init__(self, check: DigestCheck):
        self.check = check
        self.base = 0  # offset of the first byte still held
        self.held = 0
        self._chunks: collections.deque[bytes] = collections.deque()
        self.positions: dict[int, int] = {}  # reader -> the next offset it wants

    def append(self, data: bytes) -> None:
        self.check.update(data)
        self._chunks.append(data)
        self.held += len(data)

    def read(self, position: int, limit: int) -> bytes:
        if position < self.base:
            raise UpstreamUnavailable("the start of this uncached blob has already passed")
        offset = self.base
        for chunk in self._chunks:
            if position < offset + len(chunk):
                start = position - offset
                return chunk[start : start + limit]
            offset += len(chunk)
        return b""

    def trim(self, keep_from: int) -> None:
        while self._chunks and self.base + len(self._chunks[0]) <= keep_from:
            chunk = self._chunks.popleft()
            self.base += len(chunk)
            self.held -= len(chunk)


class BlobDownload:
    """The in-flight fetch of one blob and the readers following it."""

    _reader_ids = itertools.count()

    def __init__(self, store: BlobStore, digest: Digest, reserve: Reserve | None = None):
        self.store = store
        self.digest = digest
        self._reserve = reserve
        self._pass: _PassThrough | None = None
        self._joined = 0
        self._drained = asyncio.Event()
        self.size: int | None = None
        self.written = 0
        self.error: BaseException | None = None
        self.verified = False
        self.committed = False
        self.temp_path: Path | None = None
        # Where the bytes come from ("upstream" or "peer"), for the access log and metrics.
        self.source = "upstream"
        # False: pass the bytes through without storing them (someone else stores them).
        self.keep = True
        self._started = asyncio.Event()
        self._progress = asyncio.Condition()
        self._finished = False
        # Set by the owner once everything about this download is settled: committed
        # and recorded, or failed.
        self.settled = asyncio.Event()
        self.started = time.time()  # for the console's list of downloads

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def source_result(self) -> str:
        """The cache result a client of this download is logged with."""
        return "peer" if self.source == "peer" else "miss"

    @property
    def joinable(self) -> bool:
        """A new client can be served from this download: it is cached, or nothing it
        passed through has been dropped yet."""
        return self._pass is None or self._pass.base == 0

    def join(self) -> None:
        """A client will read this download (until `leave`)."""
        self._joined += 1

    def leave(self) -> None:
        self._joined -= 1
        self._drained.set()  # an uncached download with nobody left stops

    def _nobody_reading(self) -> bool:
        return self._joined <= 0 and not (self._pass is not None and self._pass.positions)

    async def wait_started(self) -> None:
        """Wait for the upstream's headers; raise the failure if it failed before."""
        await self._started.wait()
        if self.error is not None and self.temp_path is None:
            raise self.error

    async def run(
        self,
        client: SourceClient,
        repository: str,
        announce: Announce | None = None,
    ) -> None:
        """Download, verify and commit. Never raises: the outcome is on `self`.

        `announce` is told the temp file and size once the upstream answered, so other
        processes on a shared volume can follow the download (None: it is not cached).
        """
        started = time.monotonic()
        writer: BlobWriter | None = None
        try:
            async with await client.open("GET", repository, f"blobs/{self.digest}") as response:
                raise_for_upstream_status(response, BlobUnknown)
                self.size = response.content_length
                writer = await self._open_writer()
                self.temp_path = None if writer is None else writer.temp_path
                self._started.set()
                if announce is not None:
                    await announce(self.temp_path, self.size)
                async for batch in response.iter_batches(WRITE_BATCH):
                    await self._append(writer, batch)
            if writer is None:
                assert self._pass is not None
                self._pass.check.verify()
            else:
                await asyncio.to_thread(writer.verify)
            # Verified bytes may reach clients now; the fsync need not hold them up.
            self.verified = True
            async with self._progress:
                self._progress.notify_all()
            if writer is not None:
                await self._commit(writer)
            log.info(
                "blob_fetched",
                digest=str(self.digest),
                bytes=self.written,
                cached=self.committed,
                seconds=round(time.monotonic() - started, 3),
            )
        except StorageFull as exc:
            # Uncached, and every client went away: nothing more to do.
            self.error = exc
            log.info("blob_pass_through_stopped", digest=str(self.digest), bytes=self.written)
        except BaseException as exc:
            self.error = (
                exc
                if isinstance(exc, MirrorError)
                else UpstreamUnavailable("blob download failed", detail=repr(exc))
            )
            log.warning(
                "blob_fetch_failed", digest=str(self.digest), error=repr(exc), bytes=self.written
            )
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            if writer is not None:
                writer.discard()
            await self._finish()

    async def follow(
        self, temp_path: Path, size: int | None, holder_gone: Callable[[], Awaitable[bool]]
    ) -> bool:
        """Serve readers from another process's download on this shared volume.

        Its temp file is tailed as it grows; the last byte is released only once the
        holder committed (the rename keeps the inode our readers hold, so what they read
        is what was verified). True once committed; False, with readers failed, if the
        holder went away first.
        """
        self.size = size
        self.temp_path = temp_path
        self._started.set()
        next_check = time.monotonic() + FOLLOW_HOLDER_CHECK
        while True:
            try:
                grown: int | None = os.stat(temp_path).st_size
            except FileNotFoundError:
                grown = None
            # The temp file goes when the blob is committed (or the download failed);
            # the holder is also asked now and then, in case it died with the file there.
            if grown is None or time.monotonic() >= next_check:
                if await self.adopt_committed():
                    return True
                if await holder_gone():
                    if await self.adopt_committed():  # committed between the two looks
                        return True
                    await self.fail(UpstreamUnavailable("the process fetching this blob went away"))
                    return False
                next_check = time.monotonic() + FOLLOW_HOLDER_CHECK
            if grown is not None and grown > self.written:
                self.written = grown
                async with self._progress:
                    self._progress.notify_all()
            await asyncio.sleep(FOLLOW_POLL)

    async def adopt_committed(self) -> bool:
        """Another process committed this blob: readers read the committed blob. False
        (and nothing changed) if it is gone again, evicted in between, or cannot be
        reached now."""
        try:
            size = await self.store.size(self.digest)
        except ObjectStoreUnavailable:
            return False
        if size is None:
            return False
        self.size = self.written = size
        self.temp_path = self.store.local_path(self.digest)
        self.verified = self.committed = True
        await self._finish()
        return True

    async def _commit(self, writer: BlobWriter) -> None:
        """Make the verified temp file the committed blob. A store that fails now costs
        only the caching: every reader still gets the verified bytes it came for."""
        try:
            await self.store.commit(writer)
        except (OSError, ObjectStoreUnavailable) as exc:
            log.warning(
                "blob_not_cached", digest=str(self.digest), reason="store failed", error=str(exc)
            )
            return
        self.committed = True

    async def fail(self, error: MirrorError) -> None:
        if self.error is None and not self.committed:
            self.error = error
        await self._finish()

    async def _finish(self) -> None:
        self._finished = True
        self._started.set()
        async with self._progress:
            self._progress.notify_all()

    async def _open_writer(self) -> BlobWriter | None:
        """A temp file with room reserved for the blob, or None (and a pass-through) if
        it cannot fit or is not to be kept. An unknown size reserves nothing: it is
        counted when committed."""
        if not self.keep:
            self._pass = _PassThrough(DigestCheck(self.digest, self.size))
            return None
        if self.size is None:
            return await asyncio.to_thread(self.store.new_writer, self.digest, None)
        if self._reserve is not None:
            reservation = await self._reserve(self.size)
        else:
            reservation = await asyncio.to_thread(self.store.reserve, self.size)
        if reservation is None:
            self._pass = _PassThrough(DigestCheck(self.digest, self.size))
            log.info("blob_not_cached", digest=str(self.digest), bytes=self.size, reason="no room")
            return None
        return await asyncio.to_thread(self.store.new_writer, self.digest, self.size, reservation)

    async def _append(self, writer: BlobWriter | None, data: bytes) -> None:
        if writer is not None:
            await asyncio.to_thread(_write_and_flush, writer, data)
        else:
            assert self._pass is not None
            await self._wait_for_readers(self._pass)
            self._pass.append(data)
        self.written += len(data)
        async with self._progress:
            self._progress.notify_all()

    async def _wait_for_readers(self, passing: _PassThrough) -> None:
        """Hold the upstream back while the window is full; stop when nobody reads."""
        while True:
            if self._nobody_reading():
                raise StorageFull("not cached for lack of room, and no client is reading it")
            if passing.held < PASS_THROUGH_WINDOW:
                return
            self._drained.clear()
            try:
                await asyncio.wait_for(self._drained.wait(), PASS_THROUGH_IDLE)
            except TimeoutError:
                raise StorageFull("not cached for lack of room, and no client reads it") from None

    def _reader_moved(self, passing: _PassThrough) -> None:
        # Drop what every reader has; while a client has joined but not started reading
        # (it may want byte 0), keep everything.
        if passing.positions and len(passing.positions) >= self._joined:
            passing.trim(min(passing.positions.values()))
        self._drained.set()

    def _readable_limit(self, end: int | None) -> int:
        """How far a reader of [.., end) may go now: the last byte of the blob, and of a
        range, waits until the whole blob is verified, so no response is ever complete
        with bytes nobody checked."""
        if self.verified:
            return self.written if end is None else min(self.written, end)
        limit = max(self.written - 1, 0)
        return limit if end is None else min(limit, end - 1)

    async def iter_bytes(
        self, start: int = 0, end: int | None = None, *, chunk: int = READ_CHUNK
    ) -> AsyncGenerator[bytes, None]:
        """Bytes [start, end) of the blob as they arrive, up to `chunk` at a time; raises if
        the download fails."""
        await self.wait_started()
        passing = self._pass
        reader = next(self._reader_ids)
        fd: int | None = None
        if passing is not None:
            passing.read(start, 0)  # raises if those bytes are gone
            passing.positions[reader] = start
        else:
            fd = self._open_bytes()
            if fd is None:
                # Committed where no local file shows it (an object store): read it there.
                async for data in self._committed_bytes(start, end, chunk):
                    yield data
                return
        try:
            position = start
            while end is None or position < end:
                limit = self._readable_limit(end)
                if position < limit:
                    wanted = min(chunk, limit - position)
                    if passing is None:
                        assert fd is not None
                        data = os.pread(fd, wanted, position)
                    else:
                        data = passing.read(position, wanted)
                    if not data:
                        raise UpstreamBadResponse("blob temp file shorter than recorded")
                    position += len(data)
                    if passing is not None:
                        passing.positions[reader] = position
                        self._reader_moved(passing)
                    yield data
                    continue
                if self.verified:
                    break
                if self._finished:
                    raise self.error or UpstreamUnavailable("blob download failed")
                async with self._progress:
                    if self._readable_limit(end) <= position and not self._finished:
                        await self._progress.wait()
        finally:
            if fd is not None:
                os.close(fd)
            if passing is not None:
                del passing.positions[reader]
                self._reader_moved(passing)

    def _open_bytes(self) -> int | None:
        """A descriptor on the bytes readers follow: the temp file, or the committed file
        it was renamed to (perhaps a moment before `committed` is set: only a verified
        blob is ever renamed there). None when the blob is committed and not local."""
        for path in (self.temp_path, self.store.local_path(self.digest)):
            if path is None:
                continue
            try:
                return os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
        if self.committed:
            return None
        raise self.error or UpstreamUnavailable("blob download failed")

    async def _committed_bytes(
        self, start: int, end: int | None, chunk: int
    ) -> AsyncGenerator[bytes, None]:
        blob = await self.store.open_committed(self.digest, self.size)
        if blob is None:
            raise UpstreamUnavailable("blob left the cache as it was committed")
        try:
            async for data in blob.chunks(start, blob.size if end is None else end, chunk):
                yield data
        finally:
            blob.close()

    @property
    def clients(self) -> int:
        """Clients reading this download now."""
        return max(self._joined, 0)


def _write_and_flush(writer: BlobWriter, data: bytes) -> None:
    writer.write(data)
    writer.flush()
