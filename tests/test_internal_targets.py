"""An upstream cannot aim the mirror at internal addresses (the class of CVE-2026-33540).

A fake upstream on loopback is declared "public" through the network seam
(`NetworkOverrides`), and names as its token realm, or as the redirect target of a
manifest or a blob, an address more internal than that: loopback, link-local (cloud
metadata), private ranges, directly or through a host name mapped onto it. Each must be
a 502 with OCI JSON and a warning, and no connection to the target may be attempted:
loopback targets point at a listening trap socket that must accept nothing, and every
request the upstream sessions start is recorded, so none may go anywhere but to the
upstream itself. A local registry with its realm and redirects on loopback keeps
working, credentials never travel over plain HTTP to another host, and a token body
arriving in pieces is read whole.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.test_utils import TestServer
from conftest import Mirror, mirror_config
from support.fake_upstream import FakeUpstream, digest_of, serve

from mirror.app import create_app
from mirror.upstream.guard import GuardedResolver, NetworkOverrides, TargetRefusedError
from mirror.upstream.netguard import Reach, classify_text

REPO = "team/app"
BLOB = os.urandom(64 * 1024 + 3)
BLOB_DIGEST = digest_of(BLOB)
BLOB_PATH = f"/v2/{REPO}/blobs/{BLOB_DIGEST}"
MANIFEST = json.dumps({"schemaVersion": 2, "config": {}, "layers": []}).encode()
MANIFEST_DIGEST = digest_of(MANIFEST)
MANIFEST_PATH = f"/v2/{REPO}/manifests/{MANIFEST_DIGEST}"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
SECRET_PATH = "/internal/secret-path?X-Signature=secret-signature"

ServerFactory = Callable[..., Awaitable[TestServer]]


# -- the classifier ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "reach"),
    [
        ("8.8.8.8", Reach.PUBLIC),
        ("2606:4700:4700::1111", Reach.PUBLIC),
        ("10.0.0.1", Reach.PRIVATE),
        ("172.16.5.4", Reach.PRIVATE),
        ("172.32.0.1", Reach.PUBLIC),
        ("192.168.1.1", Reach.PRIVATE),
        ("100.64.0.1", Reach.PRIVATE),
        ("fd00::1", Reach.PRIVATE),
        ("127.0.0.1", Reach.LOOPBACK),
        ("127.255.0.9", Reach.LOOPBACK),
        ("::1", Reach.LOOPBACK),
        ("::ffff:127.0.0.1", Reach.LOOPBACK),
        ("::ffff:10.1.2.3", Reach.PRIVATE),
        ("::ffff:8.8.8.8", Reach.PUBLIC),
        ("64:ff9b::7f00:1", Reach.LOOPBACK),  # NAT64 of 127.0.0.1
        ("2002:a00:1::1", Reach.PRIVATE),  # 6to4 of 10.0.0.1
        ("169.254.169.254", Reach.SPECIAL),
        ("::ffff:169.254.169.254", Reach.SPECIAL),
        ("fe80::1", Reach.SPECIAL),
        ("fe80::1%eth0", Reach.SPECIAL),
        ("fd00:ec2::254", Reach.SPECIAL),  # AWS's IPv6 metadata endpoint
        ("100.100.100.200", Reach.SPECIAL),  # Alibaba's metadata endpoint
        ("0.0.0.0", Reach.SPECIAL),
        ("::", Reach.SPECIAL),
        ("224.0.0.1", Reach.SPECIAL),
        ("ff02::1", Reach.SPECIAL),
        ("255.255.255.255", Reach.SPECIAL),
        ("240.0.0.1", Reach.SPECIAL),
        ("192.0.2.1", Reach.SPECIAL),
        ("2001:db8::1", Reach.SPECIAL),
        ("::127.0.0.1", Reach.SPECIAL),  # deprecated IPv4-compatible form
        ("not-an-address", Reach.SPECIAL),
    ],
)
def test_addresses_are_ranked_by_how_internal_they_are(address: str, reach: Reach) -> None:
    assert classify_text(address) is reach


def test_reach_orders_public_before_private_before_loopback() -> None:
    assert Reach.PUBLIC < Reach.PRIVATE < Reach.LOOPBACK < Reach.SPECIAL


# -- the resolver closes the rebinding window ----------------------------------------------


class _ScriptedResolver(AbstractResolver):
    """Answers a name with the next address of a script (a rebinding DNS server)."""

    def __init__(self, answers: dict[str, list[str]]):
        self.answers = answers
        self.asked: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.asked.append(host)
        address = (
            self.answers[host].pop(0) if len(self.answers[host]) > 1 else self.answers[host][0]
        )
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        return [
            {
                "hostname": host,
                "host": address,
                "port": port,
                "family": family,
                "proto": 0,
                "flags": 0,
            }
        ]

    async def close(self) -> None:
        """Nothing to release: the answers are scripted."""


async def test_the_connection_uses_the_addresses_that_were_checked() -> None:
    now = [0.0]
    dns = _ScriptedResolver(
        {
            "registry.example": ["203.0.114.10"],
            "cdn.example": ["198.51.99.7", "127.0.0.1"],
        }
    )
    resolver = GuardedResolver("https://registry.example", dns, ttl=30.0, clock=lambda: now[0])
    checked = await resolver.resolve("cdn.example", 443, socket.AF_UNSPEC)
    assert [r["host"] for r in checked] == ["198.51.99.7"]
    # Asked again at connection time, the name would now answer loopback: the answer
    # that was checked is the one used.
    assert await resolver.resolve("cdn.example", 443, socket.AF_UNSPEC) == checked
    assert dns.asked.count("cdn.example") == 1
    # Once the answer is stale, the new one is checked too, and refused.
    now[0] = 31.0
    with pytest.raises(TargetRefusedError, match="loopback"):
        await resolver.resolve("cdn.example", 443, socket.AF_UNSPEC)


async def test_the_upstreams_own_name_may_not_resolve_to_a_metadata_endpoint() -> None:
    dns = _ScriptedResolver({"registry.example": ["169.254.169.254"]})
    resolver = GuardedResolver("https://registry.example", dns)
    with pytest.raises(TargetRefusedError, match="special-purpose"):
        await resolver.resolve("registry.example", 443, socket.AF_UNSPEC)


# -- through the mirror --------------------------------------------------------------------


@dataclass
class Trap:
    """A listening socket a connection must never reach (checked in the kernel backlog)."""

    sock: socket.socket
    host: str

    @property
    def port(self) -> int:
        port: int = self.sock.getsockname()[1]
        return port

    def accepted_nothing(self) -> bool:
        try:
            connection, _ = self.sock.accept()
        except BlockingIOError:
            return True
        connection.close()
        return False


def _listen(family: socket.AddressFamily, host: str) -> socket.socket | None:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.bind((host, 0))
    except OSError:
        sock.close()
        return None
    sock.listen(16)
    sock.setblocking(False)
    return sock


@pytest.fixture(scope="module")
def traps() -> Iterator[dict[str, Trap]]:
    found: dict[str, Trap] = {}
    v4 = _listen(socket.AF_INET, "127.0.0.1")
    assert v4 is not None
    found["v4"] = Trap(v4, "127.0.0.1")
    v6 = _listen(socket.AF_INET6, "::1") if socket.has_ipv6 else None
    if v6 is not None:
        found["v6"] = Trap(v6, "::1")
    yield found
    for trap in found.values():
        trap.sock.close()


# Each target: (name, URL host as literal or mapped name, address it resolves to, trap).
TARGETS: list[tuple[str, str, str, str | None]] = [
    ("loopback", "127.0.0.1", "127.0.0.1", "v4"),
    ("loopback-v6", "[::1]", "::1", "v6"),
    ("mapped-loopback", "[::ffff:127.0.0.1]", "::ffff:127.0.0.1", "v4"),
    ("metadata", "169.254.169.254", "169.254.169.254", None),
    ("private-10", "10.0.0.1", "10.0.0.1", None),
    ("private-192", "192.168.1.1", "192.168.1.1", None),
    ("ula", "[fd00::1]", "fd00::1", None),
]
NAMED = [
    (f"{name}-by-name", f"{name}.internal.test", address, trap)
    for name, _, address, trap in TARGETS
]
KINDS = ("realm", "manifest-redirect", "blob-redirect")


@dataclass
class Recorder:
    """Every request the mirror's upstream sessions start, as host:port."""

    started: list[str] = field(default_factory=list)

    def trace(self) -> aiohttp.TraceConfig:
        async def on_start(
            session: aiohttp.ClientSession,
            context: SimpleNamespace,
            params: aiohttp.TraceRequestStartParams,
        ) -> None:
            self.started.append(_host_port(params.url.host or "", params.url.port))

        trace = aiohttp.TraceConfig()
        trace.on_request_start.append(on_start)
        return trace


