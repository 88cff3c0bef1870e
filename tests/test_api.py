"""The read API as the OCI distribution spec and real clients expect it, against a real
upstream registry.

Headers and bodies of manifests and blobs, HEAD versus GET, ranges, Accept negotiation,
tags lists, referrers, the catalog, read-only methods, and when the upstream is asked.
"""

from __future__ import annotations

import hashlib
import json
import socket
from typing import BinaryIO

import aiohttp
import pytest
from aiohttp import web
from conftest import TAG, Mirror, MirrorFactory, Upstream
from support.images import ALL_MANIFEST_TYPES, oci_image, push

from mirror.api import transport
from mirror.oci import DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_INDEX, OCI_MANIFEST

pytestmark = pytest.mark.slow  # starts registries, servers or processes

API_HEADER = "Docker-Distribution-API-Version"


def repo(kind: str) -> str:
    return Upstream.repo(kind)


async def error_code(response: aiohttp.ClientResponse) -> str:
    body = await response.json()
    return str(body["errors"][0]["code"])


async def test_base_endpoint(mirror: Mirror, http: aiohttp.ClientSession) -> None:
    for path in ("/v2/", "/v2"):
        async with http.get(mirror.url + path) as response:
            assert response.status == 200
            assert response.headers[API_HEADER] == "registry/2.0"


