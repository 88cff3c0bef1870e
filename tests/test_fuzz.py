"""Hostile input: property tests of every parser that meets request text, and a bounded
fuzz run over the HTTP surface (random methods, paths, queries and headers; oversized
headers; slow, idle and half-closed clients)."""

from __future__ import annotations

import asyncio
import base64
import collections
import concurrent.futures
import json
import os
import random
import re
import resource
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import quote

import aiohttp
import pytest
from conftest import STORAGE_ENTRIES, MirrorFactory, Upstream
from hypothesis import given, settings
from hypothesis import strategies as st
from support.htpasswd import hash_password
from support.mirror_process import MirrorProcess
from support.net import free_port, http_request

import mirror as mirror_package
from mirror.errors import MirrorError
from mirror.oci import AcceptSet, Digest, Reference, validate_name
from mirror.routing import Router, UpstreamNames, is_registry_host

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
        assert {p.name for p in mirror.root.iterdir()} <= STORAGE_ENTRIES
        grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
        assert grown_mib < 100, f"peak memory grew {grown_mib:.0f} MiB"


@pytest.mark.slow  # a mirror process
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


# Hostile values in every request input, over raw sockets against `mirror serve`.
#
# An HTTP client library refuses most of these values before they leave it, so the
# requests are written by hand. Each value goes into every query parameter (percent-
# encoded, which the server decodes back into the raw characters, and raw, which the
# parser must refuse) and into every header, on every endpoint.

# Every query parameter and request header the mirror reads (the scan below keeps this
# list honest), and the headers aiohttp reads to frame a request before the mirror sees it.
FUZZED_QUERY = ("ns", "n", "last", "artifactType")
FUZZED_HEADERS = ("Accept", "Authorization", "If-None-Match", "Range")
# The console's API (GET only here: its actions refuse a request before reading more).
CONSOLE_QUERY = ("q", "limit", "cursor", "upstream", "repository", "reference")
CONSOLE_HEADERS = ("Origin", "X-CSRF-Token", "Forwarded", "X-Forwarded-For")
FRAMING_HEADERS = ("Host", "Connection", "Content-Length", "Transfer-Encoding", "Expect")
HOSTILE_VALUES = [
    "\r\n",
    "\r",
    "\n",
    "a\r\nX-Injected: 1",
    "a\nX-Injected: 1",
    "\x00",
    "a\x00b",
    "\x01\x02\x03",
    "\x1b[31mred",
    "\x1f",
    "\t",
    "\x7f",
    "é",
    "\u2028",
    "\ufeff",
    "²",
    "٣",
    "9" * 5000,
    "A" * 6000,
    "",
    " ",
    "%0d%0aX-Injected:%201",
    "%00",
    "%ff",
    "%",
    "docker.io\r\nX-Injected: 1",
    "local",
    "bytes=0-\x01",
]
# Credentials that reach the Basic parser and bcrypt.
HOSTILE_CREDENTIALS = [
    "Basic é",
    "Basic " + "é" * 10,
    "Basic =====",
    "Basic " + base64.b64encode("é:ü".encode()).decode(),
    "Basic " + base64.b64encode(b"\xff\xfe:\xff").decode(),
    "Basic " + base64.b64encode(b"user:" + b"p" * 100).decode(),
    "Basic " + base64.b64encode(b"user:a\x00b").decode(),
    "Basic " + base64.b64encode(b"user").decode(),
    "Bearer \x01",
]
_REQUEST_READS = re.compile(r"request\.(query|headers)\b")
_LITERAL_READ = re.compile(r"request\.(query|headers)\.(?:get|getall|getone)\(\s*\"([^\"]+)\"")
_QUERY_TEXT_CALL = re.compile(r"_query_text\(\s*request,\s*\"([^\"]+)\"")
_REQUEST_PROPERTIES = {
    "http_range": ("headers", "Range"),
    "if_none_match": ("headers", "If-None-Match"),
    "if_match": ("headers", "If-Match"),
    "if_modified_since": ("headers", "If-Modified-Since"),
    "if_unmodified_since": ("headers", "If-Unmodified-Since"),
    "if_range": ("headers", "If-Range"),
    "cookies": ("headers", "Cookie"),
    "rel_url.query": ("query", "*"),
    "url.query": ("query", "*"),
    "query_string": ("query", "*"),
    "raw_headers": ("headers", "*"),
}


