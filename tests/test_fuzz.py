"""Hostile input: property tests of every parser that meets request text, and a bounded
fuzz run over the HTTP surface (random methods, paths, queries and headers; oversized
headers; slow, idle and half-closed clients)."""

from __future__ import annotations

import asyncio
import collections
import os
import random
import resource
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import aiohttp
import pytest
from conftest import MirrorFactory
from hypothesis import given, settings
from hypothesis import strategies as st
from support.mirror_process import MirrorProcess
from support.net import free_port

from mirror.errors import MirrorError
from mirror.oci import AcceptSet, Digest, Reference, validate_name
from mirror.routing import Router, UpstreamNames

T = TypeVar("T")

HOSTILE_TEXT = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=300
) | st.sampled_from(["..", "../..", "sha256:", "sha256:" + "a" * 64, "a" * 300, "", "/", "%2e%2e"])


def attempt(parse: Callable[[str], T], text: str) -> T | None:
    """The parsed value, or None when refused with a client error (anything else fails)."""
    try:
        return parse(text)
    except MirrorError as exc:
        if not 400 <= exc.status < 500:
            raise
        return None


@given(HOSTILE_TEXT)
def test_digest_parsing_never_misbehaves(text: str) -> None:
    digest = attempt(Digest.parse, text)
    if digest is not None:
        assert str(digest) == text
        assert all(c in "0123456789abcdef" for c in digest.hex)
        assert "/" not in str(digest)
        assert ".." not in str(digest)


@given(HOSTILE_TEXT)
def test_reference_parsing_never_misbehaves(text: str) -> None:
    reference = attempt(Reference.parse, text)
    if reference is not None:
        assert str(reference) == text
        assert (reference.tag is None) != (reference.digest is None)
        assert "/" not in text


@given(HOSTILE_TEXT)
def test_name_validation_never_misbehaves(text: str) -> None:
    name = attempt(validate_name, text)
    if name is not None:
        assert ".." not in name.split("/")
        assert not name.startswith("/")
        assert len(name) <= 255


ROUTER = Router(
    [
        UpstreamNames("docker.io", ("registry-1.docker.io",), docker_hub=True),
        UpstreamNames("ghcr.io"),
    ],
    "docker.io",
)


@given(HOSTILE_TEXT, st.one_of(st.none(), HOSTILE_TEXT))
def test_routing_only_ever_chooses_configured_upstreams(name: str, namespace: str | None) -> None:
    route = attempt(lambda n: ROUTER.resolve(n, namespace), name)
    if route is not None:
        assert route.upstream in {"docker.io", "ghcr.io"}
        validate_name(route.repository)


@given(st.lists(HOSTILE_TEXT, max_size=4))
def test_accept_parsing_never_fails(lines: list[str]) -> None:
    accept = AcceptSet.from_headers(lines)
    assert accept.wildcard or accept.types


settings.register_profile("suite", max_examples=300, deadline=None)
settings.load_profile("suite")


METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "PROPFIND"]


def _fuzz_path(rng: random.Random, trap: str) -> str:
    parts = ["v2"]
    for _ in range(rng.randint(0, 6)):
        parts.append(
            rng.choice(
                [
                    "manifests",
                    "blobs",
                    "tags",
                    "list",
                    "referrers",
                    "_catalog",
                    "uploads",
                    "..",
                    ".",
                    "%2e%2e",
                    "library",
                    "alpine",
                    trap,
                    "docker.io",
                    "A" * 300,
                    "sha256:" + "a" * 64,
                    "sha256:" + "".join(rng.choices("0123456789abcdefg", k=64)),
                    "md5:00",
                    "latest",
                    "-x",
                    "%00",
                    "%ff",
                    "é",
                    "",
                ]
            )
        )
    path = "/" + "/".join(parts)
    if rng.random() < 0.5:
        keys = ["ns", "n", "last", "artifactType", "x"]
        values = [trap, "docker.io", "-1", "999999999999", "", "%", "a" * 100, "ghcr.io"]
        path += "?" + "&".join(
            f"{rng.choice(keys)}={rng.choice(values)}" for _ in range(rng.randint(1, 3))
        )
    return path


