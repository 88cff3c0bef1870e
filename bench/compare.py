"""Side-by-side benchmark: nginx, the CNCF distribution registry in proxy mode, and the
mirror, all in front of the same upstream, on loopback. Every speed claim in the README
comes from it (issue 16).

Servers:

* **upstream**: a fresh distribution registry, seeded here with a raw blob of
  ``--blob-mb`` MiB, a 5 x ``--layer-mb`` MiB image (cold pulls) and a small image
  (manifest requests);
* **nginx** (Debian package): one process (``master_process off``), ``sendfile on;
  tcp_nopush on;``, serving the mirror's own committed blob files from its storage root
  as static files: the physical limit for a warm blob on this machine;
* **distribution**: ``docker-registry`` with ``proxy: remoteurl:`` the upstream;
* **mirror**: ``mirror serve --workers 1``.

Figures (warm: each server has fetched, committed and served the content once before):

* ``streams``: aggregate GB/s of 1 and of ``--streams`` concurrent readers of the whole
  blob, and the server's CPU seconds per GB served by the concurrent readers;
* ``manifests``: ``wrk -t1 -c16 -d<--seconds>`` on a manifest by tag and by digest, and the
  server's CPU seconds per 1000 requests (nginx: the manifest's blob file, by digest only,
  as a static-file ceiling for wrk);
* ``cold``: ``skopeo copy docker://... dir:...`` of the 5-layer image through a fresh
  mirror and a fresh distribution proxy, as a multiple of a direct pull from the upstream
  just before (after an untimed first one, so every pull reads a warm page cache);
* ``rss``: the server's peak RSS (VmHWM, reset before) during ``--rss-streams`` concurrent
  warm readers of the whole blob.

The blob readers are threads of this process, one raw socket each, that discard the body
with ``recv(MSG_TRUNC)``: the kernel drops the bytes without copying them to user space,
the cheapest reader there is, so on 2 cores the servers get the CPU. Each reader checks the
status, reads exactly ``Content-Length`` bytes and then the end of the connection; one whole
warm read per server is hashed beforehand (sha256 against the pushed digest). Server CPU
comes from ``/proc/<pid>/stat`` (utime + stime, summed over the process and its children).
On loopback the mirror sends a file in 64 KiB chunks, not with sendfile (its
``mirror/api/transport.py`` keeps sendfile for remote peers), so the blob rows measure its
chunk path against nginx's sendfile.

``--repeat N`` runs the streams, manifests and cold sections in N rounds, each server once
a round, and the table gives medians; every round is printed above it.

It prints figures and never asserts timings; it exits 1 when a transfer or a content check
fails, or a tool is missing. Every process it starts is stopped on every exit path, and
the temp dir removed unless ``--keep``. From the repository root::

    .venv/bin/python bench/compare.py [--seconds 10] [--blob-mb 1024] [--streams 8]
        [--rss-streams 32] [--layer-mb 40] [--repeat 1] [--only streams,manifests,cold,rss]
        [--json FILE] [--keep] [--tmpdir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from harness import (  # noqa: E402
    Cleanup,
    add_blob_options,
    prepare_process,
    print_table,
    run_in_workdir,
)
from pull import (  # noqa: E402
    CLK_TCK,
    MIB,
    REPO,
    SEED,
    TAG,
    BenchError,
    bench_mirror,
    peak_rss_mib,
    pull_once,
    verify_tree,
)
from support.images import Image, oci_image, push, push_blob, sha256_digest  # noqa: E402
from support.mirror_process import MirrorProcess, MirrorProcessError  # noqa: E402
from support.net import LOOPBACK, Service, free_port, http_request, wait_until  # noqa: E402
from support.registry import Registry, RegistryError, find_registry_binary  # noqa: E402
from support.skopeo import SkopeoError, skopeo_binary  # noqa: E402

# The cold image sits where pull.py's pull_once looks for it.
COLD_REPO, COLD_TAG = REPO, TAG
SECTIONS = ("streams", "manifests", "cold", "rss")
SERVERS = ("nginx", "distribution", "mirror")
BLOB_REPO = "bench/compare-blob"
SMALL_REPO, SMALL_TAG = "bench/compare-small", "v1"
LAYERS = 5
GB = 1_000_000_000
WRK_CONNECTIONS = 16
WRK_TIMEOUT = 30
TRANSFER_TIMEOUT = 900.0
# distribution's proxy stores a blob in the background, after (or while) it streams it.
COMMIT_TIMEOUT = 300.0
READ_CHUNK = 4 * MIB


# -- processes -----------------------------------------------------------------------------


def process_tree(pid: int | None) -> list[int]:
    """`pid` and its live descendants (Linux: /proc/<pid>/task/<tid>/children)."""
    if pid is None:
        return []
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        for children in Path(f"/proc/{current}/task").glob("*/children"):
            try:
                queue.extend(int(child) for child in children.read_text().split())
            except OSError:
                continue  # a thread or process that just ended
    return found


def tree_cpu(pid: int | None) -> tuple[float, float]:
    """(user, system) CPU seconds of the tree's live processes, all their threads."""
    user = system = 0.0
    for p in process_tree(pid):
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        # The command name (field 2) may contain spaces; fields after it are plain.
        fields = stat.rsplit(")", 1)[1].split()
        user += int(fields[11]) / CLK_TCK
        system += int(fields[12]) / CLK_TCK
    return user, system


