"""Big blobs through the send path: aggregate throughput of concurrent warm streams, the
mirror's CPU seconds per GB and peak RSS, and a cold fetch's time to first byte.

A real distribution registry holds one random blob (1 GiB by default). For each round
and each variant (a set of `MIRROR_*` environment overrides, so two send paths can be
compared back to back: A, B, A, B), a fresh ``mirror serve`` process is started and:

* **cold**: one curl fetches the blob through it (the download from the registry),
  against one curl straight from the registry just before: time to first byte
  (curl's ``%{time_starttransfer}``) and MiB/s of both;
* **warm**: 1, 8 and 32 concurrent curl streams (``-o /dev/null``) read the committed
  blob: aggregate GB/s (10^9 bytes), the mirror's CPU seconds (user+system from
  ``/proc/<pid>/stat``) per GB sent, and its peak RSS during the phase (VmHWM, reset
  through ``/proc/<pid>/clear_refs`` before each phase, which needs root; otherwise the
  peak since start).

Variants pick the send path: ``old:MIRROR_SERVER__BLOB_SENDFILE=remote`` gives loopback
readers the chunk path (what TLS clients get), the default gives them sendfile. Figures
only, no assertions. From the repository root::

    .venv/bin/python bench/blob_streams.py [--size-mb 1024] [--rounds 2] \\
        [--variant NAME:KEY=VALUE,KEY=VALUE ...] [--streams 1,8,32]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from harness import prepare_process, print_table, run_in_workdir  # noqa: E402
from support.images import push_blob  # noqa: E402
from support.mirror_process import MirrorProcess, MirrorProcessError  # noqa: E402
from support.net import wait_until  # noqa: E402
from support.registry import Registry  # noqa: E402

REPO = "bench/streams"
MIB = 1024 * 1024
GB = 1e9
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise RuntimeError(f"no {key} for {pid}")


def children_cpu() -> float:
    """CPU seconds of the curls this script has waited for."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def reset_peak(pid: int) -> None:
    with contextlib.suppress(OSError):  # not root: VmHWM stays the peak since start
        Path(f"/proc/{pid}/clear_refs").write_text("5")


def curl(url: str, streams: int, size: int, timeout: float = 600) -> list[tuple[float, float]]:
    """Fetch `url` over `streams` parallel curls; (time to first byte, total) of each."""
    procs = [
        subprocess.Popen(
            [
                "curl",
                "-sS",
                "--fail",
                "-o",
                "/dev/null",
                "-w",
                "%{size_download} %{time_starttransfer} %{time_total}",
                url,
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(streams)
    ]
    times = []
    for proc in procs:
        out, _ = proc.communicate(timeout=timeout)
        got, first, total = out.split() if out else ("0", "0", "0")
        if proc.returncode != 0 or int(got) != size:
            raise RuntimeError(f"curl failed ({proc.returncode}) or short ({out!r})")
        times.append((float(first), float(total)))
    return times


@dataclass
class Warm:
    gbps: float
    cpu_per_gb: float
    hwm_mib: float
    client_cpu_per_gb: float


def warm_phase(mirror: MirrorProcess, url: str, streams: int, size: int) -> Warm:
    assert mirror.pid is not None
    reset_peak(mirror.pid)
    cpu = cpu_seconds(mirror.pid)
    clients = children_cpu()
    started = time.perf_counter()
    curl(url, streams, size)
    elapsed = time.perf_counter() - started
    sent = streams * size
    return Warm(
        gbps=sent / GB / elapsed,
        cpu_per_gb=(cpu_seconds(mirror.pid) - cpu) / (sent / GB),
        hwm_mib=status_kib(mirror.pid, "VmHWM") / 1024,
        client_cpu_per_gb=(children_cpu() - clients) / (sent / GB),
    )


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    name, _, pairs = text.partition(":")
    env = dict(pair.split("=", 1) for pair in pairs.split(",") if pair)
    return name, env


def run(args: argparse.Namespace, work: Path, cleanup: list[Callable[[], object]]) -> int:
    size = int(args.size_mb * MIB)
    blob = os.urandom(size)
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    registry = Registry(work / "registry")
    cleanup.append(registry.stop)
    registry.start()
    push_blob(registry.url, REPO, digest, blob, None)
    del blob
    path = f"/v2/{REPO}/blobs/{digest}"
    streams = [int(n) for n in args.streams.split(",") if n]
    variants = [parse_variant(v) for v in args.variant] or [("default", {})]
    print(f"blob: {size:,} bytes; streams {streams}; variants {variants}")
    curl(registry.url + path, 1, size)  # the registry's file into the page cache
    headers = [
        "round",
        "variant",
        "ttfb direct ms",
        "ttfb mirror ms",
        "cold MiB/s",
        "direct MiB/s",
        "cold CPU s/GB",
        "cold HWM MiB",
    ]
    for n in streams:
        headers += [f"{n}x GB/s", f"{n}x CPU s/GB", f"{n}x HWM MiB", f"{n}x curl CPU s/GB"]
    rows = []
    for round_no in range(1, args.rounds + 1):
        for name, env in variants:
            ((d_first, d_total),) = curl(registry.url + path, 1, size)
            mirror = MirrorProcess(
                work / f"mirror-{round_no}-{name}",
                {"local": {"url": registry.url}},
                log_level="warning",
                env=env,
            )
            mirror.start()
            try:
                assert mirror.pid is not None
                cpu = cpu_seconds(mirror.pid)
                ((m_first, m_total),) = curl(mirror.url + path, 1, size)
                wait_until(
                    lambda m=mirror: any((m.storage / "blobs").rglob(digest.split(":")[1])),
                    timeout=60,
                )
                row = [
                    str(round_no),
                    name,
                    f"{d_first * 1000:.1f}",
                    f"{m_first * 1000:.1f}",
                    f"{size / MIB / m_total:,.0f}",
                    f"{size / MIB / d_total:,.0f}",
                    f"{(cpu_seconds(mirror.pid) - cpu) / (size / GB):.2f}",
                    f"{status_kib(mirror.pid, 'VmHWM') / 1024:.0f}",
                ]
                curl(mirror.url + path, 1, size)  # one warm read first: page cache, heap
                for n in streams:
                    result = warm_phase(mirror, mirror.url + path, n, size)
                    row += [
                        f"{result.gbps:.2f}",
                        f"{result.cpu_per_gb:.2f}",
                        f"{result.hwm_mib:.0f}",
                        f"{result.client_cpu_per_gb:.2f}",
                    ]
                rows.append(row)
                print(" | ".join(row))
            finally:
                mirror.stop()
                shutil.rmtree(mirror.storage, ignore_errors=True)
    print()
    print_table(headers, rows)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--size-mb", type=float, default=1024)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--streams", default="1,8,32")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        help="NAME:KEY=VALUE,... (MIRROR_* overrides); repeat to alternate variants",
    )
    parser.add_argument("--tmpdir", type=Path, help="parent of the temp dir")
    args = parser.parse_args(argv)
    prepare_process()
    return run_in_workdir(
        "bench-streams-",
        parent=args.tmpdir,
        keep=False,
        failures=(MirrorProcessError, RuntimeError, TimeoutError),
        body=lambda work, cleanup: run(args, work, cleanup),
    )


if __name__ == "__main__":
    sys.exit(main())
