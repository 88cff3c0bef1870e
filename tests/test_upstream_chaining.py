"""Upstream chaining: `repository_prefix` maps client-facing names onto the upstream's.

A Harbor proxy project or an ECR pull-through rule keeps Docker Hub's images under a
path of its own (`dockerhub-proxy/library/alpine`). Here the upstreams hold the test
images under `test/<kind>` and the mirror is configured with `repository_prefix: test`:
clients pull `<kind>`, the upstream is asked for `test/<kind>`, token scopes name the
upstream's repository, and allow/deny rules the client's.
"""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest
from conftest import TAG, MirrorFactory, Upstream
from support.registry import Registry
from support.skopeo import SkopeoError, skopeo_copy_async
from test_pull_through import tree_bytes

pytestmark = pytest.mark.slow  # starts registries, servers or processes


async def pull(host: str, repository: str, dest: Path) -> dict[str, bytes]:
    await skopeo_copy_async(f"docker://{host}/{repository}:{TAG}", f"dir:{dest}")
    return tree_bytes(dest)


async def test_a_real_proxy_registry_as_middle_tier_is_reached_under_its_prefix(
    make_mirror: MirrorFactory, upstream: Upstream, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    with Registry(tmp_path / "middle", proxy_remote=upstream.url) as middle:
        mirror = await make_mirror(
            {"chained": {"url": middle.url, "repository_prefix": "test", "allow": ["oci*"]}}
        )
        direct = await pull(upstream.registry.host, Upstream.repo("oci-index"), tmp_path / "d")

        through = await pull(mirror.host, "oci-index", tmp_path / "through")

        assert through == direct
        # The middle tier was asked under the upstream's name, never the client's.
        asked = [entry.path for entry in middle.access_log()]
        assert any(path.startswith("/v2/test/oci-index/manifests/") for path in asked)
        assert not any(path.startswith("/v2/oci-index/") for path in asked)
        # Access rules match the client-facing name: `docker` is outside `oci*` even
        # though the upstream's `test/docker` exists.
        with pytest.raises(SkopeoError):
            await pull(mirror.host, "docker", tmp_path / "denied")
        async with http.get(f"{mirror.url}/v2/test/oci/manifests/{TAG}") as response:
            assert response.status in (403, 404)


async def test_token_scopes_name_the_upstream_repository(
    make_mirror: MirrorFactory, token_upstream: Upstream, tmp_path: Path
) -> None:
    assert token_upstream.token_server is not None
    mirror = await make_mirror({"hub": {"url": token_upstream.url, "repository_prefix": "test"}})
    before = len(token_upstream.token_server.requests)
    direct = await pull(token_upstream.registry.host, Upstream.repo("docker"), tmp_path / "d")
    direct_requests = len(token_upstream.token_server.requests)

    through = await pull(mirror.host, "docker", tmp_path / "through")

    assert through == direct
    assert direct_requests > before
    asked = token_upstream.token_server.requests[direct_requests:]
    assert asked, "the mirror never asked the token server"
    assert {scope for request in asked for scope in request.scopes} == {
        "repository:test/docker:pull"
    }
