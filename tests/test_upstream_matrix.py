"""The README's registry recipes, one row each, against local emulations of those registries.

Each row configures a mirror exactly as its README recipe does, with the URL pointing at
an emulation built from real parts, and pulls one tiny image through it with skopeo
(byte-exact) and with containerd (same digest). The emulations, shared where the rows'
registries behave alike:

* ``public``: a distribution registry behind a token server on another port that grants
  anonymous pulls (Docker Hub anonymous, a Harbor proxy project, Nexus with the Docker
  Bearer Token realm);
* ``private``: the same shape with anonymous pulls refused and one user per recipe
  (Docker Hub token, ghcr.io, quay.io's ``org+puller``, ACR's service principal, Harbor's
  ``robot$myproject+puller``, Artifactory, ECR's ``AWS`` from moto, Artifact Registry's
  ``oauth2accesstoken`` from a local OAuth endpoint);
* ``open``: a registry with no auth, the cloud backend registry.k8s.io sends clients to.

A real registry cannot redirect, so a small aiohttp front stands before a registry where
the recipe's registry does: ghcr.io and quay.io answer authorised blob GETs with a 307 to
a CDN host that serves the bytes under a signed query and refuses credentials;
registry.k8s.io redirects manifest and blob requests to its backend registry, under
another path.

Last, a registry that checks token expiry to the second and is slow to answer one
manifest: the token expires in the middle of a pull, and the pull still succeeds.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import PUSHER, PUSHER_PASSWORD, TAG, MirrorFactory, ServerFactory
from support.cloud import service_account_key
from support.containerd import Containerd
from support.images import Image, docker_image, oci_image, oci_index, push, push_with_token
from support.registry import Registry
from support.skopeo import skopeo_copy_async
from support.tokenserver import TokenServer
from test_pull_through import tree_bytes

pytestmark = pytest.mark.slow  # starts registries, servers and containerd

KIB = 1024
ACR_CLIENT_ID = "6f1c2b7e-3d4a-4c5b-9e8f-0a1b2c3d4e5f"
# The private token server's users: one per recipe that signs in with a password.
PASSWORDS = {
    PUSHER: PUSHER_PASSWORD,
    "hub-user": "dckr_pat_local-read-only",
    "ghcr-user": "ghp_local-read-packages",
    "org+puller": "quay-robot-token",
    ACR_CLIENT_ID: "acr-service-principal-secret",
    "robot$myproject+puller": "harbor-robot-secret",
    "art-user": "artifactory-identity-token",
}
ECR_REGISTRY_ID = "123456789012"


@dataclass(frozen=True)
class Row:
    """One README recipe: where its image lives on which emulation, what clients call it,
    and the upstream entry (YAML, as the README writes it; ``@URL@`` and friends are
    filled in per test)."""

    id: str
    emulation: str  # public | private | open
    front: str  # "" | "blob-redirect" (ghcr.io, quay.io) | "k8s" (registry.k8s.io)
    upstream_repository: str  # where the image lives, as the emulation names it
    client_repository: str  # what skopeo and containerd pull
    recipe: str
    user: str | None = None  # the token server user the row signs in as
    image: Image = field(init=False, repr=False, compare=False)


ROWS = [
    Row(
        "docker-hub-anonymous",
        "public",
        "",
        "library/busybox",
        "busybox",
        "url: @URL@\ndocker_hub: true\naliases: [@HOST@]",
    ),
    Row(
        "docker-hub-token",
        "private",
        "",
        "library/alpine",
        "alpine",
        "url: @URL@\ndocker_hub: true\naliases: [@HOST@]\n"
        "username: hub-user\npassword_file: @PASSWORD_FILE@",
        user="hub-user",
    ),
    Row(
        "ghcr",
        "private",
        "blob-redirect",
        "owner/tool",
        "owner/tool",
        "url: @URL@\naliases: [@HOST@]\nusername: ghcr-user\npassword_file: @PASSWORD_FILE@",
        user="ghcr-user",
    ),
    Row(
        "registry-k8s",
        "open",
        "k8s",
        "k8s-artifacts-prod/images/pause",
        "pause",
        "url: @URL@\naliases: [@HOST@]",
    ),
    Row(
        "quay",
        "private",
        "blob-redirect",
        "org/app",
        "org/app",
        "url: @URL@\naliases: [@HOST@]\nusername: org+puller\npassword_file: @PASSWORD_FILE@",
        user="org+puller",
    ),
    Row(
        "artifact-registry",
        "private",
        "",
        "mirror-tests/containers/app",
        "mirror-tests/containers/app",
        "url: @URL@\naliases: [@HOST@]\ncredentials: {gcp: {}}",
        user="oauth2accesstoken",
    ),
    Row(
        "ecr",
        "private",
        "",
        "team/service",
        "team/service",
        "url: @URL@\naliases: [@HOST@]\n"
        "credentials: {ecr: {region: us-east-1, registry_id: '123456789012',"
        " endpoint: @ECR_ENDPOINT@}}",
        user="AWS",
    ),
    Row(
        "ecr-pull-through",
        "private",
        "",
        "docker-hub/library/redis",
        "redis",
        "url: @URL@\naliases: [@HOST@]\ndocker_hub: true\nrepository_prefix: docker-hub\n"
        "credentials: {ecr: {region: us-east-1, registry_id: '123456789012',"
        " endpoint: @ECR_ENDPOINT@}}",
        user="AWS",
    ),
    Row(
        "acr",
        "private",
        "",
        "samples/hello",
        "samples/hello",
        f"url: @URL@\naliases: [@HOST@]\nusername: {ACR_CLIENT_ID}\npassword_file: @PASSWORD_FILE@",
        user=ACR_CLIENT_ID,
    ),
    Row(
        "harbor-project",
        "private",
        "",
        "myproject/web",
        "myproject/web",
        "url: @URL@\naliases: [@HOST@]\nusername: 'robot$myproject+puller'\n"
        "password_file: @PASSWORD_FILE@",
        user="robot$myproject+puller",
    ),
    Row(
        "harbor-proxy",
        "public",
        "",
        "dockerhub-proxy/library/nginx",
        "nginx",
        "url: @URL@\naliases: [@HOST@]\ndocker_hub: true\nrepository_prefix: dockerhub-proxy",
    ),
    Row(
        "artifactory",
        "private",
        "",
        "docker-remote/library/postgres",
        "library/postgres",
        "url: @URL@\naliases: [@HOST@]\nrepository_prefix: docker-remote\n"
        "username: art-user\npassword_file: @PASSWORD_FILE@",
        user="art-user",
    ),
    Row("nexus", "public", "", "tools/jq", "tools/jq", "url: @URL@\naliases: [@HOST@]"),
]
# Each row its own content (a few KiB), so that containerd, which keeps what it pulled,
# fetches every row's blobs through the mirror.
for number, row in enumerate(ROWS):
    make = docker_image if number % 2 else oci_image
    object.__setattr__(row, "image", make([3 * KIB, 1 * KIB], seed=9000 + number))


@dataclass
class Emulations:
    public: Registry
    public_tokens: TokenServer
    private: Registry
    private_tokens: TokenServer
    open: Registry

    def registry(self, row: Row) -> Registry:
        return {"public": self.public, "private": self.private, "open": self.open}[row.emulation]

    def tokens(self, row: Row) -> TokenServer | None:
        return {"public": self.public_tokens, "private": self.private_tokens}.get(row.emulation)


@pytest.fixture(scope="module")
def emulations(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulations]:
    work = tmp_path_factory.mktemp("matrix")
    with (
        TokenServer(users={PUSHER: PUSHER_PASSWORD}, workdir=work / "public-tokens") as pub,
        Registry(work / "public", token_auth=pub.registry_settings()) as public,
        TokenServer(users=PASSWORDS, anonymous_actions=(), workdir=work / "tokens") as priv,
        Registry(work / "private", token_auth=priv.registry_settings()) as private,
        Registry(work / "open") as open_registry,
    ):
        found = Emulations(public, pub, private, priv, open_registry)
        for row in ROWS:
            tokens = found.tokens(row)
            url = found.registry(row).url
            if tokens is None:
                push(url, row.upstream_repository, row.image, TAG)
            else:
                push_with_token(
                    url, row.upstream_repository, row.image, TAG, tokens, PUSHER, PUSHER_PASSWORD
                )
        yield found


@pytest.fixture(scope="module")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Containerd]:
    with Containerd(tmp_path_factory.mktemp("ctd")) as daemon:
        yield daemon


# The other host blobs are redirected to


class Cdn:
    """Serves blobs for signed, unexpired URLs only, and refuses any request that carries
    an Authorization header, as a storage bucket's presigned URLs do."""

    def __init__(self, blobs: dict[str, bytes]) -> None:
        self.blobs = blobs
        self._key = secrets.token_bytes(16)
        self.base = ""
        self.served: list[str] = []
        self.refused: list[str] = []

    def _signature(self, digest: str, expires: str) -> str:
        return hmac.new(self._key, f"{digest}\n{expires}".encode(), hashlib.sha256).hexdigest()

    def signed_url(self, digest: str) -> str:
        expires = str(int(time.time()) + 600)
        signature = self._signature(digest, expires)
        return f"{self.base}/pkg/{digest}?X-Expires={expires}&X-Signature={signature}"

    async def blob(self, request: web.Request) -> web.StreamResponse:
        digest = request.match_info["digest"]
        expires = request.query.get("X-Expires", "0")
        signature = request.query.get("X-Signature", "")
        if "Authorization" in request.headers:
            self.refused.append(digest)
            return web.Response(status=400, text="only one auth mechanism allowed")
        if not hmac.compare_digest(signature, self._signature(digest, expires)) or int(
            expires
        ) < int(time.time()):
            self.refused.append(digest)
            return web.Response(status=403, text="signature does not match")
        if digest not in self.blobs:
            return web.Response(status=404)
        if request.method == "GET":
            self.served.append(digest)
        return web.Response(body=self.blobs[digest], content_type="application/octet-stream")

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/pkg/{digest}", self.blob)
        return app


