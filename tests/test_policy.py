"""Per-upstream policy against a real upstream: allow/deny globs, tag rules, credentials
from the environment."""

from __future__ import annotations

import aiohttp
import pytest
from conftest import TAG, MirrorFactory, Upstream

from mirror.config import ConfigError, load_config
from mirror.policy import FOREVER, UpstreamPolicy


async def test_allow_and_deny_are_checked_before_any_upstream_request(
    make_mirror: MirrorFactory, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    mirror = await make_mirror(
        {"local": {"url": upstream.url, "allow": ["test/*"], "deny": ["test/docker*"]}}
    )
    mark = upstream.registry.mark()
    for path, status in (
        (f"/v2/test/oci/manifests/{TAG}", 200),
        (f"/v2/test/docker/manifests/{TAG}", 403),
        (f"/v2/test/docker-list/blobs/sha256:{'a' * 64}", 403),
        (f"/v2/other/thing/manifests/{TAG}", 403),
        ("/v2/test/docker/tags/list", 403),
    ):
        async with http.get(mirror.url + path) as response:
            assert response.status == status, path
            if status == 403:
                assert (await response.json())["errors"][0]["code"] == "DENIED"
    asked = {entry.route for entry in upstream.registry.access_log(since=mark)}
    assert all(route.startswith("/v2/test/oci/") for route in asked), asked


async def test_tag_rules_set_ttls_and_immutable_tags(
    make_mirror: MirrorFactory, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    mirror = await make_mirror(
        {
            "local": {
                "url": upstream.url,
                "tag_ttl": "0s",
                "tag_rules": [
                    {"repository": "test/oci", "tag": "v*", "immutable": True},
                    {"repository": "test/docker", "tag_ttl": "1h"},
                ],
            }
        }
    )
    for kind in ("oci", "docker", "oci-index"):
        async with http.get(f"{mirror.url}/v2/test/{kind}/manifests/{TAG}") as response:
            assert response.status == 200
    mark = upstream.registry.mark()
    for kind in ("oci", "docker", "oci-index"):
        async with http.get(f"{mirror.url}/v2/test/{kind}/manifests/{TAG}") as response:
            assert response.status == 200
    # Only the repository without a rule (default TTL 0) was revalidated.
    upstream.registry.wait_for_access("HEAD", f"/v2/test/oci-index/manifests/{TAG}", since=mark)
    asked = [(e.method, e.route) for e in upstream.registry.access_log(since=mark)]
    assert asked == [("HEAD", f"/v2/test/oci-index/manifests/{TAG}")]


def test_policy_matching() -> None:
    config = load_config(
        None,
        upstreams={
            "hub": {
                "url": "https://registry-1.docker.io",
                "tag_ttl": "10m",
                "tag_rules": [
                    {"tag": "sha-*", "immutable": True},
                    {"repository": "library/*", "tag": "latest", "tag_ttl": "1m"},
                ],
                "allow": ["library/*", "myorg/*"],
                "deny": ["myorg/secret*"],
            }
        },
    )
    policy = UpstreamPolicy.from_config(config.upstreams["hub"])
    assert policy.ttl_for("myorg/app", "sha-1234") == FOREVER
    assert policy.ttl_for("library/alpine", "latest") == 60
    assert policy.ttl_for("library/alpine", "3.20") == 600
    assert policy.allows("library/alpine")
    assert policy.allows("myorg/app")
    assert not policy.allows("myorg/secret-app")
    assert not policy.allows("someone/else")


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ({"tag": "x"}, "either tag_ttl or immutable"),
        ({"tag": "x", "tag_ttl": "1m", "immutable": True}, "either tag_ttl or immutable"),
        ({"tag": "x", "ttl": "1m"}, "unknown key"),
    ],
)
def test_bad_tag_rules_name_the_key(rule: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=r"upstreams\.hub\.tag_rules\.0") as caught:
        load_config(None, upstreams={"hub": {"url": "https://h", "tag_rules": [rule]}})
    assert message in str(caught.value)


def test_password_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = {"url": "https://ghcr.io", "username": "bot", "password_env": "GHCR_TOKEN"}
    with pytest.raises(ConfigError, match=r"upstreams\.ghcr\.io.*GHCR_TOKEN is not set"):
        load_config(None, upstreams={"ghcr.io": settings})
    monkeypatch.setenv("GHCR_TOKEN", "from-env")
    config = load_config(None, upstreams={"ghcr.io": settings})
    assert config.upstreams["ghcr.io"].static_credentials() == ("bot", "from-env")
    monkeypatch.setenv("GHCR_TOKEN", "rotated")
    assert config.upstreams["ghcr.io"].static_credentials() == ("bot", "rotated")
    with pytest.raises(ConfigError, match="not"):
        load_config(None, upstreams={"ghcr.io": {**settings, "password": "x"}})
