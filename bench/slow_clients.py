"""Slow and vanishing clients: what hundreds of slow readers of one warm blob cost the
mirror in memory, whether it gives that memory back when they leave, and what their
hang-ups put in the log.

A real distribution registry holds one random blob (40 MiB by default); a real
``mirror serve`` process fetches it once (the warm-up), then N clients (500 by default)
read it at a fixed rate (100 kB/s by default) through sockets with a small receive
buffer, so the mirror meets backpressure rather than a kernel that swallows the blob.
After a bounded time they hang up mid-body (closing with unread data, which sends a
RST), as a killed ``docker pull`` does. Meanwhile the mirror's RSS is sampled.

It prints: RSS before, at the peak and after the clients left (waiting, with a bound,
for it to fall back near the baseline), what the clients received, the access lines of
their requests by outcome, and the error lines and tracebacks in the mirror's log; then
warm throughput with 1 and 8 curl streams (MiB/s), so a change to the send path can be
checked for regressions. It never asserts: figures only. Run it from the repository
root::

    .venv/bin/python bench/slow_clients.py [--clients 500] [--rate-kb 100] [--seconds 25]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import random
import resource
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from harness import prepare_process, run_in_workdir  # noqa: E402
from support.images import push_blob  # noqa: E402
from support.mirror_process import MirrorProcess, MirrorProcessError  # noqa: E402
from support.net import LOOPBACK, wait_until  # noqa: E402
from support.registry import Registry  # noqa: E402

REPO = "bench/slow"
MIB = 1024 * 1024
SEED = 7007
SAMPLE_EVERY = 0.2
TICK = 0.1  # each client reads its allowance this often
CONNECT_AT_ONCE = 64  # below the listen backlog, so no SYN is dropped and retried
# "Fallen back": within this much of the baseline RSS.
SETTLED_MARGIN = 16 * MIB


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


@dataclass
class Sampler:
    pid: int
    samples: list[tuple[float, int]] = field(default_factory=list)
    # Set once a sample is at most `settled_below`, after that is set.
    settled_below: int | None = None
    settled: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def peak(self) -> int:
        return max(rss for _, rss in self.samples)

    async def run(self) -> None:
        while True:
            rss = rss_bytes(self.pid)
            self.samples.append((time.monotonic(), rss))
            if self.settled_below is not None and rss <= self.settled_below:
                self.settled.set()
            await asyncio.sleep(SAMPLE_EVERY)


@dataclass
class ClientStats:
    received: list[int] = field(default_factory=list)
    failed: Counter[str] = field(default_factory=Counter)


async def slow_client(
    host: str,
    port: int,
    path: str,
    rate: float,
    rcvbuf: int,
    stop: asyncio.Event,
    connect_gate: asyncio.Semaphore,
    stats: ClientStats,
) -> None:
    """Read the blob at `rate` bytes/s until `stop`, then hang up mid-body."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: sets the window
    sock.setblocking(False)
    received = 0
    try:
        async with connect_gate:
            await loop.sock_connect(sock, (host, port))
            request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n"
            await loop.sock_sendall(sock, request.encode())
        started = time.monotonic()
        while not stop.is_set():
            allowance = int(rate * (time.monotonic() - started)) - received
            if allowance <= 0:
                await asyncio.sleep(TICK)
                continue
            data = await loop.sock_recv(sock, min(allowance, 256 * 1024))
            if not data:
                stats.failed["closed by mirror"] += 1
                return
            received += len(data)
    except OSError as exc:
        stats.failed[type(exc).__name__] += 1
    finally:
        stats.received.append(received)
        sock.close()  # unread bytes in the receive buffer: the kernel answers with a RST


async def slow_phase(
    mirror: MirrorProcess, path: str, args: argparse.Namespace
) -> tuple[Sampler, ClientStats, float]:
    assert mirror.pid is not None
    sampler = Sampler(mirror.pid)
    stats = ClientStats()
    stop = asyncio.Event()
    gate = asyncio.Semaphore(CONNECT_AT_ONCE)
    sampling = asyncio.create_task(sampler.run())
    clients = [
        asyncio.create_task(
            slow_client(
                LOOPBACK,
                mirror.port,
                path,
                args.rate_kb * 1000,
                args.rcvbuf,
                stop,
                gate,
                stats,
            )
        )
        for _ in range(args.clients)
    ]
    await asyncio.sleep(args.seconds)
    fds_during = open_fds(mirror.pid)
    stop.set()
    await asyncio.gather(*clients)
    left_at = time.monotonic()
    # Let the mirror notice the hang-ups and free what they held; a bounded wait.
    sampler.settled_below = sampler.samples[0][1] + SETTLED_MARGIN
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(sampler.settled.wait(), timeout=args.settle)
    await asyncio.sleep(1.0)  # a few more samples past the fall
    sampling.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await sampling
    sampler.samples.append((time.monotonic(), rss_bytes(mirror.pid)))
    print(f"mirror open fds during the phase: {fds_during}")
    return sampler, stats, left_at


def curl_streams(url: str, streams: int, size: int) -> float:
    """Read the blob over `streams` parallel curl connections; aggregate MiB/s."""
    started = time.perf_counter()
    procs = [
        subprocess.Popen(
            ["curl", "-sS", "--fail", "-o", "/dev/null", "-w", "%{size_download}", url],
            stdout=subprocess.PIPE,
        )
        for _ in range(streams)
    ]
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        if proc.returncode != 0 or int(out or 0) != size:
            raise RuntimeError(f"curl failed ({proc.returncode}) or short ({out!r})")
    return streams * size / MIB / (time.perf_counter() - started)