RELAYED_REQUEST_HEADERS = ("Authorization", "Accept", "Range")
RELAYED_RESPONSE_HEADERS = (
    "Content-Type",
    "Content-Length",
    "Docker-Content-Digest",
    "Docker-Distribution-Api-Version",
    "WWW-Authenticate",
    "Location",
)


class Front:
    """Relays requests to a real registry; subclasses change what a real registry
    cannot be configured to do."""

    def __init__(self, backend: str) -> None:
        self.backend = backend

    async def relay(self, request: web.Request, method: str | None = None) -> web.Response:
        headers = {k: request.headers[k] for k in RELAYED_REQUEST_HEADERS if k in request.headers}
        async with (
            aiohttp.ClientSession(auto_decompress=False) as session,
            session.request(
                method or request.method,
                f"{self.backend}{request.rel_url}",
                headers=headers,
                allow_redirects=False,
            ) as upstream,
        ):
            body = await upstream.read()
            kept = {
                k: upstream.headers[k] for k in RELAYED_RESPONSE_HEADERS if k in upstream.headers
            }
        if request.method == "HEAD" or method == "HEAD":
            return web.Response(status=upstream.status, headers=kept)
        kept.pop("Content-Length", None)
        return web.Response(status=upstream.status, body=body, headers=kept)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        return await self.relay(request)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app


