"""The operators' console: pages under `/ui/` and their JSON API under `/api/v1/`.

`setup_console(app)` (called by `create_app` when `ui.enabled`) adds the gate middleware
(`gate.py`: who may view, who may act, CSRF), the API (`api.py`), the pages
(`pages.py`), one `on_response_prepare` hook (recent pulls, manifest access times), and
the console's resources in a `cleanup_ctx` entry that runs after the core is up: the
traffic history and the catalog snapshot (each an owned background task) and the jobs.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from aiohttp import web

from mirror.api.services import SERVICES
from mirror.app import CONFIG, METADATA, STORE
from mirror.concurrency import TaskOwner
from mirror.console import api, pages
from mirror.console.gate import GATE, ConsoleGate, console_gate, csrf_secret
from mirror.console.history import RecentPulls, TrafficHistory, metric_totals
from mirror.console.jobs import Jobs
from mirror.console.snapshot import Catalog
from mirror.logging import ACCESS_INFO
from mirror.metrics import METRICS


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
    secret = await asyncio.to_thread(csrf_secret, config, app[STORE].meta_dir)
    app[GATE] = ConsoleGate(app[SERVICES].access, config, secret)
    app[api.CATALOG] = Catalog(app[METADATA])
    app[api.JOBS] = Jobs()
    background = TaskOwner("console")
    background.spawn(app[api.HISTORY].run(), name="console-history")
    background.spawn(app[api.CATALOG].run(), name="console-snapshot")
    try:
        yield
    finally:
        await app[api.JOBS].close()
        await background.close()


async def _on_prepare(request: web.Request, response: web.StreamResponse) -> None:
    """A blob or manifest GET is answered: note it among the recent pulls; a manifest's
    last access time moves (eviction and "last pulled" both read it); new content makes
    the catalog snapshot due."""
    info = request.get(ACCESS_INFO)
    if info is None or request.method != "GET" or info.kind not in ("blob", "manifest"):
        return
    app = request.app
    app[api.PULLS].note(info, response.status)
    if info.kind != "manifest" or response.status != 200:
        return
    digest = response.headers.get("Docker-Content-Digest")
    if digest:
        app[SERVICES].blobs.note_access(digest)
    if info.cache == "miss" and api.CATALOG in app:
        app[api.CATALOG].changed()