def tree_cpu_seconds(pid: int | None) -> float:
    return sum(tree_cpu(pid))


def machine_busy_seconds() -> float:
    """CPU seconds every core of the machine has spent busy since boot (/proc/stat: all
    but idle and iowait), the whole machine's demand during a timed step."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def tree_peak_rss_mib(pid: int | None) -> float | None:
    """The sum of the peaks (VmHWM) of the tree's processes: one process for every server
    here; for a tree, an upper bound of the peak of the whole."""
    peaks = [peak_rss_mib(p) for p in process_tree(pid)]
    known = [p for p in peaks if p is not None]
    return sum(known) if known else None


def reset_peak_rss(pid: int | None) -> None:
    """Start VmHWM afresh (Linux: writing 5 to clear_refs resets the peak RSS)."""
    for p in process_tree(pid):
        Path(f"/proc/{p}/clear_refs").write_text("5")


def own_cpu_seconds() -> float:
    """CPU of this process: the blob readers are its threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def children_cpu_seconds() -> float:
    """CPU of waited-for children: wrk, skopeo."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def find_tool(name: str, *extra_dirs: str) -> str | None:
    # nginx lives in /usr/sbin, which a non-root PATH often lacks.
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(extra_dirs))


class QuietRegistry(Registry):
    """A distribution registry that writes no line per request, as nginx (access_log off)
    and the mirror (log level warning) here do not: the logging cost is not compared."""

    def config(self) -> dict[str, Any]:
        cfg = super().config()
        cfg["log"] = {"level": "warn", "accesslog": {"disabled": True}}
        return cfg


class Nginx(Service):
    """nginx on 127.0.0.1:<port> serving `root` as static files under /blobs/.

    One process (`master_process off`): the work of the server, its CPU and its RSS are
    that of one pid, as for `mirror serve --workers 1`. Everything it writes (pid, error
    log, temp dirs) stays under `workdir`.
    """

    def __init__(self, workdir: Path, root: Path, binary: str) -> None:
        self.workdir = workdir
        self.root = root
        self.binary = binary
        self.port = free_port()
        self.config_path = workdir / "nginx.conf"
        self.log_path = workdir / "error.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def config(self) -> str:
        w = self.workdir
        # Run as root, an nginx with a master process hands the work to `nobody`, who
        # cannot enter the private temp dir; `user root` keeps it (one process does not
        # switch, and the line is harmless). Not root: nothing to switch, no line.
        user = "user root;\n" if os.geteuid() == 0 else ""
        temp_paths = "".join(
            f"    {kind}_temp_path {w / kind};\n"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        return (
            f"{user}daemon off;\nmaster_process off;\nworker_processes 1;\n"
            f"pid {w / 'nginx.pid'};\nerror_log {self.log_path} warn;\n"
            "events { worker_connections 1024; }\n"
            "http {\n    access_log off;\n    sendfile on;\n    tcp_nopush on;\n"
            "    default_type application/octet-stream;\n"
            f"{temp_paths}"
            f"    server {{\n        listen {self.host};\n"
            f"        location /blobs/ {{ root {self.root}; }}\n    }}\n}}\n"
        )

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config())
        self._log = (self.workdir / "nginx.out").open("ab")
        self._process = subprocess.Popen(
            # -e: the error log before the config is read (not /var/log/nginx).
            [
                *(self.binary, "-p", str(self.workdir)),
                *("-e", str(self.log_path), "-c", str(self.config_path)),
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_until(self._ready, timeout=15, interval=0.05, message="nginx not ready")
        except (TimeoutError, BenchError) as exc:
            self.stop()
            raise BenchError(f"{exc}\n--- nginx log ---\n{self.log_tail()}") from exc

    def _ready(self) -> bool:
        assert self._process is not None
        if self._process.poll() is not None:
            raise BenchError(f"nginx exited with status {self._process.returncode}")
        try:
            return http_request("GET", f"{self.url}/blobs/", timeout=2).status in (403, 404)
        except OSError:
            return False

    def stop(self) -> None:
        proc, self._process = self._process, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self) -> str:
        texts = []
        for path in (self.log_path, self.workdir / "nginx.out"):
            if path.is_file():
                texts.append(path.read_text(errors="replace"))
        return "\n".join("\n".join(texts).splitlines()[-20:])


# -- blob readers --------------------------------------------------------------------------


def read_blob(host: str, port: int, path: str, *, hashed: bool = False) -> tuple[int, str | None]:
    """GET `path` on a fresh connection; (body bytes, "sha256:..." if `hashed`).

    The body is discarded by the kernel (MSG_TRUNC) unless it is hashed. Raises BenchError
    unless the answer is a 200 with a Content-Length and exactly that many body bytes.
    """
    what = f"{host}:{port}{path}"
    with socket.create_connection((host, port), timeout=TRANSFER_TIMEOUT) as sock:
        request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            "User-Agent: bench-compare\r\nConnection: close\r\n\r\n"
        )
        sock.sendall(request.encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(65536)
            if not chunk:
                raise BenchError(f"{what}: connection closed before the headers ended")
            head += chunk
        header_block, _, body_start = head.partition(b"\r\n\r\n")
        lines = header_block.decode("latin-1").split("\r\n")
        if lines[0].split(" ")[1:2] != ["200"]:
            raise BenchError(f"{what}: {lines[0]!r}")
        headers = {
            name.strip().lower(): value.strip()
            for name, _, value in (line.partition(":") for line in lines[1:])
        }
        if "content-length" not in headers or "transfer-encoding" in headers:
            raise BenchError(f"{what}: no Content-Length ({headers})")
        length = int(headers["content-length"])
        digest = hashlib.sha256(body_start) if hashed else None
        received = len(body_start)
        buffer = bytearray(READ_CHUNK)
        view = memoryview(buffer)
        while received < length:
            wanted = min(READ_CHUNK, length - received)
            if digest is not None:
                n = sock.recv_into(buffer, wanted)
                digest.update(view[:n])
            else:
                n = sock.recv_into(buffer, wanted, socket.MSG_TRUNC)
            if n == 0:
                break
            received += n
        if received != length or sock.recv(1):
            raise BenchError(f"{what}: {received} body bytes, Content-Length {length}")
    return received, None if digest is None else "sha256:" + digest.hexdigest()


def read_streams(host: str, port: int, path: str, count: int, expected: int) -> float:
    """`count` readers of `path` started together; wall seconds until all are done."""
    pool = ThreadPoolExecutor(max_workers=count, thread_name_prefix="reader")
    try:
        started = time.perf_counter()
        futures = [pool.submit(read_blob, host, port, path) for _ in range(count)]
        sizes = [f.result()[0] for f in futures]
        seconds = time.perf_counter() - started
    finally:
        # After a failure or Ctrl-C, stopping the servers ends the other readers: the
        # clean-up must not wait for whole blobs first.
        pool.shutdown(wait=False, cancel_futures=True)
    if any(size != expected for size in sizes):
        raise BenchError(f"{host}:{port}{path}: read {sizes}, expected {expected} each")
    return seconds


# -- servers under test --------------------------------------------------------------------


@dataclass
class Target:
    """One server under test: where its warm blob and its manifests are."""

    name: str
    service: Service
    blob_path: str | None = None  # URL path of the warm blob
    manifest_paths: dict[str, str] | None = None  # "tag"/"digest" -> URL path

    @property
    def pid(self) -> int | None:
        return self.service.pid


Figures = dict[str, dict[str, float]]  # server -> figure key -> value


def record(figures: Figures, server: str, key: str, value: float) -> None:
    figures.setdefault(server, {})[key] = value


def distribution_blob_file(registry: Registry, digest: str) -> Path:
    hex_digest = digest.removeprefix("sha256:")
    return (
        registry.storage_dir / f"docker/registry/v2/blobs/sha256/{hex_digest[:2]}/{hex_digest}/data"
    )


def mirror_blob_file(mirror: MirrorProcess, digest: str) -> Path:
    hex_digest = digest.removeprefix("sha256:")
    return mirror.storage / "blobs" / "sha256" / hex_digest[:2] / hex_digest


def static_path(digest: str) -> str:
    """The URL path of a mirror's blob file on nginx (whose root is the storage root)."""
    hex_digest = digest.removeprefix("sha256:")
    return f"/blobs/sha256/{hex_digest[:2]}/{hex_digest}"


