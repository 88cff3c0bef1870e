"""structlog set-up and the one access line per request.

JSON lines when stderr is not a terminal, coloured key-value lines when it is.
Context bound with `structlog.contextvars` (the request id) reaches every line
logged while a request is handled. A processor masks anything that looks like
a credential, whatever key it was logged under.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
from collections.abc import MutableMapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import structlog
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import HttpProcessingError

_SECRET_KEYS = re.compile(r"pass(word)?|secret|token|authorization|credential", re.IGNORECASE)
_SECRET_VALUES = re.compile(r"\b(Bearer|Basic)\s+[A-Za-z0-9._~+/=-]+", re.IGNORECASE)


@functools.lru_cache(maxsize=256)
def _secret_keys(keys: tuple[str, ...]) -> tuple[str, ...]:
    # A line's keys are the code's own names, in a few shapes: each shape is matched
    # once (the case-insensitive patterns cost microseconds per search).
    return tuple(key for key in keys if key != "event" and _SECRET_KEYS.search(key))


def mask_credentials(
    _logger: Any, _method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key in _secret_keys(tuple(event)):
        if event[key] is not None:
            event[key] = "***"
    # Every line passes here (two per pull). A credential in a value needs whitespace
    # after its scheme, and most lines have none in any value: one split over them all
    # (joined by a non-space) says so before any value is searched.
    texts = "\0".join(value for value in event.values() if isinstance(value, str))
    if len(texts.split(None, 1)) > 1:
        for key, value in event.items():
            if isinstance(value, str) and _SECRET_VALUES.search(value):
                event[key] = _SECRET_VALUES.sub(r"\1 ***", value)
    return event


def _drop_bad_client_input(record: logging.LogRecord) -> bool:
    """aiohttp logs a malformed request (garbage, oversized headers) as an error with a
    traceback; the client was answered 400 and there is nothing for an operator to do."""
    return not (record.exc_info and isinstance(record.exc_info[1], HttpProcessingError))


def configure_logging(level: str = "info", fmt: str = "auto") -> None:
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer()
    )
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        mask_credentials,
    ]
    # Lines from the standard library's loggers (aiohttp, asyncio) go out in the same form.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    handler.addFilter(_drop_bad_client_input)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    # The JSON renderer writes `exc_info` as a bare `true`: render the traceback first
    # (the console renderer prints it itself, and objects to a pre-rendered one).
    tracebacks = [structlog.processors.format_exc_info] if use_json else []
    structlog.configure(
        processors=[*shared, *tracebacks, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        # One write per line: workers sharing a log stream never interleave mid-line.
        logger_factory=structlog.WriteLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )


class Outcome(StrEnum):
    """How a response ended, on its access line."""

    COMPLETE = "complete"  # everything was handed to the kernel
    CLIENT_CLOSED = "client_closed"  # the client hung up first: ordinary, not an error
    ABORTED = "aborted"  # the mirror broke the connection (a failed download)


@dataclass
class AccessInfo:
    """What the handlers learned about a request, for its access line."""

    request_id: str
    upstream: str | None = None
    repository: str | None = None
    reference: str | None = None
    cache: str | None = None
    kind: str = "other"  # base, catalog, manifest, blob, tags, referrers
    user: str | None = None  # the authenticated client, None when anonymous
    body_bytes: int = 0  # blob or manifest bytes sent
    outcome: Outcome = Outcome.COMPLETE


ACCESS_INFO = web.RequestKey("access_info", AccessInfo)
access_log = structlog.get_logger("mirror.access")
audit_log = structlog.get_logger("mirror.audit")


class AccessLogger(AbstractAccessLogger):
    """aiohttp calls this once the response is fully sent: one line per request."""

    def __init__(self, logger: logging.Logger, log_format: str):
        super().__init__(logger, log_format)
        self._pid = os.getpid()  # built in the serving process, after any fork

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        info = request.get(ACCESS_INFO)
        access_log.info(
            "request",
            request_id=info.request_id if info else None,
            method=request.method,
            path=request.path,
            ns=request.query.get("ns"),
            upstream=info.upstream if info else None,
            repository=info.repository if info else None,
            reference=info.reference if info else None,
            cache=info.cache if info else None,
            status=response.status,
            kind=info.kind if info else None,
            bytes=info.body_bytes if info else 0,
            outcome=info.outcome.value if info else None,
            seconds=round(time, 4),
            remote=request.remote,
            user=info.user if info else None,
            pid=self._pid,  # which worker, with serve --workers
        )
        if info is not None and info.kind == "manifest" and request.method == "GET":
            # The audit trail: one line per pull, who pulled what and what they got.
            audit_log.info(
                "pull",
                user=info.user,
                remote=request.remote,
                upstream=info.upstream,
                repository=info.repository,
                reference=info.reference,
                digest=response.headers.get("Docker-Content-Digest"),
                status=response.status,
                cache=info.cache,
            )
