"""The operators' console: pages under `/ui/` and their JSON API under `/api/v1/`.

`setup_console(app)` (called by `create_app` when `ui.enabled`) adds the gate middleware
(`gate.py`: who may view, who may act, CSRF), the API (`api.py`), the pages
(`pages.py`), one `on_response_prepare` hook (recent pulls, a due snapshot), and
the console's resources in a `cleanup_ctx` entry that runs after the core is up: the
traffic history, the catalog snapshot and the marks of upstream failure counts (each an
owned background task) and the jobs.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import structlog
from aiohttp import web

from mirror.api.services import SERVICES
from mirror.app import CONFIG, METADATA, STORE, UPSTREAMS
from mirror.concurrency import TaskOwner
from mirror.console import api, pages
from mirror.console.gate import GATE, ConsoleGate, console_gate, csrf_secret
from mirror.console.history import RecentPulls, TrafficHistory, metric_totals
from mirror.console.jobs import Jobs
from mirror.console.snapshot import Catalog
from mirror.logging import ACCESS_INFO
from mirror.metrics import METRICS

log = structlog.get_logger(__name__)

MARK_EVERY = 60.0


def setup_console(app: web.Application) -> None:
    app.middlewares.append(console_gate)
    app[api.PULLS] = RecentPulls()
    app[api.HISTORY] = TrafficHistory(metric_totals(app[METRICS]))
    app.on_response_prepare.append(_on_prepare)
    app.cleanup_ctx.append(_console)
    api.setup(app)
    pages.setup(app)


async def _console(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    if config.auth.htpasswd is not None and config.ui.admins not in config.auth.groups:
        # Not an error: a console to look at is useful without anyone who may act.
        log.warning("console_without_admins", group=config.ui.admins)
    secret = await asyncio.to_thread(csrf_secret, config, app[STORE].meta_dir)
    app[GATE] = ConsoleGate(app[SERVICES].access, config, secret)
    app[api.CATALOG] = Catalog(app[METADATA])
    app[api.JOBS] = Jobs(app[METADATA])
    background = TaskOwner("console")
    background.spawn(app[api.HISTORY].run(), name="console-history")
    background.spawn(app[api.CATALOG].run(), name="console-snapshot")
    background.spawn(_mark_upstreams(app), name="console-upstream-marks")
    try:
        yield
    finally:
        await app[api.JOBS].close()
        await background.close()


async def _mark_upstreams(app: web.Application) -> None:
    """Each upstream's failure counts, once a minute: its recent errors are the
    difference (`UpstreamHealth.recent_failures`)."""
    while True:
        for client in app[UPSTREAMS].values():
            client.health.mark()
        await asyncio.sleep(MARK_EVERY)


async def _on_prepare(request: web.Request, response: web.StreamResponse) -> None:
    """A blob or manifest GET is answered: note it among the recent pulls; new content
    makes the catalog snapshot due."""
    info = request.get(ACCESS_INFO)
    if info is None or request.method != "GET" or info.kind not in ("blob", "manifest"):
        return
    app = request.app
    app[api.PULLS].note(info, response.status)
    new_content = info.kind == "manifest" and response.status == 200 and info.cache == "miss"
    if new_content and api.CATALOG in app:
        app[api.CATALOG].changed()