def request_inputs() -> tuple[set[tuple[str, str]], list[str]]:
    """Every (query|headers, name) the mirror's code reads from a request, and the
    reads whose name the scan cannot tell (each must be a helper it knows)."""
    found: set[tuple[str, str]] = set()
    unknown: list[str] = []
    for path in sorted(Path(mirror_package.__file__).parent.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        for kind, name in _LITERAL_READ.findall(text):
            found.add((kind, name))
        for name in _QUERY_TEXT_CALL.findall(text):
            found.add(("query", name))
        for prop, read in _REQUEST_PROPERTIES.items():
            if f"request.{prop}" in text:
                found.add(read)
        for number, line in enumerate(text.splitlines(), 1):
            for match in _REQUEST_READS.finditer(line):
                rest = line[match.start() :]
                if _LITERAL_READ.match(rest) or "request.query.get(key)" in rest:
                    continue  # the second: `_query_text`, whose callers are found above
                unknown.append(f"{path.name}:{number}: {line.strip()}")
    return found, unknown


def test_the_fuzz_run_covers_every_request_input() -> None:
    found, unknown = request_inputs()
    assert not unknown, f"request reads the fuzz list cannot see: {unknown}"
    covered = {("query", q) for q in (*FUZZED_QUERY, *CONSOLE_QUERY)} | {
        ("headers", h) for h in (*FUZZED_HEADERS, *FRAMING_HEADERS, *CONSOLE_HEADERS)
    }
    folded = {(kind, name.lower()) for kind, name in covered}
    missing = {(kind, name) for kind, name in found if (kind, name.lower()) not in folded}
    assert not missing, f"read by the mirror but not fuzzed: {sorted(missing)}"
    # The scan itself works: it sees the inputs the mirror is known to read.
    assert ("query", "ns") in found
    assert ("headers", "Range") in found


@dataclass
class RawResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)


def read_responses(data: bytes) -> list[RawResponse]:
    """Split what a server sent into complete responses; AssertionError on a partial one."""
    responses = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        assert sep, f"incomplete response head: {data[:200]!r}"
        lines = head.split(b"\r\n")
        version, _, status_text = lines[0].partition(b" ")
        assert version.startswith(b"HTTP/"), f"not an HTTP response: {lines[0][:100]!r}"
        headers = []
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            assert colon, f"malformed response header line: {line[:100]!r}"
            assert all(0x20 <= c < 0x7F or c == 0x09 for c in value), f"unsafe header {line!r}"
            headers.append((name.decode("ascii"), value.decode("ascii").strip()))
        response = RawResponse(int(status_text[:3]), headers, b"")
        length = response.header("Content-Length")
        if length is not None:
            assert len(rest) >= int(length), f"short body: {len(rest)} of {length}"
            response.body, data = rest[: int(length)], rest[int(length) :]
        else:
            response.body, data = rest, b""  # ends at the close
        responses.append(response)
    return responses


def exchange(port: int, data: bytes | list[bytes], timeout: float = 15) -> bytes:
    """Send `data` (parts one after the other), then read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        for part in [data] if isinstance(data, bytes) else data:
            try:
                sock.sendall(part)
            except (BrokenPipeError, ConnectionResetError):
                break  # the server already answered and closed; read what it said
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        return received


def check_answer(case: str, received: bytes, tally: collections.Counter[str]) -> None:
    assert received, f"{case}: connection closed without a response"
    responses = read_responses(received)
    for response in responses:
        tally[str(response.status)] += 1
        assert response.status < 500, f"{case}: {response.status} {response.body[:200]!r}"
        assert response.header("X-Injected") is None, case
        namespace = response.header("OCI-Namespace")
        assert namespace is None or is_registry_host(namespace), case
        if response.status >= 400 and response.body:
            errors = json.loads(response.body)["errors"]  # OCI error JSON
            assert errors[0]["code"], case
            assert errors[0]["message"], case


def log_problems(log_text: str) -> list[str]:
    """Log lines that are errors, tracebacks, or not the mirror's JSON at all."""
    problems = []
    for line in log_text.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            problems.append(line)  # a raw traceback or print
            continue
        if event.get("level") in ("error", "critical") or "Traceback" in line:
            problems.append(line)
    return problems


