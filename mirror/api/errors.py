"""OCI error JSON: the one place a `MirrorError` becomes an HTTP response.

The middleware also maps what aiohttp raises for requests that match no route
or use a method we do not serve, so every error a client sees is
`{"errors": [{"code", "message", "detail"}]}` with distribution's status.
"""

from __future__ import annotations

import json
from typing import Any

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from mirror.errors import MirrorError, NameUnknown, Unsupported

log = structlog.get_logger(__name__)


def error_response(error: MirrorError) -> web.Response:
    payload: dict[str, Any] = {"code": error.code, "message": error.message}
    if error.detail is not None:
        payload["detail"] = error.detail
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