def wait_for_file(path: Path, size: int, who: str) -> None:
    def complete() -> bool:
        try:
            return path.stat().st_size == size
        except OSError:
            return False

    wait_until(
        complete,
        timeout=COMMIT_TIMEOUT,
        interval=0.1,
        message=f"{who}: {path} not complete after {COMMIT_TIMEOUT} s",
    )


def check_blob(target: Target, digest: str, size: int, label: str) -> None:
    assert target.blob_path is not None
    started = time.perf_counter()
    got, hashed = read_blob(LOOPBACK, target.service.port, target.blob_path, hashed=True)
    if got != size or hashed != digest:
        raise BenchError(f"{target.name}: {label} read gave {got} bytes hashing to {hashed}")
    print(f"  {target.name}: {label} read hashed, {time.perf_counter() - started:.1f} s")


def check_manifests(target: Target, image: Image) -> None:
    assert target.manifest_paths is not None
    for kind, path in target.manifest_paths.items():
        resp = http_request(
            "GET", f"{target.service.url}{path}", headers={"Accept": image.media_type}
        )
        if resp.status != 200 or resp.body != image.manifest:
            raise BenchError(f"{target.name}: manifest by {kind}: {resp.status}, wrong body")


def error_lines(log: str) -> int:
    """Error-level events and lines that are not JSON events (a traceback) in a mirror log."""
    count = 0
    for line in log.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            count += 1
            continue
        if not isinstance(event, dict) or event.get("level") in ("error", "critical"):
            count += 1
    return count


