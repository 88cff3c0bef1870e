"""Hostile and malformed requests: always a 4xx OCI error, never a 500, never a stray file.

Nothing here may make the mirror touch a path outside storage.root or dial a host that
is not configured.
"""

from __future__ import annotations

import socket

import aiohttp
import pytest
from conftest import Mirror, MirrorFactory, Upstream
from support.net import free_port

GOOD_DIGEST = "sha256:" + "a" * 64
BAD_PATHS = [
    "/v2/../../etc/passwd",
    "/v2/%2e%2e/%2e%2e/etc/passwd/manifests/latest",
    "/v2/test/oci/../../../etc/manifests/latest",
    "/v2/UPPER/case/manifests/latest",
    "/v2/a" * 10 + "/manifests/latest",
    "/v2/" + "x" * 300 + "/manifests/latest",
    "/v2/test/oci/manifests/" + "t" * 129,
    "/v2/test/oci/manifests/-leading-dash",
    "/v2/test/oci/manifests/sha256:../../../../etc/passwd",
    "/v2/test/oci/manifests/sha256:" + "A" * 64,
    "/v2/test/oci/manifests/md5:d41d8cd98f00b204e9800998ecf8427e",
    "/v2/test/oci/blobs/sha256:" + "a" * 63,
    "/v2/test/oci/blobs/sha512:" + "a" * 64,
    "/v2/test/oci/blobs/sha256:" + "g" * 64,
    "/v2/test/oci/blobs/..%2F..%2Fetc%2Fpasswd",
    "/v2/test/oci/blobs/",
    "/v2/test/oci/referrers/not-a-digest",
    "/v2/test/oci/tags/list?n=-1",
    "/v2/test/oci/tags/list?n=abc",
    "/v2/_catalog?n=1e9",
    "/v2//manifests/latest",
    "/v2/test/oci/manifests/latest?ns=evil.example.com",
    "/v2/evil.example.com/library/x/manifests/latest",
    "/v2/test/oci/unknown-endpoint",
    "/v2/test/oci/manifests/latest/extra",
]


@pytest.mark.parametrize("path", BAD_PATHS)
async def test_bad_paths_get_oci_4xx(
    path: str, mirror: Mirror, http: aiohttp.ClientSession
) -> None:
    async with http.get(mirror.url + path) as response:
        assert 400 <= response.status < 500, path
        body = await response.json()
        assert body["errors"][0]["code"] in {
            "NAME_INVALID",
            "NAME_UNKNOWN",
            "MANIFEST_UNKNOWN",
            "BLOB_UNKNOWN",
            "DIGEST_INVALID",
            "SIZE_INVALID",
        }
    # Nothing appeared outside the mirror's own storage directories.
    assert sorted(p.name for p in mirror.root.iterdir()) == [
        "blobs",
        "layout-version",
        "meta",
        "tmp",
    ]
    assert mirror.blob_files() == []


@pytest.mark.parametrize(
    "header",
    [
        "bytes=",
        "bytes=-",
        "bytes=abc-def",
        "bytes=10-5",
        "bytes=99999999999-",
        "chars=0-1",
        "bytes=--1",
    ],
)
async def test_bad_ranges(
    header: str, mirror: Mirror, upstream_blob: tuple[str, str], http: aiohttp.ClientSession
) -> None:
    repo, digest = upstream_blob
    async with http.get(
        f"{mirror.url}/v2/{repo}/blobs/{digest}", headers={"Range": header}
    ) as response:
        assert response.status == 416, header
        assert (await response.json())["errors"][0]["code"] == "RANGE_INVALID"


@pytest.fixture
def upstream_blob(upstream: Upstream) -> tuple[str, str]:
    digest = next(iter(upstream.images["oci"].blobs))
    return Upstream.repo("oci"), digest


async def test_unconfigured_namespaces_open_no_connection(
    make_mirror: MirrorFactory, http: aiohttp.ClientSession
) -> None:
    # A listening socket that must never see a connection: the mirror's only upstream
    # is elsewhere, and requests name this one through ns= and path prefixes.
    with socket.socket() as trap:
        trap.bind(("127.0.0.1", 0))
        trap.listen()
        trap.setblocking(False)
        trap_host = f"127.0.0.1:{trap.getsockname()[1]}"
        mirror = await make_mirror({"only": {"url": f"http://127.0.0.1:{free_port()}"}})
        for path in (
            f"/v2/library/alpine/manifests/latest?ns={trap_host}",
            f"/v2/{trap_host}/library/alpine/manifests/latest",
            "/v2/library/alpine/manifests/latest?ns=localhost",
            f"/v2/library/alpine/blobs/{GOOD_DIGEST}?ns={trap_host}",
        ):
            async with http.get(mirror.url + path) as response:
                assert 400 <= response.status < 500, path
        with pytest.raises(BlockingIOError):
            trap.accept()
