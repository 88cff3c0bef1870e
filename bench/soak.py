"""Soak and fault run: 64 clients pulling through `mirror serve --workers 2` for a bounded
time while faults are injected on a schedule. A script that prints figures, not a test.

Everything runs on 127.0.0.1 and is started here: a real distribution registry holding
generated images, a fault proxy in front of it (the mirror's only upstream), a real Redis
(the metadata backend) and the mirror with a small ``storage.max_size``. The storage root
sits on its own small tmpfs when the script may mount one (root), so a full disk is a
real ENOSPC.

Content: images of 2 to 4 layers (KiBs to a few MiB, some base layers shared between
repositories) in several repositories; a new image is pushed every second or so (a new
tag, and ``latest`` moved to it), so misses continue all run long. A set of large images
is pushed before the run and pulled only in the ``disk-burst`` phase (three times the
size limit in all).

Clients: each of 64 loops doing what a pull does (manifest by tag, or HEAD by tag then
GET by digest as Docker does; then the config and layers by digest, three at a time),
verifying every body against its digest, until the time is up.

Phases, in turn with calm phases between: ``reset`` (upstream drops the connection
mid-blob), ``wrong-bytes`` (one byte of a body flipped, headers intact), ``5xx`` and
``429`` bursts (with Retry-After), ``stall`` (a blob body stops for 3-15 s), ``redis-down``
(Redis saved and stopped, started again at the end), ``disk-burst`` (the large uncached
images), ``disk-full`` (a filler file leaves 1 MiB free on the storage filesystem) and
``worker-kill`` (SIGKILL to one worker; the supervisor replaces it).

It prints pulls attempted, succeeded and failed (by cause and by phase), wrong bytes
served, blobs under blobs/ that do not hash to their name, 5xx answers that were not the
upstream's own, error-level and traceback lines in the mirror log, temp files left, peak
storage against the limit, and RSS and open file descriptors of the supervisor and its
workers over the run. Exit status 1 when a wrong byte was served or a bad blob committed.

    .venv/bin/python bench/soak.py [--duration 300] [--clients 64] [--max-size-mib 64]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import redis
from aiohttp import web
from multidict import CIMultiDictProxy

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from harness import Cleanup, prepare_process, print_table, run_in_workdir  # noqa: E402
from support.images import (  # noqa: E402
    ALL_MANIFEST_TYPES,
    DOCKER_CONFIG,
    DOCKER_LAYER_GZIP,
    DOCKER_MANIFEST,
    OCI_CONFIG,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    Image,
    make_layer,
    push,
    sha256_digest,
)
from support.mirror_process import MirrorProcess, MirrorProcessError  # noqa: E402
from support.net import LOOPBACK, free_port  # noqa: E402
from support.redis_server import RedisServer  # noqa: E402
from support.registry import Registry  # noqa: E402

KIB = 1024
MIB = 1024 * KIB
FAULTS = (
    "reset",
    "wrong-bytes",
    "5xx",
    "429",
    "stall",
    "redis-down",
    "worker-kill",
    # Last: the current mirror overshoots its limit, and a full disk fails what follows.
    "disk-burst",
    "disk-full",
)
CALM_WEIGHT = 0.6  # a calm phase lasts this fraction of a fault phase
# Not a first path component of any repository: the mirror takes those as upstream prefixes.
UPSTREAM = "upstream.soak.test"
REPOS = 6
SMALL_LAYER_SIZES = (3 * KIB, 40 * KIB, 300 * KIB, 1200 * KIB, 2500 * KIB)
BASE_LAYER_SIZES = (2 * MIB, 900 * KIB, 3 * MIB)
BIG_IMAGES = 16
LAYER_PARALLEL = 3  # Docker and containerd fetch three layers at a time
CORRELATION_WINDOW = 60.0  # an upstream fault this long before a mirror 5xx explains it
HEADER_HOP = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "content-length", "server", "date"}
)


class SoakError(RuntimeError):
    """The soak run could not be set up."""


def now() -> float:
    return time.monotonic()


# -- content ---------------------------------------------------------------------------------


@dataclass
class Catalog:
    """Every image pushed so far, and which digests each tag has pointed at."""

    images: dict[str, Image] = field(default_factory=dict)  # manifest digest -> image
    tag_digests: dict[tuple[str, str], set[str]] = field(default_factory=dict)
    recent: list[tuple[str, str]] = field(default_factory=list)  # (repo, tag), newest last
    all_refs: list[tuple[str, str]] = field(default_factory=list)
    big_refs: list[tuple[str, str]] = field(default_factory=list)
    pushed_bytes: int = 0

    def add(self, repo: str, tags: list[str], image: Image) -> None:
        self.images[image.digest] = image
        for tag in tags:
            self.tag_digests.setdefault((repo, tag), set()).add(image.digest)


class ContentMaker:
    """Deterministic images: shared base layers, own layers, OCI or Docker media types."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.seed = seed
        self.bases = [make_layer(size, seed * 10 + i) for i, size in enumerate(BASE_LAYER_SIZES)]
        self.counter = 0

    def image(self, layer_sizes: list[int], *, base: bool, docker: bool) -> Image:
        self.counter += 1
        seed = self.seed * 100_000 + self.counter * 10
        layers = [self.rng.choice(self.bases)] if base else []
        layers += [make_layer(size, seed + i) for i, size in enumerate(layer_sizes)]
        layer_type = DOCKER_LAYER_GZIP if docker else OCI_LAYER_GZIP
        config = json.dumps(
            {
                "architecture": "amd64",
                "os": "linux",
                "config": {"Labels": {"soak.seed": str(seed)}},
                "rootfs": {
                    "type": "layers",
                    "diff_ids": [sha256_digest(layer) for layer in layers],
                },
            },
            sort_keys=True,
        ).encode()
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": DOCKER_MANIFEST if docker else OCI_MANIFEST,
                "config": {
                    "mediaType": DOCKER_CONFIG if docker else OCI_CONFIG,
                    "digest": sha256_digest(config),
                    "size": len(config),
                },
                "layers": [
                    {"mediaType": layer_type, "digest": sha256_digest(b), "size": len(b)}
                    for b in layers
                ],
            },
            sort_keys=True,
            indent=3,
        ).encode()
        blobs = {sha256_digest(b): b for b in [config, *layers]}
        return Image(
            manifest=manifest,
            media_type=DOCKER_MANIFEST if docker else OCI_MANIFEST,
            digest=sha256_digest(manifest),
            blobs=blobs,
        )

    def small_image(self) -> Image:
        sizes = [self.rng.choice(SMALL_LAYER_SIZES) for _ in range(self.rng.randint(1, 3))]
        return self.image(sizes, base=self.rng.random() < 0.7, docker=self.rng.random() < 0.3)


