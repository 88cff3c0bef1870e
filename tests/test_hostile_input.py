"""Hostile and malformed requests: always a 4xx OCI error, never a 500, never a stray file.

Nothing here may make the mirror touch a path outside storage.root or dial a host that
is not configured.
"""

from __future__ import annotations

import base64
import json
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import quote

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import STORAGE_ENTRIES, Mirror, MirrorFactory, Upstream
from support.fake_upstream import Behaviour, FakeUpstream, digest_of, serve
from support.htpasswd import hash_password
from support.net import free_port

from mirror.oci import OCI_INDEX

pytestmark = pytest.mark.slow  # starts registries, servers or processes

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
    assert {p.name for p in mirror.root.iterdir()} <= STORAGE_ENTRIES
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


# Client credentials: whatever the Authorization header holds, 401 and never a 500.


@pytest.mark.parametrize(
    "authorization",
    [
        "Basic é",  # not ASCII: b64decode raises ValueError, not binascii.Error
        "Basic !!!",
        "Basic " + base64.b64encode("é:ü".encode()).decode(),
        "Basic " + base64.b64encode(b"\xff\xfe:\xff").decode(),  # not UTF-8
        "Basic " + base64.b64encode(b"user:" + b"p" * 73).decode(),  # bcrypt's 72-byte limit
        "Basic " + base64.b64encode(b"user:" + "é".encode() * 40).decode(),
        "Basic " + base64.b64encode(b"user:secret\x00more").decode(),
        "Basic " + base64.b64encode(b"nocolon").decode(),
        "Bearer token",
    ],
)
async def test_hostile_credentials_are_401(
    authorization: str,
    make_mirror: MirrorFactory,
    upstream: Upstream,
    tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"user:{hash_password('secret')}\n", encoding="utf-8")
    mirror = await make_mirror(
        {"local": {"url": upstream.url}}, auth={"htpasswd": str(htpasswd), "anonymous": False}
    )
    async with http.get(f"{mirror.url}/v2/", headers={"Authorization": authorization}) as response:
        assert response.status == 401
        assert (await response.json())["errors"][0]["code"] == "UNAUTHORIZED"
        assert response.headers["WWW-Authenticate"].startswith("Basic ")
    good = "Basic " + base64.b64encode(b"user:secret").decode()
    async with http.get(f"{mirror.url}/v2/", headers={"Authorization": good}) as response:
        assert response.status == 200


# Request values echoed into headers, and values from an upstream put into ours.