def log_summary(text: str) -> tuple[Counter[str], list[str], int, Counter[str]]:
    """(access lines of blob GETs by outcome, error lines, tracebacks, lines by level)."""
    outcomes: Counter[str] = Counter()
    levels: Counter[str] = Counter()
    errors: list[str] = []
    for line in text.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            if line.strip():
                errors.append(line)
            continue
        levels[str(event.get("level"))] += 1
        if event.get("event") == "request" and event.get("kind") == "blob":
            outcomes[f"{event.get('status')} {event.get('outcome', '(no outcome field)')}"] += 1
        if event.get("level") in ("error", "critical") or "exception" in event:
            errors.append(line)
    return outcomes, errors, text.count("Traceback"), levels


def run(args: argparse.Namespace, work: Path, cleanup: list[Callable[[], object]]) -> int:
    blob = random.Random(SEED).randbytes(int(args.size_mb * MIB))
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    registry = Registry(work / "registry")
    cleanup.append(registry.stop)
    registry.start()
    push_blob(registry.url, REPO, digest, blob, None)
    mirror = MirrorProcess(
        work / "mirror",
        {"local": {"url": registry.url}},
        log_level="info",
        server={"blob_sendfile": args.sendfile},
    )
    cleanup.append(mirror.stop)
    mirror.start()
    assert mirror.pid is not None
    path = f"/v2/{REPO}/blobs/{digest}"
    url = f"{mirror.url}{path}"
    print(
        f"blob: {len(blob):,} bytes; mirror pid {mirror.pid} at {mirror.url}; "
        f"blob_sendfile {args.sendfile}"
    )
    curl_streams(url, 1, len(blob))  # the warm-up: fetched from the registry, committed
    wait_until(lambda: any((mirror.storage / "blobs").rglob(digest.split(":")[1])), timeout=30)
    print(
        f"clients: {args.clients} reading at {args.rate_kb} kB/s each for {args.seconds} s, "
        f"SO_RCVBUF {args.rcvbuf}"
    )
    sampler, stats, left_at = asyncio.run(slow_phase(mirror, path, args))
    baseline = sampler.samples[0][1]
    peak = sampler.peak
    final_t, final = sampler.samples[-1]
    fallen = [t for t, rss in sampler.samples if t >= left_at and rss <= baseline + SETTLED_MARGIN]
    got = stats.received
    print(f"RSS baseline (warm, idle): {baseline / MIB:7.1f} MiB")
    print(f"RSS peak with clients:     {peak / MIB:7.1f} MiB")
    print(
        f"RSS after clients left:    {final / MIB:7.1f} MiB "
        f"({final_t - left_at:.1f} s after; "
        + (
            f"within {SETTLED_MARGIN // MIB} MiB of baseline after {fallen[0] - left_at:.1f} s)"
            if fallen
            else f"not back within {SETTLED_MARGIN // MIB} MiB of baseline in {args.settle} s)"
        )
    )
    print(
        f"clients received: total {sum(got) / MIB:,.1f} MiB, per client min "
        f"{min(got) / 1000:,.0f} kB / median {sorted(got)[len(got) // 2] / 1000:,.0f} kB / "
        f"max {max(got) / 1000:,.0f} kB; failures {dict(stats.failed) or 'none'}"
    )
    # The access lines of the hang-ups are written as aiohttp notices them.
    wait_until(
        lambda: sum(log_summary(mirror.log_text())[0].values()) >= args.clients + 1,
        timeout=30,
    )
    for streams in (1, 8):
        rates = [curl_streams(url, streams, len(blob)) for _ in range(args.repeat)]
        print(
            f"warm throughput, {streams} stream(s): best {max(rates):,.0f} MiB/s "
            f"(runs: {', '.join(f'{r:,.0f}' for r in rates)})"
        )
    print(f"RSS after throughput runs: {rss_bytes(mirror.pid) / MIB:7.1f} MiB")
    outcomes, errors, tracebacks, levels = log_summary(mirror.log_text())
    print(f"blob access lines by status and outcome: {dict(outcomes)}")
    print(f"log lines by level: {dict(levels)}")
    print(f"error lines in the mirror log: {len(errors)}; tracebacks: {tracebacks}")
    for line in errors[:3]:
        print(f"  e.g. {line[:300]}")
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--clients", type=int, default=500)
    parser.add_argument("--rate-kb", type=float, default=100, help="per client, kB/s")
    parser.add_argument("--seconds", type=float, default=25, help="how long clients read")
    parser.add_argument("--size-mb", type=float, default=40, help="blob size in MiB")
    parser.add_argument("--rcvbuf", type=int, default=8192, help="clients' SO_RCVBUF")
    parser.add_argument("--settle", type=float, default=60, help="max wait for RSS to fall")
    parser.add_argument("--repeat", type=int, default=3, help="throughput runs per case")
    parser.add_argument(
        "--sendfile",
        choices=("all", "remote", "off"),
        default="all",
        help="the mirror's server.blob_sendfile (remote: loopback clients get chunks)",
    )
    parser.add_argument("--tmpdir", type=Path, help="parent of the temp dir")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    prepare_process()
    # Each client is a socket here and a socket plus a file in the mirror (inherits this).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard, max(soft, 4 * args.clients + 256))
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return run_in_workdir(
        "bench-slow-",
        parent=args.tmpdir,
        keep=False,
        failures=(MirrorProcessError, RuntimeError, TimeoutError),
        body=lambda work, cleanup: run(args, work, cleanup),
    )


if __name__ == "__main__":
    sys.exit(main())
