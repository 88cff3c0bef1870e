"""Upstream credential sources against real things: a credential-helper script on PATH,
moto's ECR API, google-auth against a local OAuth token endpoint; the upstream is the
real registry behind the token server, which refuses anonymous pulls here."""

from __future__ import annotations

import base64
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import TAG, Mirror, MirrorFactory, Upstream
from support.cloud import service_account_key
from support.net import eventually

MANIFEST_TYPES = ", ".join(
    (
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    )
)


@pytest.fixture
def private_upstream(token_upstream: Upstream) -> Iterator[Upstream]:
    """The token upstream with anonymous pulls refused, for this test only."""
    server = token_upstream.token_server
    assert server is not None
    kept_users, kept_actions = dict(server.users), server.anonymous_actions
    server.anonymous_actions = ()
    try:
        yield token_upstream
    finally:
        server.users.clear()
        server.users.update(kept_users)
        server.anonymous_actions = kept_actions


async def get_manifest(mirror: Mirror, kind: str) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            f"{mirror.url}/v2/{Upstream.repo(kind)}/manifests/{TAG}",
            headers={"Accept": MANIFEST_TYPES},
        ) as response,
    ):
        await response.read()
        return response.status


async def readyz(mirror: Mirror) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as session, session.get(f"{mirror.url}/readyz") as r:
        return r.status, await r.json()


