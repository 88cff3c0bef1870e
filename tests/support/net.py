"""Loopback networking helpers: free ports, bounded polling and a tiny sync HTTP client.

Everything here talks to 127.0.0.1 only. The HTTP client is built on ``http.client`` rather
than ``urllib`` so that proxy environment variables can never route test traffic off the
machine, and so that error responses are ordinary return values instead of exceptions that
hold open sockets.
"""

from __future__ import annotations

import asyncio
import http.client
import socket
import subprocess
import time
import urllib.parse
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from email.message import Message
from types import TracebackType
from typing import Self

LOOPBACK = "127.0.0.1"
# Sent unless the caller overrides it, so test-driven requests are recognisable in access logs.
USER_AGENT = "registry-mirror-tests/1"


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(
    predicate: Callable[[], bool],
    timeout: float = 10,
    interval: float = 0.02,
    message: str = "",
) -> None:
    """Poll ``predicate`` until it returns true; raise ``TimeoutError`` after ``timeout`` s.

    The predicate is always evaluated at least once, and once more after the deadline has
    passed, so a slow final poll cannot turn a success into a spurious timeout.
    """
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if time.monotonic() >= deadline:
            if predicate():
                return
            raise TimeoutError(message or f"condition not met within {timeout} s: {predicate!r}")
        time.sleep(interval)


def port_open(host: str, port: int) -> bool:
    """True when a TCP connection to ``host:port`` succeeds right now."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_for_port(host: str, port: int, timeout: float = 10) -> None:
    """Wait until something accepts TCP connections on ``host:port``."""
    wait_until(
        lambda: port_open(host, port),
        timeout=timeout,
        message=f"nothing listening on {host}:{port} after {timeout} s",
    )


@dataclass(frozen=True)
class HTTPResponse:
    """A fully read HTTP response; ``headers`` lookups are case-insensitive."""

    status: int
    headers: Message
    body: bytes

    def header(self, name: str, default: str = "") -> str:
        value = self.headers.get(name)
        return default if value is None else str(value)


def http_request(
    method: str,
    url: str,
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 30,
) -> HTTPResponse:
    """Send one plain-HTTP request and return the whole response (any status).

    Redirects are not followed: registries answer uploads with ``Location`` headers that the
    caller must interpret itself.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or parts.hostname is None:
        raise ValueError(f"only plain http URLs are supported: {url!r}")
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)
    try:
        sent = dict(headers or {})
        if not any(name.lower() == "user-agent" for name in sent):
            sent["User-Agent"] = USER_AGENT
        conn.request(method, target, body=body, headers=sent)
        resp = conn.getresponse()
        data = resp.read()
        return HTTPResponse(status=resp.status, headers=resp.msg, body=data)
    finally:
        conn.close()


async def eventually(predicate: Callable[[], bool], timeout: float = 10, message: str = "") -> None:
    """`wait_until` for async tests: polls in a worker thread so the event loop (and the
    in-process mirror on it) keeps running while we wait."""
    await asyncio.to_thread(wait_until, predicate, timeout, 0.02, message)


async def eventually_async(
    predicate: Callable[[], Awaitable[bool]], timeout: float = 10, message: str = ""
) -> None:
    """`eventually` for a predicate that is itself async (it asks something over the
    test's own event loop): polled on the loop, with the same bound."""
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() >= deadline:
            if await predicate():
                return
            raise TimeoutError(message or f"condition not met within {timeout} s: {predicate!r}")
        await asyncio.sleep(0.02)


class Service(ABC):
    """A server the tests start and stop: `with Thing(...) as thing:` runs start/stop.

    It listens on `port` on the loopback address; a service that runs as a child
    process keeps it in `_process`.
    """

    port: int = 0
    _process: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @abstractmethod
    def start(self) -> None:
        """Start serving; return once the service answers."""

    def stop(self) -> None:
        """Stop and release everything the service holds: by default, its process."""
        self.stop_process()

    def stop_process(self, timeout: float = 10) -> None:
        process, self._process = self._process, None
        if process is not None:
            process.terminate()
            process.wait(timeout=timeout)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
