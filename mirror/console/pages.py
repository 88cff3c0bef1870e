"""The console's pages: `/ui/` (overview), `/ui/browse`, `/ui/seed`, their static assets
under `/ui/static/`, and the redirect from `/` to `/ui/`.

`/sign-in` lets a browser log in where nothing else would ask it to (see `_sign_in`).

The pages are server-rendered Jinja2 shells (templates/); what they show comes from
the JSON API (`api.py`, `/api/v1/`) through the scripts in static/, so the page and
`curl` see the same data and the page refreshes without a reload. Every asset ships
in the package (static/README.md lists the vendored ones): the console works
air-gapped, and its Content-Security-Policy lets a page load and contact nothing but
this server. Who may see the pages is the gate's (`gate.py`), not this module's.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import aiohttp_jinja2
import jinja2
from aiohttp import web

from mirror.api.errors import expect_handler
from mirror.api.services import SERVICES
from mirror.app import CONFIG
from mirror.errors import Unauthorized

TEMPLATES = Path(__file__).parent / "templates"
STATIC = Path(__file__).parent / "static"
STATIC_ROUTE = "console-static"
SIGN_IN = "/sign-in"

# Scripts and styles from this origin only, no inline code, and requests (fetch) only
# to this origin: a page can neither run injected script nor reach another host.
CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "form-action 'self'",
        "base-uri 'none'",
        "frame-ancestors 'none'",
    )
)
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

# path -> (template, title); the titles are the navigation too.
PAGES = {
    "/ui/": ("overview.html", "Overview"),
    "/ui/browse": ("browse.html", "Browse"),
    "/ui/seed": ("seed.html", "Seed"),
}


def setup(app: web.Application) -> None:
    """Routes for the pages, their assets and `/`; templates; the pages' headers.

    Called by `setup_console` before `create_app` adds its catch-all GET route, which
    would otherwise answer these paths with an OCI 404."""
    env = aiohttp_jinja2.setup(
        app,
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=jinja2.select_autoescape(default=True),
        undefined=jinja2.StrictUndefined,
    )
    static = app.router.add_static("/ui/static", STATIC, name=STATIC_ROUTE, append_version=True)

    @functools.cache
    def asset(filename: str) -> str:
        # ?v=<content hash>: a new release's assets are never mixed with cached old ones.
        # Hashed once per process: the files do not change under a running server.
        return str(static.url_for(filename=filename))

    env.globals["asset"] = asset
    env.globals["nav"] = [(path, title) for path, (_, title) in PAGES.items()]
    env.globals["sign_in"] = SIGN_IN
    routes = app.router
    routes.add_get("/", _to_console, expect_handler=expect_handler)
    routes.add_get("/ui", _to_console, expect_handler=expect_handler)
    routes.add_get(SIGN_IN, _sign_in, expect_handler=expect_handler)
    for path in PAGES:
        routes.add_get(path, _page, expect_handler=expect_handler)
    app.on_response_prepare.append(_page_headers)


async def _to_console(request: web.Request) -> web.StreamResponse:
    # The registry API stays at /v2/; a person who opens the server's address lands here.
    raise web.HTTPFound("/ui/")


async def _sign_in(request: web.Request) -> web.StreamResponse:
    """Ask the browser for credentials (a Basic challenge) until it sends valid ones,
    then lead to the console.

    The gate lets a loopback viewer in anonymously, so the console's own paths never
    challenge one, and a browser sends Basic credentials only once challenged: a local
    operator could never act. This path is at the root on purpose: a browser then sends
    the credentials with every request under `/`, `/api/v1/` included."""
    principal = await request.app[SERVICES].access.authenticate(
        request.headers.get("Authorization")
    )  # wrong credentials: 401 with the challenge, and the browser asks again
    if principal.user is None and request.app[CONFIG].auth.htpasswd is not None:
        challenge = request.app[SERVICES].access.challenge
        raise Unauthorized("sign in to the console", headers={"WWW-Authenticate": challenge})
    raise web.HTTPFound("/ui/")


async def _page(request: web.Request) -> web.StreamResponse:
    template, title = PAGES[request.path]
    context: dict[str, Any] = {"title": title, "path": request.path}
    response = aiohttp_jinja2.render_template(template, request, context)
    # The shell holds no data (the scripts fetch it), but a stale one may hold old
    # asset versions.
    response.headers["Cache-Control"] = "no-cache"
    return response


async def _page_headers(request: web.Request, response: web.StreamResponse) -> None:
    if request.path == "/ui" or request.path.startswith("/ui/"):
        response.headers.update(PAGE_HEADERS)