# -- measuring -----------------------------------------------------------------------------


def rounds_text(values: list[float], digits: int) -> str:
    return ", ".join(f"{v:,.{digits}f}" for v in values)


def measure_streams(
    targets: list[Target],
    size: int,
    streams: int,
    repeat: int,
    figures: Figures,
    notes: list[str],
) -> None:
    """Rounds of (each server: 1 reader, then `streams` readers), so that a change in the
    machine's load falls on every server alike; the figures are medians over rounds."""
    rates: dict[tuple[str, int], list[float]] = {}
    cpu: dict[str, list[float]] = {}  # user, system, readers, GB over the `streams` runs
    for round_number in range(1, repeat + 1):
        for target in targets:
            assert target.blob_path is not None
            for count in (1, streams):
                os.sync()
                (user0, system0), reader0 = tree_cpu(target.pid), own_cpu_seconds()
                seconds = read_streams(LOOPBACK, target.service.port, target.blob_path, count, size)
                (user1, system1), reader1 = tree_cpu(target.pid), own_cpu_seconds()
                gigabytes = count * size / GB
                rates.setdefault((target.name, count), []).append(gigabytes / seconds)
                if count == streams:
                    sums = cpu.setdefault(target.name, [0.0, 0.0, 0.0, 0.0])
                    for i, value in enumerate(
                        (user1 - user0, system1 - system0, reader1 - reader0, gigabytes)
                    ):
                        sums[i] += value
                print(
                    f"  round {round_number}, {target.name}: {count} stream(s) "
                    f"{gigabytes / seconds:.2f} GB/s"
                )
    for (name, count), values in rates.items():
        record(figures, name, f"streams_{count}_gbps", statistics.median(values))
    for name, (user, system, reader, gigabytes) in cpu.items():
        record(figures, name, "cpu_s_per_gb", (user + system) / gigabytes)
        notes.append(
            f"{name}: GB/s by round, 1 stream {rounds_text(rates[name, 1], 2)}; "
            f"{streams} streams {rounds_text(rates[name, streams], 2)}; over the {streams}-stream "
            f"runs, server CPU {user / gigabytes:.3f} user + {system / gigabytes:.3f} "
            f"system s/GB, readers {reader / gigabytes:.3f} s/GB"
        )


def measure_rss(
    targets: list[Target], size: int, streams: int, figures: Figures, notes: list[str]
) -> None:
    for target in targets:
        assert target.blob_path is not None
        os.sync()
        reset_peak_rss(target.pid)
        before = tree_peak_rss_mib(target.pid)
        seconds = read_streams(LOOPBACK, target.service.port, target.blob_path, streams, size)
        peak = tree_peak_rss_mib(target.pid)
        if peak is not None:
            record(figures, target.name, "rss_peak_mib", peak)
        notes.append(
            f"{target.name}: {streams} streams in {seconds:.1f} s; RSS {fmt(before, 0)} MiB "
            f"before, peak {fmt(peak, 0)} MiB"
        )
        print(f"  {target.name}: {streams} streams in {seconds:.1f} s, peak RSS {fmt(peak, 0)} MiB")


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    rate: float
    latency: str