def push_image(
    registry: Registry, catalog: Catalog, repo: str, tags: list[str], image: Image
) -> None:
    """Push by the first tag, then point the other tags at it (sync: run in a thread).

    The catalog knows the digest before the push: a client may see a moved tag at once.
    """
    catalog.add(repo, tags, image)
    push(registry.url, repo, image, tags[0])
    for tag in tags[1:]:
        push(registry.url, repo, image, tag)
    catalog.pushed_bytes += sum(len(b) for b in image.blobs.values())


# -- the fault proxy -------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """What the fault proxy answered the mirror."""

    start: float
    method: str
    path: str
    status: int  # what the client of the proxy saw; 0 when no status line was sent
    fault: str  # "" when the registry's answer was passed on intact


class FaultProxy:
    """An aiohttp reverse proxy in front of the registry that injects the current fault.

    It runs on its own thread and event loop, so the clients' load on the bench's loop
    does not shape the upstream's timing. `fault` is set from the scheduler's thread.
    """

    def __init__(self, upstream_url: str, seed: int):
        self.upstream_url = upstream_url.rstrip("/")
        self.port = free_port()
        self.fault = ""
        self.stall_max = 15.0
        self.answers: list[Answer] = []
        self._rng = random.Random(seed)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._release = asyncio.Event()

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)

    async def _start(self) -> None:
        self._release = asyncio.Event()
        self._session = aiohttp.ClientSession(
            auto_decompress=False, timeout=aiohttp.ClientTimeout(total=None, sock_read=60)
        )
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, LOOPBACK, self.port).start()

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        with contextlib.suppress(TimeoutError):
            asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(timeout=15)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    async def _stop(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    def _record(self, start: float, request: web.Request, status: int, fault: str) -> None:
        self.answers.append(Answer(start, request.method, request.path, status, fault))

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        try:
            return await self._answer(request)
        except ConnectionError:
            # The mirror hung up (its client went away, or its read timed out): ordinary.
            return web.Response(status=499)
        except aiohttp.ClientError as exc:
            # The registry itself failed: that is the upstream's own 5xx.
            self._record(now(), request, 502, "")
            return _oci_error(502, "UNKNOWN", f"registry: {type(exc).__name__}")

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        start = now()
        fault = self.fault
        is_blob_get = request.method == "GET" and "/blobs/sha256:" in request.path
        is_body_get = request.method == "GET" and (is_blob_get or "/manifests/" in request.path)
        roll = self._rng.random()
        if fault == "5xx" and roll < 0.6 and request.path != "/v2/":
            code = self._rng.choice((500, 502, 503, 504))
            self._record(start, request, code, "5xx")
            return _oci_error(code, "UNKNOWN", "injected upstream failure")
        if fault == "429" and roll < 0.6 and request.path != "/v2/":
            self._record(start, request, 429, "429")
            return _oci_error(429, "TOOMANYREQUESTS", "injected rate limit", {"Retry-After": "1"})
        injected = ""
        if (fault in ("reset", "stall") and is_blob_get and roll < 0.5) or (
            fault == "wrong-bytes" and is_body_get and roll < 0.5
        ):
            injected = fault
        return await self._forward(request, start, injected)

    async def _forward(self, request: web.Request, start: float, fault: str) -> web.StreamResponse:
        assert self._session is not None
        headers = {
            k: v for k, v in request.headers.items() if k.lower() not in ("host", "connection")
        }
        upstream = await self._session.request(
            request.method,
            self.upstream_url + request.path_qs,
            headers=headers,
            allow_redirects=False,
        )
        async with upstream:
            length = upstream.content_length
            body_fault = fault if upstream.status in (200, 206) and length else ""
            response = web.StreamResponse(status=upstream.status)
            for name, value in upstream.headers.items():
                if name.lower() not in HEADER_HOP:
                    response.headers.add(name, value)
            response.content_length = length
            await response.prepare(request)
            self._record(start, request, upstream.status, body_fault)
            if request.method == "HEAD":
                return response
            cut = self._rng.randint(0, max((length or 1) - 1, 0))
            sent = 0
            async for chunk in upstream.content.iter_any():
                data = chunk
                if body_fault == "wrong-bytes" and sent <= cut < sent + len(chunk):
                    flipped = bytearray(chunk)
                    flipped[cut - sent] ^= 0xFF
                    data = bytes(flipped)
                if body_fault in ("reset", "stall") and sent <= cut < sent + len(chunk):
                    await response.write(data[: cut - sent])
                    if body_fault == "reset":
                        assert request.transport is not None
                        request.transport.abort()
                        return response
                    with contextlib.suppress(TimeoutError):
                        pause = self._rng.uniform(3.0, self.stall_max)
                        await asyncio.wait_for(self._release.wait(), pause)
                    data = data[cut - sent :]
                    body_fault = ""
                sent += len(chunk)
                await response.write(data)
            await response.write_eof()
            return response


def _oci_error(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    return web.json_response(
        {"errors": [{"code": code, "message": message}]}, status=status, headers=headers
    )


# -- processes ---------------------------------------------------------------------------------


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def proc_status(pid: int, key: str) -> int:
    """A kB figure from /proc/<pid>/status (0 if the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return 0
    return 0


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def fd_kinds(pids: list[int], storage_root: Path) -> Counter[str]:
    """What the open descriptors of `pids` point at: sockets, tmp/, blobs/, other."""
    kinds: Counter[str] = Counter()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith("socket:"):
                        kinds["sockets"] += 1
                    elif target.startswith(str(storage_root / "tmp")):
                        kinds["tmp/ files"] += 1
                    elif target.startswith(str(storage_root / "blobs")):
                        kinds["blobs/ files"] += 1
                    else:
                        kinds["other"] += 1
    return kinds


def temp_bytes(storage_root: Path) -> int:
    total = 0
    with contextlib.suppress(OSError):
        for entry in os.scandir(storage_root / "tmp"):
            with contextlib.suppress(OSError):
                total += entry.stat(follow_symlinks=False).st_size
    return total


@dataclass(frozen=True)
class ProcSample:
    label: str
    workers: int
    rss_mib: float  # supervisor + workers
    fds: int
    per_worker: tuple[tuple[int, float, int], ...]  # (pid, RSS MiB, fds)


def sample_processes(supervisor: int, label: str) -> ProcSample:
    workers = children(supervisor)
    per = tuple((p, proc_status(p, "VmRSS") / KIB, open_fds(p)) for p in workers)
    rss = proc_status(supervisor, "VmRSS") / KIB + sum(r for _, r, _ in per)
    fds = open_fds(supervisor) + sum(f for _, _, f in per)
    return ProcSample(label, len(workers), rss, fds, per)


def storage_usage(root: Path) -> tuple[int, int]:
    """(bytes under blobs/, bytes under tmp/), by apparent size."""
    totals = []
    for sub in ("blobs", "tmp"):
        total = 0
        for dirpath, _, files in os.walk(root / sub):
            for name in files:
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(dirpath, name)).st_size
        totals.append(total)
    return totals[0], totals[1]


@contextlib.contextmanager
def small_filesystem(path: Path, size: int, wanted: bool) -> Iterator[bool]:
    """Mount a tmpfs of `size` bytes at `path` when allowed; yield whether it is one."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = False
    if wanted and os.geteuid() == 0:
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
            capture_output=True,
            text=True,
            check=False,
        )
        mounted = result.returncode == 0
        if not mounted:
            print(f"tmpfs not mounted ({result.stderr.strip()}); storage on the work disk")
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], check=False)


