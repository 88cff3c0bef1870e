"""Pull benchmark: skopeo pulling one large image directly, and cold, warm and N-way cold
through the mirror, against a real distribution registry on loopback.

What it measures, per phase:

* wall-clock seconds for ``skopeo copy docker://... dir:<fresh dir>`` (and that time as a
  multiple of a direct pull from the registry with a warm page cache);
* what the upstream registry sent for blob GETs during the phase, from its access log
  (bytes and request count), and those bytes divided by the image's total blob bytes: the
  "upstream bytes per pull" ratio, ~1.0 for a cold pull, 0.0 for a warm one, and ~1.0 for
  the N concurrent cold pulls as a whole when the mirror fetches each blob once;
* CPU seconds used meanwhile by the mirror, the registry and the skopeo clients;
* the mirror's peak RSS (VmHWM) at the end.

Phases: ``direct 1`` and ``direct 2`` from the registry (the second is the baseline, so both
sides read from a warm page cache), ``mirror cold`` (fresh mirror, empty storage), ``mirror
warm`` (same mirror again) and ``N-way cold`` (N pulls started together through another
fresh mirror). Every pulled tree is checked: each blob file hashes to its digest and
``manifest.json`` is byte-identical to the pushed manifest.

It prints figures and never asserts timings; it exits non-zero only when a pull fails or
pulled content is wrong. Everything runs on 127.0.0.1. Run it from the repository root::

    .venv/bin/python bench/pull.py [--size-mb 200] [--concurrency 8] [--keep]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import resource
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from harness import prepare_process, print_table, run_in_workdir  # noqa: E402
from support.images import Image, oci_image, push  # noqa: E402
from support.mirror_process import MirrorProcess, MirrorProcessError  # noqa: E402
from support.registry import AccessEntry, Registry  # noqa: E402
from support.skopeo import SkopeoError, skopeo_copy, skopeo_copy_async  # noqa: E402

MIRROR_BINARY = ROOT / ".venv" / "bin" / "mirror"
REPO = "bench/pull"
TAG = "latest"
MIB = 1024 * 1024
# Shares of the total image size for the five layers (80, 50, 40, 20, 10 of 200).
LAYER_SHARES = (80, 50, 40, 20, 10)
SEED = 4242
PULL_TIMEOUT = 300.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


def bench_mirror(workdir: Path, upstream_url: str) -> MirrorProcess:
    return MirrorProcess(
        workdir, {"local": {"url": upstream_url, "tag_ttl": "1h"}}, log_level="warning"
    )


class BenchError(RuntimeError):
    """A pull failed or produced wrong content."""


# -- processes -----------------------------------------------------------------------------


def cpu_seconds(pid: int | None) -> float:
    """utime + stime of a live process (all its threads), 0.0 if it is gone."""
    if pid is None:
        return 0.0
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    # The command name (field 2) may contain spaces; fields after it are plain.
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def children_cpu_seconds() -> float:
    """CPU of waited-for children (the skopeo processes; not the running servers)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def peak_rss_mib(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


# -- measuring -----------------------------------------------------------------------------


@dataclass
class Phase:
    name: str
    pulls: int
    seconds: float = 0.0
    per_pull: list[float] = field(default_factory=list)
    blob_gets: list[AccessEntry] = field(default_factory=list)
    other_requests: list[AccessEntry] = field(default_factory=list)
    mirror_cpu: float | None = None
    registry_cpu: float = 0.0
    client_cpu: float = 0.0
    counted: bool = True  # False for direct pulls: the registry is the source, not upstream

    @property
    def blob_bytes(self) -> int:
        return sum(e.bytes_sent for e in self.blob_gets)


def settle_access_log(
    registry: Registry, since: int, expected_blob_gets: int, timeout: float = 10
) -> tuple[list[AccessEntry], list[AccessEntry]]:
    """(blob GETs, other requests) logged since ``since``, once the log has caught up.

    distribution writes an access line after the handler returns, which for a streamed
    blob can be after the client has read the last byte. Wait (bounded) for the expected
    number of blob GETs, then until the log stops growing for a moment.
    """
    if expected_blob_gets > 0:
        # Fewer than expected by the deadline: report what is there.
        with contextlib.suppress(TimeoutError):
            registry.wait_for_access("GET", "/blobs/", expected_blob_gets, since, timeout)
    deadline = time.monotonic() + timeout
    size = registry.mark()
    quiet_since = time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - quiet_since < 0.5:
        time.sleep(0.1)
        now = registry.mark()
        if now != size:
            size, quiet_since = now, time.monotonic()
    entries = registry.access_log(since)
    blob_gets = [e for e in entries if e.method == "GET" and "/blobs/" in e.path]
    others = [e for e in entries if not (e.method == "GET" and "/blobs/" in e.path)]
    return blob_gets, others


@contextlib.contextmanager
def measured(
    phase: Phase, registry: Registry, mirror: MirrorProcess | None, expected_blob_gets: int
) -> Iterator[None]:
    """Record CPU use and upstream requests around the body of a phase."""
    # Start every phase with no dirty page cache left by the previous ones: background
    # writeback of earlier pulls would otherwise slow later phases (the order would matter).
    os.sync()
    mark = registry.mark()
    mirror_cpu0 = cpu_seconds(mirror.pid) if mirror is not None else 0.0
    registry_cpu0 = cpu_seconds(registry.pid)
    client_cpu0 = children_cpu_seconds()
    yield
    phase.client_cpu = children_cpu_seconds() - client_cpu0
    phase.blob_gets, phase.other_requests = settle_access_log(registry, mark, expected_blob_gets)
    phase.registry_cpu = cpu_seconds(registry.pid) - registry_cpu0
    if mirror is not None:
        phase.mirror_cpu = cpu_seconds(mirror.pid) - mirror_cpu0


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(4 * MIB):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def verify_tree(directory: Path, image: Image, pool: ThreadPoolExecutor) -> None:
    """Each blob file hashes to its digest; manifest.json is the pushed manifest."""
    manifest = directory / "manifest.json"
    if not manifest.is_file() or manifest.read_bytes() != image.manifest:
        raise BenchError(f"{manifest}: not the pushed manifest bytes")
    expected = {digest: directory / digest.removeprefix("sha256:") for digest in image.blobs}
    missing = [str(p) for p in expected.values() if not p.is_file()]
    if missing:
        raise BenchError(f"{directory}: missing blob files {missing}")
    actual = dict(zip(expected, pool.map(file_sha256, expected.values()), strict=True))
    wrong = [d for d, got in actual.items() if got != d]
    if wrong:
        raise BenchError(f"{directory}: blob files not matching their digests: {wrong}")


def pull_once(host: str, dest: Path) -> float:
    started = time.perf_counter()
    skopeo_copy(f"docker://{host}/{REPO}:{TAG}", f"dir:{dest}", timeout=PULL_TIMEOUT)
    return time.perf_counter() - started


async def pull_many(host: str, dests: list[Path]) -> tuple[float, list[float | BaseException]]:
    """Start one pull per destination at once; (wall seconds, per-pull seconds or error)."""
    started = time.perf_counter()

    async def one(dest: Path) -> float:
        await skopeo_copy_async(
            f"docker://{host}/{REPO}:{TAG}", f"dir:{dest}", timeout=PULL_TIMEOUT
        )
        return time.perf_counter() - started

    results = await asyncio.gather(*(one(d) for d in dests), return_exceptions=True)
    return time.perf_counter() - started, list(results)


def concurrent_phase(
    name: str,
    host: str,
    dests_dir: Path,
    n: int,
    registry: Registry,
    mirror: MirrorProcess | None,
    expected_blob_gets: int,
) -> tuple[Phase, list[BaseException]]:
    """N pulls from ``host`` started together into ``dests_dir/0..n-1``."""
    phase = Phase(name, pulls=n)
    dests = [dests_dir / str(i) for i in range(n)]
    with measured(phase, registry, mirror, expected_blob_gets):
        phase.seconds, results = asyncio.run(pull_many(host, dests))
    phase.per_pull = [r for r in results if isinstance(r, float)]
    return phase, [r for r in results if isinstance(r, BaseException)]


# -- reporting -----------------------------------------------------------------------------


def fmt_mib(n: float) -> str:
    return f"{n / MIB:,.1f} MiB"


def report(phases: list[Phase], image_bytes: int, baseline: float) -> None:
    rows = []
    for p in phases:
        blob_bytes = p.blob_bytes
        rows.append(
            [
                p.name,
                f"{p.seconds:.2f}",
                f"{p.seconds / baseline:.2f}x" if baseline > 0 else "-",
                f"{p.pulls * image_bytes / MIB / p.seconds:,.0f}" if p.seconds > 0 else "-",
                f"{blob_bytes:,}",
                f"{blob_bytes / image_bytes:.3f}" if p.counted else "(direct)",
                str(len(p.blob_gets)),
                str(len(p.other_requests)),
            ]
        )
    print_table(
        [
            "phase",
            "seconds",
            "vs direct",
            "MiB/s",
            "upstream blob bytes",
            "upstream/image",
            "blob GETs",
            "other reqs",
        ],
        rows,
    )
    print()
    print("CPU seconds used during each phase (2 cores => at most 2 x wall seconds):")
    cpu_rows = [
        [
            p.name,
            f"{p.seconds:.2f}",
            "-" if p.mirror_cpu is None else f"{p.mirror_cpu:.2f}",
            f"{p.registry_cpu:.2f}",
            f"{p.client_cpu:.2f}",
        ]
        for p in phases
    ]
    print_table(["phase", "wall", "mirror", "registry", "skopeo"], cpu_rows)


# -- main ----------------------------------------------------------------------------------


def layer_sizes(total_mib: float) -> list[int]:
    scale = total_mib / sum(LAYER_SHARES)
    return [max(int(share * scale * MIB), 1024) for share in LAYER_SHARES]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--size-mb", type=float, default=200, help="total image size in MiB (default 200)"
    )
    parser.add_argument(
        "--concurrency", type=int, default=8, help="concurrent cold pulls (default 8)"
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
    out = work / "out"

    def check(*trees: Path) -> None:
        """Verify pulled trees, then delete them (unless --keep) so their dirty pages are
        dropped rather than written back during later phases."""
        for tree in trees:
            verify_tree(tree, image, pool)
            if not args.keep:
                shutil.rmtree(tree)

    started = time.perf_counter()
    image = oci_image(layer_sizes(args.size_mb), seed=SEED)
    image_bytes = sum(len(b) for b in image.blobs.values())
    build_seconds = time.perf_counter() - started
    print(
        f"image: {len(image.layer_digests)} layers + config, {image_bytes:,} blob bytes "
        f"({fmt_mib(image_bytes)}), built in {build_seconds:.1f} s"
    )

    registry = Registry(work / "registry")
    cleanup.append(registry.stop)
    registry.start()
    started = time.perf_counter()
    push(registry.url, REPO, image, TAG)
    print(
        f"registry: {registry.url} (pid {registry.pid}), pushed in "
        f"{time.perf_counter() - started:.1f} s"
    )
    blob_count = len(image.blobs)
    phases: list[Phase] = []

    # a. direct, twice: the second is the baseline (registry files in the page cache).
    for i in (1, 2):
        phase = Phase(f"direct {i}", pulls=1, counted=False)
        with measured(phase, registry, None, blob_count):
            phase.seconds = pull_once(registry.host, out / f"direct-{i}")
        check(out / f"direct-{i}")
        phases.append(phase)
    baseline = phases[-1].seconds

    # Reference for d: the same N concurrent pulls straight from the registry.
    n = args.concurrency
    if n > 1:
        phase, failures = concurrent_phase(
            f"{n}-way direct",
            registry.host,
            out / "direct-concurrent",
            n,
            registry,
            None,
            n * blob_count,
        )
        phase.counted = False
        phases.append(phase)
        if failures:
            raise BenchError(f"{len(failures)} of {n} direct concurrent pulls failed")
        check(*sorted((out / "direct-concurrent").iterdir()))

    # b, c. cold then warm through one fresh mirror.
    mirror_a = bench_mirror(work / "mirror-a", registry.url)
    cleanup.append(mirror_a.stop)
    mirror_a.start()
    print(f"mirror A: {mirror_a.host} (pid {mirror_a.pid})")
    for name, subdir, expected in (
        ("mirror cold", "cold", blob_count),
        ("mirror warm", "warm", 0),
    ):
        phase = Phase(name, pulls=1)
        with measured(phase, registry, mirror_a, expected):
            phase.seconds = pull_once(mirror_a.host, out / subdir)
        check(out / subdir)
        phases.append(phase)

    # d. N concurrent cold pulls through another fresh mirror.
    mirror_b = bench_mirror(work / "mirror-b", registry.url)
    cleanup.append(mirror_b.stop)
    mirror_b.start()
    print(f"mirror B: {mirror_b.host} (pid {mirror_b.pid})")
    dests_dir = out / "mirror-concurrent"
    phase, failures = concurrent_phase(
        f"{n}-way cold", mirror_b.host, dests_dir, n, registry, mirror_b, blob_count
    )
    phases.append(phase)

    # Peak RSS before stopping (the /proc entry goes with the process).
    rss = {name: peak_rss_mib(m.pid) for name, m in (("A", mirror_a), ("B", mirror_b))}
    leftovers = {name: m.temp_files() for name, m in (("A", mirror_a), ("B", mirror_b))}
    statuses = {name: m.stop() for name, m in (("A", mirror_a), ("B", mirror_b))}

    print()
    report(phases, image_bytes, baseline)
    print()
    print(f"image blob bytes: {image_bytes:,}; baseline: 'direct 2' ({baseline:.2f} s)")
    for p in phases:
        if p.pulls > 1 and p.per_pull:
            times = sorted(p.per_pull)
            print(
                f"{p.name}: {len(times)}/{p.pulls} succeeded; each finished after "
                f"min {times[0]:.2f} / median {statistics.median(times):.2f} / "
                f"max {times[-1]:.2f} s"
            )
    for p in phases:
        if p.counted and p.other_requests:
            kinds: dict[str, int] = {}
            for e in p.other_requests:
                key = f"{e.method} {e.route.rsplit('/', 2)[-2]} {e.status}"
                kinds[key] = kinds.get(key, 0) + 1
            summary = ", ".join(f"{k} x{v}" for k, v in sorted(kinds.items()))
            print(f"other upstream requests in '{p.name}': {summary}")
    for name in ("A", "B"):
        peak = rss[name]
        print(
            f"mirror {name}: peak RSS (VmHWM) "
            f"{'n/a' if peak is None else f'{peak:.1f} MiB'}; "
            f"exit status after SIGTERM {statuses[name]}; "
            f"temp files left {len(leftovers[name])}"
        )

    for failure in failures:
        detail = failure.stderr.strip() if isinstance(failure, SkopeoError) else repr(failure)
        print(f"FAILED concurrent pull: {detail}", file=sys.stderr)
    if failures:
        raise BenchError(f"{len(failures)} of {n} concurrent pulls failed")
    check(*sorted(dests_dir.iterdir()))
    trees = sum(p.pulls for p in phases)
    print(f"content verified: {trees} pulled trees (blob sha256 + manifest bytes)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    prepare_process()
    return run_in_workdir(
        "bench-pull-",
        parent=args.tmpdir,
        keep=args.keep,
        failures=(BenchError, MirrorProcessError),
        body=lambda work, cleanup: run(args, work, cleanup),
    )


if __name__ == "__main__":
    sys.exit(main())
