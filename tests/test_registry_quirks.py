"""Quirks of real registries (Docker Hub and others), reproduced by fake upstreams.

registry.k8s.io redirects every request to another host and path that challenges
afresh; token servers that omit `expires_in`; Docker Hub's rate-limit headers. Upstream
credentials must never reach a redirect target or its token server.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import MirrorFactory
from support.fake_upstream import FakeUpstream, digest_of, serve

from mirror.app import UPSTREAMS
from mirror.oci import OCI_MANIFEST

pytestmark = pytest.mark.slow  # starts registries, servers or processes

ServerFactory = Callable[..., Awaitable[TestServer]]

LAYER = b"layer bytes " * 5000
LAYER_DIGEST = digest_of(LAYER)
MANIFEST = json.dumps(
    {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": LAYER_DIGEST,
            "size": len(LAYER),
        },
        "layers": [],
    },
    indent=3,
).encode()
MANIFEST_DIGEST = digest_of(MANIFEST)
TOKEN = "artifact-registry-token"
BASIC = "Basic " + base64.b64encode(b"bot:s3cret").decode()


async def test_manifests_and_blobs_redirected_to_another_host_with_its_own_challenge(
    aiohttp_server: ServerFactory, make_mirror: MirrorFactory, http: aiohttp.ClientSession
) -> None:
    # B plays Artifact Registry: another host, another path, its own Bearer challenge and a
    # token server that sends no expires_in.
    artifact = FakeUpstream()
    artifact_server = await aiohttp_server(artifact.app(), host="127.0.0.1")
    artifact_url = str(artifact_server.make_url("")).rstrip("/")
    seen: list[tuple[str, str | None]] = []
    scope = "repository:k8s-artifacts-prod/images/pause:pull"

    def guarded(
        content: bytes, content_type: str
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handler(request: web.Request) -> web.StreamResponse:
            seen.append((request.path, request.headers.get("Authorization")))
            if request.headers.get("Authorization") != f"Bearer {TOKEN}":
                challenge = f'Bearer realm="{artifact_url}/token",service="ar",scope="{scope}"'
                return web.Response(status=401, headers={"WWW-Authenticate": challenge})
            return await serve(content, content_type=content_type)(request)

        return handler

    async def token(request: web.Request) -> web.StreamResponse:
        seen.append(
            (f"{request.path}?{request.query_string}", request.headers.get("Authorization"))
        )
        return web.json_response({"token": TOKEN})  # no expires_in: assume 60 s

    target = "/v2/k8s-artifacts-prod/images/pause"
    for method in ("HEAD", "GET"):
        artifact.on(method, f"{target}/manifests/3.9", guarded(MANIFEST, OCI_MANIFEST))
        artifact.on(
            method, f"{target}/manifests/{MANIFEST_DIGEST}", guarded(MANIFEST, OCI_MANIFEST)
        )
        artifact.on(
            method, f"{target}/blobs/{LAYER_DIGEST}", guarded(LAYER, "application/octet-stream")
        )
    artifact.on("GET", "/token", token)

    # A plays registry.k8s.io: it wants our credentials, then redirects everything.
    k8s = FakeUpstream()

    async def redirect(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != BASIC:
            return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="k8s"'})
        tail = request.path.removeprefix("/v2/pause")
        return web.Response(status=307, headers={"Location": f"{artifact_url}{target}{tail}"})

    for method in ("HEAD", "GET"):
        for path in ("/manifests/3.9", f"/manifests/{MANIFEST_DIGEST}", f"/blobs/{LAYER_DIGEST}"):
            k8s.on(method, f"/v2/pause{path}", redirect)
    k8s_server = await aiohttp_server(k8s.app(), host="127.0.0.1")

    mirror = await make_mirror(
        {
            "registry.k8s.io": {
                "url": str(k8s_server.make_url("")).rstrip("/"),
                "username": "bot",
                "password": "s3cret",
            }
        }
    )
    async with http.get(f"{mirror.url}/v2/pause/manifests/3.9") as response:
        assert response.status == 200
        assert await response.read() == MANIFEST
        assert response.headers["Docker-Content-Digest"] == MANIFEST_DIGEST
    async with http.get(f"{mirror.url}/v2/pause/blobs/{LAYER_DIGEST}") as response:
        assert response.status == 200
        assert await response.read() == LAYER

    # The redirect target and its token server never saw the upstream's credentials.
    assert seen
    assert all(auth in (None, f"Bearer {TOKEN}") for _, auth in seen), seen
    token_requests = [path for path, _ in seen if path.startswith("/token")]
    assert token_requests
    assert all(f"scope={scope}" in p for p in token_requests), token_requests
    # The token was cached (no expires_in means 60 s): one token request did for all.
    assert len(token_requests) == 1


async def test_docker_hub_rate_limit_headers_are_recorded(
    aiohttp_server: ServerFactory, make_mirror: MirrorFactory, http: aiohttp.ClientSession
) -> None:
    hub = FakeUpstream()
    limits = {"RateLimit-Limit": "100;w=21600", "RateLimit-Remaining": "7;w=21600"}

    async def manifest(request: web.Request) -> web.StreamResponse:
        response = await serve(MANIFEST, content_type=OCI_MANIFEST)(request)
        response.headers.update(limits)
        return response

    for method in ("HEAD", "GET"):
        hub.on(method, "/v2/library/alpine/manifests/3.20", manifest)
        hub.on(method, f"/v2/library/alpine/manifests/{MANIFEST_DIGEST}", manifest)
    server = await aiohttp_server(hub.app(), host="127.0.0.1")
    mirror = await make_mirror(
        {"docker.io": {"url": str(server.make_url("")).rstrip("/"), "docker_hub": True}}
    )
    async with http.get(f"{mirror.url}/v2/alpine/manifests/3.20") as response:
        assert response.status == 200
    rate_limit = mirror.server.app[UPSTREAMS]["docker.io"].rate_limit
    assert rate_limit is not None
    assert (rate_limit.limit, rate_limit.remaining, rate_limit.window_seconds) == (100, 7, 21600)


async def test_a_refused_token_is_replaced_by_a_fresh_one(
    aiohttp_server: ServerFactory, make_mirror: MirrorFactory, http: aiohttp.ClientSession
) -> None:
    registry = FakeUpstream()
    server = await aiohttp_server(registry.app(), host="127.0.0.1")
    url = str(server.make_url("")).rstrip("/")
    issued = iter(["revoked-token", "good-token"])

    async def token(request: web.Request) -> web.StreamResponse:
        return web.json_response({"token": next(issued), "expires_in": 300})

    async def manifest(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != "Bearer good-token":
            challenge = f'Bearer realm="{url}/token",service="fake"'
            return web.Response(status=401, headers={"WWW-Authenticate": challenge})
        return await serve(MANIFEST, content_type=OCI_MANIFEST)(request)

    registry.on("GET", "/token", token)
    for method in ("HEAD", "GET"):
        registry.on(method, "/v2/team/app/manifests/v1", manifest)
        registry.on(method, f"/v2/team/app/manifests/{MANIFEST_DIGEST}", manifest)
    mirror = await make_mirror({"fake": {"url": url}})
    async with http.get(f"{mirror.url}/v2/team/app/manifests/v1") as response:
        assert response.status == 200
        assert await response.read() == MANIFEST
    assert registry.count("GET", "/token") == 2  # the cached, refused one was replaced