# -- clients -----------------------------------------------------------------------------------


@dataclass
class PullRecord:
    start: float
    end: float
    phase: str  # the phase the pull started in
    ok: bool
    cause: str = ""
    fail_phase: str = ""
    kind: str = ""  # warm (all HIT), cold (all MISS), mixed; from X-Cache
    big: bool = False


@dataclass(frozen=True)
class Mirror5xx:
    start: float
    end: float
    method: str
    path: str
    status: int
    code: str
    phase: str
    message: str = ""


@dataclass(frozen=True)
class WrongBytes:
    path: str
    expected: str
    got: str
    length: int
    content_length: int | None
    phase: str


class PullFailed(Exception):
    def __init__(self, cause: str, at: float):
        super().__init__(cause)
        self.cause = cause
        self.at = at


@dataclass
class Run:
    """Shared state of one soak run."""

    mirror_url: str
    catalog: Catalog
    phases: list[tuple[str, float, float]]  # (name, start, end), planned
    deadline: float
    max_pulls: int
    rng: random.Random
    prefer_big: bool = False
    pulls: list[PullRecord] = field(default_factory=list)
    mirror_5xx: list[Mirror5xx] = field(default_factory=list)
    wrong: list[WrongBytes] = field(default_factory=list)
    started_pulls: int = 0
    timeouts: list[tuple[str, float, str]] = field(default_factory=list)  # (phase, s, request)
    events: list[str] = field(default_factory=list)

    def phase_at(self, t: float) -> str:
        for name, start, end in self.phases:
            if start <= t < end:
                return name
        return self.phases[-1][0] if t >= self.phases[-1][2] else self.phases[0][0]

    def note(self, text: str) -> None:
        line = f"[{now() - self.phases[0][1]:6.1f}s] {text}"
        self.events.append(line)
        print(line)


def _error_code(body: bytes) -> str:
    try:
        doc = json.loads(body)
        return str(doc["errors"][0]["code"])
    except (ValueError, KeyError, IndexError, TypeError):
        return "non-OCI body"


def _error_message(body: bytes) -> str:
    try:
        return str(json.loads(body)["errors"][0]["message"])
    except (ValueError, KeyError, IndexError, TypeError):
        return ""


