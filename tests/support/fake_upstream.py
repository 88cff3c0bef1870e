"""A programmable stand-in registry, only for faults a real registry cannot produce.

Resets mid-blob, bytes that do not match their digest, 5xx and 429 answers, bodies that
stall until the test releases them. Each test registers what a path should do; every
request is recorded so tests can count what reached the upstream.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

Behaviour = Callable[[web.Request], Awaitable[web.StreamResponse]]


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class FakeUpstream:
    behaviours: dict[tuple[str, str], list[Behaviour]] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)
    # The answer to any request without a behaviour of its own (None: 404).
    otherwise: Behaviour | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        return app

    def on(self, method: str, path: str, *behaviours: Behaviour) -> None:
        """Answer `method path` with each behaviour in turn; the last one repeats."""
        self.behaviours[(method, path)] = list(behaviours)

    def count(self, method: str, path: str) -> int:
        return sum(1 for m, p in self.requests if m == method and p == path)

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.method, request.path))
        queue = self.behaviours.get((request.method, request.path))
        if not queue and self.otherwise is not None:
            return await self.otherwise(request)
        if not queue:
            return web.json_response({"errors": [{"code": "NAME_UNKNOWN"}]}, status=404)
        behaviour = queue.pop(0) if len(queue) > 1 else queue[0]
        return await behaviour(request)


def serve(
    data: bytes, *, content_type: str = "application/octet-stream", digest: str | None = None
) -> Behaviour:
    """A correct answer (HEAD gets the headers only)."""

    async def behaviour(request: web.Request) -> web.StreamResponse:
        headers = {"Docker-Content-Digest": digest or digest_of(data)}
        if request.method == "HEAD":
            response = web.StreamResponse(headers={**headers, "Content-Type": content_type})
            response.content_length = len(data)
            await response.prepare(request)
            return response
        return web.Response(body=data, content_type=content_type, headers=headers)

    return behaviour


def status(code: int, headers: dict[str, str] | None = None) -> Behaviour:
    async def behaviour(request: web.Request) -> web.StreamResponse:
        return web.json_response({"errors": [{"code": "UNKNOWN"}]}, status=code, headers=headers)

    return behaviour


def reset_after(data: bytes, sent: int) -> Behaviour:
    """Announce the whole body, send `sent` bytes, then drop the connection."""

    async def behaviour(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = len(data)
        await response.prepare(request)
        await response.write(data[:sent])
        assert request.transport is not None
        request.transport.abort()
        return response

    return behaviour


def stall_after(data: bytes, sent: int, release: asyncio.Event) -> Behaviour:
    """Send `sent` bytes, then the rest only once `release` is set."""

    async def behaviour(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = len(data)
        await response.prepare(request)
        await response.write(data[:sent])
        await release.wait()
        await response.write(data[sent:])
        await response.write_eof()
        return response

    return behaviour


def hang(release: asyncio.Event) -> Behaviour:
    """Send nothing at all until released (an upstream that accepted and went silent)."""

    async def behaviour(request: web.Request) -> web.StreamResponse:
        await release.wait()
        return web.Response(status=503)

    return behaviour


def drop_connection() -> Behaviour:
    """Accept the request and hang up before any response byte."""

    async def behaviour(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        request.transport.abort()
        return web.Response()

    return behaviour


async def fake_with_blobs(
    start_server: Callable[..., Awaitable[TestServer]], blobs: list[bytes], repository: str
) -> tuple[FakeUpstream, str]:
    """A fake upstream serving `blobs` (GET and HEAD) in `repository`, started with
    pytest-aiohttp's `aiohttp_server`; returns it and its URL."""
    fake = FakeUpstream()
    for data in blobs:
        for method in ("GET", "HEAD"):
            fake.on(method, f"/v2/{repository}/blobs/{digest_of(data)}", serve(data))
    server = await start_server(fake.app(), host="127.0.0.1")
    return fake, str(server.make_url("")).rstrip("/")


async def get_ok(http: aiohttp.ClientSession, url: str, **kwargs: Any) -> bytes:
    """GET `url`, which must answer 200; its body."""
    async with http.get(url, **kwargs) as response:
        assert response.status == 200, url
        return await response.read()
