"""Object-storage benchmark: the same mirror on the filesystem backend and on the S3
backend (a real SeaweedFS on loopback), side by side, plus the S3 backend answering hits
with redirects to presigned URLs (``--no-redirect`` leaves that one out).

What it measures, per backend:

* a large warm blob (``--blob-mb``, one raw blob pushed to the registry): fetched once
  through the mirror (cold; its digest checked), then, once it is committed, read back
  by one ``curl`` and by ``--streams`` concurrent ones: aggregate MiB/s. The redirect
  backend's clients follow the 307 to SeaweedFS, so they measure the object store;
* the mirror's peak RSS (VmHWM, reset through ``/proc/<pid>/clear_refs`` before each
  part) over the cold fetch and over the warm reads, and its CPU seconds per GiB sent
  during the warm reads;
* a cold ``skopeo copy`` of a 5-layer image (``--layer-mb`` each) through a fresh mirror,
  wall seconds, and that time as a multiple of a direct pull from the registry (the
  second of two, so both sides read a warm page cache). Pulled trees are verified.

Ratios are s3 (or redirect) over filesystem. It prints figures and never asserts timings;
it exits non-zero only when a transfer fails or content is wrong. Everything runs on
127.0.0.1 under a private temp dir and is stopped on every exit path. From the
repository root::

    .venv/bin/python bench/s3.py [--blob-mb 1024] [--layer-mb 40] [--streams 8] [--keep]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from harness import (  # noqa: E402
    Cleanup,
    add_blob_options,
    prepare_process,
    print_table,
    run_in_workdir,
)
from pull import MIB, SEED, BenchError, cpu_seconds, peak_rss_mib, verify_tree  # noqa: E402
from support.images import oci_image, push, push_blob, sha256_digest  # noqa: E402
from support.mirror_process import MirrorProcess, MirrorProcessError  # noqa: E402
from support.net import wait_until  # noqa: E402
from support.registry import Registry  # noqa: E402
from support.seaweedfs import SeaweedS3  # noqa: E402
from support.skopeo import SkopeoError, skopeo_copy  # noqa: E402

IMAGE_REPO, IMAGE_TAG = "bench/s3-image", "latest"
BLOB_REPO = "bench/s3-blob"
LAYERS = 5
GIB = 1024 * MIB
TRANSFER_TIMEOUT = 600.0
# Commit of a large blob to the bucket happens after its last byte reached the client.
COMMIT_TIMEOUT = 300.0


@dataclass
class Backend:
    name: str
    storage: dict[str, Any]  # storage settings beside `root`
    bucket: str | None = None
    figures: dict[str, float | None] = field(default_factory=dict)


# -- measuring -----------------------------------------------------------------------------


def reset_peak_rss(pid: int | None) -> None:
    """Start VmHWM afresh (Linux: writing 5 to clear_refs resets the peak RSS)."""
    if pid is not None:
        Path(f"/proc/{pid}/clear_refs").write_text("5")


def curl_argv(url: str) -> list[str]:
    # -L: the redirect backend answers hits with a 307 to the object store.
    return ["curl", "-sS", "-f", "-L", "-o", "/dev/null", "-w", "%{size_download}", url]


def read_streams(url: str, streams: int, expected: int) -> float:
    """Start `streams` curl readers of `url` together; wall seconds until all are done."""
    started = time.perf_counter()
    readers = [
        subprocess.Popen(curl_argv(url), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(streams)
    ]
    failures = []
    for reader in readers:
        out, err = reader.communicate(timeout=TRANSFER_TIMEOUT)
        if reader.returncode != 0 or out.decode().strip() != str(expected):
            failures.append(f"curl exit {reader.returncode}, {out.decode()!r} bytes, {err!r}")
    seconds = time.perf_counter() - started
    if failures:
        raise BenchError(f"{url}: {len(failures)} of {streams} reads failed: {failures[0]}")
    return seconds


def fetch_and_hash(url: str) -> tuple[float, str]:
    """One curl reading `url`, hashed as it arrives; (seconds, sha256 digest)."""
    digest = hashlib.sha256()
    started = time.perf_counter()
    argv = ["curl", "-sS", "-f", "-L", url]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as reader:
        assert reader.stdout is not None
        while data := reader.stdout.read(4 * MIB):
            digest.update(data)
        _, err = reader.communicate(timeout=TRANSFER_TIMEOUT)
    if reader.returncode != 0:
        raise BenchError(f"{url}: curl exit {reader.returncode}: {err.decode().strip()}")
    return time.perf_counter() - started, "sha256:" + digest.hexdigest()


def committed(backend: Backend, mirror: MirrorProcess, s3: SeaweedS3, digest: str) -> bool:
    """The blob sits in the backend's store (not just verified in tmp/)."""
    algorithm, hex_digest = digest.split(":")
    if backend.bucket is None:
        return (mirror.storage / "blobs" / algorithm / hex_digest[:2] / hex_digest).is_file()
    objects = s3.client().list_objects_v2(
        Bucket=backend.bucket, Prefix=f"blobs/{algorithm}/{hex_digest}"
    )
    return bool(objects.get("KeyCount"))