@pytest.mark.parametrize("kind", ["oci", "oci-index", "docker", "docker-list"])
@pytest.mark.parametrize("by", ["tag", "digest"])
async def test_manifest_get_and_head(
    kind: str, by: str, mirror: Mirror, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    image = upstream.images[kind]
    reference = TAG if by == "tag" else image.digest
    url = f"{mirror.url}/v2/{repo(kind)}/manifests/{reference}"
    headers = {"Accept": ", ".join(ALL_MANIFEST_TYPES)}
    async with http.get(url, headers=headers) as response:
        assert response.status == 200
        body = await response.read()
        got = dict(response.headers)
    assert body == image.manifest
    assert got["Content-Type"] == image.media_type
    assert (
        got["Docker-Content-Digest"] == image.digest == "sha256:" + hashlib.sha256(body).hexdigest()
    )
    assert got["Content-Length"] == str(len(body))
    assert got[API_HEADER] == "registry/2.0"
    assert "Content-Encoding" not in got

    async with http.head(url, headers=headers) as response:
        assert response.status == 200
        assert await response.read() == b""
        for name in ("Content-Type", "Docker-Content-Digest", "Content-Length", API_HEADER):
            assert response.headers[name] == got[name]


async def test_blob_get_and_head(
    mirror: Mirror, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    for digest, data in upstream.images["oci"].blobs.items():
        url = f"{mirror.url}/v2/{repo('oci')}/blobs/{digest}"
        async with http.head(url) as response:
            assert response.status == 200
            assert response.headers["Content-Length"] == str(len(data))
            assert response.headers["Docker-Content-Digest"] == digest
            assert await response.read() == b""
        for _ in ("cold", "warm"):
            async with http.get(url, headers={"Accept-Encoding": "gzip"}) as response:
                assert response.status == 200
                assert response.headers["Content-Length"] == str(len(data))
                assert response.headers["Docker-Content-Digest"] == digest
                assert "Content-Encoding" not in response.headers
                assert await response.read() == data
        # A warm HEAD gives the same answer from disk.
        async with http.head(url) as response:
            assert response.headers["Content-Length"] == str(len(data))
            assert response.headers["X-Cache"] == "HIT"


async def test_unknown_things_are_404_with_the_right_code(
    mirror: Mirror, http: aiohttp.ClientSession
) -> None:
    missing = "sha256:" + hashlib.sha256(b"hello world").hexdigest()
    cases = [
        (f"/v2/{repo('oci')}/manifests/no-such-tag", "MANIFEST_UNKNOWN"),
        (f"/v2/{repo('oci')}/manifests/{missing}", "MANIFEST_UNKNOWN"),
        (f"/v2/{repo('oci')}/manifests/.INVALID_MANIFEST_NAME", "MANIFEST_UNKNOWN"),
        (f"/v2/{repo('oci')}/blobs/{missing}", "BLOB_UNKNOWN"),
        ("/v2/no/such-repo/tags/list", "NAME_UNKNOWN"),
    ]
    for path, code in cases:
        for method in ("GET", "HEAD"):
            async with http.request(method, mirror.url + path) as response:
                assert response.status == 404, (method, path)
                assert response.headers[API_HEADER] == "registry/2.0"
                if method == "GET":
                    assert await error_code(response) == code, path

    async with http.get(f"{mirror.url}/v2/{repo('oci')}/manifests/sha256:totallywrong") as response:
        assert response.status in (400, 404)
        assert await error_code(response) in {"DIGEST_INVALID", "MANIFEST_UNKNOWN"}


@pytest.mark.parametrize("method", ["PUT", "POST", "PATCH", "DELETE"])
async def test_writes_are_unsupported(
    method: str, mirror: Mirror, http: aiohttp.ClientSession
) -> None:
    for path in (
        f"/v2/{repo('oci')}/manifests/{TAG}",
        f"/v2/{repo('oci')}/blobs/uploads/",
        f"/v2/{repo('oci')}/blobs/sha256:{'a' * 64}",
    ):
        async with http.request(method, mirror.url + path, data=b"x") as response:
            assert response.status == 405
            assert await error_code(response) == "UNSUPPORTED"


# Ranges


@pytest.mark.parametrize("warm", [False, True], ids=["while-fetching", "from-disk"])
async def test_ranges(
    warm: bool, mirror: Mirror, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    digest, data = next((d, b) for d, b in upstream.images["oci"].blobs.items() if len(b) > 100_000)
    size = len(data)
    url = f"{mirror.url}/v2/{repo('oci')}/blobs/{digest}"
    if warm:
        async with http.get(url) as response:
            assert await response.read() == data

    expectations = {
        "bytes=500-1499": (500, 1500),
        "bytes=500-": (500, size),
        "bytes=-500": (size - 500, size),
        f"bytes={size - 48}-{size + 5000}": (size - 48, size),
    }
    for header, (start, end) in expectations.items():
        async with http.get(url, headers={"Range": header}) as response:
            assert response.status == 206, header
            assert response.headers["Content-Length"] == str(end - start)
            assert response.headers["Content-Range"] == f"bytes {start}-{end - 1}/{size}"
            assert await response.read() == data[start:end]

    for header in (f"bytes={size}-{size + 10}", "bytes=500-0", "bytes=abc", "items=1-2"):
        async with http.get(url, headers={"Range": header}) as response:
            assert response.status == 416, header
            assert await error_code(response) == "RANGE_INVALID"

    # Several ranges at once: the whole blob, which containers/image splits itself.
    async with http.get(url, headers={"Range": "bytes=0-1,5-9"}) as response:
        assert response.status == 200
        assert await response.read() == data


# Accept negotiation


async def get_manifest(
    http: aiohttp.ClientSession, mirror: Mirror, kind: str, accept: list[str] | None
) -> aiohttp.ClientResponse:
    headers = [("Accept", value) for value in accept] if accept is not None else []
    response = await http.get(f"{mirror.url}/v2/{repo(kind)}/manifests/{TAG}", headers=headers)
    await response.read()
    return response


async def test_accept_negotiation(
    mirror: Mirror, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    images = upstream.images
    # No Accept, */*, or the stored type among several: the stored manifest.
    for accept in (
        None,
        ["*/*"],
        [f"{DOCKER_MANIFEST}, {OCI_MANIFEST}"],
        [DOCKER_MANIFEST, OCI_MANIFEST],
    ):
        response = await get_manifest(http, mirror, "oci", accept)
        assert response.status == 200, accept
        assert response.headers["Docker-Content-Digest"] == images["oci"].digest

    # OCI content to a client that lists only Docker types: 404 MANIFEST_UNKNOWN.
    for kind in ("oci", "oci-index"):
        response = await get_manifest(http, mirror, kind, [DOCKER_MANIFEST, DOCKER_MANIFEST_LIST])
        assert response.status == 404, kind

    # Docker schema 2 is returned even when only OCI types are listed.
    response = await get_manifest(http, mirror, "docker", [OCI_MANIFEST])
    assert response.status == 200
    assert response.headers["Docker-Content-Digest"] == images["docker"].digest

    # A manifest list by tag to a client without list support: its linux/amd64 entry.
    response = await get_manifest(http, mirror, "docker-list", [DOCKER_MANIFEST])
    assert response.status == 200
    amd64 = images["docker-list"].children[0]
    assert amd64.platform == ("linux", "amd64")
    assert response.headers["Docker-Content-Digest"] == amd64.digest
    assert response.headers["Content-Type"] == DOCKER_MANIFEST

    # And the index itself to one that accepts it.
    response = await get_manifest(http, mirror, "oci-index", [OCI_INDEX])
    assert response.status == 200
    assert response.headers["Content-Type"] == OCI_INDEX


# When the upstream is asked


async def test_tag_ttl_and_revalidation(
    make_mirror: MirrorFactory, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    image = upstream.images["oci"]
    manifests = f"/v2/{repo('oci')}/manifests/"
    fresh = await make_mirror({"local": {"url": upstream.url, "tag_ttl": "1h"}})
    expiring = await make_mirror({"local": {"url": upstream.url, "tag_ttl": "0s"}})
    for mirror in (fresh, expiring):
        async with http.get(f"{mirror.url}{manifests}{TAG}") as response:
            assert response.status == 200

    registry = upstream.registry
    mark = registry.mark()
    async with http.get(f"{fresh.url}{manifests}{TAG}") as response:
        assert response.headers["X-Cache"] == "HIT"
    async with http.get(f"{fresh.url}{manifests}{image.digest}") as response:
        assert response.headers["X-Cache"] == "HIT"
    async with http.get(f"{expiring.url}{manifests}{image.digest}") as response:
        assert response.status == 200
    assert registry.requests(path_contains=manifests, since=mark) == []

    # Past the TTL: one HEAD to revalidate, and no GET since the digest is cached.
    async with http.get(f"{expiring.url}{manifests}{TAG}") as response:
        assert response.status == 200
        assert await response.read() == image.manifest
    entries = registry.wait_for_access("HEAD", f"{manifests}{TAG}", since=mark)
    assert [(e.method, e.route) for e in entries] == [("HEAD", f"{manifests}{TAG}")]
    assert registry.requests(method="GET", path_contains=manifests, since=mark) == []


async def test_upstream_manifest_requests_ask_for_every_type(
    mirror: Mirror, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    # distribution answers an Accept without OCI types with a 404 for OCI content, so a
    # successful pull of an OCI index with a Docker-only client Accept proves the mirror
    # asked with all types itself.
    response = await get_manifest(
        http, mirror, "oci-index", [DOCKER_MANIFEST_LIST, DOCKER_MANIFEST]
    )
    assert response.status == 404
    response = await get_manifest(http, mirror, "oci-index", [OCI_INDEX])
    assert response.status == 200


# Tags lists, referrers, catalog


async def test_tags_list_pagination_and_links(
    mirror: Mirror, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    name = "test/many-tags"
    image = oci_image([1024], seed=999)
    tags = sorted(f"t{i:02d}" for i in range(7))
    for tag in tags:
        push(upstream.url, name, image, tag)
    base = f"{mirror.url}/v2/{name}/tags/list"

    async with http.get(base) as response:
        assert response.status == 200
        assert await response.json() == {"name": name, "tags": tags}

    async with http.get(base, params={"n": "0"}) as response:
        assert await response.json() == {"name": name, "tags": []}
        assert "Link" not in response.headers

    async with http.get(base, params={"n": "3"}) as response:
        assert (await response.json())["tags"] == tags[:3]
        link = response.headers["Link"]
    assert link.startswith(f"</v2/{name}/tags/list?")
    assert 'rel="next"' in link
    next_path = link.split(";")[0].strip("<>")
    async with http.get(mirror.url + next_path) as response:
        assert (await response.json())["tags"] == tags[3:6]

    async with http.get(base, params={"last": tags[4]}) as response:
        assert (await response.json())["tags"] == tags[5:]

    async with http.get(base, params={"n": "x"}) as response:
        assert response.status == 400

    # Links keep the client's way of naming the upstream: ns, or the path prefix.
    async with http.get(base, params={"n": "3", "ns": "local"}) as response:
        assert response.headers["OCI-Namespace"] == "local"
        link = response.headers["Link"]
    assert link.startswith(f"</v2/{name}/tags/list?")
    assert "ns=local" in link
    async with http.get(f"{mirror.url}/v2/local/{name}/tags/list", params={"n": "3"}) as response:
        assert (await response.json()) == {"name": f"local/{name}", "tags": tags[:3]}
        link = response.headers["Link"]
    assert link.startswith(f"</v2/local/{name}/tags/list?")
    async with http.get(mirror.url + link.split(";")[0].strip("<>")) as response:
        assert (await response.json())["tags"] == tags[3:6]


async def test_referrers_pass_through_and_fallback_tag(
    mirror: Mirror, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    digest = upstream.images["oci"].digest
    # distribution 2.8 has no referrers API: its 404 passes through, so clients fall back
    # to the tag schema, which the mirror proxies like any tag.
    async with http.get(f"{mirror.url}/v2/{repo('oci')}/referrers/{digest}") as response:
        assert response.status == 404
        assert await error_code(response) == "MANIFEST_UNKNOWN"
    fallback_tag = digest.replace(":", "-")
    async with http.get(f"{mirror.url}/v2/{repo('oci')}/manifests/{fallback_tag}") as response:
        assert response.status == 404
        assert await error_code(response) == "MANIFEST_UNKNOWN"
    async with http.get(f"{mirror.url}/v2/{repo('oci')}/referrers/sha256:nothex") as response:
        assert response.status == 400


async def test_catalog_lists_repositories_held_locally(
    mirror: Mirror, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{mirror.url}/v2/_catalog") as response:
        assert await response.json() == {"repositories": []}
    for kind in ("oci", "docker"):
        async with http.get(f"{mirror.url}/v2/{repo(kind)}/manifests/{TAG}") as response:
            assert response.status == 200
    async with http.get(f"{mirror.url}/v2/_catalog") as response:
        assert await response.json() == {"repositories": [repo("docker"), repo("oci")]}
    async with http.get(f"{mirror.url}/v2/_catalog", params={"n": "1"}) as response:
        assert await response.json() == {"repositories": [repo("docker")]}
        assert "last=test%2Fdocker" in response.headers["Link"]


async def test_hub_one_component_names_map_to_library(
    make_mirror: MirrorFactory, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    push(upstream.url, "library/busybox", upstream.images["oci"], TAG)
    mirror = await make_mirror({"docker.io": {"url": upstream.url, "docker_hub": True}})
    async with http.get(f"{mirror.url}/v2/busybox/manifests/{TAG}") as response:
        assert response.status == 200
        assert json.loads(await response.read())["mediaType"] == OCI_MANIFEST


async def test_head_by_tag_of_an_uncached_manifest_costs_no_upstream_get(
    mirror: Mirror, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    # Version checkers HEAD tags all day; Docker Hub counts GETs, so the mirror answers a
    # HEAD for a digest it does not hold from the upstream's HEAD alone.
    image = upstream.images["docker"]
    registry = upstream.registry
    mark = registry.mark()
    url = f"{mirror.url}/v2/{repo('docker')}/manifests/{TAG}"
    async with http.head(url) as response:
        assert response.status == 200
        assert response.headers["Docker-Content-Digest"] == image.digest
        assert response.headers["Content-Length"] == str(len(image.manifest))
        assert response.headers["Content-Type"] == DOCKER_MANIFEST
    registry.wait_for_access("HEAD", f"/manifests/{TAG}", since=mark)
    assert registry.requests(method="GET", path_contains="/manifests/", since=mark) == []


async def test_a_docker_pull_of_a_cold_tag_records_the_tag(
    mirror: Mirror, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    # Docker resolves a tag with HEAD, then GETs the manifest by digest. The next pull
    # within tag_ttl must be answered without asking the upstream anything.
    image = upstream.images["docker"]
    registry = upstream.registry
    tag_url = f"{mirror.url}/v2/{repo('docker')}/manifests/{TAG}"
    digest_url = f"{mirror.url}/v2/{repo('docker')}/manifests/{image.digest}"
    caches = {}
    mark = 0
    for pull in ("cold", "warm"):
        mark = registry.mark()
        async with http.head(tag_url) as response:
            assert response.headers["Docker-Content-Digest"] == image.digest
            caches[pull] = response.headers["X-Cache"]
        async with http.get(digest_url) as response:
            assert await response.read() == image.manifest
    assert caches == {"cold": "MISS", "warm": "HIT"}
    assert registry.requests(path_contains="/manifests/", since=mark) == []


@pytest.mark.parametrize(
    ("setting", "local_sent", "remote_sent"),
    [("all", True, True), ("remote", False, True), ("off", False, False)],
)
async def test_sendfile_goes_to_the_peers_the_setting_names(
    make_mirror: MirrorFactory,
    upstream: Upstream,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
    setting: str,
    local_sent: bool,
    remote_sent: bool,
) -> None:
    # Every test client is on loopback; "remote" ones are made by telling the mirror so.
    mirror = await make_mirror({"local": {"url": upstream.url}}, server={"blob_sendfile": setting})
    by_sendfile: list[int] = []
    send_buffers: set[int] = set()
    real_sendfile = transport._sendfile

    async def counting(request: web.Request, file: BinaryIO, offset: int, count: int) -> None:
        by_sendfile.append(count)
        await real_sendfile(request, file, offset, count)
        if transport.peer_is_local(request):
            assert request.transport is not None
            sock = request.transport.get_extra_info("socket")
            send_buffers.add(sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF))

    monkeypatch.setattr(transport, "_sendfile", counting)
    digest, data = max(upstream.images["oci"].blobs.items(), key=lambda item: len(item[1]))
    url = f"{mirror.url}/v2/{repo('oci')}/blobs/{digest}"
    for remote, expected in ((False, local_sent), (True, remote_sent)):
        if remote:
            monkeypatch.setattr(transport, "peer_is_local", lambda request: False)
        for _ in ("cold or warm", "warm"):
            by_sendfile.clear()
            async with http.get(url) as response:
                assert await response.read() == data
            assert sum(by_sendfile) == (len(data) if expected else 0)
        by_sendfile.clear()
        async with http.get(url, headers={"Range": "bytes=1000-"}) as response:
            assert response.status == 206
            assert await response.read() == data[1000:]
        assert by_sendfile == ([len(data) - 1000] if expected else [])
    # A loopback peer's send buffer is fixed (Linux reports twice what was set).
    assert send_buffers == ({2 * transport.LOOPBACK_SNDBUF} if local_sent else set())