@pytest.fixture
def fuzzed_mirror(tmp_path: Path, upstream: Upstream) -> Iterator[MirrorProcess]:
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"user:{hash_password('secret')}\n", encoding="utf-8")
    with MirrorProcess(
        tmp_path / "m",
        {"local": {"url": upstream.url, "tag_ttl": "1h"}},
        default_upstream="local",
        auth={"htpasswd": str(htpasswd), "anonymous": True},
        ui={"allow_remote": True},  # the console's API answers the fuzz's `Host: mirror`
    ) as process:
        yield process


def _endpoints(upstream: Upstream) -> list[str]:
    image = upstream.images["oci"]
    small_blob = min(image.blobs, key=lambda digest: len(image.blobs[digest]))
    repo = Upstream.repo("oci")
    return [
        "/v2/",
        "/v2/_catalog",
        f"/v2/{repo}/tags/list",
        f"/v2/{repo}/manifests/v1",
        f"/v2/{repo}/blobs/{small_blob}",
        f"/v2/{repo}/referrers/{image.digest}",
        "/healthz",
        "/nowhere",
        "/api/v1/overview",
        "/api/v1/repositories",
        "/api/v1/manifest",
    ]


def _request(target: bytes, headers: Sequence[tuple[bytes, bytes]] = ()) -> bytes:
    lines = [b"GET " + target + b" HTTP/1.1", b"Host: mirror"]
    lines += [name + b": " + value for name, value in headers]
    lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n"


def test_hostile_values_in_every_query_parameter_and_header(
    fuzzed_mirror: MirrorProcess, upstream: Upstream
) -> None:
    cases: list[tuple[str, bytes]] = []
    for path in _endpoints(upstream):
        target = path.encode()
        console = path.startswith("/api/")
        for value in HOSTILE_VALUES:
            raw = value.encode()
            for key in (*(CONSOLE_QUERY if console else FUZZED_QUERY), "x"):
                # Percent-encoded: the server decodes it back into the raw characters.
                encoded = f"{path}?{key}={quote(value, safe='')}"
                cases.append((repr(encoded[:100]), _request(encoded.encode())))
                # Raw in the request line: the parser's to refuse.
                query = target + b"?" + key.encode() + b"=" + raw
                cases.append((repr(query[:100]), _request(query)))
            for name in (
                *FUZZED_HEADERS,
                *(CONSOLE_HEADERS if console else ()),
                *FRAMING_HEADERS,
                "X-Other",
            ):
                header = (name.encode(), raw)
                cases.append((f"{name}: {value[:20]!r} on {path}", _request(target, [header])))
        for credentials in HOSTILE_CREDENTIALS:
            header = (b"Authorization", credentials.encode())
            cases.append((f"{credentials[:30]!r} on {path}", _request(target, [header])))
    tally: collections.Counter[str] = collections.Counter()
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = pool.map(lambda case: exchange(fuzzed_mirror.port, case[1]), cases)
        for (case, _), received in zip(cases, answers, strict=True):
            check_answer(case, received, tally)
    print(
        f"\nhostile values: {len(cases)} requests in {time.monotonic() - started:.1f}s, "
        f"statuses {dict(sorted(tally.items()))}, 0 dropped, 0 5xx"
    )
    assert sum(tally.values()) == len(cases)  # exactly one complete answer each
    # Still serving, and nothing in its log is an error or a traceback.
    assert http_request("GET", f"{fuzzed_mirror.url}/v2/").status == 200
    assert log_problems(fuzzed_mirror.log_text()) == []