def measure_blob(
    backend: Backend,
    mirror: MirrorProcess,
    s3: SeaweedS3,
    digest: str,
    size: int,
    streams: int,
) -> None:
    url = f"{mirror.url}/v2/{BLOB_REPO}/blobs/{digest}"
    figures = backend.figures
    os.sync()
    reset_peak_rss(mirror.pid)
    seconds, got = fetch_and_hash(url)
    if got != digest:
        raise BenchError(f"{backend.name}: cold blob read hashed to {got}, not {digest}")
    figures["cold blob MiB/s"] = size / MIB / seconds
    wait_until(
        lambda: committed(backend, mirror, s3, digest),
        timeout=COMMIT_TIMEOUT,
        interval=0.2,
        message=f"{backend.name}: blob not committed after {COMMIT_TIMEOUT} s",
    )
    figures["peak RSS cold blob MiB"] = peak_rss_mib(mirror.pid)
    # An untimed first hit: every backend then reads the blob from a warm page cache.
    read_streams(url, 1, size)
    for count, label in ((1, "1 stream"), (streams, f"{streams} streams")):
        os.sync()
        reset_peak_rss(mirror.pid)
        cpu0, store_cpu0 = cpu_seconds(mirror.pid), cpu_seconds(s3.pid)
        seconds = read_streams(url, count, size)
        gib = count * size / GIB
        figures[f"warm {label} MiB/s"] = count * size / MIB / seconds
        figures[f"mirror CPU s/GiB, {label}"] = (cpu_seconds(mirror.pid) - cpu0) / gib
        figures[f"SeaweedFS CPU s/GiB, {label}"] = (cpu_seconds(s3.pid) - store_cpu0) / gib
        figures[f"peak RSS warm {label} MiB"] = peak_rss_mib(mirror.pid)


def timed_pull(host: str, dest: Path) -> float:
    started = time.perf_counter()
    skopeo_copy(
        f"docker://{host}/{IMAGE_REPO}:{IMAGE_TAG}", f"dir:{dest}", timeout=TRANSFER_TIMEOUT
    )
    return time.perf_counter() - started


# -- reporting -----------------------------------------------------------------------------

# (figure, whether a ratio to filesystem means something): SeaweedFS idles beside the
# filesystem mirror, so its CPU there is a control, not a base.
ROWS = (
    ("warm 1 stream MiB/s", True),
    ("warm {streams} streams MiB/s", True),
    ("cold blob MiB/s", True),
    ("cold pull s", True),
    ("cold pull / direct", True),
    ("peak RSS cold blob MiB", True),
    ("peak RSS warm 1 stream MiB", True),
    ("peak RSS warm {streams} streams MiB", True),
    ("mirror CPU s/GiB, 1 stream", True),
    ("mirror CPU s/GiB, {streams} streams", True),
    ("SeaweedFS CPU s/GiB, 1 stream", False),
    ("SeaweedFS CPU s/GiB, {streams} streams", False),
    ("mirror CPU s, cold pull", True),
    ("SeaweedFS CPU s, cold pull", False),
)


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if value >= 100 else f"{value:,.2f}"


def report(backends: list[Backend], streams: int) -> None:
    base = backends[0]
    others = backends[1:]
    rows = []
    for template, compared in ROWS:
        name = template.format(streams=streams)
        values = [b.figures.get(name) for b in backends]
        ratios = []
        for other in others:
            mine, theirs = other.figures.get(name), base.figures.get(name)
            usable = compared and mine is not None and theirs
            ratios.append(f"{mine / theirs:.2f}x" if usable else "-")
        rows.append([name, *(fmt(v) for v in values), *ratios])
    print_table(
        ["figure", *(b.name for b in backends), *(f"{o.name}/{base.name}" for o in others)],
        rows,
    )


