"""Fleet benchmark: N concurrent cold pulls of one multi-layer image spread across three
replicas with their own disks and one Redis (fleet mode), against the same N pulls through
a single replica, from a real distribution registry on loopback.

What it measures, per phase:

* wall-clock seconds for the N ``skopeo copy docker://... dir:<fresh dir>`` started
  together, and the fleet's time as a multiple of the single replica's;
* what the upstream registry sent for blob GETs during the phase, from its access log
  (bytes and request count), divided by the image's total blob bytes: "upstream bytes per
  image", 1.00x when the whole phase fetched each blob from the upstream once;
* the bytes each replica served by source (``cache``, ``upstream``, ``peer``), read from
  its ``/metrics`` (``mirror_served_bytes_total{source=...}``), and its peer fills by
  outcome (``mirror_peer_fills_total``).

Phases: ``1 replica`` (one fresh ``mirror serve``, Redis metadata, no cluster) and ``3
replicas`` (three fresh ``mirror serve`` processes, each with its own storage root and peer
endpoint, sharing one Redis key prefix and the cluster secret; pull i goes to replica i
mod 3). Every pulled tree is checked: each blob file hashes to its digest and
``manifest.json`` is byte-identical to the pushed manifest.

It prints figures and never asserts timings; it exits non-zero only when a pull fails or
pulled content is wrong. Everything runs on 127.0.0.1. Run it from the repository root::

    .venv/bin/python bench/fleet.py [--size-mb 64] [--concurrency 24] [--keep]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import secrets
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from harness import prepare_process, print_table, run_in_workdir  # noqa: E402
from pull import (  # noqa: E402
    MIB,
    PULL_TIMEOUT,
    REPO,
    SEED,
    TAG,
    BenchError,
    fmt_mib,
    layer_sizes,
    settle_access_log,
    verify_tree,
)
from support.images import oci_image, push  # noqa: E402
from support.mirror_process import MirrorProcess, MirrorProcessError  # noqa: E402
from support.net import free_port, http_request  # noqa: E402
from support.redis_server import RedisServer  # noqa: E402
from support.registry import AccessEntry, Registry  # noqa: E402
from support.skopeo import SkopeoError, skopeo_copy_async  # noqa: E402

SOURCES = ("cache", "upstream", "peer")
# One sample line of the Prometheus text format: name{labels} value.
SAMPLE = re.compile(r'^(?P<name>[a-z_]+)\{(?P<label>[a-z_]+)="(?P<value>[^"]*)"\} (?P<n>\S+)$')


@dataclass
class Phase:
    name: str
    replicas: list[MirrorProcess]
    seconds: float = 0.0
    per_pull: list[float] = field(default_factory=list)
    failures: list[BaseException] = field(default_factory=list)
    blob_gets: list[AccessEntry] = field(default_factory=list)
    served: list[dict[str, float]] = field(default_factory=list)  # per replica, by source
    peer_fills: list[dict[str, float]] = field(default_factory=list)  # per replica

    @property
    def blob_bytes(self) -> int:
        return sum(e.bytes_sent for e in self.blob_gets)


def scrape(replica: MirrorProcess) -> tuple[dict[str, float], dict[str, float]]:
    """(served bytes by source, peer fills by outcome) from the replica's /metrics."""
    response = http_request("GET", f"{replica.url}/metrics", timeout=10)
    if response.status != 200:
        raise BenchError(f"{replica.url}/metrics answered {response.status}")
    served: dict[str, float] = dict.fromkeys(SOURCES, 0.0)
    fills: dict[str, float] = {}
    for line in response.body.decode().splitlines():
        match = SAMPLE.match(line)
        if match is None:
            continue
        if match["name"] == "mirror_served_bytes_total" and match["label"] == "source":
            served[match["value"]] = float(match["n"])
        elif match["name"] == "mirror_peer_fills_total" and match["label"] == "outcome":
            fills[match["value"]] = float(match["n"])
    return served, fills