async def _half_closed(host: str, port: int, data: bytes) -> bytes:
    """Send `data`, close our side, and read what the server says before it hangs up."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(data)
    writer.write_eof()
    try:
        return await asyncio.wait_for(reader.read(65536), timeout=10)
    finally:
        writer.close()


async def test_bounded_fuzz_run_over_http(make_mirror: MirrorFactory, tmp_path: Path) -> None:
    requests_sent = 1500
    rng = random.Random(20261127)
    with socket.socket() as trap:
        trap.bind(("127.0.0.1", 0))
        trap.listen()
        trap.setblocking(False)
        trap_host = f"127.0.0.1:{trap.getsockname()[1]}"
        closed = free_port()
        mirror = await make_mirror(
            {"docker.io": {"url": f"http://127.0.0.1:{closed}", "docker_hub": True}}
        )
        outside_before = sorted(p.name for p in tmp_path.iterdir())
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        statuses: collections.Counter[int] = collections.Counter()
        started = time.monotonic()
        timeout = aiohttp.ClientTimeout(total=20)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            for _ in range(requests_sent):
                headers = {
                    rng.choice(
                        ["Accept", "Range", "Authorization", "X-" + "h" * 20, "If-None-Match"]
                    ): rng.choice(
                        [
                            "*/*",
                            "bytes=0-",
                            "bytes=abc",
                            "Basic !!!",
                            "Bearer x",
                            "é" * 10,
                            "a" * 2000,
                        ]
                    )
                }
                async with http.request(
                    rng.choice(METHODS),
                    mirror.url + _fuzz_path(rng, trap_host),
                    headers=headers,
                    data=os.urandom(rng.randint(0, 64)) if rng.random() < 0.2 else None,
                    skip_auto_headers=["Accept-Encoding"],
                ) as response:
                    statuses[response.status] += 1
                    await response.read()
            # Oversized headers and request lines: refused, not a crash.
            for oversized in ({"X-Big": "a" * 20000}, {f"X-{i}": "v" for i in range(200)}):
                async with http.get(f"{mirror.url}/v2/", headers=oversized) as response:
                    statuses[response.status] += 1
        host, port = "127.0.0.1", mirror.server.port
        # Half-closed and garbage connections, then slow ones that never finish a request.
        for payload in (
            b"GET /v2/ HTTP/1.1\r\nHost: x\r\n",
            b"\x16\x03\x01garbage\r\n\r\n",
            b"GET",
        ):
            await _half_closed(host, port, payload)
        slow = [await asyncio.open_connection(host, port) for _ in range(20)]
        for _, writer in slow:
            writer.write(b"GET /v2/ HTTP/1.1\r\nHost: slow\r\n")  # and nothing more
        elapsed = time.monotonic() - started

        seen = dict(sorted(statuses.items()))
        print(f"\nfuzz: {requests_sent + 2} requests in {elapsed:.1f}s, statuses {seen}")
        assert statuses[500] == 0
        assert all(status < 500 or status in (502, 503) for status in statuses)
        # Still answering while the slow clients hang on.
        async with aiohttp.ClientSession() as http, http.get(f"{mirror.url}/v2/") as response:
            assert response.status == 200
        for _, writer in slow:
            writer.close()
        # Nothing dialled the unconfigured host; nothing written outside storage.root.
        with pytest.raises(BlockingIOError):
            trap.accept()
        assert sorted(p.name for p in tmp_path.iterdir()) == outside_before
        assert sorted(p.name for p in mirror.root.iterdir()) == [
            "blobs",
            "layout-version",
            "meta",
            "tmp",
        ]
        grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
        assert grown_mib < 100, f"peak memory grew {grown_mib:.0f} MiB"


def test_idle_and_slow_clients_are_cut_off(tmp_path: Path) -> None:
    upstreams = {"local": {"url": f"http://127.0.0.1:{free_port()}"}}
    with MirrorProcess(tmp_path / "m", upstreams, server={"idle_timeout": "1s"}) as mirror:
        idle = socket.create_connection(("127.0.0.1", mirror.port))
        slow = socket.create_connection(("127.0.0.1", mirror.port))
        slow.sendall(b"GET /v2/ HTTP/1.1\r\nHost: slow\r\n")  # never finished
        for sock in (idle, slow):
            # The server hangs up within the bound (recv raises TimeoutError otherwise).
            sock.settimeout(15)
            assert sock.recv(1024) == b""
            sock.close()
        served = socket.create_connection(("127.0.0.1", mirror.port))
        served.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        served.settimeout(5)
        assert served.recv(1024).startswith(b"HTTP/1.1 200")
        served.close()
