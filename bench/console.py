"""The console's API on a large cache: how fast the overview and browse endpoints answer
with 100,000 blob records and 5,000 repositories in the metadata store.

The store is filled synthetically (no registry: records only, plus real manifest files
for the few images the `manifest` endpoint is timed on), then a real ``mirror serve``
process is started on it, and each endpoint is asked `--requests` times, one request at
a time over one keep-alive connection, after a few warm-up requests. It prints, per
backend (the embedded store, and Redis unless `--backend embedded`), how long the
store took to fill, how long the first background snapshot took to appear (the scan the
endpoints never do), and a table of p50 / p95 / max milliseconds per endpoint. The
issue's bar is 100 ms for the overview and browse endpoints. It never asserts: figures
only. Run it from the repository root::

    .venv/bin/python bench/console.py [--blobs 100000] [--repositories 5000] [--requests 200]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from harness import prepare_process, print_table, reconciled_at, run_in_workdir  # noqa: E402
from support.images import oci_image, push  # noqa: E402
from support.mirror_process import MirrorProcess, MirrorProcessError  # noqa: E402
from support.net import free_port, http_request, wait_until  # noqa: E402
from support.redis_server import RedisServer  # noqa: E402
from support.registry import Registry  # noqa: E402
from throughput import wrk  # noqa: E402

from mirror.errors import MetadataUnavailable  # noqa: E402
from mirror.metadata.base import BlobRecord, MetadataStore, TagRecord  # noqa: E402
from mirror.metadata.embedded import EmbeddedMetadataStore  # noqa: E402
from mirror.metadata.redis import RedisMetadataStore  # noqa: E402
from mirror.oci import OCI_INDEX, OCI_MANIFEST, Digest  # noqa: E402
from mirror.storage.blobstore import FilesystemBlobStore  # noqa: E402

UPSTREAM = "docker.io"
TAGS = ("latest", "1.0")
SAMPLED = 20  # repositories whose images get real manifest files (the manifest endpoint)
LAYERS = 5
CONCURRENT_WRITES = 16  # more only queues in the store (and Redis connects time out)
WRITE_ATTEMPTS = 3
WARM_UP = 5


def fake_content(kind: str, n: int) -> bytes:
    return f"{kind}-{n}".encode()


def fake_digest(kind: str, n: int) -> str:
    """The digest of `fake_content(kind, n)`: the files written are real blobs."""
    return "sha256:" + hashlib.sha256(fake_content(kind, n)).hexdigest()


def write_files(store: FilesystemBlobStore, contents: list[bytes]) -> None:
    """Blob files written straight into place, without fsync: a bench's fill, not the
    mirror's commit path (the mirror's start-up reconcile drops records without files)."""
    for content in contents:
        path = store.path(Digest.of(content))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)


def repository_name(n: int) -> str:
    return f"team{n % 50}/service-{n:05d}"


def platform_manifest(n: int, arch: str, blob_count: int) -> bytes:
    layers = [
        {
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": fake_digest("blob", (n * 7 + i) % blob_count),
            "size": 1000 + i,
        }
        for i in range(LAYERS)
    ]
    document = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": fake_digest(f"config-{arch}", n),
            "size": 500,
        },
        "layers": layers,
        "annotations": {"arch": arch},
    }
    return json.dumps(document).encode()


def index_manifest(children: list[tuple[str, bytes]]) -> bytes:
    document = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {
                "mediaType": OCI_MANIFEST,
                "digest": "sha256:" + hashlib.sha256(body).hexdigest(),
                "size": len(body),
                "platform": {"os": "linux", "architecture": arch},
            }
            for arch, body in children
        ],
    }
    return json.dumps(document).encode()


async def gather_bounded(jobs: list[Callable[[], Any]]) -> None:
    limiter = asyncio.Semaphore(CONCURRENT_WRITES)

    async def one(job: Callable[[], Any]) -> None:
        async with limiter:
            for attempt in range(1, WRITE_ATTEMPTS + 1):
                try:
                    await job()
                    return
                except MetadataUnavailable:  # a loaded machine's connect timeout
                    if attempt == WRITE_ATTEMPTS:
                        raise

    await asyncio.gather(*(one(job) for job in jobs))


async def fill(metadata: MetadataStore, storage: Path, blobs: int, repositories: int) -> None:
    """Blob records, repositories with tags, and for the sampled repositories real
    manifests (an index of two platforms) in the blob store."""
    now = time.time()
    store = FilesystemBlobStore(storage)
    await asyncio.to_thread(store.prepare, 0.0)
    manifests: dict[str, tuple[str, bytes]] = {}  # tag digest -> (media type, body)
    tagged: list[tuple[str, str, str]] = []  # repository, tag, digest
    for n in range(repositories):
        for tag in TAGS:
            if n < SAMPLED:
                children = [(a, platform_manifest(n, a, blobs)) for a in ("amd64", "arm64")]
                for _arch, body in children:
                    manifests["sha256:" + hashlib.sha256(body).hexdigest()] = (OCI_MANIFEST, body)
                body = index_manifest(children)
                digest = "sha256:" + hashlib.sha256(body).hexdigest()
                manifests[digest] = (OCI_INDEX, body)
            else:
                digest = fake_digest(f"manifest-{tag}", n)
            tagged.append((repository_name(n), tag, digest))
    records: list[tuple[str, BlobRecord]] = []
    contents = []
    for i in range(blobs):
        when = now - 86400 + i % 86400
        contents.append(fake_content("blob", i))
        records.append((fake_digest("blob", i), BlobRecord(len(contents[-1]), when, when)))
    for n in range(SAMPLED, repositories):
        for tag in TAGS:
            content = fake_content(f"manifest-{tag}", n)
            contents.append(content)
            records.append(
                (
                    fake_digest(f"manifest-{tag}", n),
                    BlobRecord(len(content), now - 3600, now - 60, OCI_INDEX),
                )
            )
    await asyncio.to_thread(write_files, store, contents)
    for digest, (media_type, body) in manifests.items():
        await store.put_bytes(Digest.parse(digest), body)
        records.append((digest, BlobRecord(len(body), now - 3600, now - 60, media_type)))
    await gather_bounded([_put_blob(metadata, digest, record) for digest, record in records])
    await gather_bounded(
        [
            _put_tag(metadata, repository, tag, TagRecord(digest, OCI_INDEX, now - 30))
            for repository, tag, digest in tagged
        ]
    )
    for n in range(repositories):
        await metadata.add_repository(UPSTREAM, repository_name(n))
    for repository, _tag, digest in tagged:
        if digest in manifests:
            await metadata.add_blob_repository(digest, UPSTREAM, repository)
    # The indexes a mirror builds on its first start over a new store: built here, the
    # measured mirror starts as a running one would restart, not as an upgrade does.
    await metadata.rebuild_indexes()
    await store.close()


def _put_blob(metadata: MetadataStore, digest: str, record: BlobRecord) -> Callable[[], Any]:
    return lambda: metadata.put_blob(digest, record)


def _put_tag(
    metadata: MetadataStore, repository: str, tag: str, record: TagRecord
) -> Callable[[], Any]:
    return lambda: metadata.put_tag(UPSTREAM, repository, tag, record)


def endpoints() -> list[tuple[str, str]]:
    sample = repository_name(3)
    query = f"upstream={UPSTREAM}&repository={sample}"
    return [
        ("session", "/api/v1/session"),
        ("overview", "/api/v1/overview"),
        ("repositories (first page)", "/api/v1/repositories"),
        ("repositories ?q= (substring)", "/api/v1/repositories?q=service-0042"),
        ("repositories ?q= (many hits)", "/api/v1/repositories?q=team7/&limit=100"),
        ("tags", f"/api/v1/tags?{query}"),
        ("manifest (index, 2 platforms)", f"/api/v1/manifest?{query}&reference=latest"),
    ]


async def time_endpoints(base: str, requests: int) -> list[list[str]]:
    rows = []
    async with aiohttp.ClientSession(base) as http:
        first = await (await http.get("/api/v1/repositories")).json()
        cursor = first["next"]
        paths = [
            *endpoints(),
            ("repositories (page 2, cursor)", f"/api/v1/repositories?cursor={cursor}"),
        ]
        for name, path in paths:
            timings = []
            for i in range(WARM_UP + requests):
                started = time.perf_counter()
                async with http.get(path) as response:
                    await response.read()
                    if response.status != 200:
                        raise MirrorProcessError(f"{path}: {response.status}")
                if i >= WARM_UP:
                    timings.append((time.perf_counter() - started) * 1000)
            timings.sort()
            rows.append(
                [
                    name,
                    f"{statistics.median(timings):.1f}",
                    f"{timings[int(len(timings) * 0.95) - 1]:.1f}",
                    f"{timings[-1]:.1f}",
                ]
            )
    return rows


def run_backend(
    backend: str, args: argparse.Namespace, work: Path, cleanup: list[Callable[[], object]]
) -> None:
    storage = work / backend / "storage"
    settings: dict[str, Any] = {}
    if backend == "redis":
        redis = RedisServer(work / backend / "redis")
        cleanup.append(redis.stop)
        redis.start()
        settings["metadata"] = {"backend": "redis", "redis_url": redis.url}
        metadata: MetadataStore = RedisMetadataStore(redis.url)
    else:
        metadata = EmbeddedMetadataStore(storage / "meta")
    started = time.monotonic()

    async def fill_and_close() -> None:
        try:
            await fill(metadata, storage, args.blobs, args.repositories)
        finally:
            await metadata.close()

    asyncio.run(fill_and_close())
    filled = time.monotonic() - started
    print(f"{backend}: store filled in {filled:.1f} s; starting mirror serve")
    mirror = MirrorProcess(
        work / backend / "mirror",
        {UPSTREAM: {"url": f"http://127.0.0.1:{free_port()}"}},
        storage=storage,
        log_level="info",  # the start-up reconcile's end is read from the log
        **settings,
    )
    cleanup.append(mirror.stop)
    started, wall_started = time.monotonic(), time.time()
    mirror.start(timeout=600)  # start-up counts 100k blob files (the space ledger)
    ready = time.monotonic() - started
    base = mirror.url

    def counted() -> bool:
        import urllib.request

        with urllib.request.urlopen(f"{base}/api/v1/overview", timeout=10) as response:  # noqa: S310 (loopback)
            return bool(json.load(response)["usage"]["blobs"])

    wait_until(counted, timeout=600)
    snapshot = time.monotonic() - started
    # Once as soon as the console has its first snapshot, when the start-up reconcile
    # (a walk of every blob file) may still run beside the requests; once after it.
    early = reconciled_at(mirror.log_path) is None
    first_rows = asyncio.run(time_endpoints(base, args.requests))
    wait_until(lambda: reconciled_at(mirror.log_path) is not None, timeout=900)
    reconciled = reconciled_at(mirror.log_path)
    rows = asyncio.run(time_endpoints(base, args.requests))
    mirror.stop()
    print(
        f"\n{backend}: {args.blobs:,} blob records, {args.repositories:,} repositories "
        f"x {len(TAGS)} tags; filled in {filled:.1f} s; serving {ready:.1f} s after start, "
        f"first snapshot {snapshot:.1f} s after start, start-up reconcile done "
        f"{(reconciled or time.time()) - wall_started:.1f} s after start"
    )
    headers = ["endpoint", "p50 ms", "p95 ms", "max ms"]
    if early:
        print("requests from the first snapshot on, while the start-up reconcile ran:")
        print_table(headers, first_rows)
        print("and once it had finished:")
    print_table(headers, rows)
    if not args.keep:
        shutil.rmtree(work / backend, ignore_errors=True)


def pull_cost(args: argparse.Namespace, work: Path, cleanup: list[Callable[[], object]]) -> None:
    """What the console costs a pull: warm manifest and blob requests per second with
    `ui.enabled` false and true, alternated (off, on, off, on) under the same load."""
    image = oci_image([2048, 4096], seed=78)
    registry = Registry(work / "registry")
    cleanup.append(registry.stop)
    registry.start()
    push(registry.url, "bench/app", image, "v1")
    accept = "application/vnd.oci.image.manifest.v1+json"
    rows = []
    for run_number in range(1, 2 * args.ab_rounds + 1):
        enabled = run_number % 2 == 0
        mirror = MirrorProcess(
            work / f"ab-{run_number}",
            {"local": {"url": registry.url, "tag_ttl": "1h"}},
            log_level="warning",
            ui={"enabled": enabled},
        )
        cleanup.append(mirror.stop)
        with mirror:
            manifest = f"{mirror.url}/v2/bench/app/manifests/v1"
            blob = f"{mirror.url}/v2/bench/app/blobs/{image.layer_digests[0]}"
            for _ in range(4):  # warm: cached, and the tag fresh
                assert http_request("GET", manifest, headers={"Accept": accept}).status == 200
                assert http_request("GET", blob).status == 200
            manifest_rate, _ = wrk(manifest, args.ab_seconds, 32, f"Accept: {accept}")
            blob_rate, _ = wrk(blob, args.ab_seconds, 32, None)
        rows.append(
            [
                f"run {run_number}: ui {'on' if enabled else 'off'}",
                f"{manifest_rate:.0f}",
                f"{blob_rate:.0f}",
            ]
        )
    print(f"\nwarm pulls, wrk -t1 -c32 -d{args.ab_seconds}s, one worker, requests per second")
    print_table(["run", "manifest by tag", "small blob"], rows)


def run(args: argparse.Namespace, work: Path, cleanup: list[Callable[[], object]]) -> int:
    backends = ["embedded", "redis"] if args.backend == "both" else [args.backend]
    if args.backend != "none":
        print(f"{args.requests} requests per endpoint, one at a time, after {WARM_UP} warm-ups")
    for backend in backends if args.backend != "none" else []:
        run_backend(backend, args, work, cleanup)
    if args.ab_rounds:
        if shutil.which("wrk") is None:
            print("wrk is not installed (apt-get install wrk): no pull-cost runs")
        else:
            pull_cost(args, work, cleanup)
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--blobs", type=int, default=100_000)
    parser.add_argument("--repositories", type=int, default=5_000)
    parser.add_argument("--requests", type=int, default=200, help="per endpoint")
    parser.add_argument("--backend", choices=["embedded", "redis", "both", "none"], default="both")
    parser.add_argument(
        "--ab-rounds", type=int, default=2, help="pull-cost runs: ui off/on pairs (0: none)"
    )
    parser.add_argument("--ab-seconds", type=int, default=5, help="each pull-cost run")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--tmpdir", type=Path, help="parent of the temp dir")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    prepare_process()
    return run_in_workdir(
        "bench-console-",
        parent=args.tmpdir,
        keep=args.keep,
        failures=(MirrorProcessError, TimeoutError, OSError, RuntimeError, MetadataUnavailable),
        body=lambda work, cleanup: run(args, work, cleanup),
    )


if __name__ == "__main__":
    sys.exit(main())