# -- main ----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    add_blob_options(parser)
    parser.add_argument(
        "--no-redirect", action="store_true", help="leave out the S3 backend with redirects"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (and print it)")
    parser.add_argument("--tmpdir", type=Path, help="parent of the temp dir (default: $TMPDIR)")
    args = parser.parse_args(argv)
    if args.blob_mb < 1 or args.layer_mb <= 0 or args.streams < 1:
        parser.error("--blob-mb and --layer-mb must be > 0, --streams >= 1")
    return args


def run(args: argparse.Namespace, work: Path, cleanup: Cleanup) -> int:
    pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="verify")
    cleanup.append(pool.shutdown)

    started = time.perf_counter()
    rng = random.Random(SEED)
    # randbytes makes at most 256 MiB at a time (an int of n * 8 bits).
    blob = b"".join(rng.randbytes(MIB) for _ in range(args.blob_mb))
    blob_digest = sha256_digest(blob)
    image = oci_image([int(args.layer_mb * MIB)] * LAYERS, seed=SEED)
    image_bytes = sum(len(b) for b in image.blobs.values())
    print(
        f"blob: {len(blob):,} bytes; image: {LAYERS} layers + config, {image_bytes:,} blob "
        f"bytes; built in {time.perf_counter() - started:.1f} s"
    )
    registry = Registry(work / "registry")
    cleanup.append(registry.stop)
    registry.start()
    push_blob(registry.url, BLOB_REPO, blob_digest, blob, None)
    del blob  # a GiB the measurements should not share the machine with
    push(registry.url, IMAGE_REPO, image, IMAGE_TAG)
    s3 = SeaweedS3(work / "weed")
    (work / "weed").mkdir()
    cleanup.append(s3.stop)
    s3.start()
    print(
        f"registry: {registry.url}; SeaweedFS S3: {s3.endpoint} (up in {s3.startup_seconds:.1f} s)"
    )

    backends = [Backend("filesystem", {"backend": "filesystem"})]
    for name, extra in (("s3", {}), ("redirect", {"redirect": True})):
        if name == "redirect" and args.no_redirect:
            continue
        bucket = f"bench-{name}"
        s3.make_bucket(bucket)
        # weed grows a bucket's first volume on its first write (~0.3 s): done here, as
        # in a bucket in use, not in the middle of the cold pull. Outside `blobs/`.
        s3.client().put_object(Bucket=bucket, Key="bench-volume-warm-up", Body=b"x")
        backends.append(Backend(name, s3.storage_settings(bucket, **extra), bucket=bucket))

    out = work / "out"
    direct = [timed_pull(registry.host, out / f"direct-{i}") for i in (1, 2)]
    for tree in (out / "direct-1", out / "direct-2"):
        verify_tree(tree, image, pool)
        shutil.rmtree(tree)
    baseline = direct[1]
    print(f"direct pulls: {direct[0]:.2f} s, {direct[1]:.2f} s (baseline)")

    upstreams = {"local": {"url": registry.url, "tag_ttl": "1h"}}
    for backend in backends:
        mirror = MirrorProcess(work / backend.name, upstreams, log_level="warning")
        mirror.config["storage"].update(backend.storage)
        cleanup.append(mirror.stop)
        mirror.start()
        print(f"{backend.name}: mirror {mirror.host} (pid {mirror.pid})")
        os.sync()
        tree = out / backend.name
        cpu0, store_cpu0 = cpu_seconds(mirror.pid), cpu_seconds(s3.pid)
        seconds = timed_pull(mirror.host, tree)
        backend.figures["mirror CPU s, cold pull"] = cpu_seconds(mirror.pid) - cpu0
        # The uploads of layers already verified run during the pull and compete with it.
        backend.figures["SeaweedFS CPU s, cold pull"] = cpu_seconds(s3.pid) - store_cpu0
        verify_tree(tree, image, pool)
        shutil.rmtree(tree)
        backend.figures["cold pull s"] = seconds
        backend.figures["cold pull / direct"] = seconds / baseline
        measure_blob(backend, mirror, s3, blob_digest, args.blob_mb * MIB, args.streams)
        status = mirror.stop()
        print(f"{backend.name}: done; mirror exit status after SIGTERM {status}")

    print()
    print(
        f"warm blob {args.blob_mb} MiB; image {LAYERS} x {args.layer_mb:g} MiB; "
        f"direct pull baseline {baseline:.2f} s; MiB/s aggregate over all streams"
    )
    report(backends, args.streams)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    prepare_process()
    return run_in_workdir(
        "bench-s3-",
        parent=args.tmpdir,
        keep=args.keep,
        failures=(BenchError, MirrorProcessError, SkopeoError, TimeoutError),
        body=lambda work, cleanup: run(args, work, cleanup),
    )


if __name__ == "__main__":
    sys.exit(main())