async def request(
    run: Run,
    session: aiohttp.ClientSession,
    method: str,
    path: str,
    *,
    kind: str,
    expect: str | None,
    headers: dict[str, str] | None = None,
) -> tuple[bytes, str, CIMultiDictProxy[str]]:
    """One request to the mirror, verified: (body or b"", body digest, headers).

    A failure raises PullFailed with its cause; a complete 200 body whose digest is not
    the one asked for is recorded as wrong bytes (and fails the pull).
    """
    start = now()
    keep = kind == "manifest"
    try:
        async with session.request(method, run.mirror_url + path, headers=headers) as resp:
            if resp.status >= 400:
                body = await resp.read()
                code = _error_code(body) if method != "HEAD" else "-"
                if resp.status >= 500:
                    run.mirror_5xx.append(
                        Mirror5xx(
                            start,
                            now(),
                            method,
                            path,
                            resp.status,
                            code,
                            run.phase_at(now()),
                            _error_message(body),
                        )
                    )
                raise PullFailed(f"{method} {kind} -> {resp.status} {code}", now())
            if method == "HEAD":
                return b"", resp.headers.get("Docker-Content-Digest", ""), resp.headers
            digest = hashlib.sha256()
            chunks: list[bytes] = []
            length = 0
            async for chunk in resp.content.iter_chunked(256 * KIB):
                digest.update(chunk)
                length += len(chunk)
                if keep:
                    chunks.append(chunk)
            got = "sha256:" + digest.hexdigest()
            wanted = expect or resp.headers.get("Docker-Content-Digest")
            if wanted is not None and got != wanted:
                run.wrong.append(
                    WrongBytes(path, wanted, got, length, resp.content_length, run.phase_at(start))
                )
                raise PullFailed(f"{method} {kind} -> WRONG BYTES", now())
            return b"".join(chunks), got, resp.headers
    except aiohttp.ClientPayloadError:
        raise PullFailed(f"{method} {kind} body cut off", now()) from None
    except aiohttp.ServerDisconnectedError:
        raise PullFailed(f"{method} {kind} server disconnected", now()) from None
    except aiohttp.ClientConnectionError as exc:
        if isinstance(exc, TimeoutError):
            run.timeouts.append((run.phase_at(start), now() - start, f"{method} {path}"))
        raise PullFailed(f"{method} {kind} {type(exc).__name__}", now()) from None
    except TimeoutError:
        raise PullFailed(f"{method} {kind} timeout", now()) from None


def choose_ref(run: Run) -> tuple[str, str, bool]:
    cat = run.catalog
    roll = run.rng.random()
    if run.prefer_big and cat.big_refs and roll < 0.7:
        return (*run.rng.choice(cat.big_refs), True)
    if roll < 0.35:
        return f"soak/app{run.rng.randrange(REPOS)}", "latest", False
    if roll < 0.7:
        return (*run.rng.choice(cat.recent[-6:]), False)
    return (*run.rng.choice(cat.all_refs), False)


async def fetch_blobs(
    run: Run, session: aiohttp.ClientSession, repo: str, digests: list[str], cache: list[str]
) -> None:
    """GET each blob by digest, three at a time; the first failure stops the rest."""
    gate = asyncio.Semaphore(LAYER_PARALLEL)

    async def blob(digest: str) -> None:
        async with gate:
            _, _, headers = await request(
                run, session, "GET", f"/v2/{repo}/blobs/{digest}", kind="blob", expect=digest
            )
            cache.append(str(headers.get("X-Cache", "?")))

    tasks = [asyncio.create_task(blob(d)) for d in digests]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]


async def pull(run: Run, session: aiohttp.ClientSession) -> PullRecord:
    repo, tag, big = choose_ref(run)
    start = now()
    record = PullRecord(start, start, run.phase_at(start), ok=False, big=big)
    accept = {"Accept": ", ".join(ALL_MANIFEST_TYPES)}
    cache: list[str] = []
    try:
        async with asyncio.timeout(180):
            if run.rng.random() < 0.3:
                # Docker: HEAD by tag for the digest, then GET by digest.
                _, digest, _ = await request(
                    run,
                    session,
                    "HEAD",
                    f"/v2/{repo}/manifests/{tag}",
                    kind="manifest",
                    expect=None,
                    headers=accept,
                )
                if not digest:
                    raise PullFailed("HEAD manifest without Docker-Content-Digest", now())
                body, got, _ = await request(
                    run,
                    session,
                    "GET",
                    f"/v2/{repo}/manifests/{digest}",
                    kind="manifest",
                    expect=digest,
                    headers=accept,
                )
            else:
                body, got, _ = await request(
                    run,
                    session,
                    "GET",
                    f"/v2/{repo}/manifests/{tag}",
                    kind="manifest",
                    expect=None,
                    headers=accept,
                )
            if got not in run.catalog.tag_digests.get((repo, tag), set()):
                run.wrong.append(
                    WrongBytes(
                        f"{repo}:{tag}",
                        "a digest pushed as that tag",
                        got,
                        len(body),
                        None,
                        run.phase_at(start),
                    )
                )
                raise PullFailed("GET manifest -> WRONG BYTES (not the tag's)", now())
            manifest = json.loads(body)
            digests = [manifest["config"]["digest"]] + [
                layer["digest"] for layer in manifest["layers"]
            ]
            await fetch_blobs(run, session, repo, digests, cache)
        record.ok = True
    except PullFailed as exc:
        record.cause, record.fail_phase = exc.cause, run.phase_at(exc.at)
    except TimeoutError:
        record.cause, record.fail_phase = "whole pull over 180 s", run.phase_at(now())
    record.end = now()
    hits = sum(1 for c in cache if c == "HIT")
    record.kind = "warm" if cache and hits == len(cache) else "cold" if hits == 0 else "mixed"
    return record


