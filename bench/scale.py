"""Does the mirror stay flat as its cache grows? A small store against a synthetic big one.

    .venv/bin/python bench/scale.py [--blobs 1000000] [--tags 50000] [--repositories 3000]
        [--baseline 1000] [--backend embedded|redis|both] [--rounds 3] [--keep]
        [--tmpdir DIR] [--reuse DIR]

For each metadata backend it builds two stores, a baseline (`--baseline` blobs, tags and
repositories in the same proportion, but at least enough for the hot set below) and a big
one (`--blobs`, `--tags`), and measures on each: start-up (spawn of `mirror serve` to
/readyz 200 and to /v2/ answering), the time until the background reconcile logs its end,
blob GET and manifest-by-tag hit latency (wrk, p50 and p99), `mirror stats --json` wall
time, one forced eviction pass (in this process, on the real `Evictor`, with max_size just
below usage) and the server's peak RSS. It prints one table per backend: baseline, big,
and big over baseline.

The hits are the same work on both stores, so that only the size differs: HOT blobs, and
HOT tags that each name their own manifest in their own repository (a hot set of a few
manifests in a few repositories makes every access flush smaller, and its tail shorter).
Both servers run at once, and wrk takes turns between them for `--rounds` rounds; each hit
figure is the median of its rounds, so a machine that is slow for a while is slow for both.

The store is written directly, fast: every blob record has a real small file under
`blobs/` (so hits are real hits and reconcile finds what it expects), a size, an access
time, one repository; a tenth of the tags point at manifests. Records go in as the
backends lay them out (embedded: diskcache keys in transactions of 10,000; Redis:
pipelines), the ledger gets the committed total a running mirror would have kept, and a
backend that keeps indexes beside its records is asked to build them before the run.

Everything is on 127.0.0.1: Redis is started here on a free port with its own dir; the
configured upstream is a closed loopback port, so every answer is from the cache. Nothing
is asserted: it prints figures. Timings on a shared machine are noisy; run it twice.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from harness import prepare_process, print_table, reconciled_at, run_in_workdir  # noqa: E402
from support.net import LOOPBACK, free_port, http_request  # noqa: E402
from support.redis_server import RedisServer  # noqa: E402

from mirror.eviction import Evictor  # noqa: E402
from mirror.logging import configure_logging  # noqa: E402
from mirror.metadata.base import BlobRecord, MetadataStore, TagRecord  # noqa: E402
from mirror.storage.blobstore import FilesystemBlobStore, Quota  # noqa: E402

UPSTREAM = "bench"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CHUNK = 10_000
HOT = 64  # blobs and tags the latency runs rotate over
WRK_SECONDS = 5
START_TIMEOUT = float(os.environ.get("SCALE_START_TIMEOUT", "600"))
RECONCILE_TIMEOUT = 900.0
T0 = 1_700_000_000.0  # access times are spread over the following N seconds
NOW = time.time()  # tags were checked now: within tag_ttl, answered from the cache


@dataclass
class Synthetic:
    """The i-th blob of a synthetic store: its bytes and digest; tag j's manifest."""

    blobs: int
    tags: int
    repositories: int

    def blob(self, i: int) -> bytes:
        if i < self.tags // 10:
            return self.manifest(i)
        return b"scale-blob-%d" % i

    def manifest(self, i: int) -> bytes:
        body = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": digest_of(b"scale-blob-%d" % (self.blobs - 1 - i)),
                "size": len(b"scale-blob-%d" % (self.blobs - 1 - i)),
            },
            "layers": [],
            "annotations": {"scale": str(i)},
        }
        return json.dumps(body, separators=(",", ":")).encode()

    def is_manifest(self, i: int) -> bool:
        return i < self.tags // 10

    def repository(self, i: int) -> str:
        return f"team{i % self.repositories}/app"

    def record(self, i: int, data: bytes) -> BlobRecord:
        # Access order shuffled against creation order, as in a cache people pull from.
        accessed = T0 + (i * 7919) % self.blobs
        return BlobRecord(
            size=len(data),
            created_at=T0,
            last_access=accessed,
            media_type=OCI_MANIFEST if self.is_manifest(i) else None,
            pinned=i % 1000 == 999,
        )

    def tag(self, j: int) -> tuple[str, str, TagRecord]:
        manifest = j % max(self.tags // 10, 1)
        return (
            self.repository(manifest),
            f"v{j}",
            TagRecord(
                digest=digest_of(self.manifest(manifest)), media_type=OCI_MANIFEST, checked_at=NOW
            ),
        )


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# Building a store


def write_files(root: Path, synthetic: Synthetic) -> int:
    """Every blob's file (kept if already there: files are shared between backends);
    returns the committed bytes."""
    blobs = root / "blobs" / "sha256"
    for prefix in range(256):
        (blobs / f"{prefix:02x}").mkdir(parents=True, exist_ok=True)
    total = 0
    for i in range(synthetic.blobs):
        data = synthetic.blob(i)
        hexdigest = hashlib.sha256(data).hexdigest()
        path = blobs / hexdigest[:2] / hexdigest
        total += len(data)
        if path.exists():
            continue
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
    for name in ("tmp", "meta"):
        (root / name).mkdir(exist_ok=True)
    (root / "layout-version").write_text("1\n")
    # What a running mirror's ledger says (storage/ledger.py): nothing reserved.
    (root / "ledger.json").write_text(json.dumps({"committed": total, "processes": {}}))
    return total


def records(synthetic: Synthetic) -> Iterator[tuple[str, BlobRecord, str]]:
    for i in range(synthetic.blobs):
        data = synthetic.blob(i)
        yield digest_of(data), synthetic.record(i, data), synthetic.repository(i)


def fill_embedded(meta: Path, synthetic: Synthetic) -> None:
    """diskcache keys as `mirror/metadata/embedded.py` lays them out."""
    import diskcache

    shutil.rmtree(meta, ignore_errors=True)
    cache = diskcache.Cache(str(meta), timeout=30, eviction_policy="none")
    try:
        batch: list[tuple[str, BlobRecord, str]] = []
        for item in records(synthetic):
            batch.append(item)
            if len(batch) == CHUNK:
                _embedded_blobs(cache, batch)
                batch = []
        _embedded_blobs(cache, batch)
        tags: dict[str, set[str]] = {}
        with cache.transact():
            for j in range(synthetic.tags):
                repository, tag, record = synthetic.tag(j)
                cache.set(f"tag:{UPSTREAM}/{repository}:{tag}", record.to_json())
                tags.setdefault(repository, set()).add(tag)
            for repository, names in tags.items():
                cache.set(f"tags:{UPSTREAM}/{repository}", json.dumps(sorted(names)))
            repositories = {
                f"{UPSTREAM}/{synthetic.repository(i)}" for i in range(synthetic.repositories)
            }
            cache.set("repositories", json.dumps(sorted(repositories)))
    finally:
        cache.close()


def _embedded_blobs(cache: Any, batch: list[tuple[str, BlobRecord, str]]) -> None:
    with cache.transact():
        for digest, record, repository in batch:
            cache.set(f"blob:{digest}", record.to_json())
            cache.set(f"blobrepos:{digest}", json.dumps([f"{UPSTREAM}/{repository}"]))


def fill_redis(url: str, prefix: str, synthetic: Synthetic) -> None:
    """Keys as `mirror/metadata/redis.py` lays them out, in pipelines."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        pipe = client.pipeline(transaction=False)
        for n, (digest, record, repository) in enumerate(records(synthetic), 1):
            pipe.set(f"{prefix}blob:{digest}", record.to_json())
            pipe.zadd(f"{prefix}blob-access", {digest: record.last_access})
            pipe.sadd(f"{prefix}blobrepos:{digest}", f"{UPSTREAM}/{repository}")
            if n % CHUNK == 0:
                pipe.execute()
        for j in range(synthetic.tags):
            repository, tag, tag_record = synthetic.tag(j)
            pipe.set(f"{prefix}tag:{UPSTREAM}/{repository}:{tag}", tag_record.to_json())
            pipe.sadd(f"{prefix}tags:{UPSTREAM}/{repository}", tag)
            if j % CHUNK == 0:
                pipe.execute()
        for i in range(synthetic.repositories):
            pipe.sadd(f"{prefix}repositories", f"{UPSTREAM}/{synthetic.repository(i)}")
        pipe.execute()
    finally:
        client.close()


def open_store(backend: str, root: Path, redis_url: str | None, prefix: str) -> MetadataStore:
    if backend == "redis":
        from mirror.metadata.redis import RedisMetadataStore

        assert redis_url is not None
        return RedisMetadataStore(redis_url, prefix)
    from mirror.metadata.embedded import EmbeddedMetadataStore

    return EmbeddedMetadataStore(root / "meta")


async def build_indexes(store: MetadataStore) -> None:
    """A store that keeps indexes beside its records builds them now, as the mirror
    would have while the records were written (older versions have none)."""
    rebuild = getattr(store, "rebuild_indexes", None)
    if rebuild is not None:
        await rebuild()


# Measuring


def http_status(url: str, headers: dict[str, str] | None = None) -> int | None:
    try:
        return http_request("GET", url, headers=headers, timeout=2).status
    except OSError:
        return None


def mirror_config(
    work: Path, root: Path, backend: str, redis_url: str | None, prefix: str
) -> tuple[Path, int]:
    port = free_port()
    config: dict[str, Any] = {
        "listen": f"{LOOPBACK}:{port}",
        "default_upstream": UPSTREAM,
        "storage": {"root": str(root)},
        "log": {"level": "info", "format": "json"},
        # A closed loopback port: every answer has to come from the cache.
        "upstreams": {UPSTREAM: {"url": f"http://{LOOPBACK}:9", "tag_ttl": "30d"}},
    }
    if backend == "redis":
        config["metadata"] = {"backend": "redis", "redis_url": redis_url, "key_prefix": prefix}
    path = work / f"config-{backend}-{root.name}.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path, port


def wrk(url: str, paths: list[str], headers: dict[str, str]) -> tuple[float, float, int]:
    """p50 and p99 in ms and the request count, 4 connections rotating over `paths`."""
    script = Path(os.environ.get("TMPDIR", "/tmp")) / f"scale-wrk-{os.getpid()}.lua"
    header_lines = "".join(f'wrk.headers["{k}"] = "{v}"\n' for k, v in headers.items())
    script.write_text(
        header_lines
        + "paths = {"
        + ",".join(f'"{p}"' for p in paths)
        + "}\n"
        + "n = 0\nrequest = function()\n  n = n + 1\n"
        + "  return wrk.format(nil, paths[(n % #paths) + 1])\nend\n"
    )
    try:
        out = subprocess.run(
            ["wrk", "-t1", "-c4", f"-d{WRK_SECONDS}s", "--latency", "-s", str(script), url],
            capture_output=True,
            text=True,
            timeout=WRK_SECONDS + 30,
            check=True,
        ).stdout
    finally:
        script.unlink(missing_ok=True)
    found = re.findall(r"^\s*(50|99)(?:\.0+)?%\s+(\S+)", out, re.M)
    percentiles = {m[0]: _ms(m[1]) for m in found}
    if "50" not in percentiles or "99" not in percentiles:
        raise RuntimeError(f"wrk printed no latency distribution:\n{out}")
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        raise RuntimeError(f"wrk saw {errors.group(1)} error responses at {url}{paths[0]}")
    return percentiles["50"], percentiles["99"], requests


def _ms(text: str) -> float:
    value = float(re.sub(r"[a-z]+$", "", text))
    unit = re.search(r"[a-z]+$", text).group(0)  # type: ignore[union-attr]
    return value * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@dataclass
class Running:
    """A `mirror serve` on one store, and the figures measured on it so far."""

    name: str
    synthetic: Synthetic
    process: subprocess.Popen[bytes]
    base: str
    config: Path
    env: dict[str, str]
    figures: dict[str, float | None] = field(default_factory=dict)
    samples: dict[str, list[float]] = field(default_factory=dict)


def start(
    work: Path,
    name: str,
    root: Path,
    backend: str,
    synthetic: Synthetic,
    redis_url: str | None,
    prefix: str,
) -> Running:
    """Spawn the mirror on a store; time it to ready, then to the end of its reconcile."""
    config, port = mirror_config(work, root, backend, redis_url, prefix)
    log_path = work / f"mirror-{backend}-{root.name}.log"
    log = log_path.open("wb")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIRROR_")}
    started = time.time()
    process = subprocess.Popen(
        [sys.executable, "-m", "mirror", "serve", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
    )
    log.close()
    running = Running(name, synthetic, process, f"http://{LOOPBACK}:{port}", config, env)
    ready = v2 = None
    while ready is None or v2 is None:
        if process.poll() is not None:
            raise RuntimeError(f"mirror exited with {process.returncode}: see {log_path}")
        if time.time() - started > START_TIMEOUT:
            raise RuntimeError(f"{backend} {root.name}: not ready in {START_TIMEOUT:.0f}s")
        if ready is None and http_status(running.base + "/readyz") == 200:
            ready = time.time() - started
        if v2 is None and http_status(running.base + "/v2/") == 200:
            v2 = time.time() - started
        time.sleep(0.01)
    running.figures["start: /readyz 200 (s)"] = ready
    running.figures["start: /v2/ 200 (s)"] = v2
    # Hits are measured after the reconcile, so that it does not compete with them.
    while (done := reconciled_at(log_path)) is None:
        if time.time() - started > RECONCILE_TIMEOUT or process.poll() is not None:
            raise RuntimeError(f"{backend} {root.name}: no reconcile end; see {log_path}")
        time.sleep(0.2)
    running.figures["reconcile done (s)"] = done - started
    return running


def hot_paths(running: Running) -> tuple[list[str], list[str]]:
    """HOT blobs (not manifests) and HOT tags, each tag naming its own manifest in its own
    repository on both stores: the same work per hit and per access flush, so that only
    the store's size differs."""
    synthetic = running.synthetic
    first = synthetic.tags // 10  # manifests come first
    step = max((synthetic.blobs - first) // HOT, 1)
    blob_paths = [
        f"/v2/{synthetic.repository(i)}/blobs/{digest_of(synthetic.blob(i))}"
        for i in range(first, synthetic.blobs, step)[:HOT]
    ]
    tag_paths = []
    for j in range(0, first, max(first // HOT, 1))[:HOT]:
        repository, tag, _ = synthetic.tag(j)
        tag_paths.append(f"/v2/{repository}/manifests/{tag}")
    # An earlier eviction pass on a reused store may have taken a few: only hits count.
    blob_paths = [p for p in blob_paths if http_status(running.base + p) == 200]
    tag_paths = [
        p for p in tag_paths if http_status(running.base + p, {"Accept": OCI_MANIFEST}) == 200
    ]
    if len(blob_paths) < HOT // 2 or len(tag_paths) < HOT // 2:
        raise RuntimeError(f"too few hits: {len(blob_paths)} blobs, {len(tag_paths)} tags")
    return blob_paths, tag_paths


def hit_rounds(servers: list[Running], rounds: int) -> None:
    """Blob and tag hit latency, in rounds that take turns between the servers (a machine
    that slows down for a while slows both), each figure the median of its rounds."""
    paths = {running.name: hot_paths(running) for running in servers}
    for round_number in range(rounds):
        # Each goes first in every other round: what follows a run pays for its wake.
        for running in servers if round_number % 2 == 0 else reversed(servers):
            blob_paths, tag_paths = paths[running.name]
            for kind, hot, headers in (
                ("blob", blob_paths, {}),
                ("tag", tag_paths, {"Accept": OCI_MANIFEST}),
            ):
                p50, p99, count = wrk(running.base, hot, headers)
                for figure, value in (
                    (f"{kind} hit p50 (ms)", p50),
                    (f"{kind} hit p99 (ms)", p99),
                    (f"{kind} hits/s", count / WRK_SECONDS),
                ):
                    running.samples.setdefault(figure, []).append(value)
    for running in servers:
        for figure, values in running.samples.items():
            running.figures[figure] = statistics.median(values)


def finish(running: Running) -> None:
    """`mirror stats` against the running server's store, its peak RSS, then stop it."""
    try:
        before = time.time()
        stats = subprocess.run(
            [sys.executable, "-m", "mirror", "stats", "--config", str(running.config), "--json"],
            capture_output=True,
            text=True,
            timeout=1800,
            env=running.env,
        )
        if stats.returncode == 0:
            running.figures["mirror stats (s)"] = time.time() - before
            reported = json.loads(stats.stdout)
            if reported["blobs"] != running.synthetic.blobs:
                print(f"  note: stats says {reported['blobs']} blobs, {running.synthetic.blobs}")
        else:
            print(
                f"  mirror stats failed after {time.time() - before:.1f}s: {stats.stderr.strip()}"
            )
        running.figures["peak RSS (MiB)"] = peak_rss_mib(running.process.pid)
    finally:
        stop(running.process)


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


async def evict_once(root: Path, backend: str, redis_url: str | None, prefix: str) -> float:
    """One pass of the real evictor with max_size at usage: it frees about 0.02%."""
    probe = FilesystemBlobStore(root)
    usage = probe.usage
    quota = Quota(max_size=usage, high_watermark=0.9999, low_watermark=0.9998)
    store = FilesystemBlobStore(root, quota)
    metadata = open_store(backend, root, redis_url, prefix)
    try:
        evictor = Evictor(store, metadata, set)
        started = time.perf_counter()
        freed = await evictor.evict()
        elapsed = time.perf_counter() - started
        print(f"  eviction: {evictor.evicted_blobs} blobs, {freed} bytes in {elapsed:.3f}s")
        return elapsed
    finally:
        await metadata.close()


def prepare(
    work: Path, name: str, backend: str, synthetic: Synthetic, redis_url: str | None, prefix: str
) -> Path:
    root = work / name
    began = time.time()
    write_files(root, synthetic)
    files = time.time() - began
    if backend == "redis":
        assert redis_url is not None
        fill_redis(redis_url, prefix, synthetic)
    else:
        fill_embedded(root / "meta", synthetic)

    written = time.time()

    async def indexes() -> tuple[float, float]:
        # What an upgrade from a version without the indexes costs: opening the store
        # (start-up, blocking), then the rebuild (background, at start).
        opening = time.perf_counter()
        store = open_store(backend, root, redis_url, prefix)
        opened = time.perf_counter()
        try:
            await build_indexes(store)
        finally:
            await store.close()
        return opened - opening, time.perf_counter() - opened

    opening, rebuild = asyncio.run(indexes())
    print(
        f"  {backend} {name}: {synthetic.blobs} blobs, {synthetic.tags} tags "
        f"(files {files:.0f}s, records {written - began - files:.0f}s; as an older version "
        f"left them: open {opening:.2f}s, index rebuild {rebuild:.1f}s)"
    )
    return root


def main() -> int:
    prepare_process()
    configure_logging("warning", "console")  # the in-process eviction pass: quiet
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blobs", type=int, default=1_000_000)
    parser.add_argument("--tags", type=int, default=50_000)
    parser.add_argument("--repositories", type=int, default=3_000)
    parser.add_argument("--baseline", type=int, default=1_000, help="blobs in the small store")
    parser.add_argument("--backend", choices=("embedded", "redis", "both"), default="both")
    parser.add_argument("--tmpdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--rounds", type=int, default=3, help="wrk rounds per figure (median)")
    parser.add_argument(
        "--reuse",
        type=Path,
        default=None,
        help="a work dir kept by an earlier run (--keep): measure its embedded stores again,"
        " without writing them (to compare two versions on the same data; a store whose"
        " directory was removed is written again)",
    )
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is not installed (scripts/bootstrap test installs it)", file=sys.stderr)
        return 1
    backends = ["embedded", "redis"] if args.backend == "both" else [args.backend]
    ratio = args.baseline / args.blobs
    scales = {
        "baseline": Synthetic(
            args.baseline,
            # Enough for the hot set of the big one: HOT manifests in HOT repositories.
            max(int(args.tags * ratio), 10 * HOT),
            max(int(args.repositories * ratio), HOT),
        ),
        "big": Synthetic(args.blobs, args.tags, args.repositories),
    }

    def body(work: Path, cleanup: list[Any]) -> int:
        redis_url = None
        if "redis" in backends:
            server = RedisServer(work / "redis")
            server.start()
            cleanup.append(server.kill)
            redis_url = server.url
        for backend in backends:
            if backend == "redis":
                import redis

                redis.Redis.from_url(redis_url).flushdb()  # both stores are written next
            roots = {
                name: work / name
                if args.reuse is not None and backend == "embedded" and (work / name).exists()
                else prepare(work, name, backend, synthetic, redis_url, f"scale-{name}:")
                for name, synthetic in scales.items()
            }
            # Both servers run at once, so that their hit rounds can take turns.
            servers: list[Running] = []
            try:
                for name, synthetic in scales.items():
                    prefix = f"scale-{name}:"
                    servers.append(
                        start(work, name, roots[name], backend, synthetic, redis_url, prefix)
                    )
                hit_rounds(servers, args.rounds)
                for running in servers:
                    finish(running)
            finally:
                for running in servers:
                    stop(running.process)
            results: dict[str, dict[str, float | None]] = {}
            for running in servers:
                evicted = asyncio.run(
                    evict_once(roots[running.name], backend, redis_url, f"scale-{running.name}:")
                )
                results[running.name] = {**running.figures, "eviction pass (s)": evicted}
            if backend == "redis":
                import redis

                redis.Redis.from_url(redis_url).flushdb(asynchronous=True)  # no wait
            print()
            baseline = scales["baseline"].blobs
            print(f"{backend}: {baseline} blobs vs {args.blobs} blobs, {args.tags} tags")
            rows = []
            figures = list(dict.fromkeys([*results["baseline"], *results["big"]]))
            for figure in figures:
                small, big = results["baseline"].get(figure), results["big"].get(figure)
                rows.append(
                    [
                        figure,
                        _fmt(small),
                        _fmt(big),
                        "-" if not small or big is None else f"{big / small:.2f}x",
                    ]
                )
            print_table(["figure", "baseline", "big", "ratio"], rows)
            print()
        return 0

    if args.reuse is not None:
        cleanup: list[Any] = []
        try:
            return body(args.reuse, cleanup)
        finally:
            for step in reversed(cleanup):
                step()
    return run_in_workdir(
        "scale-bench-",
        parent=args.tmpdir,
        keep=args.keep,
        failures=(RuntimeError, OSError, subprocess.SubprocessError),
        body=body,
    )


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if value < 100 else f"{value:.0f}"


if __name__ == "__main__":
    sys.exit(main())
