"""Objects in an S3-compatible bucket: the thin async layer the S3 blob store stands on.

It knows S3 and nothing of registries or caching: keys are strings the caller chooses,
placed under the configured `storage.s3.prefix`. One aiobotocore client serves the
process (its aiohttp pool is shared by every request). Bodies are streamed, never read
whole; large files go up as multipart uploads that are aborted on any failure, so a
failed upload leaves no object behind.

Errors: an absent key or bucket entry is a None (or an empty listing), never an
exception. Everything else botocore, aiohttp or the network raises becomes
`ObjectStoreUnavailable` here and nowhere else. Timeouts and retries are short, so a dead
or hung server fails a request in seconds.
"""

from __future__ import annotations

import asyncio
import builtins
import io
import os
from collections.abc import AsyncIterator, Awaitable, Iterator
from contextlib import AsyncExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import aiohttp
import structlog
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from mirror.config import S3Config
from mirror.errors import ObjectStoreUnavailable

log = structlog.get_logger(__name__)

T = TypeVar("T")

# Parts of one multipart upload in flight at once: enough to fill a link with some
# latency. Each is streamed from the temp file (`FilePart`), so memory does not grow
# with the part size.
UPLOAD_CONCURRENCY = 4
# Seconds to wait for AbortMultipartUpload while a failed upload is cleaned up.
ABORT_TIMEOUT = 10.0
ABSENT_CODES = frozenset({"404", "NoSuchKey", "NotFound", "NoSuchUpload"})
MISSING_BUCKET_CODES = frozenset({"NoSuchBucket"})
# Everything a request can fail with below this module, besides its own errors.
_TRANSPORT_ERRORS = (BotoCoreError, aiohttp.ClientError, asyncio.TimeoutError, OSError)


@dataclass(frozen=True)
class ObjectInfo:
    key: str  # without the configured prefix
    size: int
    last_modified: float  # epoch seconds


@dataclass(frozen=True)
class UploadInfo:
    key: str  # without the configured prefix
    upload_id: str
    initiated: float  # epoch seconds


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _http_status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _is_absent(exc: ClientError) -> bool:
    return _error_code(exc) in ABSENT_CODES or (
        _http_status(exc) == 404 and _error_code(exc) not in MISSING_BUCKET_CODES
    )


@contextmanager
def _unavailable(operation: str, key: str | None = None) -> Iterator[None]:
    """Turn what botocore and aiohttp raise into `ObjectStoreUnavailable`."""
    try:
        yield
    except ClientError as exc:
        code = _error_code(exc)
        raise ObjectStoreUnavailable(
            f"object store refused {operation}: {code or _http_status(exc)}",
            detail={"operation": operation, "key": key, "code": code},
        ) from exc
    except _TRANSPORT_ERRORS as exc:
        raise ObjectStoreUnavailable(
            f"object store unreachable during {operation}: {type(exc).__name__}",
            detail={"operation": operation, "key": key},
        ) from exc


class ObjectRange:
    """An open GetObject response: `size` is the whole object's size; the body holds the
    requested range. Close it (or use `async with`) to give the connection back."""

    def __init__(self, key: str, size: int, length: int, body: Any):
        self.key = key
        self.size = size
        self.length = length  # bytes in this response's body
        self._body = body

    async def iter_chunks(self, chunk_size: int = 256 * 1024) -> AsyncIterator[bytes]:
        with _unavailable("GetObject body", self.key):
            async for chunk in self._body.iter_chunks(chunk_size):
                yield chunk

    def close(self) -> None:
        self._body.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _full_size(response: dict[str, Any]) -> int:
    """The whole object's size: from `Content-Range: bytes a-b/size` on a ranged answer,
    else its Content-Length."""
    content_range = response.get("ContentRange")
    if content_range:
        total = str(content_range).rpartition("/")[2]
        if total.isdigit():
            return int(total)
    return int(response["ContentLength"])