async def client(run: Run) -> None:
    connector = aiohttp.TCPConnector(limit=LAYER_PARALLEL + 1)
    timeout = aiohttp.ClientTimeout(total=None, connect=10, sock_read=45)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        while now() < run.deadline and run.started_pulls < run.max_pulls:
            run.started_pulls += 1
            record = await pull(run, session)
            run.pulls.append(record)
            if not record.ok:
                # Clients retry after a pause rather than at once (Docker, containerd).
                await asyncio.sleep(run.rng.uniform(0.2, 1.0))


# -- the schedule ------------------------------------------------------------------------------


def plan_phases(start: float, duration: float) -> list[tuple[str, float, float]]:
    unit = duration / (len(FAULTS) + (len(FAULTS) + 1) * CALM_WEIGHT)
    names = [
        f"calm {i // 2 + 1}" if i % 2 == 0 else FAULTS[i // 2] for i in range(2 * len(FAULTS) + 1)
    ]
    phases = []
    t = start
    for name in names:
        length = unit * (CALM_WEIGHT if name.startswith("calm") else 1.0)
        phases.append((name, t, t + length))
        t += length
    return phases


@dataclass
class Rig:
    """What the schedule acts on."""

    proxy: FaultProxy
    redis_server: RedisServer
    mirror: MirrorProcess
    fs_root: Path
    small_fs: bool
    workers: int


async def fill_disk(rig: Rig, run: Run, until: float) -> None:
    """Keep the storage filesystem at 1 MiB free until `until` (filler files beside the root)."""
    n = 0
    while now() < until:
        stat = os.statvfs(rig.fs_root)
        free = stat.f_bavail * stat.f_frsize
        if free > 2 * MIB:
            filler = rig.fs_root / f"filler-{n}"
            n += 1
            # ENOSPC when the mirror wrote meanwhile: measure again and fill what is left.
            with contextlib.suppress(OSError), filler.open("wb") as fh:
                await asyncio.to_thread(os.posix_fallocate, fh.fileno(), 0, free - MIB)
            if n == 1:
                run.note(f"disk-full: filler of {(free - MIB) / MIB:.1f} MiB, 1 MiB left free")
        await asyncio.sleep(0.5)
    for filler in rig.fs_root.glob("filler-*"):
        filler.unlink()
    run.note(f"disk-full: {n} filler file(s) removed")


async def kill_worker(rig: Rig, run: Run, until: float) -> None:
    assert rig.mirror.pid is not None
    workers = children(rig.mirror.pid)
    if not workers:
        run.note("worker-kill: no worker found")
        return
    os.kill(workers[0], signal.SIGKILL)
    killed_at = now()
    run.note(f"worker-kill: SIGKILL to worker {workers[0]}")
    while now() < until:
        current = children(rig.mirror.pid)
        if len(current) == rig.workers and workers[0] not in current:
            run.note(f"worker-kill: replaced after {now() - killed_at:.1f} s")
            return
        await asyncio.sleep(0.2)
    run.note("worker-kill: not replaced by the end of the phase")


async def redis_down(rig: Rig, run: Run, until: float) -> None:
    def save_and_stop() -> None:
        # A Redis with persistence saves on shutdown; this one has `--save ""`, so ask.
        with redis.Redis.from_url(rig.redis_server.url) as client:
            client.save()
        rig.redis_server.stop()

    await asyncio.to_thread(save_and_stop)
    run.note("redis-down: Redis saved and stopped")
    await asyncio.sleep(max(until - now(), 0))
    await asyncio.to_thread(rig.redis_server.start)
    run.note("redis-down: Redis started again")


async def schedule(rig: Rig, run: Run) -> None:
    for name, _, end in run.phases:
        run.note(f"phase {name}")
        if name in ("reset", "wrong-bytes", "5xx", "429", "stall"):
            rig.proxy.fault = name
            await asyncio.sleep(max(end - now(), 0))
            rig.proxy.fault = ""
        elif name == "redis-down":
            await redis_down(rig, run, end)
        elif name == "disk-burst":
            run.prefer_big = True
            await asyncio.sleep(max(end - now(), 0))
            run.prefer_big = False
        elif name == "disk-full" and rig.small_fs:
            await fill_disk(rig, run, end)
        elif name == "worker-kill":
            await kill_worker(rig, run, end)
        await asyncio.sleep(max(end - now(), 0))


async def push_new_content(
    registry: Registry, run: Run, maker: ContentMaker, interval: float
) -> None:
    n = 0
    while now() < run.deadline:
        n += 1
        repo = f"soak/app{maker.rng.randrange(REPOS)}"
        image = await asyncio.to_thread(maker.small_image)
        await asyncio.to_thread(push_image, registry, run.catalog, repo, [f"n{n}", "latest"], image)
        run.catalog.recent.append((repo, f"n{n}"))
        run.catalog.all_refs.append((repo, f"n{n}"))
        await asyncio.sleep(interval)


@dataclass
class Samples:
    storage: list[tuple[float, int, int]] = field(default_factory=list)  # (t, blobs, tmp)
    procs: list[ProcSample] = field(default_factory=list)
    peak_rss: float = 0.0
    peak_fds: int = 0
    settled_fds: Counter[str] = field(default_factory=Counter)


async def sampler(rig: Rig, run: Run, samples: Samples, storage_root: Path) -> None:
    assert rig.mirror.pid is not None
    while True:
        blobs, tmp = await asyncio.to_thread(storage_usage, storage_root)
        samples.storage.append((now(), blobs, tmp))
        proc = sample_processes(rig.mirror.pid, "")
        samples.peak_rss = max(samples.peak_rss, proc.rss_mib)
        samples.peak_fds = max(samples.peak_fds, proc.fds)
        await asyncio.sleep(1.0)


# -- after the run -----------------------------------------------------------------------------


def rehash_blobs(storage_root: Path) -> tuple[int, int, list[str]]:
    """(files, bytes, names of files under blobs/ that do not hash to their name)."""
    files = total = 0
    bad = []
    for path in sorted((storage_root / "blobs").rglob("*")):
        if not path.is_file():
            continue
        files += 1
        total += path.stat().st_size
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            while chunk := fh.read(4 * MIB):
                digest.update(chunk)
        if digest.hexdigest() != path.name or path.parent.parent.name != "sha256":
            bad.append(str(path.relative_to(storage_root)))
    return files, total, bad


@dataclass
class LogSummary:
    lines: int = 0
    tracebacks: int = 0
    by_level: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)  # "level event" -> count
    samples: dict[str, str] = field(default_factory=dict)


