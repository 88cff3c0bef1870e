"""Warm request throughput with `mirror serve --workers 1` and `--workers 2`.

Pushes a small image to a local distribution registry, starts the mirror (embedded
metadata store, shared by the workers), warms it, then drives two warm endpoints with
wrk (Debian package `wrk`) for a fixed time each: a manifest by tag within its TTL, and
a small blob. Prints requests per second, latency, and the ratio of 2 workers over 1.
Loopback only; every process it starts is stopped at the end.

    .venv/bin/python bench/throughput.py [--seconds 5] [--connections 32]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from support.images import oci_image, push
from support.mirror_process import MirrorProcess
from support.net import free_port, http_request
from support.registry import Registry

REPO, TAG = "bench/app", "v1"
ACCEPT = "application/vnd.oci.image.manifest.v1+json"


def wrk(url: str, seconds: int, connections: int, header: str | None) -> tuple[float, str]:
    """Requests per second and the average latency, as wrk reports them."""
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", url]
    if header:
        argv += ["-H", header]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=seconds + 30)
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out.stdout)
    latency = re.search(r"Latency\s+(\S+)", out.stdout)
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out.stdout)
    if rate is None or non_2xx is not None:
        raise RuntimeError(f"wrk run failed or saw errors:\n{out.stdout}")
    return float(rate.group(1)), latency.group(1) if latency else "?"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is not installed: apt-get install wrk", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="bench-throughput-"))
    image = oci_image([2048, 4096], seed=77)
    blob = image.layer_digests[0]
    results: dict[int, dict[str, tuple[float, str]]] = {}
    try:
        with Registry(work / "registry") as registry:
            push(registry.url, REPO, image, TAG)
            for workers in (1, 2):
                mirror = MirrorProcess(
                    work / f"mirror-{workers}",
                    {"local": {"url": registry.url, "tag_ttl": "1h"}},
                    port=free_port(),
                    log_level="warning",
                    extra_args=("--workers", str(workers)),
                )
                with mirror:
                    manifest_url = f"{mirror.url}/v2/{REPO}/manifests/{TAG}"
                    blob_url = f"{mirror.url}/v2/{REPO}/blobs/{blob}"
                    # Warm both, through every worker the kernel picks.
                    for _ in range(8):
                        assert (
                            http_request("GET", manifest_url, headers={"Accept": ACCEPT}).status
                            == 200
                        )
                        assert http_request("GET", blob_url).status == 200
                    results[workers] = {
                        "manifest by tag": wrk(
                            manifest_url, args.seconds, args.connections, f"Accept: {ACCEPT}"
                        ),
                        "small blob": wrk(blob_url, args.seconds, args.connections, None),
                    }
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(
        f"\nwrk -t1 -c{args.connections} -d{args.seconds}s "
        "on this machine (2 cores, shared with wrk)"
    )
    print(
        f"{'endpoint':<18}{'1 worker req/s':>16}{'2 workers req/s':>17}{'ratio':>8}   latency 1 / 2"
    )
    for endpoint in results[1]:
        one, two = results[1][endpoint], results[2][endpoint]
        print(
            f"{endpoint:<18}{one[0]:>16.0f}{two[0]:>17.0f}{two[0] / one[0]:>7.2f}x"
            f"   {one[1]} / {two[1]}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