class BlobRedirectFront(Front):
    """ghcr.io and quay.io: the registry answers every request itself, except that an
    authorised blob GET is a 307 to the CDN."""

    def __init__(self, backend: str, cdn: Cdn) -> None:
        super().__init__(backend)
        self.cdn = cdn
        self.redirected: list[str] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.method == "GET" and "/blobs/sha256:" in request.path:
            # Authorise first, as the real registries do: the backend's answer to a HEAD
            # with the same credentials decides.
            check = await self.relay(request, method="HEAD")
            if check.status != 200:
                check.headers.pop("Content-Length", None)
                return check
            digest = request.path.rsplit("/", 1)[1]
            self.redirected.append(digest)
            raise web.HTTPTemporaryRedirect(self.cdn.signed_url(digest))
        return await self.relay(request)


class K8sFront:
    """registry.k8s.io: `/v2/` answers itself; manifest and blob requests are 307s to the
    backend registry, where the images live under `k8s-artifacts-prod/images/`."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.redirected: list[str] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.path == "/v2/":
            return web.json_response({})
        name = request.path.removeprefix("/v2/")
        if "/manifests/" not in name and "/blobs/" not in name:
            return web.json_response({"errors": [{"code": "NAME_UNKNOWN"}]}, status=404)
        self.redirected.append(f"{request.method} {name}")
        raise web.HTTPTemporaryRedirect(f"{self.backend}/v2/k8s-artifacts-prod/images/{name}")

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app


@dataclass
class Stage:
    """What one row's pull goes through: the host clients name and the fronts' records."""

    url: str
    host: str
    cdn: Cdn | None = None
    front: BlobRedirectFront | K8sFront | None = None


async def serve(aiohttp_server: ServerFactory, app: web.Application) -> TestServer:
    return await aiohttp_server(app, host="127.0.0.1")


async def stage(row: Row, emulations: Emulations, aiohttp_server: ServerFactory) -> Stage:
    registry = emulations.registry(row)
    if row.front == "k8s":
        k8s = K8sFront(registry.url)
        server = await serve(aiohttp_server, k8s.app())
        return Stage(str(server.make_url("")).rstrip("/"), f"127.0.0.1:{server.port}", front=k8s)
    if row.front == "blob-redirect":
        cdn = Cdn(row.image.all_blobs())
        cdn_server = await serve(aiohttp_server, cdn.app())
        cdn.base = str(cdn_server.make_url("")).rstrip("/")
        front = BlobRedirectFront(registry.url, cdn)
        server = await serve(aiohttp_server, front.app())
        return Stage(str(server.make_url("")).rstrip("/"), f"127.0.0.1:{server.port}", cdn, front)
    return Stage(registry.url, registry.host)


async def oauth_endpoint(
    tokens: TokenServer,
    aiohttp_server: ServerFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> list[str]:
    """Google's token endpoint, named as `token_uri` in a service-account key that
    GOOGLE_APPLICATION_CREDENTIALS points at; each access token it hands out becomes the
    password the token server accepts for `oauth2accesstoken`. Returns the grants asked."""
    grants: list[str] = []

    async def token(request: web.Request) -> web.Response:
        form = await request.post()
        grants.append(str(form.get("grant_type")))
        access_token = f"ya29.matrix-{len(grants)}"
        tokens.users["oauth2accesstoken"] = access_token
        return web.json_response({"access_token": access_token, "expires_in": 3600})

    app = web.Application()
    app.router.add_post("/token", token)
    server = await serve(aiohttp_server, app)
    key = tmp_path / "service-account.json"
    service_account_key(key, str(server.make_url("/token")))
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    return grants


def upstream_entry(row: Row, stage: Stage, tmp_path: Path, ecr_endpoint: str) -> dict[str, Any]:
    password_file = tmp_path / "upstream-password"
    if row.user in PASSWORDS:
        password_file.write_text(PASSWORDS[row.user] + "\n")
    text = (
        row.recipe.replace("@URL@", stage.url)
        .replace("@HOST@", f"'{stage.host}'")
        .replace("@PASSWORD_FILE@", str(password_file))
        .replace("@ECR_ENDPOINT@", ecr_endpoint)
    )
    entry: dict[str, Any] = yaml.safe_load(text)
    return entry


def hosts_dir(tmp_path: Path, host: str, mirror_url: str) -> Path:
    """containerd's hosts.toml for the emulated registry's host: the mirror, nothing else."""
    directory = tmp_path / "certs.d"
    host_dir = directory / host
    host_dir.mkdir(parents=True)
    closed = "http://127.0.0.1:1"  # nothing listens: pulls succeed only through the mirror
    (host_dir / "hosts.toml").write_text(
        f'server = "{closed}"\n\n[host."{mirror_url}"]\n  capabilities = ["pull", "resolve"]\n',
        encoding="utf-8",
    )
    return directory


def expected_dir(image: Image) -> dict[str, bytes]:
    """What `skopeo copy --all` to dir: holds for `image`: manifests and blobs, by name."""
    files = {"manifest.json": image.manifest}
    for child in image.children:
        files[f"{child.digest.split(':', 1)[1]}.manifest.json"] = child.manifest
    files.update({digest.split(":", 1)[1]: data for digest, data in image.all_blobs().items()})
    return files


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
async def test_recipe_pulls_through_the_mirror_with_skopeo_and_containerd(
    row: Row,
    emulations: Emulations,
    containerd: Containerd,
    make_mirror: MirrorFactory,
    aiohttp_server: ServerFactory,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    ecr_endpoint = ""
    ecr: dict[str, Any] | None = None
    grants: list[str] | None = None
    tokens = emulations.tokens(row)
    if "ecr:" in row.recipe:
        assert tokens is not None
        ecr = request.getfixturevalue("moto_ecr")
        ecr["on_issue"] = lambda password: tokens.users.__setitem__("AWS", password)
        ecr["lifetime"] = 3600.0
        ecr_endpoint = ecr["url"]
    if "gcp:" in row.recipe:
        assert tokens is not None
        grants = await oauth_endpoint(
            tokens, aiohttp_server, tmp_path, request.getfixturevalue("monkeypatch")
        )
    where = await stage(row, emulations, aiohttp_server)
    mirror = await make_mirror({row.id: upstream_entry(row, where, tmp_path, ecr_endpoint)})
    asked_before = len(tokens.requests) if tokens is not None else 0

    dest = tmp_path / "skopeo"
    await skopeo_copy_async(f"docker://{mirror.host}/{row.client_repository}:{TAG}", f"dir:{dest}")
    pulled = tree_bytes(dest)
    pulled.pop("version", None)
    assert pulled == expected_dir(row.image)

    reference = f"{where.host}/{row.client_repository}:{TAG}"
    certs = hosts_dir(tmp_path, where.host, mirror.url)
    # In a thread: the mirror answering ctr runs on this test's event loop.
    await asyncio.to_thread(containerd.pull, reference, certs)
    assert containerd.image_digest(reference) == row.image.digest

    # The emulation was asked under the recipe's upstream name, with the recipe's user.
    if tokens is not None:
        asked = tokens.requests[asked_before:]
        assert asked, "the mirror never asked the token server"
        assert {s for r in asked for s in r.scopes} == {
            f"repository:{row.upstream_repository}:pull"
        }
        assert {r.username for r in asked} == {row.user}
        assert all(r.status == 200 for r in asked)
    else:
        assert emulations.open.requests("GET", f"/v2/{row.upstream_repository}/manifests/")
    if isinstance(where.front, BlobRedirectFront):
        assert where.cdn is not None
        assert set(where.cdn.served) == set(row.image.blobs)
        assert where.cdn.refused == []  # no credentials followed the redirect
    if isinstance(where.front, K8sFront):
        assert any(r.startswith("GET pause/manifests/") for r in where.front.redirected)
        assert any("/blobs/sha256:" in r for r in where.front.redirected)
    if ecr is not None:
        assert len(ecr["calls"]) == 1
    if grants is not None:
        assert grants == ["urn:ietf:params:oauth:grant-type:jwt-bearer"]


# A token that expires in the middle of a pull


class StrictExpiryFront(Front):
    """A registry that checks a token's `exp` to the second (distribution allows a minute
    of leeway, Docker Hub does not), and is slow to answer one manifest: the request
    after it carries a token that has just expired."""

    def __init__(self, backend: str, tokens: TokenServer, slow_path: str) -> None:
        super().__init__(backend)
        self.tokens = tokens
        self.slow_path = slow_path
        self.refused_expired: list[str] = []

    def _expiry(self, request: web.Request) -> float | None:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme != "Bearer" or not token:
            return None
        return float(self.tokens.decode(token)["exp"])

    async def handle(self, request: web.Request) -> web.StreamResponse:
        expiry = self._expiry(request)
        if expiry is not None and expiry < time.time():
            self.refused_expired.append(f"{request.method} {request.path}")
            name = request.path.removeprefix("/v2/").split("/manifests/")[0].split("/blobs/")[0]
            challenge = (
                f'Bearer realm="{self.tokens.realm}",service="{self.tokens.service}",'
                f'scope="repository:{name}:pull"'
            )
            return web.json_response(
                {"errors": [{"code": "UNAUTHORIZED", "message": "token expired"}]},
                status=401,
                headers={"WWW-Authenticate": challenge},
            )
        if request.path == self.slow_path and expiry is not None:
            # Answered only once the token it came with has expired: the slowness of a
            # big manifest or a congested registry, made certain.
            await asyncio.sleep(max(0.0, expiry + 0.2 - time.time()))
        return await self.relay(request)


async def test_a_token_expiring_mid_pull_is_renewed_without_failing_the_pull(
    make_mirror: MirrorFactory, aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    image = oci_index(
        [
            oci_image([3 * KIB, 1 * KIB], seed=9100, platform=("linux", "amd64")),
            oci_image([3 * KIB, 1 * KIB], seed=9101, platform=("linux", "arm64")),
        ]
    )
    amd64 = image.children[0]
    # Tokens say they last 300 s, as Docker Hub's do, but the JWT inside expires in 2 s.
    with (
        TokenServer(
            users={PUSHER: PUSHER_PASSWORD}, jwt_lifetime=2, workdir=tmp_path / "tokens"
        ) as tokens,
        Registry(tmp_path / "registry", token_auth=tokens.registry_settings()) as registry,
    ):
        push_with_token(
            registry.url, "library/busybox", image, TAG, tokens, PUSHER, PUSHER_PASSWORD
        )
        front = StrictExpiryFront(
            registry.url, tokens, f"/v2/library/busybox/manifests/{amd64.digest}"
        )
        server = await serve(aiohttp_server, front.app())
        url = str(server.make_url("")).rstrip("/")
        mirror = await make_mirror({"docker.io": {"url": url, "docker_hub": True}})
        issued_before = tokens.issued_count

        dest = tmp_path / "pulled"
        await skopeo_copy_async(f"docker://{mirror.host}/busybox:{TAG}", f"dir:{dest}")

        pulled = tree_bytes(dest)
        pulled.pop("version", None)
        assert pulled == expected_dir(image)
        # The expired token was refused upstream, a new one fetched, and the request
        # answered with it; skopeo saw no failure.
        assert front.refused_expired, "no request carried an expired token"
        assert tokens.issued_count - issued_before >= 2