_WRK_TOTAL = re.compile(r"(\d+) requests in ([\d.]+)(us|ms|s|m)\b")
_WRK_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def parse_wrk(output: str) -> WrkResult:
    """wrk's summary; BenchError if it saw non-2xx answers or socket errors."""
    total = _WRK_TOTAL.search(output)
    rate = re.search(r"Requests/sec:\s+([\d.]+)", output)
    latency = re.search(r"Latency\s+(\S+)", output)
    failed = re.search(r"Non-2xx or 3xx responses:\s+(\d+)|Socket errors:.*", output)
    if total is None or rate is None or failed is not None:
        raise BenchError(f"wrk failed or saw errors:\n{output}")
    seconds = float(total.group(2)) * _WRK_UNITS[total.group(3)]
    return WrkResult(
        int(total.group(1)), seconds, float(rate.group(1)), latency.group(1) if latency else "?"
    )


def run_wrk(url: str, seconds: int, accept: str) -> WrkResult:
    argv = [
        *("wrk", "-t1", f"-c{WRK_CONNECTIONS}", f"-d{seconds}s"),
        # wrk gives up on an answer after 2 s by default and counts it as a socket error;
        # on a loaded machine a slow answer is a figure, not a failure.
        *("--timeout", f"{WRK_TIMEOUT}s", "-H", f"Accept: {accept}", url),
    ]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 2 * WRK_TIMEOUT)
    if out.returncode != 0:
        raise BenchError(f"wrk exit {out.returncode}: {out.stderr.strip()}")
    return parse_wrk(out.stdout)


def measure_manifests(
    targets: list[Target],
    image: Image,
    seconds: int,
    repeat: int,
    upstream: Registry,
    figures: Figures,
    notes: list[str],
) -> None:
    """Rounds of (each server, each kind of reference) under wrk; medians over rounds."""
    rates: dict[tuple[str, str], list[float]] = {}
    # server CPU, wrk CPU, requests, upstream requests, summed over rounds
    sums: dict[tuple[str, str], list[float]] = {}
    latencies: dict[tuple[str, str], list[str]] = {}
    for round_number in range(1, repeat + 1):
        for target in targets:
            assert target.manifest_paths is not None
            for kind, path in target.manifest_paths.items():
                cpu0, wrk_cpu0 = tree_cpu_seconds(target.pid), children_cpu_seconds()
                mark = upstream.mark()
                result = run_wrk(f"{target.service.url}{path}", seconds, image.media_type)
                cpu = tree_cpu_seconds(target.pid) - cpu0
                wrk_cpu = children_cpu_seconds() - wrk_cpu0
                # What the server asked the upstream meanwhile (distribution's proxy asks
                # on every request by tag; a line is logged once its answer is sent).
                upstream_requests = len(upstream.access_log(mark))
                key = (target.name, kind)
                rates.setdefault(key, []).append(result.rate)
                latencies.setdefault(key, []).append(result.latency)
                total = sums.setdefault(key, [0.0, 0.0, 0.0, 0.0])
                for i, value in enumerate((cpu, wrk_cpu, result.requests, upstream_requests)):
                    total[i] += value
                print(
                    f"  round {round_number}, {target.name}: manifest by {kind} "
                    f"{result.rate:,.0f} req/s"
                )
    for (name, kind), values in rates.items():
        server_cpu, wrk_total, requests, upstream_total = sums[name, kind]
        record(figures, name, f"manifest_{kind}_rps", statistics.median(values))
        record(figures, name, f"cpu_s_per_1000_{kind}", server_cpu / requests * 1000)
        notes.append(
            f"{name}: manifest by {kind}: req/s by round {rounds_text(values, 0)}; "
            f"latency {', '.join(latencies[name, kind])}; {requests:.0f} requests, server "
            f"CPU {server_cpu:.2f} s, wrk CPU {wrk_total:.2f} s, "
            f"{upstream_total:.0f} upstream requests"
        )


