"""Security: client authentication and access rules, credentialed upstreams keeping
their access rules, TLS and mutual TLS, and the audit trail."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import trustme
import yaml
from conftest import PUSHER, PUSHER_PASSWORD, TAG, MirrorFactory, Upstream
from support.cli import containerd_hosts
from support.containerd import Containerd
from support.htpasswd import basic, hash_password, write_htpasswd
from support.images import oci_image, push_with_token
from support.mirror_process import MirrorProcess
from support.net import http_request
from support.redis_server import RedisServer
from support.registry import Registry
from support.skopeo import SkopeoError, run_skopeo_async, skopeo_copy_async
from support.tokenserver import TokenServer

from mirror.app import server_ssl_context
from mirror.config import TlsConfig

pytestmark = pytest.mark.slow  # starts registries, servers or processes

USERS = {"alice": "alice-pw", "bob": "bob-pw", "carol": "carol-pw"}


@pytest.fixture
def htpasswd(tmp_path: Path) -> Path:
    return write_htpasswd(tmp_path / "htpasswd", USERS)


def auth_settings(htpasswd: Path) -> dict[str, object]:
    return {
        "auth": {
            "htpasswd": str(htpasswd),
            "anonymous": False,
            "realm": "test-mirror",
            "groups": {"builders": ["carol"]},
            "rules": [
                {"users": ["alice"], "upstreams": ["local"], "repositories": ["test/*"]},
                {"groups": ["builders"], "repositories": ["test/oci"]},
            ],
        }
    }


async def test_authentication_and_access_rules(
    make_mirror: MirrorFactory, upstream: Upstream, htpasswd: Path, http: aiohttp.ClientSession
) -> None:
    mirror = await make_mirror({"local": {"url": upstream.url}}, **auth_settings(htpasswd))
    manifest = f"{mirror.url}/v2/{Upstream.repo('oci')}/manifests/{TAG}"
    mark = upstream.registry.mark()

    for url in (f"{mirror.url}/v2/", manifest):
        async with http.get(url) as response:
            assert response.status == 401
            assert response.headers["WWW-Authenticate"] == 'Basic realm="test-mirror"'
            assert (await response.json())["errors"][0]["code"] == "UNAUTHORIZED"
    async with http.get(manifest, headers=basic("alice", "wrong")) as response:
        assert response.status == 401
    async with http.get(manifest, headers=basic("mallory", "alice-pw")) as response:
        assert response.status == 401
    async with http.get(manifest, headers=basic("bob", "bob-pw")) as response:
        assert response.status == 403
        assert (await response.json())["errors"][0]["code"] == "DENIED"
    async with http.get(
        f"{mirror.url}/v2/{Upstream.repo('docker')}/manifests/{TAG}",
        headers=basic("carol", "carol-pw"),
    ) as response:
        assert response.status == 403  # the builders group may pull test/oci only
    # Refused requests never reached the upstream.
    assert upstream.registry.requests(path_contains="/manifests/", since=mark) == []

    async with http.get(f"{mirror.url}/v2/", headers=basic("alice", "alice-pw")) as response:
        assert response.status == 200
    async with http.get(manifest, headers=basic("carol", "carol-pw")) as response:
        assert response.status == 200
    async with http.get(
        f"{mirror.url}/v2/{Upstream.repo('docker')}/manifests/{TAG}",
        headers=basic("alice", "alice-pw"),
    ) as response:
        assert response.status == 200
    # The catalog shows each user only what they may pull.
    async with http.get(
        f"{mirror.url}/v2/_catalog", headers=basic("carol", "carol-pw")
    ) as response:
        assert (await response.json())["repositories"] == [Upstream.repo("oci")]

    # skopeo pulls with the right user's credentials.
    await skopeo_copy_async(
        f"docker://{mirror.host}/{Upstream.repo('oci')}:{TAG}",
        f"dir:{htpasswd.parent / 'pulled'}",
        src_creds="alice:alice-pw",
    )
    assert (htpasswd.parent / "pulled" / "manifest.json").read_bytes() == upstream.images[
        "oci"
    ].manifest
    with pytest.raises(SkopeoError):
        await skopeo_copy_async(
            f"docker://{mirror.host}/{Upstream.repo('oci')}:{TAG}",
            f"dir:{htpasswd.parent / 'refused'}",
            src_creds="bob:bob-pw",
        )


async def test_htpasswd_is_reloaded_when_it_changes(
    make_mirror: MirrorFactory, upstream: Upstream, htpasswd: Path, http: aiohttp.ClientSession
) -> None:
    mirror = await make_mirror(
        {"local": {"url": upstream.url}}, auth={"htpasswd": str(htpasswd), "anonymous": False}
    )
    base = f"{mirror.url}/v2/"
    async with http.get(base, headers=basic("bob", "bob-pw")) as response:
        assert response.status == 200
    htpasswd.write_text(f"bob:{hash_password('new-pw')}\n", encoding="utf-8")
    os.utime(htpasswd, (1, 1))  # an mtime that surely differs from the first load's
    async with http.get(base, headers=basic("bob", "bob-pw")) as response:
        assert response.status == 401  # the remembered old password is forgotten
    async with http.get(base, headers=basic("bob", "new-pw")) as response:
        assert response.status == 200
    async with http.get(base, headers=basic("alice", "alice-pw")) as response:
        assert response.status == 401


async def test_containerd_pulls_with_credentials(
    make_mirror: MirrorFactory, upstream: Upstream, htpasswd: Path, tmp_path: Path
) -> None:
    upstreams = {"reg.test": {"url": upstream.url}}
    rules = [{"users": ["alice"], "repositories": ["test/oci"]}]
    mirror = await make_mirror(
        upstreams, auth={"htpasswd": str(htpasswd), "anonymous": False, "rules": rules}
    )
    config = tmp_path / "m.yaml"
    config.write_text(yaml.safe_dump({"upstreams": upstreams}))
    hosts = tmp_path / "certs.d"
    containerd_hosts(config, mirror.url, hosts, fallback="none")
    reference = f"reg.test/{Upstream.repo('oci')}:{TAG}"
    with Containerd() as daemon:
        await asyncio.to_thread(
            daemon.ctr,
            "images",
            "pull",
            "--hosts-dir",
            str(hosts),
            "--user",
            "alice:alice-pw",
            "--snapshotter",
            "native",
            reference,
        )
        assert daemon.image_digest(reference) == upstream.images["oci"].digest
        refused = await asyncio.to_thread(
            daemon.ctr,
            "images",
            "pull",
            "--hosts-dir",
            str(hosts),
            "--user",
            "bob:bob-pw",
            f"reg.test/{Upstream.repo('docker')}:{TAG}",
            check=False,
        )
        assert refused.returncode != 0


@dataclass(frozen=True)
class PrivateUpstream:
    """A registry nobody may read anonymously, holding one image under two names."""

    registry: Registry
    layer: str
    manifest: str


@pytest.fixture
def private_upstream(tmp_path: Path) -> Iterator[PrivateUpstream]:
    with (
        TokenServer(
            users={PUSHER: PUSHER_PASSWORD}, anonymous_actions=(), workdir=tmp_path / "t"
        ) as tokens,
        Registry(tmp_path / "private", token_auth=tokens.registry_settings()) as registry,
    ):
        image = oci_image([64 * 1024], seed=777)
        for repository in ("private/app", "private/copy"):
            push_with_token(registry.url, repository, image, TAG, tokens, PUSHER, PUSHER_PASSWORD)
        yield PrivateUpstream(registry, image.layer_digests[0], image.digest)


@pytest.mark.parametrize("backend", ["embedded", "redis"])
async def test_private_content_is_not_served_through_other_names(
    make_mirror: MirrorFactory,
    upstream: Upstream,
    private_upstream: PrivateUpstream,
    redis_server: RedisServer,
    http: aiohttp.ClientSession,
    backend: str,
) -> None:
    """Blobs and manifests fetched with credentials reach another repository or upstream
    only once that upstream says the repository holds them."""
    metadata: dict[str, str] = {"backend": backend}
    if backend == "redis":
        metadata |= {"redis_url": redis_server.url, "key_prefix": f"private{os.getpid()}:"}
    mirror = await make_mirror(
        {
            "private": {
                "url": private_upstream.registry.url,
                "username": PUSHER,
                "password": PUSHER_PASSWORD,
            },
            "public": {"url": upstream.url},
        },
        metadata=metadata,
    )
    accept = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
    content = {
        "blobs": private_upstream.layer,
        "manifests": private_upstream.manifest,
    }
    for kind, digest in content.items():
        own = f"{mirror.url}/v2/private/app/{kind}/{digest}?ns=private"
        async with http.get(own, headers=accept) as response:
            assert response.status == 200, kind
            await response.read()
        await mirror.settled()
        async with http.get(own, headers=accept) as response:
            assert response.headers["X-Cache"] == "HIT", kind

    for kind, digest in content.items():
        unknown = "BLOB_UNKNOWN" if kind == "blobs" else "MANIFEST_UNKNOWN"
        # Cached, yet not through a public upstream's names, nor through a private
        # repository the upstream says lacks it.
        for path in (
            f"/v2/public/app/{kind}/{digest}?ns=public",
            f"/v2/{Upstream.repo('oci')}/{kind}/{digest}?ns=public",
            f"/v2/private/other/{kind}/{digest}?ns=private",
        ):
            async with http.get(mirror.url + path, headers=accept) as response:
                assert response.status == 404, path
                assert (await response.json())["errors"][0]["code"] == unknown, path
            async with http.head(mirror.url + path, headers=accept) as response:
                assert response.status == 404, path

        # A private repository that does hold it gets the cached copy, after one HEAD.
        mark = private_upstream.registry.mark()
        copy = f"{mirror.url}/v2/private/copy/{kind}/{digest}?ns=private"
        for method in ("HEAD", "GET"):
            async with http.request(method, copy, headers=accept) as response:
                assert response.status == 200, (method, kind)
                assert response.headers["X-Cache"] == "HIT", (method, kind)
                await response.read()
        asked = [
            e.method for e in private_upstream.registry.requests(since=mark) if digest in e.path
        ]
        assert asked == ["HEAD"], (kind, asked)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("tls")
    server_ca, client_ca = trustme.CA(), trustme.CA()
    server = server_ca.issue_cert("127.0.0.1", "localhost")
    client = client_ca.issue_cert("pull-client")
    paths = {
        "server_ca": work / "server-ca.pem",
        "client_ca": work / "client-ca.pem",
        "cert": work / "server.pem",
        "key": work / "server.key",
    }
    server_ca.cert_pem.write_to_path(str(paths["server_ca"]))
    client_ca.cert_pem.write_to_path(str(paths["client_ca"]))
    server.private_key_pem.write_to_path(str(paths["key"]))
    server.cert_chain_pems[0].write_to_path(str(paths["cert"]))
    # skopeo's --src-cert-dir: *.crt are trusted CAs, a .cert/.key pair is its own identity.
    for name, with_identity in (("trust-only", False), ("with-identity", True)):
        directory = work / name
        directory.mkdir()
        server_ca.cert_pem.write_to_path(str(directory / "ca.crt"))
        if with_identity:
            client.cert_chain_pems[0].write_to_path(str(directory / "client.cert"))
            client.private_key_pem.write_to_path(str(directory / "client.key"))
        paths[name] = directory
    return paths


async def skopeo_over_tls(host: str, cert_dir: Path, dest: Path) -> None:
    await run_skopeo_async(
        [
            "skopeo",
            "--insecure-policy",
            "copy",
            "--retry-times",
            "0",
            "--src-cert-dir",
            str(cert_dir),
            "--src-tls-verify=true",
            "--src-no-creds",
            f"docker://{host}/{Upstream.repo('oci')}:{TAG}",
            f"dir:{dest}",
        ],
        timeout=120,
    )


async def test_https_and_mutual_tls(
    make_mirror: MirrorFactory, upstream: Upstream, certificates: dict[str, Path], tmp_path: Path
) -> None:
    https = server_ssl_context(TlsConfig(cert=certificates["cert"], key=certificates["key"]))
    mirror = await make_mirror({"local": {"url": upstream.url}}, ssl_context=https)
    await skopeo_over_tls(mirror.host, certificates["trust-only"], tmp_path / "https")
    assert (tmp_path / "https" / "manifest.json").read_bytes() == upstream.images["oci"].manifest

    mutual = server_ssl_context(
        TlsConfig(
            cert=certificates["cert"], key=certificates["key"], client_ca=certificates["client_ca"]
        )
    )
    mtls = await make_mirror({"local": {"url": upstream.url}}, ssl_context=mutual)
    await skopeo_over_tls(mtls.host, certificates["with-identity"], tmp_path / "mtls")
    assert (tmp_path / "mtls" / "manifest.json").read_bytes() == upstream.images["oci"].manifest
    with pytest.raises(SkopeoError):
        await skopeo_over_tls(mtls.host, certificates["trust-only"], tmp_path / "refused")
    # Any TLS client that trusts the CA is served; plain HTTP to the TLS port is not.
    client_context = ssl.create_default_context(cafile=str(certificates["server_ca"]))
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"https://{mirror.host}/v2/", ssl=client_context) as response,
    ):
        assert response.status == 200
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientError):
            await http.get(f"http://{mirror.host}/v2/")


def test_audit_lines_say_who_pulled_what(
    upstream: Upstream, htpasswd: Path, tmp_path: Path
) -> None:
    settings = auth_settings(htpasswd)
    with MirrorProcess(tmp_path / "m", {"local": {"url": upstream.url}}, **settings) as mirror:
        url = f"{mirror.url}/v2/{Upstream.repo('oci')}/manifests/{TAG}"
        assert http_request("GET", url, headers=basic("alice", "alice-pw")).status == 200
        assert http_request("GET", url, headers=basic("bob", "bob-pw")).status == 403
    lines = [json.loads(line) for line in mirror.log_text().splitlines() if line.startswith("{")]
    pulls = [line for line in lines if line.get("event") == "pull"]
    assert [(p["user"], p["status"]) for p in pulls] == [("alice", 200), ("bob", 403)]
    assert pulls[0]["digest"] == upstream.images["oci"].digest
    assert pulls[0]["repository"] == Upstream.repo("oci")
    assert pulls[0]["remote"] == "127.0.0.1"
    text = mirror.log_text()
    for secret in USERS.values():
        assert secret not in text
