"""How blob bytes reach a client's socket, and how much each connection may hold.

The HTTP layer decides what to send (status, headers, range); this module sends the
body, from a committed file or from a download in progress, and turns a client that
hangs up into an outcome on its access line rather than an error.

Measured with `bench/slow_clients.py` (500 clients reading a warm 40 MiB blob at
100 kB/s through 8 KiB receive buffers, then hanging up; 2 shared cores): with 1 MiB
writes the mirror's RSS went from 66 MiB to 1187 MiB and stayed at 1176 MiB after they
left; with the rules below it peaks at 94 MiB and is back to 76 MiB 5 s after they
left (the trim is `mirror.memory`'s). Warm throughput, 1 and 8 curl streams, is
unchanged within the noise of the shared machine (about 1000 and 1300-1700 MiB/s).
The reasons behind each rule:

* **Remote peers without TLS: sendfile.** The kernel copies from the page cache;
  the process holds nothing per connection, however slow the reader.
* **Loopback peers and TLS: chunks, one at a time.** sendfile to a local receiver
  costs it more than it saves us (skopeo: 15% more client CPU, a slower pull), and
  TLS must encrypt in user space. Each chunk is `CHUNK` bytes, and the next one is
  read only once the transport has handed the last one wholly to the kernel. The
  1 MiB writes this replaced sat in the transport's buffer of every slow reader
  (asyncio pauses the writer only above 64 KiB, and aiohttp drains only then), and
  were copied on the way in: memory grew by about 2 MiB per slow reader.
* **Page-cache reads stay on the event loop.** A read is first tried with
  `RWF_NOWAIT`, which returns at once from the page cache (a warm blob, or a download
  just written) or fails with EAGAIN when it would wait for the disk; only then does
  it go to a worker thread. At 64 KiB a chunk, the thread hop would cost more than
  the read.
* **A hang-up is ordinary.** It ends the response with outcome `client_closed` on the
  access line, with no error logged; a download in progress goes on for its other
  readers and for the cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import os
from collections.abc import AsyncGenerator
from typing import BinaryIO

import structlog
from aiohttp import web

from mirror.errors import BlobUnknown, MirrorError
from mirror.logging import ACCESS_INFO, Outcome

log = structlog.get_logger(__name__)

# The most one connection holds in this process while the kernel drains its socket.
CHUNK = 64 * 1024


async def send_blob_body(
    request: web.Request,
    response: web.StreamResponse,
    *,
    file: BinaryIO | None,
    chunks: AsyncGenerator[bytes, None] | None,
    offset: int,
    count: int | None,
) -> None:
    """Send the body of a prepared blob response and end it.

    From `file` (`count` bytes from `offset`) or from `chunks` (a download in progress,
    read in `CHUNK`s). The outcome goes on the request's access line; nothing is raised
    for a client that hung up or a transfer that failed: the response is over either way.
    """
    info = request[ACCESS_INFO]
    try:
        if file is not None:
            assert count is not None
            await _send_file(request, response, file, offset, count)
        else:
            assert chunks is not None
            # Closed here, not whenever it is collected: it holds the temp file open.
            async with contextlib.aclosing(chunks), _one_chunk_at_a_time(request):
                # No name holds a chunk here (see _write_drained).
                sent = True
                while sent:
                    sent = bool(await _write_drained(request, response, await anext(chunks, b"")))
        await response.write_eof()
    except MirrorError as error:
        # Headers are gone: the only honest signal left is a broken connection, which
        # no client mistakes for a complete body.
        log.warning(
            "blob_transfer_aborted",
            digest=response.headers.get("Docker-Content-Digest"),
            error=error.message,
        )
        info.outcome = Outcome.ABORTED
        if request.transport is not None:
            request.transport.abort()
    except ConnectionError:
        # The client hung up. aiohttp's own write_eof on the dead transport raises again,
        # which it takes for what it is: the access line is written, without a traceback.
        info.outcome = Outcome.CLIENT_CLOSED


PREPARED = web.RequestKey("prepared_response", web.StreamResponse)


async def remember_prepared(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: the response a request started, for `hung_up_response`."""
    request[PREPARED] = response