FRAMING_ABUSE: dict[str, bytes | list[bytes]] = {
    "duplicate Content-Length": b"GET /v2/ HTTP/1.1\r\nHost: m\r\nContent-Length: 1\r\n"
    b"Content-Length: 2\r\n\r\nab",
    "Content-Length and Transfer-Encoding": b"GET /v2/ HTTP/1.1\r\nHost: m\r\n"
    b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "negative Content-Length": b"GET /v2/ HTTP/1.1\r\nHost: m\r\nContent-Length: -1\r\n\r\n",
    "huge Content-Length": b"GET /v2/ HTTP/1.1\r\nHost: m\r\nContent-Length: "
    + b"9" * 40
    + b"\r\n\r\n",
    "unknown Transfer-Encoding": b"GET /v2/ HTTP/1.1\r\nHost: m\r\n"
    b"Transfer-Encoding: gzip, chunked, foo\r\n\r\n",
    "bad chunk size": b"GET /v2/ HTTP/1.1\r\nHost: m\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"zz\r\nabc\r\n0\r\n\r\n",
    "bad chunk size after the head": [
        b"GET /v2/ HTTP/1.1\r\nHost: m\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"-5\r\nabc\r\n0\r\n\r\n",
    ],
    "chunk longer than announced": b"GET /v2/ HTTP/1.1\r\nHost: m\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n2\r\nabcdef\r\n0\r\n\r\n",
    "header without colon": b"GET /v2/ HTTP/1.1\r\nHost: m\r\nBogusHeader\r\n\r\n",
    "obs-fold": b"GET /v2/ HTTP/1.1\r\nHost: m\r\nX-A: a\r\n  folded\r\n\r\n",
    "NUL in a header": b"GET /v2/ HTTP/1.1\r\nHost: m\r\nX-A: a\x00b\r\n\r\n",
    "space before colon": b"GET /v2/ HTTP/1.1\r\nHost: m\r\nX-A : b\r\n\r\n",
    "20 KB header line": b"GET /v2/ HTTP/1.1\r\nHost: m\r\nX-A: " + b"a" * 20_000 + b"\r\n\r\n",
    "20 KB request line": b"GET /v2/" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: m\r\n\r\n",
    "300 headers": b"GET /v2/ HTTP/1.1\r\nHost: m\r\n"
    + b"".join(b"X-%d: v\r\n" % i for i in range(300))
    + b"\r\n",
    "bad version": b"GET /v2/ HTTP/9.9\r\nHost: m\r\n\r\n",
    "version garbage": b"GET /v2/ HTTP/1.x\r\nHost: m\r\n\r\n",
    "garbage request line": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n",
    "lowercase method": b"get /v2/ HTTP/1.1\r\nHost: m\r\n\r\n",
    "control characters in the target": b"GET /v2/\x01\x7f HTTP/1.1\r\nHost: m\r\n\r\n",
    "HTTP/0.9-style line": b"GET /v2/\r\n\r\n",
    "bare LF line ends": b"GET /v2/ HTTP/1.1\nHost: m\n\n",
    "pipelined garbage after a good request": b"GET /v2/ HTTP/1.1\r\nHost: m\r\n\r\n"
    b"BLAH BLAH BLAH\r\n\r\n",
    "garbage after an answered request": [
        b"GET /v2/ HTTP/1.1\r\nHost: m\r\n\r\n",
        b"\x00\x01\x02 nonsense\r\n\r\n",
    ],
}


@pytest.mark.slow  # a mirror process
def test_framing_abuse_gets_a_complete_4xx(tmp_path: Path) -> None:
    upstreams = {"local": {"url": f"http://127.0.0.1:{free_port()}"}}
    tally: collections.Counter[str] = collections.Counter()
    with MirrorProcess(tmp_path / "m", upstreams) as mirror:
        for case, data in FRAMING_ABUSE.items():
            if isinstance(data, list) and case == "garbage after an answered request":
                received = _answered_then(mirror.port, data)
            else:
                received = exchange(mirror.port, data)
            check_answer(case, received, tally)
            last = read_responses(received)[-1]
            if case != "HTTP/0.9-style line" and case != "bare LF line ends":
                assert 400 <= last.status < 500, f"{case}: {last.status}"
                assert json.loads(last.body)["errors"][0]["code"], case
                assert last.header("Docker-Distribution-API-Version") == "registry/2.0", case
        print(
            f"\nframing abuse: {len(FRAMING_ABUSE)} cases, statuses {dict(sorted(tally.items()))}"
        )
        assert tally["431"] >= 2, tally
        assert tally["414"] == 1, tally
        assert http_request("GET", f"{mirror.url}/v2/").status == 200
        assert log_problems(mirror.log_text()) == []


def _answered_then(port: int, parts: list[bytes]) -> bytes:
    """A good request, its whole answer read, then `parts[1]` on the same connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.sendall(parts[0])
        received = b""
        while not _complete(received):
            chunk = sock.recv(65536)
            assert chunk, "closed before the first answer was complete"
            received += chunk
        sock.sendall(parts[1])
        while chunk := sock.recv(65536):
            received += chunk
        return received


def _complete(received: bytes) -> bool:
    head, sep, body = received.partition(b"\r\n\r\n")
    if not sep:
        return False
    match = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    return match is not None and len(body) >= int(match.group(1))