def summarize_log(text: str) -> LogSummary:
    summary = LogSummary()
    for line in text.splitlines():
        summary.lines += 1
        if "Traceback" in line:
            summary.tracebacks += 1
        try:
            entry = json.loads(line)
        except ValueError:
            # Not a structlog line: a worker's raw stderr (e.g. a traceback's own lines).
            if line.startswith(("Traceback", "  File", " ")):
                continue
            entry = {"level": "raw", "event": line[:100]}
        if not isinstance(entry, dict):
            continue
        level = str(entry.get("level", "?"))
        summary.by_level[level] += 1
        if level in ("error", "critical", "raw"):
            key = f"{level} {entry.get('event', '?')}"
            summary.errors[key] += 1
            summary.samples.setdefault(key, line[:300])
    return summary


def correlation_key(path: str) -> str:
    """Blobs by path; manifests by repository (a by-tag request may reach the upstream as a
    HEAD by tag and a GET by digest)."""
    repo, sep, _ = path.partition("/manifests/")
    return repo + sep if sep else path


def classify_5xx(answers: list[Answer], failures: list[Mirror5xx]) -> Counter[str]:
    """Explain each mirror 5xx by what the upstream answered for the same content before."""
    by_key: dict[str, list[Answer]] = defaultdict(list)
    for answer in answers:
        by_key[correlation_key(answer.path)].append(answer)
    result: Counter[str] = Counter()
    for failure in failures:
        near = [
            a
            for a in by_key.get(correlation_key(failure.path), [])
            if failure.start - CORRELATION_WINDOW <= a.start <= failure.end
        ]
        if any(a.status >= 500 for a in near):
            why = "upstream's own 5xx"
        elif any(a.fault or a.status == 429 for a in near):
            faults = sorted({a.fault or str(a.status) for a in near if a.fault or a.status == 429})
            why = "after upstream fault " + "/".join(faults)
        else:
            # Said whole: each of these is a defect to chase.
            why = f"NOT the upstream's ({failure.method} {failure.path}: {failure.message!r})"
        result[f"{failure.status} {failure.code} [{failure.phase}]: {why}"] += 1
    return result


def mib(n: float) -> str:
    return f"{n / MIB:.1f}"


@dataclass
class Outcome:
    """Figures gathered after the clients stopped."""

    unfinished: int
    temp_running: int
    temp_running_bytes: int
    temp_after_stop: int
    blob_files: int
    blob_bytes: int
    bad_blobs: list[str]
    log: LogSummary
    exit_status: int | None