class S3Objects:
    """The bucket of `settings`: `await start()` once, `await close()` at shut-down."""

    def __init__(
        self,
        settings: S3Config,
        *,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
        max_attempts: int = 2,
    ):
        self.settings = settings
        self.bucket = settings.bucket
        self.prefix = settings.prefix
        self._config = AioConfig(
            region_name=settings.region,
            signature_version="s3v4",
            s3={"addressing_style": "path" if settings.path_style else "auto"},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"max_attempts": max_attempts, "mode": "standard"},
            # Every blob is hashed against its digest before it is uploaded, and
            # re-hashed by `mirror verify`: CRC32 checksums of every part and every read
            # would only cost CPU (and a copy) on the event loop.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self._stack: AsyncExitStack | None = None
        self._client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            raise RuntimeError("S3Objects used before start()")
        return self._client

    def _key(self, key: str) -> str:
        return self.prefix + key

    def _unprefixed(self, key: str) -> str:
        return key[len(self.prefix) :]

    async def start(self) -> None:
        """Create the client and make sure the bucket is there (created when
        `create_bucket`, else a start-up error naming storage.s3.bucket)."""
        credentials = self.settings.credentials()
        static = (
            {"aws_access_key_id": credentials[0], "aws_secret_access_key": credentials[1]}
            if credentials
            else {}  # botocore's default chain: env, shared config, web identity, role
        )
        stack = AsyncExitStack()
        try:
            self._client = await stack.enter_async_context(
                get_session().create_client(
                    "s3",
                    endpoint_url=self.settings.endpoint,
                    region_name=self.settings.region,
                    config=self._config,
                    **static,
                )
            )
        except (*_TRANSPORT_ERRORS, ValueError) as exc:
            await stack.aclose()
            raise ObjectStoreUnavailable(f"cannot create the S3 client: {exc}") from exc
        self._stack = stack
        try:
            await self._ensure_bucket()
        except BaseException:
            await self.close()
            raise
        log.info(
            "s3_started",
            endpoint=self.settings.endpoint or "aws",
            bucket=self.bucket,
            prefix=self.prefix,
            static_credentials=credentials is not None,
        )

    async def _ensure_bucket(self) -> None:
        try:
            await self.client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as exc:
            if _http_status(exc) != 404 and _error_code(exc) not in MISSING_BUCKET_CODES:
                raise ObjectStoreUnavailable(
                    f"storage.s3.bucket: cannot use bucket {self.bucket!r}: "
                    f"{_error_code(exc) or _http_status(exc)} (check the credentials and "
                    "the bucket's permissions)"
                ) from exc
        except _TRANSPORT_ERRORS as exc:
            raise ObjectStoreUnavailable(
                f"storage.s3.bucket: cannot reach the object store for bucket "
                f"{self.bucket!r}: {type(exc).__name__}"
            ) from exc
        if not self.settings.create_bucket:
            raise ObjectStoreUnavailable(
                f"storage.s3.bucket: bucket {self.bucket!r} does not exist "
                "(create it, or set storage.s3.create_bucket: true)"
            )
        extra: dict[str, Any] = {}
        if self.settings.region != "us-east-1":
            extra["CreateBucketConfiguration"] = {"LocationConstraint": self.settings.region}
        with _unavailable("CreateBucket"):
            await self.client.create_bucket(Bucket=self.bucket, **extra)
        log.info("s3_bucket_created", bucket=self.bucket)

    async def close(self) -> None:
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    async def check(self) -> None:
        """Readiness: the bucket answers (raises `ObjectStoreUnavailable` otherwise)."""
        with _unavailable("HeadBucket"):
            await self.client.head_bucket(Bucket=self.bucket)

    async def _maybe_absent(self, operation: str, key: str, call: Awaitable[T]) -> T | None:
        try:
            return await call
        except ClientError as exc:
            if _is_absent(exc):
                return None
            with _unavailable(operation, key):
                raise
        except _TRANSPORT_ERRORS:
            with _unavailable(operation, key):
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def head(self, key: str) -> int | None:
        """The object's size; None when there is no such object."""
        response = await self._maybe_absent(
            "HeadObject", key, self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        )
        if response is None:
            return None
        if "ContentLength" not in response:
            raise ObjectStoreUnavailable("object store sent no Content-Length", detail={"key": key})
        return int(response["ContentLength"])

    async def open_range(
        self, key: str, start: int = 0, end: int | None = None
    ) -> ObjectRange | None:
        """Bytes `start` up to `end` (exclusive; None: to the end) of the object, as a
        stream; None when there is no such object."""
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": self._key(key)}
        if start or end is not None:
            # An unranged GET for the whole object: S3 refuses any range of an empty one.
            params["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        response = await self._maybe_absent("GetObject", key, self.client.get_object(**params))
        if response is None:
            return None
        return ObjectRange(
            key, _full_size(response), int(response["ContentLength"]), response["Body"]
        )

    async def get_bytes(self, key: str) -> bytes | None:
        """The whole (small) object; None when absent."""
        opened = await self.open_range(key)
        if opened is None:
            return None
        async with opened:
            return b"".join([chunk async for chunk in opened.iter_chunks()])

    async def put_bytes(self, key: str, data: bytes) -> None:
        with _unavailable("PutObject", key):
            await self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    async def put_file(self, key: str, path: Path, size: int) -> None:
        """Upload the first `size` bytes of the file at `path`: one PutObject below
        `multipart_chunk`, else a multipart upload whose parts are streamed from the file
        (`UPLOAD_CONCURRENCY` at once). On any failure or cancellation the upload is
        aborted, so no object appears. (One cancelled while CreateMultipartUpload is in
        flight has no id to abort: `BlobStore.sweep_uploads` and `mirror gc` find it.)"""
        chunk = int(self.settings.multipart_chunk)
        if size < chunk:
            data = await asyncio.to_thread(_read_part, path, 0, size)
            await self.put_bytes(key, data)
            return
        with _unavailable("CreateMultipartUpload", key):
            created = await self.client.create_multipart_upload(
                Bucket=self.bucket, Key=self._key(key)
            )
        upload_id = str(created["UploadId"])
        try:
            parts = await self._upload_parts(key, upload_id, path, size, chunk)
            with _unavailable("CompleteMultipartUpload", key):
                await self.client.complete_multipart_upload(
                    Bucket=self.bucket,
                    Key=self._key(key),
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                )
        except BaseException:
            await self._abort_quietly(key, upload_id)
            raise
        log.debug("s3_multipart_uploaded", key=key, size=size, parts=len(parts))

    async def _upload_parts(
        self, key: str, upload_id: str, path: Path, size: int, chunk: int
    ) -> list[dict[str, Any]]:
        slots = asyncio.Semaphore(UPLOAD_CONCURRENCY)
        offsets = range(0, size, chunk)

        async def upload(number: int, offset: int) -> dict[str, Any]:
            async with slots:
                part = await asyncio.to_thread(_open_part, path, offset, min(chunk, size - offset))
                try:
                    with _unavailable("UploadPart", key):
                        answer = await self.client.upload_part(
                            Bucket=self.bucket,
                            Key=self._key(key),
                            UploadId=upload_id,
                            PartNumber=number,
                            Body=part,
                        )
                finally:
                    part.close()
                return {"PartNumber": number, "ETag": answer["ETag"]}

        # A TaskGroup, not TaskOwner: these tasks live inside this call, and one failure
        # cancels the others before the upload is aborted.
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [
                    group.create_task(upload(number, offset))
                    for number, offset in enumerate(offsets, start=1)
                ]
        except ExceptionGroup as failed:
            raise failed.exceptions[0] from failed
        return [task.result() for task in tasks]

    async def _abort_quietly(self, key: str, upload_id: str) -> None:
        """Best effort: a dead store cannot abort; `mirror gc` and the start-up sweep find it."""
        try:
            async with asyncio.timeout(ABORT_TIMEOUT):
                await self.abort_upload(key, upload_id)
        except (ObjectStoreUnavailable, TimeoutError) as exc:
            log.warning("s3_abort_failed", key=key, upload_id=upload_id, error=str(exc))
        else:
            log.info("s3_upload_aborted", key=key, upload_id=upload_id)

    async def delete(self, key: str) -> None:
        """Remove the object (no error when it is absent, as S3 itself)."""
        with _unavailable("DeleteObject", key):
            await self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    async def copy(self, source: str, target: str) -> None:
        """Copy an object within the bucket (server-side; CopyObject handles up to 5 GB)."""
        with _unavailable("CopyObject", source):
            await self.client.copy_object(
                Bucket=self.bucket,
                Key=self._key(target),
                CopySource={"Bucket": self.bucket, "Key": self._key(source)},
            )

    async def list(self, prefix: str = "") -> AsyncIterator[ObjectInfo]:
        """Every object whose key starts with `prefix`, page by page."""
        paginator = self.client.get_paginator("list_objects_v2")
        with _unavailable("ListObjectsV2", prefix):
            async for page in paginator.paginate(Bucket=self.bucket, Prefix=self._key(prefix)):
                for entry in page.get("Contents", ()):
                    yield ObjectInfo(
                        key=self._unprefixed(entry["Key"]),
                        size=int(entry["Size"]),
                        last_modified=entry["LastModified"].timestamp(),
                    )

    # `builtins.list`: the name `list` in this class is the listing method above.
    async def list_uploads(self, prefix: str = "") -> builtins.list[UploadInfo]:
        """Multipart uploads started and neither completed nor aborted."""
        paginator = self.client.get_paginator("list_multipart_uploads")
        uploads = []
        with _unavailable("ListMultipartUploads", prefix):
            async for page in paginator.paginate(Bucket=self.bucket, Prefix=self._key(prefix)):
                for entry in page.get("Uploads", ()):
                    uploads.append(
                        UploadInfo(
                            key=self._unprefixed(entry["Key"]),
                            upload_id=str(entry["UploadId"]),
                            initiated=entry["Initiated"].timestamp(),
                        )
                    )
        return uploads

    async def abort_upload(self, key: str, upload_id: str) -> None:
        """Abort one multipart upload; one already gone is not an error."""
        await self._maybe_absent(
            "AbortMultipartUpload",
            key,
            self.client.abort_multipart_upload(
                Bucket=self.bucket, Key=self._key(key), UploadId=upload_id
            ),
        )

    async def presign_get(
        self, key: str, expires: float, *, content_type: str | None = None
    ) -> str:
        """A URL anyone can GET the object with (Range included) for `expires` seconds,
        signed with this client's credentials; `content_type` overrides the answer's."""
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": self._key(key)}
        if content_type is not None:
            params["ResponseContentType"] = content_type
        with _unavailable("presign GetObject", key):
            url = await self.client.generate_presigned_url(
                "get_object", Params=params, ExpiresIn=max(1, int(expires))
            )
        return str(url)


def _read_part(path: Path, offset: int, length: int) -> bytes:
    """`length` bytes at `offset` (runs in a worker thread)."""
    with path.open("rb") as file:
        data = os.pread(file.fileno(), length, offset)
    if len(data) != length:
        # The caller's size was wrong: a bug, not an object store failure.
        raise ValueError(f"{path} ends before offset {offset + length}")
    return data


def _open_part(path: Path, offset: int, length: int) -> FilePart:
    """One part of a multipart upload, opened (runs in a worker thread)."""
    return FilePart(path, offset, length)


class FilePart(io.RawIOBase):
    """`length` bytes of a file from `offset`, as a seekable stream of their own.

    A part's body is this rather than its bytes: botocore reads it once to sign it and
    aiohttp again to send it, 64 KiB at a time, so a 16 MiB part never sits in memory
    (measured with bench/s3.py: the mirror's RSS after uploading a 512 MiB blob stayed
    far above its start when parts were read whole, the allocator keeping the arenas
    the worker threads had filled)."""

    def __init__(self, path: Path, offset: int, length: int):
        super().__init__()
        self._fd = os.open(path, os.O_RDONLY)
        if os.fstat(self._fd).st_size < offset + length:
            os.close(self._fd)
            raise ValueError(f"{path} ends before offset {offset + length}")
        self._offset = offset
        self._length = length
        self._position = 0

    def __len__(self) -> int:
        return self._length

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._length}[whence]
        self._position = min(max(base + offset, 0), self._length)
        return self._position

    def readinto(self, buffer: Any) -> int:
        wanted = min(len(buffer), self._length - self._position)
        if wanted <= 0:
            return 0
        data = os.pread(self._fd, wanted, self._offset + self._position)
        buffer[: len(data)] = data
        self._position += len(data)
        return len(data)

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()