def _host_port(host: str, port: int | None) -> str:
    try:
        host = str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        host = host.lower()
    return f"{host}:{port}"


@pytest.fixture
async def start_mirror(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Mirror]]]:
    servers: list[TestServer] = []

    async def factory(upstreams: dict[str, dict[str, Any]], network: NetworkOverrides) -> Mirror:
        config = mirror_config(
            tmp_path / f"mirror-{len(servers)}", upstreams, default_upstream=next(iter(upstreams))
        )
        server = TestServer(create_app(config, network=network), host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return Mirror(server, config)

    yield factory
    for server in servers:
        await server.close()


def _target_url(host: str, trap: Trap | None) -> str:
    return f"http://{host}:{trap.port}" if trap is not None else f"http://{host}"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("label", "host", "address", "trap_name"), TARGETS + NAMED)
async def test_an_internal_realm_or_redirect_of_a_public_upstream_is_refused(
    kind: str,
    label: str,
    host: str,
    address: str,
    trap_name: str | None,
    traps: dict[str, Trap],
    aiohttp_server: ServerFactory,
    start_mirror: Callable[..., Awaitable[Mirror]],
    http: aiohttp.ClientSession,
) -> None:
    trap = traps.get(trap_name) if trap_name else None
    if trap_name is not None and trap is None:
        pytest.skip("no IPv6 loopback here")
    target = _target_url(host, trap)
    fake = FakeUpstream()
    if kind == "realm":

        async def challenge(request: web.Request) -> web.StreamResponse:
            realm = f'Bearer realm="{target}/token",service="registry",scope="x"'
            return web.Response(status=401, headers={"WWW-Authenticate": realm})

        fake.on("GET", MANIFEST_PATH, challenge)
        path = MANIFEST_PATH
    else:
        path = MANIFEST_PATH if kind == "manifest-redirect" else BLOB_PATH

        async def redirect(request: web.Request) -> web.StreamResponse:
            return web.Response(status=307, headers={"Location": target + SECRET_PATH})

        fake.on("GET", path, redirect)
    upstream = await aiohttp_server(fake.app(), host="127.0.0.1")
    recorder = Recorder()
    name = host.strip("[]")
    mirror = await start_mirror(
        {"public": {"url": str(upstream.make_url("")).rstrip("/")}},
        NetworkOverrides(
            hosts={name: (address,)} if label.endswith("-by-name") else {},
            reach={"public": Reach.PUBLIC},
            trace_configs=(recorder.trace(),),
        ),
    )

    with structlog.testing.capture_logs() as logs:
        async with http.get(f"{mirror.url}{path}", headers={"Accept": OCI_MANIFEST}) as response:
            assert response.status == 502
            assert response.content_type == "application/json"
            body = await response.json()

    error = body["errors"][0]
    assert error["code"] == "UNAVAILABLE"
    assert name in error["message"]
    assert "secret" not in json.dumps(body)
    assert "/token" not in json.dumps(body)
    refusals = [entry for entry in logs if entry["event"] == "upstream_target_refused"]
    expected_kind = "realm" if kind == "realm" else "redirect"
    assert [(e["log_level"], e["upstream"], e["kind"], e["target_host"]) for e in refusals] == [
        ("warning", "public", expected_kind, name)
    ]
    upstream_address = _host_port("127.0.0.1", upstream.port)
    assert recorder.started
    assert set(recorder.started) == {upstream_address}
    if trap is not None:
        assert trap.accepted_nothing()
    assert mirror.blob_files() == []


