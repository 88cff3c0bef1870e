"""The `/v2/` grammar in aiohttp's router, and `If-None-Match`, without a socket.

The routes only split the path (the end of it decides the endpoint, the name takes
the rest, slashes included); what they hand on is validated by `mirror.oci`, which
the tests against a running mirror cover.
"""

from __future__ import annotations

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from mirror.api import v2
from mirror.errors import NameUnknown, Unsupported

DIGEST = "sha256:" + "a" * 64


def v2_app() -> web.Application:
    app = web.Application()
    v2.add_routes(app.router)
    return app


async def resolve(path: str, method: str = "GET") -> web.UrlMappingMatchInfo:
    app = v2_app()
    match = await app.router.resolve(make_mocked_request(method, path, app=app))
    assert isinstance(match, web.UrlMappingMatchInfo)
    return match


@pytest.mark.parametrize(
    ("path", "handler", "parts"),
    [
        ("/v2", v2.base, {}),
        ("/v2/", v2.base, {}),
        ("/v2/_catalog", v2.catalog, {}),
        ("/v2/library/alpine/tags/list", v2.tags, {"name": "library/alpine"}),
        # Reaches the name's validation, which refuses it.
        ("/v2//tags/list", v2.tags, {"name": ""}),
        ("/v2/a/b/c/manifests/latest", v2.manifest, {"name": "a/b/c", "reference": "latest"}),
        # The last marker decides; the earlier one is part of the name.
        ("/v2/a/manifests/b/manifests/c", v2.manifest, {"name": "a/manifests/b", "reference": "c"}),
        ("/v2/a/tags/list/tags/list", v2.tags, {"name": "a/tags/list"}),
        ("/v2/x/blobs/" + DIGEST, v2.blob, {"name": "x", "digest": DIGEST}),
        ("/v2/x/y/referrers/" + DIGEST, v2.referrers, {"name": "x/y", "digest": DIGEST}),
        # Text oci.py refuses still reaches it, for its error code.
        ("/v2/a/manifests/{x}", v2.manifest, {"name": "a", "reference": "{x}"}),
    ],
)
async def test_each_endpoint_gets_its_parts(
    path: str, handler: object, parts: dict[str, str]
) -> None:
    for method in ("GET", "HEAD"):
        match = await resolve(path, method)
        assert match.handler is handler, (method, path)
        assert dict(match) == parts


@pytest.mark.parametrize(
    "path",
    [
        "/v2/tags/list",
        "/v2//manifests/latest",
        "/v2/a/manifests/b/c",
        "/v2/a/blobs/",
        "/v2/a/blobs/uploads/",
        "/v2/test/oci/unknown-endpoint",
        "/v2/_catalog/x",
        # An encoded slash does not separate the endpoint from the name.
        "/v2/a/manifests%2Flatest",
    ],
)
async def test_other_v2_paths_are_name_unknown_and_writes_unsupported(path: str) -> None:
    for method in ("GET", "HEAD"):
        match = await resolve(path, method)
        assert match.handler is v2.not_served
        with pytest.raises(NameUnknown):
            await v2.not_served(make_mocked_request(method, path))


@pytest.mark.parametrize(
    "path", ["/v2", "/v2/", "/v2/a/manifests/latest", "/v2/a/blobs/" + DIGEST, "/v2/nowhere"]
)
@pytest.mark.parametrize("method", ["PUT", "POST", "PATCH", "DELETE", "OPTIONS"])
async def test_writes_reach_the_v2_answer_for_every_path(path: str, method: str) -> None:
    match = await resolve(path, method)
    assert match.handler is v2.not_served
    with pytest.raises(Unsupported) as raised:
        await v2.not_served(make_mocked_request(method, path))
    assert raised.value.headers == {"Allow": "GET, HEAD"}


async def test_an_encoded_slash_stays_inside_its_segment() -> None:
    match = await resolve("/v2/test/oci/blobs/..%2F..%2Fetc%2Fpasswd")
    # One segment: the digest oci.py refuses, not a path of three.
    assert match.handler is v2.blob
    assert match["digest"] == "../../etc/passwd"


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (f'"{DIGEST}"', True),
        (f'W/"{DIGEST}"', True),
        (f'"sha256:{"b" * 64}", "{DIGEST}"', True),
        ("*", True),
        (DIGEST, False),  # not an entity tag
        (f'"sha256:{"b" * 64}"', False),
        (f'"{DIGEST[:-1]}"', False),
        ("", False),
    ],
)
def test_if_none_match(header: str, expected: bool) -> None:
    request = make_mocked_request("GET", "/", headers=CIMultiDict({"If-None-Match": header}))
    assert v2.not_modified(request, DIGEST) is expected


def test_no_if_none_match_is_no_match() -> None:
    assert not v2.not_modified(make_mocked_request("GET", "/"), DIGEST)