def hung_up_response(request: web.Request) -> web.StreamResponse | None:
    """For a ConnectionError out of a handler: the started response when the client is
    gone, with the outcome recorded; None when it is something else.

    Returned to aiohttp as the handler's answer, it gets the request its access line;
    raised, the error would be logged with a traceback, and the line lost.
    """
    transport = request.transport
    if PREPARED not in request or (transport is not None and not transport.is_closing()):
        return None
    request[ACCESS_INFO].outcome = Outcome.CLIENT_CLOSED
    return request[PREPARED]


def peer_is_local(request: web.Request) -> bool:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    if not peer:
        return False
    try:
        return ipaddress.ip_address(peer[0]).is_loopback
    except ValueError:
        return False


async def _send_file(
    request: web.Request, response: web.StreamResponse, file: BinaryIO, offset: int, count: int
) -> None:
    transport = request.transport
    if transport is None or transport.is_closing():
        raise ConnectionResetError("client went away")
    if not peer_is_local(request) and transport.get_extra_info("sslcontext") is None:
        try:
            await asyncio.get_running_loop().sendfile(transport, file, offset, count)
        except NotImplementedError:
            pass  # uvloop has no loop.sendfile: chunks, as below (nothing was sent yet)
        else:
            request[ACCESS_INFO].body_bytes = count
            return
    async with _one_chunk_at_a_time(request):
        end = offset + count
        position = offset
        while position < end:
            size = min(CHUNK, end - position)
            # A short read (part of the range in the page cache) sends what it got.
            written = await _write_drained(
                request, response, await read_chunk(file.fileno(), position, size)
            )
            if not written:
                raise BlobUnknown("blob file is shorter than its size")  # aborts the transfer
            position += written


async def read_chunk(fd: int, offset: int, size: int) -> bytes | bytearray:
    """Up to `size` bytes at `offset`: from the page cache on the loop when they are
    there, else in a worker thread."""
    buffer = bytearray(size)  # fresh each time: the transport may keep a reference to it
    try:
        got = os.preadv(fd, [buffer], offset, os.RWF_NOWAIT)
    except BlockingIOError:
        return await asyncio.to_thread(os.pread, fd, size, offset)
    except OSError as exc:
        if exc.errno != errno.EOPNOTSUPP:  # a file system without non-blocking reads
            raise
        return await asyncio.to_thread(os.pread, fd, size, offset)
    if got < size:
        del buffer[got:]
    return buffer


class _one_chunk_at_a_time:
    """While sending a body: the transport tells aiohttp to pause as soon as it holds
    any byte the kernel did not take, and to resume once it holds none, so waiting on
    aiohttp's drain means waiting for the last chunk to be wholly handed over.

    asyncio's defaults (pause above 64 KiB, resume at 16 KiB) let a writer keep adding
    up to 64 KiB on top of whatever it last wrote; restored afterwards, so the other
    responses on a kept-alive connection are unaffected.
    """

    def __init__(self, request: web.Request):
        self._transport = request.transport
        self._limits: tuple[int, int] | None = None

    async def __aenter__(self) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if transport.get_extra_info("sslcontext") is not None:
            # asyncio's TLS transport did not resume a writer paused at a zero limit: pulls
            # over TLS stalled (tests/test_security.py). Its default limits (64 KiB) still
            # bound what a connection holds.
            return
        self._limits = transport.get_write_buffer_limits()
        transport.set_write_buffer_limits(high=0, low=0)

    async def __aexit__(self, *exc: object) -> None:
        if self._limits is not None and not self._transport.is_closing():  # type: ignore[union-attr]
            low, high = self._limits
            self._transport.set_write_buffer_limits(high=high, low=low)  # type: ignore[union-attr]


async def _write_drained(
    request: web.Request, response: web.StreamResponse, chunk: bytes | bytearray
) -> int:
    """Write `chunk` and wait until the transport holds none of it; its size (0: nothing
    was written).

    The only reference to the chunk is this frame's, dropped before the wait: what the
    kernel did not take is held once, by the transport, not twice.
    """
    size = len(chunk)
    if size == 0:
        return 0
    # aiohttp's write drains by itself once this count passes 64 KiB, holding the chunk
    # meanwhile; the drain below, after the chunk is let go, is the one that waits.
    request.writer.buffer_size = 0
    await response.write(chunk)
    del chunk
    await request.writer.drain()
    request[ACCESS_INFO].body_bytes += size
    return size