@dataclass
class LocalRegistry:
    """A loopback registry with a token endpoint and a blob store on other ports."""

    registry: FakeUpstream
    auth: FakeUpstream
    storage: FakeUpstream
    token_requests: list[str | None] = field(default_factory=list)


async def _local_registry(
    aiohttp_server: ServerFactory, *, realm_host: str, storage_host: str, token_pieces: int = 1
) -> tuple[TestServer, LocalRegistry]:
    """A registry at 127.0.0.1 whose realm and blob redirect are on the given hosts
    (names the test maps onto loopback, or literals)."""
    local = LocalRegistry(FakeUpstream(), FakeUpstream(), FakeUpstream())
    token = "tok-" + os.urandom(8).hex()
    local.storage.on("GET", "/store/blob", serve(BLOB))
    storage_server = await aiohttp_server(local.storage.app(), host="127.0.0.1")

    async def issue(request: web.Request) -> web.StreamResponse:
        local.token_requests.append(request.headers.get("Authorization"))
        data = json.dumps({"token": token, "expires_in": 300, "padding": "x" * 4096}).encode()
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = len(data)
        await response.prepare(request)
        step = -(-len(data) // token_pieces)
        for start in range(0, len(data), step):
            await response.write(data[start : start + step])
            if start + step < len(data):
                # Pacing, not waiting for a state: each piece leaves in its own TCP
                # segment, so the mirror's first read gets a part of the body.
                await asyncio.sleep(0.05)
        await response.write_eof()
        return response

    local.auth.on("GET", "/token", issue)
    auth_server = await aiohttp_server(local.auth.app(), host="127.0.0.1")

    async def blob(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"Bearer {token}":
            realm = f'Bearer realm="http://{realm_host}:{auth_server.port}/token",service="local"'
            return web.Response(status=401, headers={"WWW-Authenticate": realm})
        location = f"http://{storage_host}:{storage_server.port}/store/blob?sig=s"
        return web.Response(status=307, headers={"Location": location})

    local.registry.on("GET", BLOB_PATH, blob)
    return await aiohttp_server(local.registry.app(), host="127.0.0.1"), local


@pytest.mark.parametrize("by_name", [False, True], ids=["literal", "by-name"])
async def test_a_local_registry_keeps_its_loopback_realm_and_redirects(
    by_name: bool,
    aiohttp_server: ServerFactory,
    start_mirror: Callable[..., Awaitable[Mirror]],
    http: aiohttp.ClientSession,
) -> None:
    realm_host, storage_host = (
        ("auth.local.test", "cdn.local.test") if by_name else ("127.0.0.1",) * 2
    )
    server, local = await _local_registry(
        aiohttp_server, realm_host=realm_host, storage_host=storage_host
    )
    hosts = {realm_host: ("127.0.0.1",), storage_host: ("127.0.0.1",)} if by_name else {}
    mirror = await start_mirror(
        {"local": {"url": str(server.make_url("")).rstrip("/")}}, NetworkOverrides(hosts=hosts)
    )
    async with http.get(f"{mirror.url}{BLOB_PATH}") as response:
        assert response.status == 200
        assert await response.read() == BLOB
    assert local.token_requests == [None]  # anonymous: no credentials configured
    assert local.storage.count("GET", "/store/blob") == 1


async def test_credentials_never_go_over_plain_http_to_another_host(
    aiohttp_server: ServerFactory,
    start_mirror: Callable[..., Awaitable[Mirror]],
    http: aiohttp.ClientSession,
) -> None:
    # The upstream is http://registry.local.test; its realm is plain HTTP on another host.
    server, local = await _local_registry(
        aiohttp_server, realm_host="auth.local.test", storage_host="registry.local.test"
    )
    hosts = {"registry.local.test": ("127.0.0.1",), "auth.local.test": ("127.0.0.1",)}
    mirror = await start_mirror(
        {
            "private": {
                "url": f"http://registry.local.test:{server.port}",
                "username": "bot",
                "password": "pw-secret",
            }
        },
        NetworkOverrides(hosts=hosts),
    )
    with structlog.testing.capture_logs() as logs:
        async with http.get(f"{mirror.url}{BLOB_PATH}") as response:
            assert response.status == 502
            body = await response.json()
    assert "auth.local.test" in body["errors"][0]["message"]
    assert "plain HTTP" in body["errors"][0]["message"]
    assert local.token_requests == []  # the realm was never contacted
    assert [
        (e["kind"], e["target_host"]) for e in logs if e["event"] == "upstream_target_refused"
    ] == [("realm", "auth.local.test")]
    assert "pw-secret" not in json.dumps(body) + repr(logs)


async def test_credentials_go_to_a_realm_on_the_plain_http_upstreams_own_host(
    aiohttp_server: ServerFactory,
    start_mirror: Callable[..., Awaitable[Mirror]],
    http: aiohttp.ClientSession,
) -> None:
    server, local = await _local_registry(
        aiohttp_server, realm_host="registry.local.test", storage_host="registry.local.test"
    )
    mirror = await start_mirror(
        {
            "private": {
                "url": f"http://registry.local.test:{server.port}",
                "username": "bot",
                "password": "pw",
            }
        },
        NetworkOverrides(hosts={"registry.local.test": ("127.0.0.1",)}),
    )
    async with http.get(f"{mirror.url}{BLOB_PATH}") as response:
        assert response.status == 200
        assert await response.read() == BLOB
    assert local.token_requests == ["Basic " + base64.b64encode(b"bot:pw").decode()]


async def test_a_token_body_arriving_in_pieces_is_read_whole(
    aiohttp_server: ServerFactory,
    start_mirror: Callable[..., Awaitable[Mirror]],
    http: aiohttp.ClientSession,
) -> None:
    server, local = await _local_registry(
        aiohttp_server, realm_host="127.0.0.1", storage_host="127.0.0.1", token_pieces=3
    )
    mirror = await start_mirror(
        {"local": {"url": str(server.make_url("")).rstrip("/")}}, NetworkOverrides()
    )
    async with http.get(f"{mirror.url}{BLOB_PATH}") as response:
        assert response.status == 200
        assert await response.read() == BLOB
    assert local.token_requests == [None]
