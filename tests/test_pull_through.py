"""skopeo pulling every test image through the mirror, against real registries.

A pull through the mirror must give the same manifests, digests and bytes as a direct
pull, with and without token auth upstream; a second pull must not touch the upstream's
blobs, nor its manifests within the tag TTL.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import TAG, Mirror, MirrorFactory, Upstream
from support.skopeo import skopeo_copy_async

pytestmark = pytest.mark.slow  # starts registries, servers or processes

KINDS = ["oci", "oci-index", "docker", "docker-list"]


def tree_bytes(directory: Path) -> dict[str, bytes]:
    """Every file skopeo's dir: transport wrote, by name."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


async def pull_dir(host: str, kind: str, dest: Path, ref: str = TAG) -> dict[str, bytes]:
    separator = "@" if ref.startswith("sha256:") else ":"
    await skopeo_copy_async(f"docker://{host}/{Upstream.repo(kind)}{separator}{ref}", f"dir:{dest}")
    return tree_bytes(dest)


@pytest.mark.parametrize("kind", KINDS)
async def test_copy_matches_direct_and_second_pull_is_local(
    kind: str, mirror: Mirror, upstream: Upstream, tmp_path: Path
) -> None:
    direct = await pull_dir(upstream.registry.host, kind, tmp_path / "direct")
    image = upstream.images[kind]
    assert direct["manifest.json"] == image.manifest

    cold = await pull_dir(mirror.host, kind, tmp_path / "cold")
    assert cold == direct

    mark = upstream.registry.mark()
    warm = await pull_dir(mirror.host, kind, tmp_path / "warm")
    assert warm == direct
    assert upstream.registry.requests(path_contains="/blobs/", since=mark) == []
    assert upstream.registry.requests(path_contains="/manifests/", since=mark) == []

    # Every blob the image references is on the mirror's disk, under its digest.
    on_disk = {p.name for p in mirror.blob_files()}
    for digest in image.all_blobs():
        assert digest.removeprefix("sha256:") in on_disk
    assert mirror.temp_files() == []


@pytest.mark.parametrize("kind", KINDS)
async def test_copy_through_token_auth_upstream(
    kind: str, make_mirror: MirrorFactory, token_upstream: Upstream, tmp_path: Path
) -> None:
    assert token_upstream.token_server is not None
    mirror = await make_mirror({"hub": {"url": token_upstream.url, "tag_ttl": "1h"}})
    direct_dir = tmp_path / "direct"
    await skopeo_copy_async(
        f"docker://{token_upstream.registry.host}/{Upstream.repo(kind)}:{TAG}", f"dir:{direct_dir}"
    )
    before = len(token_upstream.token_server.requests)
    through = await pull_dir(mirror.host, kind, tmp_path / "through")
    assert through == tree_bytes(direct_dir)
    # The mirror answered the challenge itself, anonymously, for the pull scope.
    asked = token_upstream.token_server.requests[before:]
    assert asked, "the mirror never asked the token server"
    assert all(request.username is None for request in asked)
    assert {scope for request in asked for scope in request.scopes} == {
        f"repository:{Upstream.repo(kind)}:pull"
    }
    # Tokens are cached: far fewer token requests than upstream requests.
    assert len(asked) <= 2


async def test_pull_by_digest(mirror: Mirror, upstream: Upstream, tmp_path: Path) -> None:
    image = upstream.images["oci"]
    through = await pull_dir(mirror.host, "oci", tmp_path / "by-digest", ref=image.digest)
    assert through["manifest.json"] == image.manifest
