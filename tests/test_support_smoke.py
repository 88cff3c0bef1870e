"""Smoke tests for tests/support: real registries, real token auth, real skopeo pulls.

If these fail, every mirror test built on the support library is meaningless, so they check
the support code against the real binaries rather than against itself.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.images import PushError, push, push_with_token, standard_images
from support.net import http_request
from support.registry import Registry, parse_access_line
from support.skopeo import SkopeoError, inspect_raw, inspect_raw_async, skopeo_copy
from support.tokenserver import TokenServer, fetch_token

pytestmark = pytest.mark.slow  # starts registries, servers or processes

USER, PASSWORD = "alice", "s3cret"


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    with Registry(tmp_path / "registry") as reg:
        yield reg


@pytest.fixture
def token_server(tmp_path: Path) -> Iterator[TokenServer]:
    with TokenServer(users={USER: PASSWORD}, workdir=tmp_path / "tokens") as server:
        yield server


@pytest.fixture
def auth_registry(tmp_path: Path, token_server: TokenServer) -> Iterator[Registry]:
    with Registry(tmp_path / "auth-registry", token_auth=token_server.registry_settings()) as reg:
        yield reg


def _assert_dir_copy_matches(out: Path, image_manifest: bytes, blobs: dict[str, bytes]) -> None:
    assert (out / "manifest.json").read_bytes() == image_manifest
    for digest, data in blobs.items():
        assert (out / digest.removeprefix("sha256:")).read_bytes() == data


def test_push_and_pull_standard_images(registry: Registry, tmp_path: Path) -> None:
    images = standard_images()
    total = sum(len(b) for img in images.values() for b in img.all_blobs().values())
    assert total < 15 * 1024 * 1024

    for name, image in images.items():
        repo = f"smoke/{name}"
        before = registry.mark()
        push(registry.url, repo, image, "v1")

        blobs = image.all_blobs()
        uploads = registry.wait_for_access("PUT", f"/v2/{repo}/blobs/uploads/", len(blobs), before)
        assert all(e.status == 201 for e in uploads)
        tagged = registry.wait_for_access("PUT", f"/v2/{repo}/manifests/v1", 1, before)
        assert tagged[0].status == 201
        for child in image.children:
            assert registry.count("PUT", f"/v2/{repo}/manifests/{child.digest}", before) == 1

        assert inspect_raw(f"docker://{registry.host}/{repo}:v1") == image.manifest

        out = tmp_path / "copies" / name
        pulled = registry.mark()
        skopeo_copy(f"docker://{registry.host}/{repo}:v1", f"dir:{out}")
        _assert_dir_copy_matches(out, image.manifest, blobs)
        for child in image.children:
            child_file = out / f"{child.digest.removeprefix('sha256:')}.manifest.json"
            assert child_file.read_bytes() == child.manifest

        gets = registry.wait_for_access("GET", f"/v2/{repo}/blobs/", len(blobs), pulled)
        assert {e.status for e in gets} == {200}
        assert all(e.user_agent.startswith("skopeo/") for e in gets)
        sizes = {e.path.rsplit("/", 1)[1]: e.bytes_sent for e in gets}
        assert sizes == {d: len(b) for d, b in blobs.items()}
        manifest_gets = registry.requests("GET", f"/v2/{repo}/manifests/v1", pulled)
        assert manifest_gets
        assert manifest_gets[0].status == 200


def test_image_configs_are_valid() -> None:
    for image in standard_images().values():
        for single in image.all_manifests():
            if single.is_index:
                assert all(c.platform for c in single.children)
                continue
            assert single.config_digest is not None
            config = json.loads(single.blobs[single.config_digest])
            diff_ids = [
                "sha256:" + hashlib.sha256(gzip.decompress(single.blobs[d])).hexdigest()
                for d in single.layer_digests
            ]
            assert config["rootfs"] == {"type": "layers", "diff_ids": diff_ids}
            assert (config["os"], config["architecture"]) == single.platform
            assert len(config["history"]) == len(diff_ids)
    # Deterministic: the same seed gives the same digests, another seed disjoint ones.
    again, other = standard_images(), standard_images(seed_base=1)
    assert {k: v.digest for k, v in again.items()} == {
        k: v.digest for k, v in standard_images().items()
    }
    assert not set(again["oci"].all_blobs()) & set(other["oci"].all_blobs())


def test_restart_keeps_port_and_content(registry: Registry) -> None:
    image = standard_images()["docker"]
    push(registry.url, "smoke/restart", image, "v1")
    url, old_pid = registry.url, registry.pid
    mark = registry.mark()
    registry.restart()
    assert registry.url == url
    assert registry.pid != old_pid
    assert inspect_raw(f"docker://{registry.host}/smoke/restart:v1") == image.manifest
    assert registry.count("GET", "/v2/smoke/restart/manifests/v1", since=mark) >= 1
    assert registry.count("PUT", "/v2/smoke/restart/manifests/v1", since=mark) == 0


def test_token_auth_registry(
    auth_registry: Registry, token_server: TokenServer, tmp_path: Path
) -> None:
    resp = http_request("GET", f"{auth_registry.url}/v2/")
    assert resp.status == 401
    challenge = resp.header("WWW-Authenticate")
    assert challenge.startswith("Bearer ")
    assert f'realm="{token_server.realm}"' in challenge
    assert f'service="{token_server.service}"' in challenge

    image = standard_images()["oci-index"]
    repo = "smoke/private"

    # Anonymous tokens carry pull only, so the registry refuses an anonymous push.
    anonymous = fetch_token(token_server.realm, token_server.service, [f"repository:{repo}:push"])
    with pytest.raises(PushError, match="401"):
        push(auth_registry.url, repo, image, "v1", anonymous)
    with pytest.raises(PermissionError):
        fetch_token(token_server.realm, token_server.service, [], USER, "wrong")

    push_with_token(auth_registry.url, repo, image, "v1", token_server, USER, PASSWORD)

    token_server.clear()
    out = tmp_path / "anon-copy"
    skopeo_copy(f"docker://{auth_registry.host}/{repo}:v1", f"dir:{out}")
    _assert_dir_copy_matches(out, image.manifest, image.all_blobs())

    requests = token_server.requests
    assert requests
    assert token_server.issued_count == len(requests)
    assert all(r.username is None and not r.authorized for r in requests)
    pulls = [r for r in requests if r.scopes == (f"repository:{repo}:pull",)]
    assert pulls
    assert pulls[0].service == token_server.service
    assert [a.actions for a in pulls[0].granted] == [("pull",)]

    # With credentials skopeo authenticates at the token server.
    token_server.clear()
    assert (
        inspect_raw(f"docker://{auth_registry.host}/{repo}:v1", creds=f"{USER}:{PASSWORD}")
        == image.manifest
    )
    assert any(r.username == USER and r.authorized for r in token_server.requests)

    # A repository without anonymous pull rights is really protected.
    token_server.anonymous_actions = ()
    with pytest.raises(SkopeoError, match=r"unauthorized|denied|authentication required"):
        inspect_raw(f"docker://{auth_registry.host}/{repo}:v1")


def test_token_server_records_and_claims(token_server: TokenServer) -> None:
    token = fetch_token(
        token_server.realm,
        token_server.service,
        ["repository:a/b:pull,push", "repository:127.0.0.1:5000/c:pull"],
        USER,
        PASSWORD,
    )
    claims = token_server.decode(token)
    assert claims["iss"] == token_server.issuer
    assert claims["aud"] == token_server.service
    assert claims["sub"] == USER
    assert claims["access"] == [
        {"type": "repository", "name": "a/b", "actions": ["pull", "push"]},
        {"type": "repository", "name": "127.0.0.1:5000/c", "actions": ["pull"]},
    ]
    assert re.fullmatch(r"([A-Z2-7]{4}:){11}[A-Z2-7]{4}", token_server.key_id)

    with pytest.raises(PermissionError):
        fetch_token(token_server.realm, token_server.service, [], "mallory", "x")
    last = token_server.requests[-1]
    assert (last.status, last.username, last.authorized) == (401, "mallory", False)
    assert token_server.issued_count == 1


def test_token_server_can_omit_expires_in() -> None:
    with TokenServer(expires_in=None) as server:
        resp = http_request("GET", f"{server.realm}?service={server.service}")
        body = json.loads(resp.body)
        assert resp.status == 200
        assert "expires_in" not in body
        assert body["token"] == body["access_token"]
        assert body["issued_at"].endswith("Z")


def test_access_log_parser_handles_escapes() -> None:
    line = (
        '127.0.0.1 - - [27/Nov/2026:19:13:59 +0000] "GET /v2/x/manifests/a?b=c HTTP/1.1" '
        '200 96 "" "agent \\"quoted\\" \\x01"'
    )
    entry = parse_access_line(line)
    assert entry is not None
    assert (entry.method, entry.path, entry.route) == (
        "GET",
        "/v2/x/manifests/a?b=c",
        "/v2/x/manifests/a",
    )
    assert (entry.status, entry.bytes_sent) == (200, 96)
    assert entry.user_agent == 'agent "quoted" \x01'
    assert parse_access_line('time="2026-11-27T19:13:58Z" level=info msg="listening"') is None


async def test_async_inspect(registry: Registry) -> None:
    image = standard_images()["docker-list"]
    push(registry.url, "smoke/async", image, None)
    ref = f"docker://{registry.host}/smoke/async@{image.digest}"
    assert await inspect_raw_async(ref) == image.manifest
    with pytest.raises(SkopeoError, match="manifest unknown"):
        await inspect_raw_async(f"docker://{registry.host}/smoke/async:missing")