async def pull_spread(
    hosts: list[str], dests: list[Path]
) -> tuple[float, list[float | BaseException]]:
    """Start pull i through hosts[i % len(hosts)] into dests[i], all at once; (wall seconds,
    per-pull finish seconds or error)."""
    started = time.perf_counter()

    async def one(host: str, dest: Path) -> float:
        await skopeo_copy_async(
            f"docker://{host}/{REPO}:{TAG}", f"dir:{dest}", timeout=PULL_TIMEOUT
        )
        return time.perf_counter() - started

    results = await asyncio.gather(
        *(one(hosts[i % len(hosts)], dest) for i, dest in enumerate(dests)),
        return_exceptions=True,
    )
    return time.perf_counter() - started, list(results)


def run_phase(phase: Phase, n: int, out: Path, registry: Registry, blob_count: int) -> None:
    """N pulls spread across the phase's replicas into ``out/0..n-1``, measured."""
    # Start with no dirty page cache left by the image build or the previous phase.
    os.sync()
    before = [scrape(r) for r in phase.replicas]
    mark = registry.mark()
    dests = [out / str(i) for i in range(n)]
    phase.seconds, results = asyncio.run(pull_spread([r.host for r in phase.replicas], dests))
    phase.per_pull = [r for r in results if isinstance(r, float)]
    phase.failures = [r for r in results if isinstance(r, BaseException)]
    phase.blob_gets, _ = settle_access_log(registry, mark, blob_count)
    for replica, (served0, fills0) in zip(phase.replicas, before, strict=True):
        served, fills = scrape(replica)
        phase.served.append({s: served.get(s, 0.0) - served0.get(s, 0.0) for s in served})
        phase.peer_fills.append({o: fills[o] - fills0.get(o, 0.0) for o in fills})


def report(phases: list[Phase], image_bytes: int, n: int) -> None:
    single = phases[0].seconds
    rows = [
        [
            p.name,
            f"{n - len(p.failures)}/{n}",
            f"{p.seconds:.2f}",
            f"{p.seconds / single:.2f}x" if single > 0 else "-",
            f"{n * image_bytes / MIB / p.seconds:,.0f}" if p.seconds > 0 else "-",
            f"{p.blob_bytes:,}",
            f"{p.blob_bytes / image_bytes:.2f}x",
            str(len(p.blob_gets)),
        ]
        for p in phases
    ]
    print_table(
        [
            "phase",
            "pulls ok",
            "seconds",
            "vs 1 replica",
            "MiB/s",
            "upstream blob bytes",
            "upstream/image",
            "blob GETs",
        ],
        rows,
    )
    print()
    print("Bytes served to clients by source (MiB, blobs and manifests; from /metrics):")
    source_rows = []
    for p in phases:
        for index, (served, fills) in enumerate(zip(p.served, p.peer_fills, strict=True)):
            fill_text = ", ".join(f"{o} {v:.0f}" for o, v in sorted(fills.items()) if v) or "-"
            source_rows.append(
                [
                    f"{p.name} / {'abc'[index]}",
                    *(f"{served.get(s, 0.0) / MIB:,.1f}" for s in SOURCES),
                    f"{sum(served.values()) / MIB:,.1f}",
                    fill_text,
                ]
            )
        totals = {s: sum(served.get(s, 0.0) for served in p.served) for s in SOURCES}
        source_rows.append(
            [
                f"{p.name} / all",
                *(f"{totals[s] / MIB:,.1f}" for s in SOURCES),
                f"{sum(totals.values()) / MIB:,.1f}",
                "",
            ]
        )
    print_table(["phase / replica", *SOURCES, "total", "peer fills"], source_rows)
    print()
    print(f"image blob bytes: {image_bytes:,} ({fmt_mib(image_bytes)}); {n} pulls per phase")
    for p in phases:
        if p.per_pull:
            times = sorted(p.per_pull)
            print(
                f"{p.name}: each pull finished after min {times[0]:.2f} / median "
                f"{statistics.median(times):.2f} / max {times[-1]:.2f} s"
            )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--size-mb", type=float, default=64, help="total image size in MiB (default 64)"
    )
    parser.add_argument(
        "--concurrency", type=int, default=24, help="concurrent cold pulls (default 24)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (and print it)")
    parser.add_argument("--tmpdir", type=Path, help="parent of the temp dir (default: $TMPDIR)")
    args = parser.parse_args(argv)
    if args.size_mb <= 0 or args.concurrency < 1:
        parser.error("--size-mb must be > 0 and --concurrency >= 1")
    return args