def report(run: Run, rig: Rig, samples: Samples, outcome: Outcome, limit: int) -> None:
    pulls = run.pulls
    ok = [p for p in pulls if p.ok]
    failed = [p for p in pulls if not p.ok]
    kinds = Counter(p.kind for p in ok)
    answers = list(rig.proxy.answers)
    print()
    print("== pulls ==")
    print(
        f"attempted {len(pulls) + outcome.unfinished}, succeeded {len(ok)} "
        f"(warm {kinds['warm']}, cold {kinds['cold']}, mixed {kinds['mixed']}), "
        f"failed {len(failed)}, unfinished when stopped {outcome.unfinished}; "
        f"large-image pulls {sum(p.big for p in pulls)}"
    )
    print(
        f"images pushed {len(run.catalog.images)} "
        f"({run.catalog.pushed_bytes / MIB:.0f} MiB of blobs); "
        f"upstream requests seen by the fault proxy {len(answers)}"
    )
    print()
    rows = []
    for name, start, end in run.phases:
        started = [p for p in pulls if p.phase == name]
        in_phase = [a for a in answers if start <= a.start < end]
        store = [s for s in samples.storage if start <= s[0] < end]
        rows.append(
            [
                name,
                f"{end - start:.0f}",
                str(len(started)),
                str(sum(p.ok for p in started)),
                str(sum(1 for p in pulls if not p.ok and p.fail_phase == name)),
                str(sum(1 for m in run.mirror_5xx if m.phase == name)),
                str(len(in_phase)),
                str(sum(1 for a in in_phase if a.fault)),
                str(sum(1 for a in in_phase if a.status >= 500)),
                str(sum(1 for a in in_phase if a.status == 429)),
                mib(max(s[1] for s in store)) if store else "-",
                mib(max(s[1] + s[2] for s in store)) if store else "-",
            ]
        )
    print_table(
        [
            "phase",
            "s",
            "pulls",
            "ok",
            "failed here",
            "mirror 5xx",
            "upstream reqs",
            "faults",
            "up 5xx",
            "up 429",
            "peak blobs MiB",
            "+tmp MiB",
        ],
        rows,
    )
    print()
    print("== failed pulls by cause (and the phase the failure was seen in) ==")
    causes: dict[str, Counter[str]] = defaultdict(Counter)
    for p in failed:
        causes[p.cause][p.fail_phase] += 1
    for cause, phases in sorted(causes.items(), key=lambda kv: -sum(kv[1].values())):
        where = ", ".join(f"{k} {v}" for k, v in phases.most_common())
        print(f"{sum(phases.values()):6d}  {cause}  [{where}]")
    if not failed:
        print("     0")
    print()
    print("== mirror 5xx answers, explained by the upstream's answers on the same path ==")
    explained = classify_5xx(answers, run.mirror_5xx)
    for key, count in explained.most_common():
        print(f"{count:6d}  {key}")
    if not explained:
        print("     0")
    not_upstream = sum(c for k, c in explained.items() if "NOT the upstream's" in k)
    print()
    print("== processes (supervisor + workers, from /proc) ==")
    print_table(
        ["when", "workers", "RSS MiB", "open fds", "per worker (pid RSS fds)"],
        [
            [
                s.label,
                str(s.workers),
                f"{s.rss_mib:.1f}",
                str(s.fds),
                "; ".join(f"{p} {r:.0f} {f}" for p, r, f in s.per_worker),
            ]
            for s in samples.procs
        ],
    )
    print(
        f"peak over the run (1 s samples): RSS {samples.peak_rss:.1f} MiB, fds {samples.peak_fds}"
    )
    fd_summary = ", ".join(f"{k} {v}" for k, v in samples.settled_fds.most_common())
    print(f"open fds when settled: {fd_summary}")
    print()
    print("== mirror log ==")
    levels = ", ".join(f"{k} {v}" for k, v in outcome.log.by_level.most_common())
    print(f"{outcome.log.lines} lines ({levels}); traceback lines {outcome.log.tracebacks}")
    for key, count in outcome.log.errors.most_common(12):
        print(f"{count:6d}  {key}")
        print(f"        e.g. {outcome.log.samples[key][:200]}")
    print()
    peak_blobs = max((s[1] for s in samples.storage), default=0)
    peak_all = max((s[1] + s[2] for s in samples.storage), default=0)
    verdict = [
        ("pulls attempted", str(len(pulls) + outcome.unfinished)),
        ("pulls succeeded", str(len(ok))),
        ("pulls failed", str(len(failed))),
        ("WRONG BYTES SERVED (must be 0)", str(len(run.wrong))),
        (
            "PARTIAL BLOBS COMMITTED (must be 0)",
            f"{len(outcome.bad_blobs)} of {outcome.blob_files} files re-hashed",
        ),
        ("5xx answers not the upstream's", str(not_upstream)),
        ("500 answers (always a bug)", str(sum(1 for m in run.mirror_5xx if m.status == 500))),
        (
            "error-level log lines (besides the killed worker's worker_died)",
            str(sum(c for k, c in outcome.log.errors.items() if k != "error worker_died")),
        ),
        ("traceback lines in the log", str(outcome.log.tracebacks)),
        (
            "temp files left (running / stopped)",
            f"{outcome.temp_running} ({mib(outcome.temp_running_bytes)} MiB)"
            f" / {outcome.temp_after_stop}",
        ),
        (
            "peak storage blobs / +tmp vs limit (MiB)",
            f"{mib(peak_blobs)} / {mib(peak_all)} vs {mib(limit)} ({peak_blobs / limit:.2f}x)",
        ),
        ("storage filesystem", "tmpfs" if rig.small_fs else "work disk (no disk-full phase)"),
        ("mirror exit status after SIGTERM", str(outcome.exit_status)),
    ]
    print("== summary ==")
    print_table(["figure", "value"], [[k, v] for k, v in verdict])
    for phase, seconds, what in run.timeouts[:5]:
        print(f"timed out: {what} (started in {phase}, gave up after {seconds:.0f} s)")
    for wrong in run.wrong[:5]:
        print(f"wrong bytes: {wrong}")
    for bad in outcome.bad_blobs[:5]:
        print(f"bad blob: {bad}")


# -- main --------------------------------------------------------------------------------------


async def drive(
    args: argparse.Namespace,
    rig: Rig,
    registry: Registry,
    run: Run,
    maker: ContentMaker,
    samples: Samples,
    storage_root: Path,
) -> int:
    """Run clients, schedule, pusher and sampler; return how many pulls were unfinished."""
    assert rig.mirror.pid is not None
    pid = rig.mirror.pid
    samples.procs.append(sample_processes(pid, "idle, before load"))
    background = [
        asyncio.create_task(sampler(rig, run, samples, storage_root)),
        asyncio.create_task(push_new_content(registry, run, maker, args.push_interval)),
    ]
    scheduler = asyncio.create_task(schedule(rig, run))

    async def sample_at(t: float, label: str) -> None:
        await asyncio.sleep(max(t - now(), 0))
        samples.procs.append(sample_processes(pid, label))

    background.append(asyncio.create_task(sample_at(run.phases[0][2], "after calm 1")))
    background.append(
        asyncio.create_task(sample_at((run.phases[0][1] + run.deadline) / 2, "middle"))
    )
    clients = [asyncio.create_task(client(run)) for _ in range(args.clients)]
    try:
        _, pending = await asyncio.wait(clients, timeout=max(run.deadline - now(), 0) + 60)
        for task in pending:
            task.cancel()
        await asyncio.gather(*clients, return_exceptions=True)
        await scheduler
    finally:
        for task in [*background, scheduler, *clients]:
            task.cancel()
        await asyncio.gather(*background, scheduler, *clients, return_exceptions=True)
    samples.procs.append(sample_processes(pid, "end of load"))
    # Let in-flight downloads that lost their clients finish (bounded), then look again.
    settle_until = now() + 15
    while now() < settle_until and (storage_root / "tmp").is_dir():
        if not any((storage_root / "tmp").iterdir()):
            break
        await asyncio.sleep(0.5)
    samples.procs.append(sample_processes(pid, "settled"))
    samples.settled_fds = fd_kinds([pid, *children(pid)], storage_root)
    return len(pending)


