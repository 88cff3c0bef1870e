"""Committed blobs in an S3-compatible bucket: the blob store of a stateless fleet.

Replicas on one bucket share every committed blob; their local root (`storage.root`)
keeps only what is in flight and the account of space. The keys, under
`storage.s3.prefix`:

    <prefix>blobs/<algorithm>/<hex>      complete, verified, immutable
    <prefix>corrupt/<algorithm>-<hex>    what `mirror verify` took out of the cache

A blob reaches the bucket the way it reaches local disk: written to a temp file
under `tmp/` as it arrives (clients stream from that file), verified, and only then
uploaded (multipart when large, aborted on any failure) under its digest. S3 makes an
object visible only once its upload completed, so the bucket holds complete,
verified blobs or nothing; an object whose size differs from the size recorded for
the blob is treated as missing (it is fetched again and overwritten).

The committed bytes are counted by listing the bucket (at start, and on the
evictor's rescans) plus this process's own commits and deletions in between; other
replicas' writes show up at the next rescan. Reservations are this root's, as on local
disk. Failures of the bucket are `ObjectStoreUnavailable`: the cache then fetches
and streams without caching, never failing a pull the upstream can answer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import structlog

from mirror.config import S3Config
from mirror.errors import DigestInvalid, ObjectStoreUnavailable
from mirror.oci import Digest
from mirror.storage.blobstore import BlobStore, BlobWriter, Quota, StoredBlob, StoredInfo
from mirror.storage.s3 import S3Objects

log = structlog.get_logger(__name__)

# How an abandoned multipart upload is named to `gc` (and found again to abort it).
_UPLOAD_SEPARATOR = "?uploadId="
# After a failure, the bucket is taken for down this long: requests meanwhile go
# straight to the upstream instead of each waiting out the client's timeouts first.
OUTAGE_HOLD = 5.0

T = TypeVar("T")


class S3Blob(StoredBlob):
    """A committed object, found by a HEAD; its bytes are read when asked for."""

    def __init__(self, objects: S3Objects, key: str, size: int):
        self._objects = objects
        self._key = key
        self.size = size

    async def chunks(self, start: int, end: int, chunk: int) -> AsyncGenerator[bytes, None]:
        if start >= end:
            return
        # A reader must fail rather than end early: its client would take a short body
        # for a whole one. The object may have gone, or been replaced by other bytes,
        # since the HEAD that opened it (S3 serves the part of a range it has).
        body = await self._objects.open_range(self._key, start, end)
        if body is None:
            raise ObjectStoreUnavailable(
                "blob object went away while it was read", detail={"key": self._key}
            )
        received = 0
        async with body:
            if body.size != self.size:
                raise ObjectStoreUnavailable(
                    "blob object changed size while it was read",
                    detail={"key": self._key, "size": body.size, "expected": self.size},
                )
            async for data in body.iter_chunks(chunk):
                received += len(data)
                yield data
        if received != end - start:
            raise ObjectStoreUnavailable(
                "blob object ended early",
                detail={"key": self._key, "received": received, "expected": end - start},
            )


class S3BlobStore(BlobStore):
    """Committed blobs as objects in one bucket, under one prefix."""

    local_blobs = False

    def __init__(
        self,
        root: Path,
        settings: S3Config,
        quota: Quota | None = None,
    ):
        super().__init__(root, quota)
        self._objects = S3Objects(settings)
        # S3Objects puts every key under `storage.s3.prefix`.
        self._blobs_prefix = "blobs/"
        self._corrupt_prefix = "corrupt/"
        self._location = f"s3://{settings.bucket}/{settings.prefix}"
        self._redirect = settings.redirect
        self._redirect_expiry = int(settings.redirect_expiry)
        # The committed bytes at the last listing: what a ledger that lost count starts
        # from until the next one.
        self._listed = 0
        self._down_until = 0.0  # monotonic time until which the bucket is taken for down

    async def start(self) -> None:
        await self._objects.start()

    async def close(self) -> None:
        await self._objects.close()

    async def check_backend(self) -> None:
        await self._objects.check()  # a real probe, whatever the last failure said
        self._down_until = 0.0

    async def _call(self, operation: Coroutine[Any, Any, T]) -> T:
        """Run one bucket operation, unless a recent failure says the bucket is down."""
        if time.monotonic() < self._down_until:
            operation.close()
            raise ObjectStoreUnavailable("the object store failed moments ago; not asked again")
        try:
            return await operation
        except ObjectStoreUnavailable as exc:
            if time.monotonic() >= self._down_until:
                log.warning("object_store_down", error=exc.message, hold=OUTAGE_HOLD)
            self._down_until = time.monotonic() + OUTAGE_HOLD
            raise

    def key(self, digest: Digest) -> str:
        # Digest.parse has restricted algorithm and hex to [a-z0-9]: the key stays
        # under the prefix.
        return f"{self._blobs_prefix}{digest.algorithm}/{digest.hex}"

    def _digest_of(self, key: str) -> Digest | None:
        algorithm, _, hex_digest = key.removeprefix(self._blobs_prefix).partition("/")
        try:
            return Digest.parse(f"{algorithm}:{hex_digest}")
        except DigestInvalid:
            return None  # not ours: something else under the prefix

    def _count_committed(self) -> int:
        return self._listed

    async def size(self, digest: Digest) -> int | None:
        return await self._call(self._objects.head(self.key(digest)))

    async def open_committed(
        self, digest: Digest, expected_size: int | None = None
    ) -> StoredBlob | None:
        key = self.key(digest)
        size = await self._call(self._objects.head(key))
        if size is None:
            return None
        if expected_size is not None and size != expected_size:
            log.warning(
                "blob_object_wrong_size", digest=str(digest), size=size, expected=expected_size
            )
            return None
        return S3Blob(self._objects, key, size)

    async def read_bytes(self, digest: Digest) -> bytes | None:
        return await self._call(self._objects.get_bytes(self.key(digest)))

    async def commit(self, writer: BlobWriter) -> bool:
        await asyncio.to_thread(writer.seal)
        key = self.key(writer.digest)
        # Another replica may have uploaded it meanwhile: the same bytes, so keep theirs.
        # An object of another size is not the blob: it is overwritten, and its count
        # replaced.
        existing = await self._call(self._objects.head(key))
        added = existing != writer.written
        if added:
            await self._call(self._objects.put_file(key, writer.temp_path, writer.written))
        await asyncio.to_thread(self._account_commit, writer, added, existing or 0)
        return added

    async def delete(self, digest: Digest) -> int:
        key = self.key(digest)
        size = await self._objects.head(key)
        if size is None:
            return 0
        await self._objects.delete(key)
        await asyncio.to_thread(self._account_removal, size)
        return size

    async def move_aside(self, digest: Digest) -> str | None:
        key = self.key(digest)
        size = await self._objects.head(key)
        if size is None:
            return None
        target = f"{self._corrupt_prefix}{digest.algorithm}-{digest.hex}"
        kept: str | None = f"{self._location}{target}"
        try:
            await self._objects.copy(key, target)
        except ObjectStoreUnavailable as exc:
            # Out of the cache it goes all the same (a copy is refused above 5 GB).
            log.warning("corrupt_blob_not_kept", digest=str(digest), error=exc.message)
            kept = None
        await self._objects.delete(key)
        await asyncio.to_thread(self._account_removal, size)
        return kept or "deleted"

    async def list_committed(self) -> AsyncIterator[StoredInfo]:
        async for info in self._objects.list(self._blobs_prefix):
            digest = self._digest_of(info.key)
            if digest is not None:
                yield StoredInfo(digest, info.size, info.last_modified)

    async def scan_usage(self) -> int:
        total = await super().scan_usage()
        self._listed = total
        return total

    async def redirect_url(self, digest: Digest) -> str | None:
        if not self._redirect:
            return None
        return await self._objects.presign_get(self.key(digest), self._redirect_expiry)

    async def abandoned_uploads(self, older_than: float, now: float) -> list[str]:
        return [
            f"{upload.key}{_UPLOAD_SEPARATOR}{upload.upload_id}"
            for upload in await self._objects.list_uploads(self._blobs_prefix)
            if now - upload.initiated > older_than
        ]

    async def abort_upload(self, name: str) -> None:
        key, _, upload_id = name.partition(_UPLOAD_SEPARATOR)
        await self._objects.abort_upload(key, upload_id)