async def metric(mirror: Mirror, name: str, upstream: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(f"{mirror.url}/metrics") as r:
        text = await r.text()
    for line in text.splitlines():
        if line.startswith(f'{name}{{upstream="{upstream}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# The helper protocol


HELPER = """#!{python}
import json, pathlib, sys
here = pathlib.Path({here!r})
server = sys.stdin.read().strip()
with open(here / "runs.log", "a") as log:
    log.write(server + "\\n")
if (here / "fail").exists():
    print("credentials not found in native keychain")
    sys.exit(1)
secret = "secret-B" if (here / "rotated").exists() else "secret-A"
print(json.dumps({{"ServerURL": server, "Username": "helper-bot", "Secret": secret}}))
"""


@pytest.fixture
def helper_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`docker-credential-testhelper` in a private directory on PATH."""
    here = tmp_path / "helper"
    here.mkdir()
    script = here / "docker-credential-testhelper"
    script.write_text(HELPER.format(python=sys.executable, here=str(here)))
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{here}{os.pathsep}{os.environ['PATH']}")
    return here


def helper_runs(here: Path) -> list[str]:
    log = here / "runs.log"
    return log.read_text().splitlines() if log.exists() else []


async def test_helper_is_rerun_once_when_its_password_is_rotated(
    make_mirror: MirrorFactory, private_upstream: Upstream, helper_dir: Path
) -> None:
    tokens = private_upstream.token_server
    assert tokens is not None
    tokens.users["helper-bot"] = "secret-A"
    mirror = await make_mirror(
        {"private": {"url": private_upstream.url, "credentials": {"helper": "testhelper"}}}
    )
    assert await get_manifest(mirror, "oci") == 200
    assert helper_runs(helper_dir) == [private_upstream.registry.host]

    # Rotated on the registry side and in the helper's store: the old password is
    # refused on the next pull, and the helper is asked again, once.
    tokens.users["helper-bot"] = "secret-B"
    (helper_dir / "rotated").touch()
    assert await get_manifest(mirror, "docker") == 200
    assert len(helper_runs(helper_dir)) == 2
    refused = [r for r in tokens.requests if r.username == "helper-bot" and r.status == 401]
    assert len(refused) == 1
    # Within its lifetime the helper is not run again.
    assert await get_manifest(mirror, "oci-index") == 200
    assert len(helper_runs(helper_dir)) == 2


async def test_failing_helper_keeps_the_cache_serving_and_is_reported(
    make_mirror: MirrorFactory, private_upstream: Upstream, helper_dir: Path
) -> None:
    tokens = private_upstream.token_server
    assert tokens is not None
    tokens.users["helper-bot"] = "secret-A"
    mirror = await make_mirror(
        {
            "private": {
                "url": private_upstream.url,
                "tag_ttl": "1h",
                "credentials": {"helper": "testhelper"},
            }
        }
    )
    assert await get_manifest(mirror, "oci") == 200
    status, body = await readyz(mirror)
    assert status == 200
    assert "degraded" not in body

    tokens.users["helper-bot"] = "secret-C"  # rotated, and the helper now fails
    (helper_dir / "fail").touch()
    assert await get_manifest(mirror, "docker") == 503  # a miss cannot be fetched
    assert await get_manifest(mirror, "oci") == 200  # what is cached is still served
    status, body = await readyz(mirror)
    assert status == 200
    assert "credentials not found" in body["degraded"]["credentials"]["private"]
    assert "secret" not in json.dumps(body)
    assert await metric(mirror, "mirror_upstream_credential_errors_total", "private") >= 1


# ECR through moto's server


async def test_ecr_token_is_fetched_once_per_lifetime_and_replaced_before_expiry(
    make_mirror: MirrorFactory, private_upstream: Upstream, moto_ecr: dict[str, Any]
) -> None:
    # The registry cannot check ECR tokens; the token server stands in for ECR's
    # registry and accepts user AWS with the password moto handed out last.
    tokens = private_upstream.token_server
    assert tokens is not None
    moto_ecr["on_issue"] = lambda password: tokens.users.__setitem__("AWS", password)
    ecr = {"region": "us-east-1", "registry_id": "123456789012", "endpoint": moto_ecr["url"]}
    mirror = await make_mirror({"ecr": {"url": private_upstream.url, "credentials": {"ecr": ecr}}})

    assert await get_manifest(mirror, "oci") == 200
    assert await get_manifest(mirror, "oci-index") == 200  # same token: no second call
    assert len(moto_ecr["calls"]) == 1
    _, first_expiry, _ = moto_ecr["calls"][0]

    # Past its refresh time (half of a 12 s lifetime), before its expiry: the next pull
    # gets a new token first.
    issued_at = moto_ecr["calls"][0][0]
    await eventually(lambda: time.time() >= issued_at + 6.1, timeout=15)
    assert await get_manifest(mirror, "docker") == 200
    assert len(moto_ecr["calls"]) == 2
    second_call, _, _ = moto_ecr["calls"][1]
    assert second_call < first_expiry
    assert tokens.users["AWS"] == "ecr-token-2"
    aws = [r for r in tokens.requests if r.username == "AWS"]
    assert aws
    assert all(r.status == 200 for r in aws)


# Google's default chain against a local OAuth endpoint


async def test_gcp_token_from_the_default_chain_is_used_as_oauth2accesstoken(
    make_mirror: MirrorFactory,
    private_upstream: Upstream,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tokens = private_upstream.token_server
    assert tokens is not None
    grants: list[str] = []

    async def oauth_token(request: web.Request) -> web.Response:
        form = await request.post()
        grants.append(str(form.get("grant_type")))
        token = f"ya29.local-{len(grants)}"
        tokens.users["oauth2accesstoken"] = token
        return web.json_response({"access_token": token, "expires_in": 3600})

    app = web.Application()
    app.router.add_post("/token", oauth_token)
    oauth = TestServer(app, host="127.0.0.1")
    await oauth.start_server()
    try:
        key = tmp_path / "key.json"
        service_account_key(key, str(oauth.make_url("/token")))
        monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key))
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        mirror = await make_mirror(
            {"gar": {"url": private_upstream.url, "credentials": {"gcp": {}}}}
        )
        assert await get_manifest(mirror, "oci") == 200
        assert await get_manifest(mirror, "docker") == 200
    finally:
        await oauth.close()
    assert grants == ["urn:ietf:params:oauth:grant-type:jwt-bearer"]
    asked = [r for r in tokens.requests if r.username == "oauth2accesstoken"]
    assert asked
    assert all(r.authorized for r in asked)


async def test_basic_auth_refusal_reruns_the_helper_once(
    make_mirror: MirrorFactory, aiohttp_server: Any, helper_dir: Path
) -> None:
    # A registry that answers Basic itself (as ECR and ACR do) refuses the old password
    # on the registry, not at a token server: the request is retried with new ones.
    manifest = json.dumps(
        {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json"}
    ).encode()
    accepted = {"password": "secret-A"}
    seen: list[str] = []

    async def manifests(request: web.Request) -> web.Response:
        header = request.headers.get("Authorization", "")
        seen.append(header)
        expected = base64.b64encode(f"helper-bot:{accepted['password']}".encode()).decode()
        if header != f"Basic {expected}":
            return web.json_response(
                {"errors": [{"code": "UNAUTHORIZED", "message": "no"}]},
                status=401,
                headers={"WWW-Authenticate": 'Basic realm="basic-registry"'},
            )
        return web.Response(
            body=manifest, content_type="application/vnd.oci.image.manifest.v1+json"
        )

    app = web.Application()
    app.router.add_route("*", "/v2/team/{name}/manifests/{reference}", manifests)
    server = await aiohttp_server(app, host="127.0.0.1")
    mirror = await make_mirror(
        {
            "basic": {
                "url": str(server.make_url("")).rstrip("/"),
                "credentials": {"helper": "testhelper"},
            }
        }
    )

    async def pull(name: str) -> int:
        async with (
            aiohttp.ClientSession() as session,
            session.get(
                f"{mirror.url}/v2/team/{name}/manifests/v1", headers={"Accept": MANIFEST_TYPES}
            ) as response,
        ):
            return response.status

    assert await pull("one") == 200
    assert len(helper_runs(helper_dir)) == 1
    accepted["password"] = "secret-B"
    (helper_dir / "rotated").touch()
    assert await pull("two") == 200
    assert len(helper_runs(helper_dir)) == 2
    assert "secret" not in "".join(helper_runs(helper_dir))
