"""The air-gapped workflow: seed a mirror from a real upstream, export a bundle, stop the
upstream, import the bundle into a fresh mirror and serve it offline to skopeo and
containerd, with the upstream's digests."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import yaml
from conftest import TAG, MirrorFactory, Upstream
from support.cli import containerd_hosts, mirror_cli
from support.containerd import Containerd
from support.images import Image, push, standard_images
from support.registry import Registry
from support.skopeo import inspect_raw, skopeo_copy_async

pytestmark = pytest.mark.slow  # starts registries, servers or processes

REGISTRY = "reg.test"  # the upstream's name at both sites
KINDS = ("oci", "oci-index", "docker")


def site_config(path: Path, root: Path, upstream_url: str, **settings: object) -> Path:
    data = {
        "default_upstream": REGISTRY,
        "storage": {"root": str(root)},
        "upstreams": {REGISTRY: {"url": upstream_url}},
        **settings,
    }
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def ref(kind: str) -> str:
    return f"{REGISTRY}/{Upstream.repo(kind)}:{TAG}"


@dataclass
class Site:
    images: dict[str, Image]
    upstream_url: str
    bundle: Path
    seed_output: str
    reseed_output: str
    work: Path


@pytest.fixture(scope="module")
def seeded_bundle(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """Site A seeds from the upstream and exports; then the upstream is gone."""
    work = tmp_path_factory.mktemp("airgap")
    images = standard_images(seed_base=40)
    registry = Registry(work / "upstream")
    registry.start()
    try:
        for kind in KINDS:
            push(registry.url, Upstream.repo(kind), images[kind], TAG)
        config_a = site_config(work / "a.yaml", work / "site-a", registry.url)
        # Only arm64 of the index; then a single image and one named without a registry
        # (the default upstream), for this host's platform.
        only_arm64 = mirror_cli(
            "seed", "--config", str(config_a), "--platform", "linux/arm64", ref("oci-index")
        )
        assert only_arm64.returncode == 0, only_arm64.stdout + only_arm64.stderr
        seeded = mirror_cli(
            "seed", "--config", str(config_a), ref("oci"), f"{Upstream.repo('docker')}:{TAG}"
        )
        assert seeded.returncode == 0, seeded.stdout + seeded.stderr
        reseeded = mirror_cli("seed", "--config", str(config_a), ref("oci"))
        bundle = work / "bundle.tar"
        exported = mirror_cli("export", "--config", str(config_a), "--output", str(bundle), "--all")
        assert exported.returncode == 0, exported.stdout + exported.stderr
    finally:
        registry.stop()
    return Site(images, registry.url, bundle, seeded.stdout, reseeded.stdout, work)


def test_seed_reports_progress_and_resumes(seeded_bundle: Site) -> None:
    out = seeded_bundle.seed_output
    assert f"ok      {ref('oci')} {seeded_bundle.images['oci'].digest}" in out
    assert "seeded 2 of 2 references" in out
    assert "already cached" in seeded_bundle.reseed_output
    assert "0 fetched" in seeded_bundle.reseed_output
    # Not a single upstream is left to answer; a bad reference fails with a clear line.
    config = site_config(
        seeded_bundle.work / "x.yaml", seeded_bundle.work / "x", seeded_bundle.upstream_url
    )
    failed = mirror_cli("seed", "--config", str(config), "nowhere.example/app:1", ref("oci"))
    assert failed.returncode == 1
    assert "failed (2):" in failed.stdout
    assert "nowhere.example/app:1: no upstream is configured for this registry" in failed.stdout


def test_skopeo_reads_the_bundle_itself(seeded_bundle: Site) -> None:
    images = seeded_bundle.images
    # skopeo 1.9 skips index.json entries with Docker media types (a limit of that
    # version; the Docker image round-trips through import below), so OCI kinds only.
    for kind in ("oci", "oci-index"):
        raw = inspect_raw(f"oci-archive:{seeded_bundle.bundle}:{ref(kind)}")
        assert raw == images[kind].manifest, kind


@pytest.fixture
def site_b(seeded_bundle: Site, tmp_path: Path) -> Path:
    config = site_config(
        tmp_path / "b.yaml", tmp_path / "site-b", seeded_bundle.upstream_url, offline=True
    )
    imported = mirror_cli("import", "--config", str(config), str(seeded_bundle.bundle))
    assert imported.returncode == 0, imported.stdout + imported.stderr
    assert "3 images" in imported.stdout
    again = mirror_cli("import", "--config", str(config), str(seeded_bundle.bundle))
    assert again.returncode == 0
    assert "0 blobs added" in again.stdout  # idempotent
    return tmp_path / "site-b"


async def test_offline_site_serves_the_bundle(
    seeded_bundle: Site,
    site_b: Path,
    make_mirror: MirrorFactory,
    tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    images = seeded_bundle.images
    mirror = await make_mirror(
        {REGISTRY: {"url": seeded_bundle.upstream_url}},
        offline=True,
        storage={"root": str(site_b)},
    )
    # A single-platform OCI image and a Docker schema 2 image, whole.
    for kind in ("oci", "docker"):
        out = tmp_path / kind
        await skopeo_copy_async(f"docker://{mirror.host}/{Upstream.repo(kind)}:{TAG}", f"dir:{out}")
        assert (out / "manifest.json").read_bytes() == images[kind].manifest
        for digest, data in images[kind].all_blobs().items():
            assert (out / digest.removeprefix("sha256:")).read_bytes() == data
    # The index is intact, byte for byte; its arm64 image pulls, its amd64 one is absent.
    index_url = f"{mirror.url}/v2/{Upstream.repo('oci-index')}/manifests/{TAG}"
    async with http.get(index_url, headers={"Accept": "*/*"}) as response:
        assert await response.read() == images["oci-index"].manifest
    amd64, arm64 = images["oci-index"].children
    out = tmp_path / "arm64"
    await skopeo_copy_async(
        f"docker://{mirror.host}/{Upstream.repo('oci-index')}:{TAG}",
        f"dir:{out}",
        all_images=False,
        extra=("--override-arch", "arm64"),
    )
    assert (out / "manifest.json").read_bytes() == arm64.manifest
    async with http.get(
        f"{mirror.url}/v2/{Upstream.repo('oci-index')}/manifests/{amd64.digest}"
    ) as response:
        assert response.status == 404
        assert "offline" in (await response.json())["errors"][0]["message"]
    async with http.get(f"{mirror.url}/v2/{Upstream.repo('oci')}/tags/list") as response:
        assert (await response.json())["tags"] == [TAG]


async def test_containerd_pulls_from_the_offline_site(
    seeded_bundle: Site, site_b: Path, make_mirror: MirrorFactory, tmp_path: Path
) -> None:
    mirror = await make_mirror(
        {REGISTRY: {"url": seeded_bundle.upstream_url}},
        offline=True,
        storage={"root": str(site_b)},
    )
    config = site_config(tmp_path / "c.yaml", site_b, seeded_bundle.upstream_url, offline=True)
    hosts = tmp_path / "certs.d"
    containerd_hosts(config, mirror.url, hosts, fallback="none")
    with Containerd() as daemon:
        reference = ref("oci")
        await asyncio.to_thread(daemon.pull, reference, hosts)
        assert daemon.image_digest(reference) == seeded_bundle.images["oci"].digest


def _flip_a_byte_in_a_blob(source: Path, target: Path, victim: str) -> None:
    shutil.copy(source, target)
    with tarfile.open(target) as tar:
        member = tar.getmember(f"blobs/sha256/{victim.removeprefix('sha256:')}")
        offset = member.offset_data + member.size // 2
    with open(target, "r+b") as file:
        file.seek(offset)
        byte = file.read(1)
        file.seek(offset)
        file.write(bytes([byte[0] ^ 0xFF]))


def _cache_state(root: Path) -> tuple[list[str], list[str], bytes]:
    files = sorted(
        p.relative_to(root).as_posix() for p in (root / "blobs").rglob("*") if p.is_file()
    )
    temps = sorted(p.name for p in (root / "tmp").iterdir())
    return files, temps, hashlib.sha256("".join(files).encode()).digest()


def test_a_corrupted_bundle_is_refused_and_changes_nothing(
    seeded_bundle: Site, site_b: Path, tmp_path: Path
) -> None:
    victim = seeded_bundle.images["docker"].layer_digests[0]
    corrupted = tmp_path / "corrupted.tar"
    _flip_a_byte_in_a_blob(seeded_bundle.bundle, corrupted, victim)

    fresh = tmp_path / "fresh-site"
    for root in (fresh, site_b):
        config = site_config(tmp_path / "c.yaml", root, seeded_bundle.upstream_url, offline=True)
        before = _cache_state(root) if root.exists() else None
        result = mirror_cli("import", "--config", str(config), str(corrupted))
        assert result.returncode == 1
        assert f"blob {victim} does not match its digest" in result.stderr
        assert "nothing was imported" in result.stderr
        after = _cache_state(root)
        if before is None:
            assert after[0] == []
            assert after[1] == []
        else:
            assert after == before
    stats = mirror_cli("stats", "--config", str(tmp_path / "c.yaml"), "--json")
    assert json.loads(stats.stdout)["blobs"] == len(_cache_state(site_b)[0])