def measure_cold(
    args: argparse.Namespace,
    work: Path,
    cleanup: Cleanup,
    upstream: Registry,
    image: Image,
    figures: Figures,
    notes: list[str],
) -> None:
    """An untimed direct pull (the page cache), then rounds of: a direct pull (the
    baseline), a pull through a fresh mirror, one through a fresh distribution proxy.
    Each ratio is to the direct pull of its round; the figures are medians."""
    out = work / "pulls"
    seconds: dict[str, list[float]] = {}
    ratios: dict[str, list[float]] = {}
    cpu: dict[str, float] = {}
    machine: dict[str, list[float]] = {}  # machine-wide busy CPU s of each pull
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="verify") as pool:
        cores = os.cpu_count() or 1

        def timed(host: str, name: str) -> float:
            os.sync()
            tree = out / name
            busy = machine_busy_seconds()
            took = pull_once(host, tree)
            busy = machine_busy_seconds() - busy
            verify_tree(tree, image, pool)
            shutil.rmtree(tree)
            # How much of the machine the pull kept busy: a pull that fills every core
            # is bound by the CPU all its processes need together, not by any wait.
            print(
                f"  {name}: {took:.2f} s; machine CPU {busy:.2f} s "
                f"({busy / (took * cores):.0%} of {cores} cores)"
            )
            machine.setdefault(name.rsplit("-", 1)[0], []).append(busy)
            return took

        timed(upstream.host, "direct-0")
        for round_number in range(1, args.repeat + 1):
            baseline = timed(upstream.host, f"direct-{round_number}")
            seconds.setdefault("direct", []).append(baseline)
            for name in ("mirror", "distribution"):
                workdir = work / f"{name}-cold-{round_number}"
                server: MirrorProcess | QuietRegistry
                if name == "mirror":
                    server = bench_mirror(workdir, upstream.url)
                    server.extra_args = ("--workers", "1")
                else:
                    server = QuietRegistry(workdir, proxy_remote=upstream.url)
                cleanup.append(server.stop)
                server.start()
                cpu0 = tree_cpu_seconds(server.pid)
                took = timed(server.host, f"{name}-cold-{round_number}")
                cpu[name] = cpu.get(name, 0.0) + tree_cpu_seconds(server.pid) - cpu0
                server.stop()
                seconds.setdefault(name, []).append(took)
                ratios.setdefault(name, []).append(took / baseline)
    record(figures, "direct", "cold_pull_s", statistics.median(seconds["direct"]))
    notes.append(
        f"direct pulls (the baselines), s: {rounds_text(seconds['direct'], 2)}; machine CPU "
        f"{statistics.median(machine['direct'][1:]):.2f} s a pull"
    )
    for name, values in ratios.items():
        record(figures, name, "cold_pull_s", statistics.median(seconds[name]))
        record(figures, name, "cold_vs_direct", statistics.median(values))
        notes.append(
            f"{name}: cold pulls, s: {rounds_text(seconds[name], 2)}; x direct: "
            f"{rounds_text(values, 2)}; server CPU {cpu[name] / len(values):.2f} s a pull, "
            f"machine CPU {statistics.median(machine[name + '-cold']):.2f} s a pull"
        )


# -- reporting -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Goal:
    text: str
    met: Callable[[dict[str, float]], bool | None]  # from the mirror's figures and ratios


def at_least(value: float, *, key: str = "mirror") -> Callable[[dict[str, float]], bool | None]:
    def met(v: dict[str, float]) -> bool | None:
        return None if key not in v else v[key] >= value

    return met


def at_most(value: float) -> Callable[[dict[str, float]], bool | None]:
    def met(v: dict[str, float]) -> bool | None:
        return None if "mirror" not in v else v["mirror"] <= value

    return met


@dataclass(frozen=True)
class Row:
    key: str
    label: str  # formatted with the run's settings
    section: str
    goal: Goal | None = None
    digits: int = 2


ROWS = (
    Row(
        "streams_{streams}_gbps",
        "warm {blob} blob, {streams} streams, aggregate GB/s",
        "streams",
        Goal(">= 0.95x nginx", at_least(0.95, key="mirror/nginx")),
    ),
    Row("streams_1_gbps", "warm {blob} blob, 1 stream, GB/s", "streams"),
    Row("cpu_s_per_gb", "server CPU s per GB served ({streams} streams)", "streams", digits=3),
    Row(
        "manifest_tag_rps",
        "manifest GET by tag, req/s (wrk -t1 -c16)",
        "manifests",
        Goal(">= 4000", at_least(4000)),
        digits=0,
    ),
    Row(
        "manifest_digest_rps",
        "manifest GET by digest, req/s (wrk -t1 -c16)",
        "manifests",
        Goal(">= 4000", at_least(4000)),
        digits=0,
    ),
    Row("cpu_s_per_1000_tag", "server CPU s per 1000 manifest GETs by tag", "manifests", digits=3),
    Row(
        "cpu_s_per_1000_digest",
        "server CPU s per 1000 manifest GETs by digest",
        "manifests",
        digits=3,
    ),
    Row("cold_pull_s", "cold pull {layers} x {layer_mb} MiB, s", "cold"),
    Row(
        "cold_vs_direct",
        "cold pull / direct pull (x)",
        "cold",
        Goal("<= 1.10x", at_most(1.10)),
    ),
    Row(
        "rss_peak_mib",
        "peak RSS, {rss_streams} warm {blob} streams, MiB",
        "rss",
        Goal("<= 120 MiB", at_most(120)),
        digits=0,
    ),
)


def settings(args: argparse.Namespace) -> dict[str, Any]:
    blob = f"{args.blob_mb / 1024:g} GiB" if args.blob_mb >= 1024 else f"{args.blob_mb} MiB"
    return {
        "blob": blob,
        "blob_mb": args.blob_mb,
        "streams": args.streams,
        "rss_streams": args.rss_streams,
        "layers": LAYERS,
        "layer_mb": f"{args.layer_mb:g}",
        "seconds": args.seconds,
        "repeat": args.repeat,
        "sections": list(args.only),
    }


def fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


Table = tuple[list[str], list[list[str]], dict[str, Any]]


def table(figures: Figures, config: dict[str, Any]) -> Table:
    """(headers, rows, per-row summary for --json) of the rows whose section ran."""
    headers = [
        "figure",
        *SERVERS,
        "mirror/nginx",
        "mirror/distribution",
        "goal",
        "met?",
    ]
    rows: list[list[str]] = []
    summary: dict[str, Any] = {}
    for row in ROWS:
        if row.section not in config["sections"]:
            continue
        key = row.key.format(**config)
        values = {s: figures[s][key] for s in SERVERS if key in figures.get(s, {})}
        ratios = {
            f"mirror/{other}": values["mirror"] / values[other]
            for other in ("nginx", "distribution")
            if "mirror" in values and values.get(other)
        }
        met = row.goal.met({**values, **ratios}) if row.goal else None
        rows.append(
            [
                row.label.format(**config),
                *(fmt(values.get(s), row.digits) for s in SERVERS),
                *(
                    fmt(ratios.get(f"mirror/{o}"), 2) + "x" * (f"mirror/{o}" in ratios)
                    for o in ("nginx", "distribution")
                ),
                row.goal.text if row.goal else "-",
                "-" if met is None else ("yes" if met else "NO"),
            ]
        )
        summary[key] = {"label": rows[-1][0], **values, **ratios, "met": met}
    return headers, rows, summary


def report(
    figures: Figures, config: dict[str, Any], notes: list[str], json_path: Path | None
) -> None:
    headers, rows, summary = table(figures, config)
    print()
    for note in notes:
        print(note)
    print()
    print_table(headers, rows)
    if json_path is not None:
        json_path.write_text(
            json.dumps({"settings": config, "figures": figures, "rows": summary}, indent=2) + "\n"
        )
        print(f"figures written to {json_path}")


# -- main ----------------------------------------------------------------------------------


