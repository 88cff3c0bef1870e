"""The size limit is a bound: storage.max_size and storage.min_free hold at every moment,
under bursts, with several workers, on a small real filesystem, and through a full disk.

Real `mirror serve` processes in front of a real registry; usage is sampled from the
filesystem by a thread while the pulls run. The reservation arithmetic itself is
tested without sockets at the top.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import os
import random
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from conftest import MirrorFactory
from prometheus_client.parser import text_string_to_metric_families
from support.fake_upstream import FakeUpstream, digest_of, serve
from support.images import push_blob, sha256_digest
from support.mirror_process import MirrorProcess
from support.net import eventually, http_request, wait_until
from support.registry import Registry

from mirror.api.services import SERVICES
from mirror.cache.fetch import PASS_THROUGH_WINDOW, WRITE_BATCH
from mirror.errors import StorageFull
from mirror.eviction import Evictor
from mirror.metadata.base import BlobRecord
from mirror.metadata.embedded import EmbeddedMetadataStore
from mirror.oci import Digest
from mirror.storage.blobstore import BlobStore, FilesystemBlobStore, Quota
from mirror.storage.ledger import HOST, Ledger

pytestmark = pytest.mark.slow  # starts registries, servers or processes

MIB = 1024 * 1024
REPO = "bound/blobs"
BLOB_SIZE = 2 * MIB


# The reservation arithmetic, no sockets.


async def put(store: BlobStore, data: bytes) -> Digest:
    digest = Digest.parse(sha256_digest(data))
    reservation = store.reserve(len(data))
    assert reservation is not None
    writer = store.new_writer(digest, len(data), reservation)
    try:
        writer.write(data)
        await store.commit(writer)
    finally:
        writer.discard()
    return digest


def store_at(root: Path, **quota: int | float) -> FilesystemBlobStore:
    store = FilesystemBlobStore(root, Quota(**quota))  # type: ignore[arg-type]
    store.prepare()
    return store


def test_reservations_count_against_the_limit_until_committed_or_released(
    tmp_path: Path,
) -> None:
    store = store_at(tmp_path, max_size=10 * MIB, high_watermark=0.8, low_watermark=0.5)
    first = store.reserve(6 * MIB)
    assert first is not None
    assert store.excess(0, "high") == 0
    # 6 reserved + 3 = 9: over the high watermark (8), under the limit (10).
    assert store.reserve(3 * MIB, "high") is None
    assert store.excess(3 * MIB, "high") == 1 * MIB
    assert store.excess(3 * MIB, "low") == 4 * MIB
    second = store.reserve(3 * MIB, "max")
    assert second is not None
    assert store.reserve(2 * MIB, "max") is None  # 11 > 10
    store.release(second)
    store.release(second)  # idempotent
    assert store.reserve(2 * MIB, "max") is not None
    assert store.usage == 0


async def test_a_commit_turns_the_reservation_into_usage_and_a_discard_gives_it_back(
    tmp_path: Path,
) -> None:
    store = store_at(tmp_path, max_size=4 * MIB)
    data = os.urandom(MIB)
    await put(store, data)
    assert store.usage == MIB
    assert store.excess(3 * MIB, "max") == 0
    assert store.excess(3 * MIB + 1, "max") == 1
    # A failed write (here: discarded before its commit) frees its reservation and file.
    reservation = store.reserve(3 * MIB)
    assert reservation is not None
    writer = store.new_writer(Digest.parse(sha256_digest(b"x" * 10)), 10, reservation)
    writer.write(b"x" * 5)
    writer.discard()
    assert list(store.tmp_dir.iterdir()) == []
    assert store.excess(3 * MIB, "max") == 0
    assert await store.delete(Digest.parse(sha256_digest(data))) == MIB
    assert store.usage == 0


async def test_processes_sharing_a_root_keep_one_account(tmp_path: Path) -> None:
    one = store_at(tmp_path, max_size=10 * MIB)
    other = FilesystemBlobStore(tmp_path, Quota(max_size=10 * MIB))  # another process on the root
    held = one.reserve(6 * MIB)
    assert held is not None
    assert other.reserve(5 * MIB) is None
    await put(other, os.urandom(4 * MIB))
    assert one.usage == other.usage == 4 * MIB
    assert one.reserve(1) is None  # 4 committed + 6 reserved = the limit
    one.release(held)
    assert other.reserve(6 * MIB) is not None


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_reservations_of_dead_or_silent_processes_are_dropped(tmp_path: Path) -> None:
    store = store_at(tmp_path, max_size=10 * MIB)
    store.scan_usage_blocking()
    ledger_file = tmp_path / "ledger.json"
    state = json.loads(ledger_file.read_text())
    now = time.time()
    state["processes"] = {
        "crashed-here": {"host": HOST, "pid": dead_pid(), "reserved": 8 * MIB, "updated": now},
        "silent-elsewhere": {
            "host": "other-node",
            "pid": 1,
            "reserved": 8 * MIB,
            "updated": now - 3600,
        },
        "alive-elsewhere": {"host": "other-node", "pid": 1, "reserved": 2 * MIB, "updated": now},
    }
    ledger_file.write_text(json.dumps(state))
    assert store.reserve(8 * MIB) is not None  # 2 (alive) + 8 fits 10
    assert store.reserve(1) is None
    assert set(Ledger(tmp_path).read().processes) == {"alive-elsewhere", store._ledger.owner}


async def test_a_lost_ledger_is_recounted_from_the_files(tmp_path: Path) -> None:
    store = store_at(tmp_path, max_size=3 * MIB)
    await put(store, os.urandom(2 * MIB))
    (tmp_path / "ledger.json").write_text("{not json")
    assert store.reserve(2 * MIB) is None
    assert store.usage == 2 * MIB


async def test_a_manifest_that_does_not_fit_is_not_stored(tmp_path: Path) -> None:
    store = store_at(tmp_path, max_size=100)
    body = b"{}" * 100
    assert not await store.put_bytes(Digest.parse(sha256_digest(body)), body)
    assert store.usage == 0
    assert list(store.tmp_dir.iterdir()) == []
    small = b"{}"
    assert await store.put_bytes(Digest.parse(sha256_digest(small)), small)


def test_min_free_floor_arithmetic() -> None:
    quota = Quota(min_free=10 * MIB, high_watermark=0.9, low_watermark=0.7)
    assert quota.floor(1000 * MIB, "max") == 10 * MIB
    assert quota.floor(1000 * MIB, "low") == 12 * MIB  # eviction aims past the floor
    share = Quota(min_free_ratio=0.25)
    assert share.floor(64 * MIB, "high") == 16 * MIB
    assert Quota().floor(64 * MIB, "high") is None
    assert not Quota().bounded


async def test_a_reservation_evicts_the_least_recently_used_but_never_pinned_or_busy(
    tmp_path: Path,
) -> None:
    store = store_at(tmp_path, max_size=8 * MIB, high_watermark=0.9, low_watermark=0.5)
    metadata = EmbeddedMetadataStore(store.meta_dir)
    busy: set[str] = set()
    evictor = Evictor(store, metadata, lambda: busy)
    try:
        digests = []
        for age in range(3):
            digest = await put(store, os.urandom(2 * MIB))
            digests.append(str(digest))
            await metadata.put_blob(str(digest), BlobRecord(2 * MIB, age, age))
        pinned, in_use, oldest_free = digests[0], digests[1], digests[2]
        record = await metadata.get_blob(pinned)
        assert record is not None
        await metadata.put_blob(pinned, dataclasses.replace(record, pinned=True))
        busy.add(in_use)
        # 6 + 2 crosses 0.9 x 8: the only evictable blob goes, then 2 more fit.
        reservation = await evictor.reserve(2 * MIB)
        assert reservation is not None
        assert await store.size(Digest.parse(oldest_free)) is None
        assert await store.size(Digest.parse(pinned)) is not None
        assert await store.size(Digest.parse(in_use)) is not None
        # Now 4 committed + 2 reserved; 3 more cannot fit, and nothing can go.
        assert await evictor.reserve(3 * MIB) is None
        assert evictor.refused_blobs == 1
        store.release(reservation)
    finally:
        await metadata.close()


# Real processes, a real registry, usage sampled from the filesystem.


@pytest.fixture(scope="module")
def blob_upstream(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Registry, list[bytes]]]:
    """A registry holding 24 blobs of 2 MiB and a few bigger ones (index 24 on)."""
    rng = random.Random(11)
    blobs = [rng.randbytes(BLOB_SIZE) for _ in range(24)] + [
        rng.randbytes(6 * MIB),
        rng.randbytes(4 * MIB),
    ]
    with Registry(tmp_path_factory.mktemp("bound-upstream")) as registry:
        for data in blobs:
            push_blob(registry.url, REPO, sha256_digest(data), data, None)
        yield registry, blobs


def files_size(*directories: Path) -> int:
    total = 0
    for directory in directories:
        for dirpath, _, names in os.walk(directory):
            for name in names:
                with contextlib.suppress(FileNotFoundError):
                    total += os.stat(os.path.join(dirpath, name)).st_size
    return total


@contextlib.contextmanager
def sampled(measure: Callable[[], int]) -> Iterator[list[int]]:
    """Samples of `measure()` every few milliseconds while the block runs."""
    samples: list[int] = []
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            samples.append(measure())
            stop.wait(0.003)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        stop.set()
        thread.join()
        samples.append(measure())


def mirror_for(workdir: Path, registry: Registry, storage: Path, **limits: object) -> MirrorProcess:
    mirror = MirrorProcess(workdir, {"local": {"url": registry.url}}, storage=storage)
    mirror.config["storage"].update(limits)
    return mirror


def committed_blobs(storage: Path) -> list[Path]:
    return [p for p in (storage / "blobs").rglob("*") if p.is_file()]


def assert_every_blob_is_whole(storage: Path) -> None:
    for path in committed_blobs(storage):
        assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name, path


async def pull(http: aiohttp.ClientSession, mirror: MirrorProcess, data: bytes) -> None:
    digest = sha256_digest(data)
    async with http.get(f"{mirror.url}/v2/{REPO}/blobs/{digest}") as response:
        assert response.status == 200
        body = await response.read()
    assert sha256_digest(body) == digest


def metric(mirror: MirrorProcess, sample: str) -> float:
    text = http_request("GET", f"{mirror.url}/metrics").body.decode()
    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == sample:
                return float(found.value)
    raise AssertionError(f"{sample} not in /metrics")


def settle(mirror: MirrorProcess) -> None:
    """No download left in tmp/ (the last byte reaches clients before the commit)."""
    wait_until(lambda: mirror.temp_files() == [], timeout=20, message="tmp/ not empty")


async def burst(mirror: MirrorProcess, blobs: list[bytes]) -> None:
    async with aiohttp.ClientSession() as http:
        await asyncio.gather(*(pull(http, mirror, data) for data in blobs))


@pytest.mark.parametrize("workers", [1, 2])
async def test_a_burst_of_three_times_the_limit_stays_within_it(
    tmp_path: Path, blob_upstream: tuple[Registry, list[bytes]], workers: int
) -> None:
    registry, blobs = blob_upstream
    limit = 16 * MIB
    storage = tmp_path / "storage"
    mirror = mirror_for(tmp_path / "m", registry, storage, max_size=limit)
    if workers > 1:
        mirror.extra_args = ("--workers", str(workers))
    burst_blobs = blobs[:24]  # 48 MiB: three times the limit
    with mirror:
        with sampled(lambda: files_size(storage / "blobs", storage / "tmp")) as usage:
            await burst(mirror, burst_blobs)
            settle(mirror)
            # Again, one by one: now each new blob has to evict older ones.
            async with aiohttp.ClientSession() as http:
                for data in reversed(burst_blobs):
                    await pull(http, mirror, data)
            settle(mirror)
        assert max(usage) <= limit + BLOB_SIZE, f"peak {max(usage)} over {limit}"
        assert committed_blobs(storage), "nothing was cached at all"
        assert_every_blob_is_whole(storage)
        ledger = json.loads((storage / "ledger.json").read_text())
        assert ledger["committed"] == files_size(storage / "blobs")
        if workers == 1:  # each worker reports its own counters
            assert metric(mirror, "mirror_evictions_total") > 0


async def test_a_blob_bigger_than_the_limit_is_served_whole_and_not_kept(
    tmp_path: Path, blob_upstream: tuple[Registry, list[bytes]]
) -> None:
    registry, blobs = blob_upstream
    big = blobs[24]  # 6 MiB
    storage = tmp_path / "storage"
    mirror = mirror_for(tmp_path / "m", registry, storage, max_size=4 * MIB)
    with mirror:
        with sampled(lambda: files_size(storage / "blobs", storage / "tmp")) as usage:
            await burst(mirror, [big, big, big])
            async with aiohttp.ClientSession() as http:
                # A range of it, too, verified like the whole.
                digest = sha256_digest(big)
                headers = {"Range": "bytes=1000-"}
                url = f"{mirror.url}/v2/{REPO}/blobs/{digest}"
                async with http.get(url, headers=headers) as response:
                    assert response.status == 206
                    assert await response.read() == big[1000:]
        assert max(usage) == 0
        assert committed_blobs(storage) == []
        assert mirror.temp_files() == []
        assert metric(mirror, "mirror_blobs_not_cached_total") >= 2
        assert '"event": "blob_not_cached"' in mirror.log_text()


async def test_pinned_blobs_leaving_no_room_make_new_blobs_pass_through(
    tmp_path: Path, blob_upstream: tuple[Registry, list[bytes]]
) -> None:
    registry, blobs = blob_upstream
    storage = tmp_path / "storage"
    mirror = mirror_for(tmp_path / "m", registry, storage, max_size=7 * MIB)
    kept, newcomer = blobs[:3], blobs[3]
    with mirror:
        async with aiohttp.ClientSession() as http:
            for data in kept:
                await pull(http, mirror, data)
            settle(mirror)
            metadata = EmbeddedMetadataStore(storage / "meta")
            try:
                for data in kept:
                    digest = sha256_digest(data)
                    await wait_for_record(metadata, digest)
                    record = await metadata.get_blob(digest)
                    assert record is not None
                    await metadata.put_blob(digest, dataclasses.replace(record, pinned=True))
            finally:
                await metadata.close()
            await pull(http, mirror, newcomer)
            settle(mirror)
        names = {p.name for p in committed_blobs(storage)}
        assert names == {sha256_digest(d)[7:] for d in kept}
        assert metric(mirror, "mirror_blobs_not_cached_total") == 1


async def wait_for_record(metadata: EmbeddedMetadataStore, digest: str) -> None:
    deadline = time.monotonic() + 10
    while await metadata.get_blob(digest) is None:
        assert time.monotonic() < deadline, f"no record for {digest}"
        await asyncio.sleep(0.02)


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def free_bytes(path: Path) -> int:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


async def test_min_free_holds_on_a_small_filesystem(
    tmp_path: Path, blob_upstream: tuple[Registry, list[bytes]]
) -> None:
    registry, blobs = blob_upstream
    floor = 12 * MIB
    with tmpfs(tmp_path / "fs", "32m") as root:
        storage = root / "storage"
        mirror = mirror_for(tmp_path / "m", registry, storage, min_free=floor)
        with mirror:
            with sampled(lambda: free_bytes(root)) as free:
                await burst(mirror, blobs[:6])
                settle(mirror)
                async with aiohttp.ClientSession() as http:
                    for data in blobs[6:16]:  # 32 MiB in all through a 32 MiB disk
                        await pull(http, mirror, data)
                settle(mirror)
            assert min(free) >= floor, f"free space fell to {min(free)}, floor {floor}"
            assert committed_blobs(storage), "nothing was cached at all"
            assert_every_blob_is_whole(storage)
            # The newest blob was kept: eviction made room for it.
            assert (storage / "blobs" / "sha256" / sha256_digest(blobs[15])[7:9]).is_dir()


async def test_a_full_disk_mid_download_fails_that_transfer_only(
    tmp_path: Path, blob_upstream: tuple[Registry, list[bytes]]
) -> None:
    registry, blobs = blob_upstream
    cached, victim = blobs[0], blobs[25]  # 2 MiB, then 4 MiB
    with tmpfs(tmp_path / "fs", "32m") as root:
        storage = root / "storage"
        mirror = mirror_for(tmp_path / "m", registry, storage)  # no limits: the disk is
        with mirror:
            async with aiohttp.ClientSession() as http:
                await pull(http, mirror, cached)
                settle(mirror)
                filler = root / "filler"
                with filler.open("wb") as file:
                    file.truncate(0)
                    file.write(b"\0" * (free_bytes(root) - MIB))
                url = f"{mirror.url}/v2/{REPO}/blobs/{sha256_digest(victim)}"
                with pytest.raises(aiohttp.ClientPayloadError):
                    async with http.get(url) as response:
                        await response.read()
                settle(mirror)
                assert victim_absent(storage, victim)
                # The mirror keeps serving what it has...
                await pull(http, mirror, cached)
                # ...and once there is space again the same pull works, and is kept.
                filler.unlink()
                await pull(http, mirror, victim)
                settle(mirror)
                wait_until(lambda: not victim_absent(storage, victim), timeout=10)
            assert_every_blob_is_whole(storage)
            assert "Traceback" not in mirror.log_text()


def victim_absent(storage: Path, data: bytes) -> bool:
    return sha256_digest(data)[7:] not in {p.name for p in committed_blobs(storage)}


async def test_an_uncached_blob_follows_its_slowest_reader_and_stops_when_all_leave(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    make_mirror: MirrorFactory,
    http: aiohttp.ClientSession,
) -> None:
    big = os.urandom(40 * MIB)
    digest = digest_of(big)
    fake = FakeUpstream()
    fake.on("GET", f"/v2/{REPO}/blobs/{digest}", serve(big))
    server = await aiohttp_server(fake.app(), host="127.0.0.1")
    mirror = await make_mirror(
        {"fake": {"url": str(server.make_url("")).rstrip("/")}}, storage={"max_size": MIB}
    )
    blobs = mirror.server.app[SERVICES].blobs
    url = f"{mirror.url}/v2/{REPO}/blobs/{digest}"
    async with http.get(url) as response:
        await response.content.readexactly(MIB)
        # The reader stalls: the upstream is read no further than the window allows.
        download = blobs._downloads[Digest.parse(digest)][0]
        await eventually(lambda: download._pass is not None and download.written > MIB)
        assert download._pass is not None
        await eventually(lambda: download._pass.held >= PASS_THROUGH_WINDOW - WRITE_BATCH)
        assert download.written < 20 * MIB
        response.close()  # and hangs up
    await eventually(lambda: blobs.downloads_in_flight == 0)
    assert isinstance(download.error, StorageFull)
    assert mirror.blob_files() == []
    # The next client gets a download of its own, whole and verified.
    async with http.get(url) as response:
        assert await response.read() == big
