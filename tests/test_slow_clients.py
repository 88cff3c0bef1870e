"""Slow and vanishing clients: what a connection may hold, and what a hang-up leaves.

A real `mirror serve` process, read by many clients through sockets with a small receive
buffer at a slow, fixed rate, so the mirror meets backpressure rather than a kernel that
swallows the blob. Its peak RSS during the reads (VmHWM, reset when they start) must stay
within a bound that one buffered megabyte per connection would break; it must fall back
once they hang up; and each hang-up must leave an access line with its outcome and no
error line. The full-size figures (500 clients, 40 MiB) come from bench/slow_clients.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from conftest import Upstream
from support.fake_upstream import FakeUpstream, digest_of, serve, stall_after
from support.images import push_blob
from support.mirror_process import MirrorProcess
from support.net import LOOPBACK, http_request, wait_until

pytestmark = pytest.mark.slow  # starts registries, servers or processes

MIB = 1024 * 1024
KIB = 1024
CLIENTS = 100
RCVBUF = 8 * KIB
# Each slow client reads this much at this rate (about 4 s), then hangs up.
READ_BYTES = 512 * KIB
RATE = 128 * KIB
# What 100 slow readers may add to the mirror's RSS: a 1 MiB buffer per connection
# (the send path this replaced) would take it past 100 MiB.
PEAK_GROWTH_BOUND = 32 * MIB
# "Fallen back": within this much of the RSS before the clients came.
SETTLED_MARGIN = 16 * MIB

ServerFactory = Callable[..., Awaitable[TestServer]]


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * KIB
    raise AssertionError(f"no {field} for {pid}")


def log_events(mirror: MirrorProcess) -> list[dict[str, Any]]:
    events = []
    for line in mirror.log_text().splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            events.append({"level": "error", "unparsed": line})  # a traceback or a stray print
    return events


def blob_access_lines(mirror: MirrorProcess) -> list[dict[str, Any]]:
    return [
        e
        for e in log_events(mirror)
        if e.get("event") == "request" and e.get("kind") == "blob" and e.get("method") == "GET"
    ]


def error_lines(mirror: MirrorProcess) -> list[dict[str, Any]]:
    return [e for e in log_events(mirror) if e.get("level") in ("error", "critical")]


async def read_slowly(
    port: int, path: str, limit: int | None, rate: float, received: list[int]
) -> bytes:
    """GET `path` and read the body at `rate` bytes/s: `limit` bytes then hang up (closing
    with unread bytes, which sends a RST), or all of it (limit None). Returns what was read
    after the headers."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
    sock.setblocking(False)
    data = bytearray()
    try:
        await loop.sock_connect(sock, (LOOPBACK, port))
        await loop.sock_sendall(
            sock, f"GET {path} HTTP/1.1\r\nHost: mirror\r\nConnection: close\r\n\r\n".encode()
        )
        started = loop.time()
        while limit is None or len(data) < limit:
            allowance = int(rate * (loop.time() - started)) - len(data)
            if limit is not None:
                allowance = min(allowance, limit - len(data))
            if allowance <= 0:
                await asyncio.sleep(0.05)  # pacing the reads, not waiting for a state
                continue
            chunk = await loop.sock_recv(sock, allowance)
            if not chunk:
                break
            data += chunk
    finally:
        received.append(len(data))
        sock.close()
    _, _, body = bytes(data).partition(b"\r\n\r\n")
    return body


# Both ways a body leaves (api/transport.py): sendfile holds nothing per connection;
# chunks (what TLS clients get) hold at most one each.
SEND_PATHS = pytest.mark.parametrize("sendfile", ["all", "off"], ids=["sendfile", "chunks"])


@SEND_PATHS
async def test_slow_readers_hold_little_and_hang_ups_are_access_lines(
    upstream: Upstream, tmp_path: Path, sendfile: str
) -> None:
    blob = random.Random(1107).randbytes(24 * MIB)
    digest = digest_of(blob)
    push_blob(upstream.url, "test/slow-readers", digest, blob, None)
    path = f"/v2/test/slow-readers/blobs/{digest}"
    with MirrorProcess(
        tmp_path / "m", {"local": {"url": upstream.url}}, server={"blob_sendfile": sendfile}
    ) as mirror:
        warm = http_request("GET", mirror.url + path, timeout=60)
        assert warm.status == 200
        assert hashlib.sha256(warm.body).digest().hex() == digest[7:]
        assert mirror.pid is not None
        pid = mirror.pid
        baseline = status_kib(pid, "VmRSS")
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS from here on

        received: list[int] = []
        await asyncio.gather(
            *(read_slowly(mirror.port, path, READ_BYTES, RATE, received) for _ in range(CLIENTS))
        )
        peak = status_kib(pid, "VmHWM")
        # Every client met a mirror that had more to send than it would take.
        assert received == [READ_BYTES] * CLIENTS
        assert peak - baseline < PEAK_GROWTH_BOUND, (peak, baseline)

        # Memory comes back once they are gone.
        wait_until(
            lambda: status_kib(pid, "VmRSS") <= baseline + SETTLED_MARGIN,
            timeout=30,
            message="RSS did not fall back after the slow clients left",
        )
        # One access line per hang-up, with its outcome; nothing logged as an error.
        wait_until(
            lambda: len(blob_access_lines(mirror)) == CLIENTS + 1,
            timeout=30,
            message="missing access lines",
        )
        outcomes = [line["outcome"] for line in blob_access_lines(mirror)]
        assert outcomes.count("client_closed") == CLIENTS
        assert outcomes.count("complete") == 1
        assert error_lines(mirror) == []
        assert "Traceback" not in mirror.log_text()


@SEND_PATHS
async def test_hang_ups_during_a_download_leave_it_running(
    aiohttp_server: ServerFactory, tmp_path: Path, sendfile: str
) -> None:
    blob = random.Random(1108).randbytes(8 * MIB)
    digest = digest_of(blob)
    path = f"/v2/slow/blobs/{digest}"
    release = asyncio.Event()
    fake = FakeUpstream()
    fake.on("GET", path, stall_after(blob, 2 * MIB, release), serve(blob))
    server = await aiohttp_server(fake.app(), host="127.0.0.1")
    upstreams = {"fake": {"url": str(server.make_url("")).rstrip("/")}}
    with MirrorProcess(tmp_path / "m", upstreams, server={"blob_sendfile": sendfile}) as mirror:
        received: list[int] = []
        leavers = [
            asyncio.create_task(read_slowly(mirror.port, path, 256 * KIB, 4 * MIB, received))
            for _ in range(20)
        ]
        stayer = asyncio.create_task(read_slowly(mirror.port, path, None, 64 * MIB, []))
        # The leavers hang up while the upstream is stalled mid-blob.
        await asyncio.gather(*leavers)
        assert received == [256 * KIB] * 20
        release.set()
        body = await stayer
        assert hashlib.sha256(body).hexdigest() == digest[7:]
        assert fake.count("GET", path) == 1
        await asyncio.to_thread(
            wait_until,
            lambda: len(blob_access_lines(mirror)) == 21 and not mirror.temp_files(),
            30,
            0.05,
            "access lines or the commit missing",
        )
        outcomes = sorted(line["outcome"] for line in blob_access_lines(mirror))
        assert outcomes == ["client_closed"] * 20 + ["complete"]
        # The download went on without them: the blob is in the cache.
        head = await asyncio.to_thread(http_request, "HEAD", mirror.url + path)
        assert head.status == 200
        assert head.header("X-Cache") == "HIT"
        assert error_lines(mirror) == []
        assert "Traceback" not in mirror.log_text()