@pytest.mark.parametrize(
    "query",
    [
        "ns=a%0d%0aX-Injected:%201",
        "ns=%01local",
        "ns=local%7f",
        "ns=%C3%A9.example",
        "ns=" + "a" * 300,
        "ns=",
    ],
)
async def test_ns_that_is_not_a_registry_host_is_name_invalid(
    query: str, mirror: Mirror, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{mirror.url}/v2/test/oci/manifests/v1?{query}") as response:
        assert response.status == 400
        assert (await response.json())["errors"][0]["code"] == "NAME_INVALID"
        assert "X-Injected" not in response.headers
        assert "OCI-Namespace" not in response.headers
    # Where ns is not routed (the base endpoint), it is not echoed either.
    async with http.get(f"{mirror.url}/v2/?{query}") as response:
        assert response.status == 200
        assert "OCI-Namespace" not in response.headers


async def test_a_valid_ns_is_echoed(mirror: Mirror, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{mirror.url}/v2/test/oci/manifests/v1?ns=local") as response:
        assert response.status == 200
        assert response.headers["OCI-Namespace"] == "local"


@pytest.mark.parametrize("n", ["²", "٣", "9" * 5000, "0" * 5000 + "1", "-0", "1e3", " 1"])
async def test_page_size_is_ascii_digits_and_never_500(
    n: str, mirror: Mirror, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{mirror.url}/v2/_catalog", params={"n": n}) as response:
        body = await response.json()
        if n.isascii() and n.isdigit():
            assert response.status == 200
            assert isinstance(body["repositories"], list)
        else:
            assert response.status == 400
            assert body["errors"][0]["code"] == "SIZE_INVALID"


async def test_over_long_last_and_artifact_type_are_refused(
    mirror: Mirror, http: aiohttp.ClientSession
) -> None:
    for path, params in (
        ("/v2/_catalog", {"n": "1", "last": "a" * 5000}),
        ("/v2/test/oci/tags/list", {"n": "1", "last": "\x01" * 1000}),
        (f"/v2/test/oci/referrers/{GOOD_DIGEST}", {"artifactType": "x" * 1000}),
    ):
        async with http.get(mirror.url + path, params=params) as response:
            assert response.status == 400, path
            assert (await response.json())["errors"][0]["code"] == "SIZE_INVALID"
    # Within the bound, control characters in `last` reach the Link only percent-encoded.
    async with http.get(
        f"{mirror.url}/v2/test/oci/tags/list", params={"n": "0", "last": "\r\n"}
    ) as response:
        assert response.status == 200


TAGS_PATH = "/v2/team/app/tags/list"
REFERRERS_PATH = f"/v2/team/app/referrers/{GOOD_DIGEST}"


def _answer(body: object, headers: dict[str, str], status: int = 200) -> Behaviour:
    async def behaviour(request: web.Request) -> web.StreamResponse:
        return web.json_response(body, status=status, headers=headers)

    return behaviour


@pytest.fixture
async def hostile_upstream(
    aiohttp_server: Callable[..., Awaitable[TestServer]], make_mirror: MirrorFactory
) -> tuple[FakeUpstream, Mirror]:
    fake = FakeUpstream()
    server = await aiohttp_server(fake.app(), host="127.0.0.1")
    mirror = await make_mirror(
        {"fake": {"url": str(server.make_url("")).rstrip("/"), "tags_list_ttl": 0}}
    )
    return fake, mirror


@pytest.mark.parametrize(
    ("n", "link"),
    [
        ("²", None),
        ("-1", None),
        ("\x01", None),
        ("9" * 5000, '</v2/team/app/tags/list?n=10000&last=b>; rel="next"'),  # capped
    ],
)
async def test_an_upstream_link_is_rebuilt_from_validated_values(
    n: str,
    link: str | None,
    hostile_upstream: tuple[FakeUpstream, Mirror],
    http: aiohttp.ClientSession,
) -> None:
    fake, mirror = hostile_upstream
    upstream_link = f'</v2/team/app/tags/list?n={quote(n)}&last=b>; rel="next"'
    fake.on(
        "GET", TAGS_PATH, _answer({"name": "team/app", "tags": ["a", "b"]}, {"Link": upstream_link})
    )
    async with http.get(f"{mirror.url}{TAGS_PATH}?n=2") as response:
        assert response.status == 200
        assert (await response.json())["tags"] == ["a", "b"]
        assert response.headers.get("Link") == link


# aiohttp (client and server) refuses control characters in header values, so what a
# hostile upstream can slip through is text outside ASCII.
@pytest.mark.parametrize("value", ["é", "²", "٣", "9" * 5000, "Wed, 21 Oct 2015 07:28:00 GMT"])
async def test_an_upstream_retry_after_is_passed_on_only_as_seconds(
    value: str, hostile_upstream: tuple[FakeUpstream, Mirror], http: aiohttp.ClientSession
) -> None:
    fake, mirror = hostile_upstream
    fake.on("GET", TAGS_PATH, _answer({}, {"Retry-After": value}, status=429))
    async with http.get(f"{mirror.url}{TAGS_PATH}") as response:
        assert response.status == 429
        assert (await response.json())["errors"][0]["code"] == "TOOMANYREQUESTS"
        retry_after = response.headers["Retry-After"]
        assert retry_after.isascii()
        assert retry_after.isdigit()


async def test_an_upstream_filters_header_that_is_not_ascii_is_dropped(
    hostile_upstream: tuple[FakeUpstream, Mirror], http: aiohttp.ClientSession
) -> None:
    fake, mirror = hostile_upstream
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
    fake.on("GET", REFERRERS_PATH, _answer(index, {"OCI-Filters-Applied": "artifactType,é"}))
    async with http.get(f"{mirror.url}{REFERRERS_PATH}") as response:
        assert response.status == 200
        assert (await response.json())["manifests"] == []
        assert "OCI-Filters-Applied" not in response.headers


async def test_a_header_value_that_cannot_be_sent_is_dropped_not_the_connection(
    hostile_upstream: tuple[FakeUpstream, Mirror], http: aiohttp.ClientSession
) -> None:
    # The last guard: a manifest whose upstream media type is not ASCII reaches our
    # Content-Type, which no validation before the prepare hook checks.
    fake, mirror = hostile_upstream
    body = json.dumps({"schemaVersion": 2, "mediaType": "x", "layers": []}).encode()
    for method, reference in (("HEAD", "v1"), ("GET", "v1"), ("GET", digest_of(body))):
        path = f"/v2/team/app/manifests/{reference}"
        fake.on(method, path, serve(body, content_type="application/vnd.évil+json"))
    async with http.get(f"{mirror.url}/v2/team/app/manifests/v1") as response:
        assert response.status == 200
        assert await response.read() == body
        assert response.headers.get("Content-Type", "").isascii()
