"""OCI error JSON: the one place a `MirrorError` becomes an HTTP response.

The middleware also maps what aiohttp raises for requests that match no route
or use a method we do not serve, so every error a client sees is
`{"errors": [{"code", "message", "detail"}]}` with distribution's status. The
`Expect` header is answered before any middleware runs, so `expect_handler` (set
on every route) answers an expectation we cannot meet here, in the same form.
"""

from __future__ import annotations

import json
from typing import Any

import structlog
from aiohttp import HttpVersion11, web
from aiohttp.typedefs import Handler

from mirror.errors import MirrorError, NameUnknown, Unsupported

log = structlog.get_logger(__name__)


# Details echo request text (a name, a digest, `ns`); each raiser bounds its own, and
# this bounds the whole, so no request can make an error body large.
DETAIL_MAX = 2048


def _bounded_detail(detail: Any) -> Any:
    # default=str: a detail holding a non-JSON value (bytes, a path) is still said.
    text = json.dumps(detail, default=str)
    if len(text) <= DETAIL_MAX:
        return json.loads(text)
    return {"truncated": text[:DETAIL_MAX]}


def error_response(error: MirrorError) -> web.Response:
    payload: dict[str, Any] = {"code": error.code, "message": error.message}
    if error.detail is not None:
        payload["detail"] = _bounded_detail(error.detail)
    response = web.Response(
        status=error.status,
        body=json.dumps({"errors": [payload]}).encode(),
        content_type="application/json",
        headers=error.headers,
    )
    return response


@web.middleware
async def oci_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except MirrorError as error:
        if error.status >= 500:
            log.warning(
                "request_failed", code=error.code, message=error.message, detail=error.detail
            )
        return error_response(error)
    except web.HTTPMethodNotAllowed:
        return error_response(
            Unsupported("this mirror is read-only", headers={"Allow": "GET, HEAD"})
        )
    except web.HTTPNotFound:
        return error_response(NameUnknown("no such endpoint"))
    except (web.HTTPException, ConnectionError):
        raise  # aiohttp's own answers, and clients that hung up
    except Exception as exc:  # a bug: say so in OCI form, and log it whole
        log.exception("unhandled_error", error=repr(exc))
        return error_response(MirrorError("internal error"))


async def expect_handler(request: web.Request) -> web.StreamResponse | None:
    """Nothing for `100-continue`: a read-only mirror wants no body, and the final answer
    may come without an interim 100. Any other expectation is 417, in OCI form."""
    expect = request.headers.get("Expect", "")
    if request.version != HttpVersion11 or expect.strip().lower() == "100-continue":
        return None
    payload = {"code": "UNSUPPORTED", "message": "unsupported Expect header"}
    return web.Response(
        status=417,
        body=json.dumps({"errors": [payload]}).encode(),
        content_type="application/json",
    )
