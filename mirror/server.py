"""The connection layer: how the aiohttp server that carries the app is built and run.

aiohttp answers some requests before any handler or middleware sees them: a
malformed request line, a bad header, conflicting Content-Length and
Transfer-Encoding, an over-long line, too many headers. Its own answer is a
plain-text 400 and an error-level log line with a traceback. Here the protocol
class answers them as OCI error JSON with a fitting status (431 for header
fields over the limit, 414 for an over-long request line, 400 otherwise) and
logs one info line: a client that sends garbage is ordinary, not an error.

`run()` serves an app the way `web.run_app` does (signals, graceful shut-down),
with this protocol class; `MirrorRunner` is the same for tests and embedders. In
fleet mode it also serves the peer endpoint (`PeerSite`) on `cluster.listen`, with a
runner of its own: an aiohttp runner serves one app with one router, and a separate
one is what keeps the public port from ever reaching the peer paths.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import structlog
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import BadHttpMethod, HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler

from mirror.api.middleware import API_VERSION_HEADER

log = structlog.get_logger(__name__)

# aiohttp gives one LineTooLong for both the request line and a header field, with
# the limit it hit; distinct limits tell them apart.
MAX_REQUEST_LINE = 8190
MAX_FIELD_SIZE = 8192
MAX_HEADERS = 128
MESSAGE_MAX = 200


def protocol_error_status(exc: BaseException | None) -> HTTPStatus:
    """The status for a request aiohttp's parser refused."""
    if isinstance(exc, LineTooLong):
        limit = exc.args[1] if len(exc.args) > 1 else None
        if limit == MAX_FIELD_SIZE:
            return HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE
        if limit == MAX_REQUEST_LINE:
            return HTTPStatus.REQUEST_URI_TOO_LONG
    if isinstance(exc, HttpProcessingError) and "Too many headers" in exc.message:
        return HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE
    return HTTPStatus.BAD_REQUEST


def oci_error_body(code: str, message: str) -> bytes:
    return json.dumps({"errors": [{"code": code, "message": message[:MESSAGE_MAX]}]}).encode()


class OciRequestHandler(RequestHandler):
    """aiohttp's protocol, answering the requests it refuses by itself in OCI form."""

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            # Headers are gone; aiohttp then breaks the connection, the only honest
            # signal left.
            raise ConnectionError("response already started")
        if status >= 500 or (exc is not None and not isinstance(exc, HttpProcessingError)):
            # Reached only past the middlewares: a bug, so it is logged whole.
            log.error("unhandled_error", status=status, error=repr(exc))
            status, code, text = 500, "UNKNOWN", "internal error"
        else:
            http_status = protocol_error_status(exc)
            status = http_status.value
            code = "UNSUPPORTED" if status == 400 else "SIZE_INVALID"
            raw = exc.message if isinstance(exc, HttpProcessingError) else message
            # The parser draws a caret under the fault on a second line: one line here.
            reason = " ".join((raw or "").split())[:MESSAGE_MAX]
            text = f"malformed request: {reason or http_status.phrase}"
            if not isinstance(exc, BadHttpMethod) or self._request_count > 1:
                # TLS or other non-HTTP bytes on the port are the common case of a
                # bad first method; the rest is worth a line, but not an error.
                log.info(
                    "request_refused",
                    status=status,
                    reason=reason,
                    remote=request.remote,
                )
        response = web.Response(
            status=status,
            body=oci_error_body(code, text),
            content_type="application/json",
            headers={API_VERSION_HEADER[0]: API_VERSION_HEADER[1]},
        )
        response.force_close()
        return response

    def log_exception(self, *args: Any, **kw: Any) -> None:
        # After a response, a body that breaks its framing (a bad chunk) surfaces while
        # aiohttp drains it: the client's fault, answered already.
        if isinstance(kw.get("exc_info"), HttpProcessingError):
            log.info("request_body_refused", reason=str(kw["exc_info"])[:MESSAGE_MAX])
            return
        super().log_exception(*args, **kw)


class OciServer(web.Server):
    def __call__(self) -> RequestHandler:
        return OciRequestHandler(self, loop=self._loop, **self._kwargs)


class MirrorRunner(web.AppRunner):
    """An AppRunner whose connections use `OciRequestHandler`."""

    def __init__(self, app: web.Application, **kwargs: Any):
        kwargs.setdefault("max_line_size", MAX_REQUEST_LINE)
        kwargs.setdefault("max_field_size", MAX_FIELD_SIZE)
        kwargs.setdefault("max_headers", MAX_HEADERS)
        super().__init__(app, **kwargs)

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # aiohttp builds a plain Server (starting the app on the way); ours differs
        # only in the protocol class it hands each connection.
        server.__class__ = OciServer
        return server


@dataclass(frozen=True, slots=True)
class PeerSite:
    """The fleet's peer endpoint: a second app, built from the started mirror app, on its
    own port and runner (`app.create_peer_app`)."""

    build: Callable[[web.Application], web.Application]
    host: str
    port: int


async def _serve(
    app: web.Application,
    host: str,
    port: int,
    ssl_context: ssl.SSLContext | None,
    reuse_port: bool,
    runner_options: dict[str, Any],
    peer: PeerSite | None,
) -> None:
    runner = MirrorRunner(app, handle_signals=True, **runner_options)
    await runner.setup()
    peer_runner: MirrorRunner | None = None
    try:
        if peer is not None:
            # Built once the mirror app has started: it serves that app's blob cache.
            peer_runner = MirrorRunner(peer.build(app), **runner_options)
            await peer_runner.setup()
            await web.TCPSite(peer_runner, peer.host, peer.port, reuse_port=reuse_port).start()
        site = web.TCPSite(runner, host, port, ssl_context=ssl_context, reuse_port=reuse_port)
        await site.start()
        await asyncio.Event().wait()  # until a signal ends the loop
    finally:
        # The peer endpoint first: its responses read the caches the mirror app closes.
        if peer_runner is not None:
            await peer_runner.cleanup()
        await runner.cleanup()


def run(
    app: web.Application,
    *,
    host: str,
    port: int,
    ssl_context: ssl.SSLContext | None,
    idle_timeout: float,
    reuse_port: bool,
    access_log_class: type[AbstractAccessLogger],
    shutdown_timeout: float = 10.0,
    peer: PeerSite | None = None,
    event_loop: str = "asyncio",
) -> None:
    """Serve `app` (and the peer endpoint, given `peer`) until SIGINT or SIGTERM, then
    shut down gracefully."""
    options: dict[str, Any] = {
        "keepalive_timeout": idle_timeout,
        "access_log_class": access_log_class,
        "shutdown_timeout": shutdown_timeout,
    }
    # SIGTERM and SIGINT raise GracefulExit; asyncio.run then cancels _serve, whose
    # finally runs the app's clean-up.
    with (
        contextlib.suppress(web.GracefulExit, KeyboardInterrupt),
        asyncio.Runner(loop_factory=loop_factory(event_loop)) as runner,
    ):
        runner.run(_serve(app, host, port, ssl_context, reuse_port, options, peer))


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop `server.event_loop` asks for; None is asyncio's own.

    uvloop (libuv) spent 5-10% less CPU per warm manifest request in
    `bench/throughput.py`, none less per small blob, and it has no `loop.sendfile`
    (blobs to remote clients go out in chunks): so it is asked for, not the default. A
    platform without it runs asyncio's loop.
    """
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            log.warning("uvloop_unavailable", fallback="asyncio")
        return None
    return uvloop.new_event_loop
