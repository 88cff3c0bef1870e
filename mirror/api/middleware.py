"""What wraps every request: its context and access line, who is asking, and the
headers every response carries.

`request_context` opens the access record (`ACCESS_INFO`) and binds the request id
to every log line; `authenticate` sets the `PRINCIPAL` of each `/v2/` request;
`on_prepare` adds the API version, `OCI-Namespace` and request id headers and is the
last guard before the wire. Turning errors into OCI JSON is `api/errors.py`'s.
"""

from __future__ import annotations

import itertools
import secrets
import time

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from mirror.access import Principal
from mirror.api import transport
from mirror.api.services import SERVICES
from mirror.headers import header_safe
from mirror.logging import ACCESS_INFO, AccessInfo
from mirror.metrics import METRICS
from mirror.routing import is_registry_host

log = structlog.get_logger(__name__)

API_VERSION_HEADER = ("Docker-Distribution-API-Version", "registry/2.0")

PRINCIPAL = web.RequestKey("principal", Principal)


class RequestIds:
    """Request ids: 32 hex digits like a UUID's, unique across processes and nodes (a
    random half per process), without a uuid4's urandom call on every request."""

    def __init__(self) -> None:
        self._prefix = secrets.token_hex(8)
        self._count = itertools.count()

    def __call__(self) -> str:
        return f"{self._prefix}{next(self._count) & 0xFFFF_FFFF_FFFF_FFFF:016x}"


_request_ids = RequestIds()


@web.middleware
async def request_context(request: web.Request, handler: Handler) -> web.StreamResponse:
    request_id = _request_ids()
    info = AccessInfo(request_id=request_id)
    request[ACCESS_INFO] = info
    started = time.monotonic()
    structlog.contextvars.bind_contextvars(request_id=request_id)
    try:
        return await handler(request)
    except ConnectionError:
        response = transport.hung_up_response(request)
        if response is None:
            raise
        return response
    finally:
        structlog.contextvars.unbind_contextvars("request_id")
        if info.kind != "other":
            request.app[METRICS].observe_request(
                info.upstream,
                info.repository,
                info.kind,
                info.cache,
                info.body_bytes,
                time.monotonic() - started,
            )


@web.middleware
async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Who is asking, for every /v2/ request (the API version check included, so
    `docker login` meets the challenge there)."""
    if request.path == "/v2" or request.path.startswith("/v2/"):
        principal = await request.app[SERVICES].access.authenticate(
            request.headers.get("Authorization")
        )
        request[PRINCIPAL] = principal
        request[ACCESS_INFO].user = principal.user
    return await handler(request)


async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
    """Headers every response carries, streamed or not, error or not."""
    response.headers[API_VERSION_HEADER[0]] = API_VERSION_HEADER[1]
    namespace = request.query.get("ns")
    if namespace and response.status < 400 and is_registry_host(namespace):
        response.headers["OCI-Namespace"] = namespace
    info = request.get(ACCESS_INFO)
    if info is not None:
        response.headers["X-Request-Id"] = info.request_id
    _drop_unsafe_headers(response)


def _drop_unsafe_headers(response: web.StreamResponse) -> None:
    """The last guard before the wire: every value that reaches a header is validated
    where it is set, so a value that cannot be sent is a bug, and it is dropped (and
    logged) rather than sent or left to break the connection."""
    if header_safe("".join(response.headers.values())):
        return  # all of them at once (every response runs this): none is unsafe
    unsafe = [name for name, value in response.headers.items() if not header_safe(value)]
    for name in unsafe:
        log.warning(
            "unsafe_header_dropped",
            header=name,
            value=ascii(response.headers.get(name, ""))[:100],
            status=response.status,
        )
        response.headers.popall(name, None)