def run(args: argparse.Namespace, work: Path, cleanup: list[Callable[[], object]]) -> int:
    pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="verify")
    cleanup.append(pool.shutdown)

    started = time.perf_counter()
    image = oci_image(layer_sizes(args.size_mb), seed=SEED)
    image_bytes = sum(len(b) for b in image.blobs.values())
    blob_count = len(image.blobs)
    print(
        f"image: {len(image.layer_digests)} layers + config, {image_bytes:,} blob bytes "
        f"({fmt_mib(image_bytes)}), built in {time.perf_counter() - started:.1f} s"
    )
    registry = Registry(work / "registry")
    cleanup.append(registry.stop)
    registry.start()
    push(registry.url, REPO, image, TAG)
    redis = RedisServer(work / "redis")
    cleanup.append(redis.stop)
    redis.start()
    print(f"registry: {registry.url} (pid {registry.pid}); redis: {redis.url}")

    upstreams = {"local": {"url": registry.url, "tag_ttl": "1h"}}
    cluster_secret = secrets.token_hex(16)

    def replica(name: str, prefix: str, fleet: bool) -> MirrorProcess:
        settings: dict[str, object] = {
            "metadata": {"backend": "redis", "redis_url": redis.url, "key_prefix": prefix}
        }
        if fleet:
            settings["cluster"] = {"listen": f"127.0.0.1:{free_port()}", "secret": cluster_secret}
        process = MirrorProcess(work / name, upstreams, log_level="warning", **settings)
        cleanup.append(process.stop)
        process.start()
        return process

    n = args.concurrency
    phases = [
        Phase("1 replica", [replica("single", "bench-single:", fleet=False)]),
        Phase("3 replicas", []),
    ]
    statuses: list[str] = []
    for phase in phases:
        if not phase.replicas:
            phase.replicas = [replica(f"fleet-{x}", "bench-fleet:", fleet=True) for x in "abc"]
        print(f"{phase.name}: {', '.join(r.host for r in phase.replicas)}; {n} pulls")
        out = work / "out" / phase.name.replace(" ", "-")
        run_phase(phase, n, out, registry, blob_count)
        for failure in phase.failures:
            detail = failure.stderr.strip() if isinstance(failure, SkopeoError) else repr(failure)
            print(f"FAILED pull in '{phase.name}': {detail}", file=sys.stderr)
        for tree in sorted(out.iterdir()) if not phase.failures else []:
            verify_tree(tree, image, pool)
            # Dropped now so its dirty pages are not written back during the next phase.
            if not args.keep:
                shutil.rmtree(tree)
        for r in phase.replicas:
            left = len(r.temp_files())
            statuses.append(f"{r.host}: exit {r.stop()} after SIGTERM, {left} temp files left")

    print()
    report(phases, image_bytes, n)
    for line in statuses:
        print(f"mirror {line}")
    failed = sum(len(p.failures) for p in phases)
    if failed:
        raise BenchError(f"{failed} pulls failed")
    print(f"content verified: {n * len(phases)} pulled trees (blob sha256 + manifest bytes)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    prepare_process()
    return run_in_workdir(
        "bench-fleet-",
        parent=args.tmpdir,
        keep=args.keep,
        failures=(BenchError, MirrorProcessError),
        body=lambda work, cleanup: run(args, work, cleanup),
    )


if __name__ == "__main__":
    sys.exit(main())