def make_content(registry: Registry, catalog: Catalog, maker: ContentMaker, limit: int) -> None:
    for i in range(REPOS):
        repo = f"soak/app{i}"
        for j in range(2):
            tag = f"init{j}"
            push_image(registry, catalog, repo, [tag, "latest"], maker.small_image())
            catalog.recent.append((repo, tag))
            catalog.all_refs.append((repo, tag))
    # Large images pulled only in disk-burst: three times the size limit in all.
    layer = max(3 * limit // (2 * BIG_IMAGES), 64 * KIB)
    for i in range(BIG_IMAGES):
        image = maker.image([layer, layer], base=False, docker=False)
        push_image(registry, catalog, "soak/big", [f"b{i}"], image)
        catalog.big_refs.append(("soak/big", f"b{i}"))


def run_soak(args: argparse.Namespace, work: Path, stack: contextlib.ExitStack) -> int:
    limit = args.max_size_mib * MIB
    registry = Registry(work / "registry")
    stack.callback(registry.stop)
    registry.start()
    proxy = FaultProxy(registry.url, args.seed)
    stack.callback(proxy.stop)
    proxy.start()
    redis_server = RedisServer(work / "redis")
    stack.callback(redis_server.stop)
    redis_server.start()
    fs_root = work / "fs"
    small_fs = stack.enter_context(small_filesystem(fs_root, 4 * limit, not args.no_tmpfs))
    storage_root = fs_root / "storage"

    maker = ContentMaker(args.seed)
    catalog = Catalog()
    started = now()
    make_content(registry, catalog, maker, limit)
    print(
        f"content: {len(catalog.images)} images, {catalog.pushed_bytes / MIB:.0f} MiB pushed "
        f"in {now() - started:.1f} s"
    )

    storage: dict[str, Any] = {"root": str(storage_root), "max_size": limit}
    if args.min_free:
        storage["min_free"] = args.min_free
    mirror = MirrorProcess(
        work / "mirror",
        {UPSTREAM: {"url": proxy.url, "tag_ttl": "5s", "read_timeout": "8s"}},
        storage=storage_root,
        port=free_port(),
        log_level=args.log_level,
        extra_args=("--workers", str(args.workers)),
        default_upstream=UPSTREAM,
        metadata={"backend": "redis", "redis_url": redis_server.url},
    )
    mirror.config["storage"] = storage
    stack.callback(mirror.stop)
    mirror.start()
    print(f"registry {registry.url}, fault proxy {proxy.url}, redis {redis_server.url}")
    print(f"mirror {mirror.url} (supervisor pid {mirror.pid}, {args.workers} workers)")
    where = "tmpfs" if small_fs else "the work disk"
    print(f"storage {storage_root} on {where}, limit {mib(limit)} MiB")

    rig = Rig(proxy, redis_server, mirror, fs_root, small_fs, args.workers)
    start = now()
    run = Run(
        mirror_url=mirror.url,
        catalog=catalog,
        phases=plan_phases(start, args.duration),
        deadline=start + args.duration,
        max_pulls=args.max_pulls,
        rng=random.Random(args.seed + 1),
    )
    samples = Samples()
    unfinished = asyncio.run(drive(args, rig, registry, run, maker, samples, storage_root))
    temp_running = len(mirror.temp_files())
    temp_running_bytes = temp_bytes(storage_root)
    exit_status = mirror.stop()
    temp_after_stop = len(mirror.temp_files())
    files, total, bad = rehash_blobs(storage_root)
    outcome = Outcome(
        unfinished,
        temp_running,
        temp_running_bytes,
        temp_after_stop,
        files,
        total,
        bad,
        summarize_log(mirror.log_text()),
        exit_status,
    )
    report(run, rig, samples, outcome, limit)
    print(f"mirror log: {mirror.log_path}" if args.keep else "")
    return 1 if run.wrong or bad else 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=300, help="seconds of load (300)")
    parser.add_argument("--clients", type=int, default=64, help="concurrent clients (64)")
    parser.add_argument("--workers", type=int, default=2, help="mirror workers (2)")
    parser.add_argument("--max-size-mib", type=int, default=64, help="storage.max_size (64)")
    parser.add_argument("--min-free", help="storage.min_free, passed on when given")
    parser.add_argument("--max-pulls", type=int, default=200_000, help="stop after N pulls")
    parser.add_argument(
        "--push-interval", type=float, default=1.0, help="seconds between new images (1.0)"
    )
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--log-level", default="info", help="the mirror's log level (info)")
    parser.add_argument("--no-tmpfs", action="store_true", help="keep storage on the work disk")
    parser.add_argument("--tmpdir", help="where the work directory goes")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    prepare_process()

    def soak(work: Path, cleanup: Cleanup) -> int:
        with contextlib.ExitStack() as stack:
            return run_soak(args, work, stack)

    return run_in_workdir(
        "bench-soak-",
        parent=args.tmpdir,
        keep=args.keep,
        failures=(SoakError, MirrorProcessError),
        body=soak,
    )


if __name__ == "__main__":
    sys.exit(main())
