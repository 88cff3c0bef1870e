"""Real node clients pulling through one mirror of two upstreams, configured only by
`mirror client-config`.

Two local registries stand in for docker.io and ghcr.io and hold the same repository
name with different content. containerd (its own daemon, `hosts.toml` routing by
`?ns=`) and podman (private `registries.conf`, routing by path prefix) must each get
the right upstream's image, and the upstreams must see requests from the mirror only:
every fallback points at a closed loopback port.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import yaml
from conftest import Mirror, MirrorFactory
from support.cli import mirror_cli
from support.containerd import Containerd
from support.images import Image, docker_image, oci_image, push
from support.net import free_port
from support.podman import Podman
from support.registry import Registry

from mirror.upstream.client import USER_AGENT

pytestmark = pytest.mark.slow  # starts registries, servers or processes

REPO = "team/app"
TAG = "1.0"


@dataclass
class TwoUpstreams:
    hub: Registry
    ghcr: Registry
    hub_library: Image  # docker.io/library/app:1.0
    hub_team: Image  # docker.io/team/app:1.0
    ghcr_team: Image  # ghcr.io/team/app:1.0

    def upstreams(self) -> dict[str, dict[str, object]]:
        return {
            "docker.io": {
                "url": self.hub.url,
                "aliases": ["registry-1.docker.io", "index.docker.io"],
                "docker_hub": True,
                "tag_ttl": "1h",
            },
            "ghcr.io": {"url": self.ghcr.url, "tag_ttl": "1h"},
        }


@pytest.fixture(scope="module")
def two_upstreams(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoUpstreams]:
    workdir = tmp_path_factory.mktemp("two-upstreams")
    with Registry(workdir / "hub") as hub, Registry(workdir / "ghcr") as ghcr:
        upstreams = TwoUpstreams(
            hub,
            ghcr,
            hub_library=oci_image([64 * 1024, 1024], seed=501),
            hub_team=docker_image([48 * 1024, 512], seed=502),
            ghcr_team=oci_image([40 * 1024, 256], seed=503),
        )
        push(hub.url, "library/app", upstreams.hub_library, TAG)
        push(hub.url, REPO, upstreams.hub_team, TAG)
        push(ghcr.url, REPO, upstreams.ghcr_team, TAG)
        yield upstreams


@pytest.fixture(scope="module")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Containerd]:
    # A short path: unix socket paths are limited to about 100 bytes.
    with Containerd(tmp_path_factory.mktemp("ctd")) as daemon:
        yield daemon


def client_config(tmp_path: Path, upstreams: TwoUpstreams, mirror: Mirror, client: str) -> Path:
    config = tmp_path / "mirror.yaml"
    config.write_text(
        yaml.safe_dump({"default_upstream": "docker.io", "upstreams": upstreams.upstreams()}),
        encoding="utf-8",
    )
    output = tmp_path / f"{client}-config"
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens: no fallback can succeed
    subprocess.run(
        [
            sys.executable,
            "-m",
            "mirror",
            "client-config",
            client,
            "--config",
            str(config),
            "--mirror-url",
            mirror.url,
            "--fallback",
            closed,
            "--output",
            str(output),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return output


def assert_only_the_mirror_called(registry: Registry, since: int) -> None:
    entries = [e for e in registry.access_log(since=since) if e.route != "/v2/"]
    assert entries, "the upstream saw no request at all"
    assert {entry.user_agent for entry in entries} == {USER_AGENT}


async def test_containerd_pulls_through_the_generated_hosts_toml(
    make_mirror: MirrorFactory, two_upstreams: TwoUpstreams, containerd: Containerd, tmp_path: Path
) -> None:
    mirror = await make_mirror(two_upstreams.upstreams(), default_upstream="docker.io")
    hosts_dir = client_config(tmp_path, two_upstreams, mirror, "containerd")
    assert (hosts_dir / "docker.io" / "hosts.toml").exists()
    hub_mark, ghcr_mark = two_upstreams.hub.mark(), two_upstreams.ghcr.mark()

    expected = {
        "docker.io/library/app:1.0": two_upstreams.hub_library.digest,
        f"docker.io/{REPO}:{TAG}": two_upstreams.hub_team.digest,
        f"ghcr.io/{REPO}:{TAG}": two_upstreams.ghcr_team.digest,
    }
    for reference, digest in expected.items():
        # In a thread: the mirror answering ctr runs on this test's event loop.
        await asyncio.to_thread(containerd.pull, reference, hosts_dir)
        assert containerd.image_digest(reference) == digest, reference

    assert_only_the_mirror_called(two_upstreams.hub, hub_mark)
    assert_only_the_mirror_called(two_upstreams.ghcr, ghcr_mark)


async def test_podman_pulls_through_the_generated_path_prefixes(
    make_mirror: MirrorFactory, two_upstreams: TwoUpstreams, tmp_path: Path
) -> None:
    mirror = await make_mirror(two_upstreams.upstreams(), default_upstream="docker.io")
    conf_dir = client_config(tmp_path, two_upstreams, mirror, "podman")
    podman = Podman(tmp_path / "podman", conf_dir / "registry-mirror.conf")
    hub_mark, ghcr_mark = two_upstreams.hub.mark(), two_upstreams.ghcr.mark()

    expected = {
        f"docker.io/{REPO}:{TAG}": two_upstreams.hub_team.digest,
        f"ghcr.io/{REPO}:{TAG}": two_upstreams.ghcr_team.digest,
        "docker.io/library/app:1.0": two_upstreams.hub_library.digest,
    }
    try:
        for reference, digest in expected.items():
            # In a thread: the mirror answering podman runs on this test's event loop.
            assert await asyncio.to_thread(podman.pull, reference) == digest, reference
    finally:
        podman.close()

    assert_only_the_mirror_called(two_upstreams.hub, hub_mark)
    assert_only_the_mirror_called(two_upstreams.ghcr, ghcr_mark)


async def test_ns_and_prefix_routes_keep_upstreams_apart(
    make_mirror: MirrorFactory, two_upstreams: TwoUpstreams
) -> None:
    mirror = await make_mirror(two_upstreams.upstreams(), default_upstream="docker.io")
    routes = {
        f"/v2/{REPO}/manifests/{TAG}": two_upstreams.hub_team,
        f"/v2/{REPO}/manifests/{TAG}?ns=docker.io": two_upstreams.hub_team,
        f"/v2/{REPO}/manifests/{TAG}?ns=registry-1.docker.io": two_upstreams.hub_team,
        f"/v2/docker.io/{REPO}/manifests/{TAG}": two_upstreams.hub_team,
        f"/v2/{REPO}/manifests/{TAG}?ns=ghcr.io": two_upstreams.ghcr_team,
        f"/v2/ghcr.io/{REPO}/manifests/{TAG}": two_upstreams.ghcr_team,
        f"/v2/ghcr.io/{REPO}/manifests/{TAG}?ns=ghcr.io": two_upstreams.ghcr_team,
        f"/v2/app/manifests/{TAG}": two_upstreams.hub_library,
        f"/v2/docker.io/app/manifests/{TAG}": two_upstreams.hub_library,
    }
    async with aiohttp.ClientSession() as http:
        for _ in ("cold", "warm"):
            for path, image in routes.items():
                async with http.get(mirror.url + path, headers={"Accept": "*/*"}) as response:
                    assert response.status == 200, path
                    assert await response.read() == image.manifest, path
                    namespace = path.partition("?ns=")[2]
                    assert response.headers.get("OCI-Namespace", "") == namespace

        async with http.get(f"{mirror.url}/v2/ghcr.io/{REPO}/tags/list") as response:
            assert await response.json() == {"name": f"ghcr.io/{REPO}", "tags": [TAG]}
        async with http.get(f"{mirror.url}/v2/_catalog") as response:
            repositories = (await response.json())["repositories"]
        assert repositories == sorted(["library/app", REPO, f"ghcr.io/{REPO}"])


def test_podman_falls_back_to_a_plain_http_upstream(
    two_upstreams: TwoUpstreams, tmp_path: Path
) -> None:
    """The mirror does not answer, so podman pulls from the upstream named as fallback.
    Those upstreams speak plain HTTP, which podman uses only where `insecure = true`."""
    config = tmp_path / "mirror.yaml"
    config.write_text(
        yaml.safe_dump({"default_upstream": "docker.io", "upstreams": two_upstreams.upstreams()}),
        encoding="utf-8",
    )
    down = f"http://127.0.0.1:{free_port()}"  # the mirror is down
    result = mirror_cli(
        "client-config",
        "podman",
        "--config",
        config,
        "--mirror-url",
        down,
        "--fallback",
        "upstream",
        "--output",
        tmp_path / "podman-config",
    )
    assert result.returncode == 0, result.stderr
    podman = Podman(tmp_path / "podman", tmp_path / "podman-config" / "registry-mirror.conf")
    ghcr_mark = two_upstreams.ghcr.mark()
    try:
        assert podman.pull(f"ghcr.io/{REPO}:{TAG}") == two_upstreams.ghcr_team.digest
    finally:
        podman.close()
    # podman itself fetched the manifest from the upstream, not through any mirror.
    entries = [e for e in two_upstreams.ghcr.access_log(since=ghcr_mark) if e.route != "/v2/"]
    assert entries
    assert USER_AGENT not in {entry.user_agent for entry in entries}