def sections_arg(text: str) -> tuple[str, ...]:
    chosen = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"sections are {', '.join(SECTIONS)}; got {text!r}")
    return chosen


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--seconds", type=int, default=10, help="wrk run length (default 10)")
    add_blob_options(parser)
    parser.add_argument(
        "--rss-streams", type=int, default=32, help="concurrent readers for peak RSS (default 32)"
    )
    parser.add_argument(
        "--only",
        type=sections_arg,
        default=SECTIONS,
        metavar="SECTION[,SECTION]",
        help=f"run a subset of: {', '.join(SECTIONS)} (default all)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="rounds of the streams, manifests and cold sections, servers interleaved "
        "in each; the table gives medians (default 1)",
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (and print it)")
    parser.add_argument("--tmpdir", type=Path, help="parent of the temp dir (default: $TMPDIR)")
    args = parser.parse_args(argv)
    if args.blob_mb < 1 or args.layer_mb <= 0 or args.streams < 1 or args.rss_streams < 1:
        parser.error("--blob-mb and --layer-mb must be > 0, --streams and --rss-streams >= 1")
    if args.seconds < 1 or args.repeat < 1:
        parser.error("--seconds and --repeat must be >= 1")
    return args


def missing_tools(sections: Iterable[str]) -> list[str]:
    """What the chosen sections need and this machine lacks, with the package to install."""
    wanted = set(sections)
    missing = []
    try:
        find_registry_binary()
    except FileNotFoundError:
        missing.append("docker-registry (Debian package docker-registry)")
    if (
        wanted & {"streams", "rss", "manifests"}
        and find_tool("nginx", "/usr/sbin", "/sbin") is None
    ):
        missing.append("nginx (Debian package nginx)")
    if "manifests" in wanted and shutil.which("wrk") is None:
        missing.append("wrk (Debian package wrk)")
    if "cold" in wanted:
        try:
            skopeo_binary()
        except (FileNotFoundError, SkopeoError):
            missing.append("skopeo (Debian package skopeo)")
    return missing


def run(args: argparse.Namespace, work: Path, cleanup: Cleanup) -> int:
    sections = set(args.only)
    figures: Figures = {}
    notes: list[str] = []
    upstream = Registry(work / "upstream")
    cleanup.append(upstream.stop)
    upstream.start()
    print(f"upstream: {upstream.url}")

    blob_digest, size = "", args.blob_mb * MIB
    if sections & {"streams", "rss"}:
        started = time.perf_counter()
        rng = random.Random(SEED)
        # randbytes makes at most 256 MiB at a time (an int of n * 8 bits).
        blob = b"".join(rng.randbytes(MIB) for _ in range(args.blob_mb))
        blob_digest = sha256_digest(blob)
        push_blob(upstream.url, BLOB_REPO, blob_digest, blob, None)
        del blob  # memory the measurements should not share the machine with
        print(f"blob: {size:,} bytes, pushed in {time.perf_counter() - started:.1f} s")
    small = oci_image([2048, 4096], seed=SEED + 1)
    if "manifests" in sections:
        push(upstream.url, SMALL_REPO, small, SMALL_TAG)

    if "cold" in sections:
        # First, while no warm server holds page cache or CPU.
        image = oci_image([int(args.layer_mb * MIB)] * LAYERS, seed=SEED)
        push(upstream.url, COLD_REPO, image, COLD_TAG)
        print(f"cold pulls of {COLD_REPO}:{COLD_TAG} ({LAYERS} x {args.layer_mb:g} MiB)")
        measure_cold(args, work, cleanup, upstream, image, figures, notes)

    if not sections & {"streams", "rss", "manifests"}:
        report(figures, settings(args), notes, args.json)
        return 0

    mirror = bench_mirror(work / "mirror", upstream.url)
    mirror.extra_args = ("--workers", "1")
    proxy = QuietRegistry(work / "distribution", proxy_remote=upstream.url)
    nginx_binary = find_tool("nginx", "/usr/sbin", "/sbin")
    assert nginx_binary is not None
    # It serves the mirror's committed files, as they appear.
    nginx = Nginx(work / "nginx", mirror.storage, nginx_binary)
    for server in (mirror, proxy, nginx):
        cleanup.append(server.stop)
        server.start()
    print(f"mirror pid {mirror.pid}, distribution pid {proxy.pid}, nginx pid {nginx.pid}")
    proxies = [
        Target(
            name,
            server,
            f"/v2/{BLOB_REPO}/blobs/{blob_digest}",
            {
                "tag": f"/v2/{SMALL_REPO}/manifests/{SMALL_TAG}",
                "digest": f"/v2/{SMALL_REPO}/manifests/{small.digest}",
            },
        )
        for name, server in (("distribution", proxy), ("mirror", mirror))
    ]

    if sections & {"streams", "rss"}:
        print("warming: a cold read through each proxy, then a warm one, each hashed")
        for target in proxies:
            check_blob(target, blob_digest, size, "cold")
        wait_for_file(mirror_blob_file(mirror, blob_digest), size, "mirror")
        wait_for_file(distribution_blob_file(proxy, blob_digest), size, "distribution")
        targets = [Target("nginx", nginx, blob_path=static_path(blob_digest)), *proxies]
        for target in targets:
            check_blob(target, blob_digest, size, "warm")
        if "streams" in sections:
            print(f"streams: 1 and {args.streams} readers of the whole blob")
            measure_streams(targets, size, args.streams, args.repeat, figures, notes)
        if "rss" in sections:
            print(f"rss: {args.rss_streams} readers of the whole blob")
            measure_rss(targets, size, args.rss_streams, figures, notes)

    if "manifests" in sections:
        for target in proxies:
            check_manifests(target, small)
        # nginx: the same bytes as a static file, what wrk and one process reach here.
        wait_for_file(mirror_blob_file(mirror, small.digest), small.size, "mirror")
        targets = [
            Target("nginx", nginx, manifest_paths={"digest": static_path(small.digest)}),
            *proxies,
        ]
        check_manifests(targets[0], small)
        print(f"manifests: wrk -t1 -c{WRK_CONNECTIONS} -d{args.seconds}s")
        measure_manifests(targets, small, args.seconds, args.repeat, upstream, figures, notes)

    status = mirror.stop()
    notes.append(
        f"mirror: exit status {status} after SIGTERM, "
        f"{error_lines(mirror.log_text())} error lines logged"
    )
    report(figures, settings(args), notes, args.json)
    return 0


def execute(args: argparse.Namespace) -> int:
    """Check the tools, run the chosen sections in a fresh work dir; the exit status."""
    missing = missing_tools(args.only)
    if missing:
        print(
            "bench/compare.py needs: "
            + "; ".join(missing)
            + ". Install them with ./scripts/bootstrap test (or apt-get install).",
            file=sys.stderr,
        )
        return 1
    return run_in_workdir(
        "bench-compare-",
        parent=args.tmpdir,
        keep=args.keep,
        failures=(
            BenchError,
            MirrorProcessError,
            RegistryError,
            SkopeoError,
            TimeoutError,
            OSError,
            subprocess.SubprocessError,
        ),
        body=lambda work, cleanup: run(args, work, cleanup),
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    prepare_process()
    return execute(args)


if __name__ == "__main__":
    sys.exit(main())
