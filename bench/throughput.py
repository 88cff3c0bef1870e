"""Warm request throughput with `mirror serve --workers 1` and `--workers 2`.

Pushes a small image to a local distribution registry, starts the mirror (embedded
metadata store, shared by the workers), warms it, then drives three warm endpoints
with wrk (Debian package `wrk`) for a fixed time each: a manifest by tag within its
TTL, the same manifest by digest, and a small blob. For each number of connections
(16 and 32 unless told) it prints requests per second, latency, the ratio of 2
workers over 1, and the mirror's CPU time per request (all its processes, from
/proc), which a machine shared with other work disturbs far less than the rate: 1e6
over it is what one fully used core would answer. Loopback only; every process it
starts is stopped at the end.

    .venv/bin/python bench/throughput.py [--seconds 5] [--connections 16 32] [--workers 1 2]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from support.images import oci_image, push
from support.mirror_process import MirrorProcess
from support.net import free_port, http_request
from support.registry import Registry

REPO, TAG = "bench/app", "v1"
ACCEPT = "application/vnd.oci.image.manifest.v1+json"


@dataclass(frozen=True)
class Run:
    rate: float  # requests per second
    latency: str  # wrk's average
    cpu_us: float  # the mirror's CPU microseconds per request


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process and its descendants (Linux /proc)."""
    total = 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                total += cpu_seconds(int(child))
    except (OSError, IndexError):
        pass  # a process that just ended
    return total


def wrk(url: str, seconds: int, connections: int, header: str | None, pid: int) -> Run:
    """Requests per second and the average latency as wrk reports them, and the CPU
    time the mirror (process `pid` and its children) spent per request."""
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", url]
    if header:
        argv += ["-H", header]
    cpu_before = cpu_seconds(pid)
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=seconds + 30)
    cpu = cpu_seconds(pid) - cpu_before
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out.stdout)
    latency = re.search(r"Latency\s+(\S+)", out.stdout)
    done = re.search(r"(\d+) requests in", out.stdout)
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out.stdout)
    if rate is None or done is None or non_2xx is not None:
        raise RuntimeError(f"wrk run failed or saw errors:\n{out.stdout}")
    return Run(
        float(rate.group(1)),
        latency.group(1) if latency else "?",
        cpu * 1e6 / max(int(done.group(1)), 1),
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    # server.event_loop; unset: the mirror's default.
    parser.add_argument("--event-loop", choices=["auto", "uvloop", "asyncio"])
    # log.level: warning leaves the access line out; info measures it too.
    parser.add_argument("--log-level", default="warning", choices=["info", "warning"])
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is not installed: apt-get install wrk", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="bench-throughput-"))
    image = oci_image([2048, 4096], seed=77)
    blob = image.layer_digests[0]
    results: dict[int, dict[int, dict[str, Run]]] = {c: {} for c in args.connections}
    try:
        with Registry(work / "registry") as registry:
            push(registry.url, REPO, image, TAG)
            for workers in args.workers:
                mirror = MirrorProcess(
                    work / f"mirror-{workers}",
                    {"local": {"url": registry.url, "tag_ttl": "1h"}},
                    port=free_port(),
                    log_level=args.log_level,
                    extra_args=("--workers", str(workers)),
                    **({"server": {"event_loop": args.event_loop}} if args.event_loop else {}),
                )
                with mirror:
                    base = f"{mirror.url}/v2/{REPO}"
                    endpoints = {
                        "manifest by tag": (f"{base}/manifests/{TAG}", f"Accept: {ACCEPT}"),
                        "manifest by digest": (
                            f"{base}/manifests/{image.digest}",
                            f"Accept: {ACCEPT}",
                        ),
                        "small blob": (f"{base}/blobs/{blob}", None),
                    }
                    # Warm each, through every worker the kernel picks.
                    for _ in range(8):
                        for url, header in endpoints.values():
                            headers = dict([header.split(": ", 1)]) if header else None
                            assert http_request("GET", url, headers=headers).status == 200
                    for connections in args.connections:
                        results[connections][workers] = {
                            name: wrk(url, args.seconds, connections, header, mirror.pid)
                            for name, (url, header) in endpoints.items()
                        }
    finally:
        shutil.rmtree(work, ignore_errors=True)

    for connections, by_workers in results.items():
        print(
            f"\nwrk -t1 -c{connections} -d{args.seconds}s "
            "on this machine (2 cores, shared with wrk)"
        )
        counts = list(by_workers)
        print(
            f"{'endpoint':<20}"
            + "".join(f"{f'{n} worker(s) req/s':>20}" for n in counts)
            + (f"{'ratio':>8}" if len(counts) == 2 else "")
            + "   latency "
            + " / ".join(str(n) for n in counts)
            + "   CPU us/request "
            + " / ".join(str(n) for n in counts)
        )
        for endpoint in by_workers[counts[0]]:
            runs = [by_workers[n][endpoint] for n in counts]
            ratio = f"{runs[1].rate / runs[0].rate:>7.2f}x" if len(runs) == 2 else ""
            print(
                f"{endpoint:<20}"
                + "".join(f"{run.rate:>20.0f}" for run in runs)
                + ratio
                + "   "
                + " / ".join(run.latency for run in runs)
                + "   "
                + " / ".join(f"{run.cpu_us:.0f}" for run in runs)
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
