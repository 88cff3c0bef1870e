"""The console's pages as served (`mirror/console/pages.py`), without a browser: the
redirect to /ui/, the shells, their headers, that every asset a page names is served
from the package, and /sign-in. What the pages show is the browser test's
(test_console_browser.py)."""

from __future__ import annotations

import fnmatch
import re
import tomllib
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from conftest import MirrorFactory, Upstream
from support.htpasswd import basic, write_htpasswd

from mirror.console import pages
from mirror.console.pages import SIGN_IN

ROOT = Path(__file__).parent.parent


@pytest.fixture
async def client(aiohttp_client: Any) -> TestClient:
    """The pages alone on a bare app: no mirror, no API behind them."""
    app = web.Application()
    pages.setup(app)
    client: TestClient = await aiohttp_client(app)
    return client


async def test_the_server_root_leads_to_the_console(client: TestClient) -> None:
    for path in ("/", "/ui"):
        response = await client.get(path, allow_redirects=False)
        assert response.status == 302
        assert response.headers["Location"] == "/ui/"


@pytest.mark.parametrize("path", ["/ui/", "/ui/browse", "/ui/seed"])
async def test_every_page_is_a_shell_under_a_strict_policy(client: TestClient, path: str) -> None:
    response = await client.get(path)
    assert response.status == 200
    assert response.content_type == "text/html"
    policy = response.headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy
    assert "default-src 'none'" in policy
    assert "unsafe" not in policy
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    html = await response.text()
    # No inline script or style: everything comes from /ui/static/ and nowhere else.
    assert re.search(r"<script(?![^>]*\bsrc=)", html) is None
    assert " style=" not in html
    assert "<style" not in html
    assets = re.findall(r'(?:src|href)="([^"#]+)"', html)
    static = [a for a in assets if a.startswith("/ui/static/")]
    assert any(a.startswith("/ui/static/console.js?v=") for a in static)
    assert set(assets) - set(static) <= {*pages.PAGES, SIGN_IN}
    for asset in static:
        served = await client.get(asset)
        assert served.status == 200, asset
        assert served.headers["Content-Security-Policy"] == policy


async def test_static_files_only_from_the_package(client: TestClient) -> None:
    response = await client.get("/ui/static/console.js")
    assert response.status == 200
    assert response.content_type in ("application/javascript", "text/javascript")
    for path in ("/ui/static/../pages.py", "/ui/static/%2e%2e/pages.py", "/ui/static/nope.js"):
        assert (await client.get(path)).status == 404


def test_vendored_code_ships_with_its_licence_and_provenance() -> None:
    static = Path(pages.STATIC)
    readme = (static / "README.md").read_text(encoding="utf-8")
    for vendored in (p for p in static.iterdir() if p.is_dir()):
        assert (vendored / "LICENSE").is_file(), vendored
        assert f"`{vendored.name}/`" in readme, vendored


async def test_sign_in_asks_the_browser_until_it_has_a_user(
    make_mirror: MirrorFactory, upstream: Upstream, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    htpasswd = write_htpasswd(tmp_path / "htpasswd", {"ada": "ada-pw"})
    mirror = await make_mirror(
        {"local": {"url": upstream.url}}, auth={"htpasswd": str(htpasswd), "realm": "here"}
    )
    open_mirror = await make_mirror({"local": {"url": upstream.url}})

    # The registry API keeps its paths; `/` (past the app's catch-all) leads to the console.
    async with http.get(mirror.url + "/", allow_redirects=False) as response:
        assert response.status == 302
        assert response.headers["Location"] == "/ui/"
    for headers in ({}, basic("ada", "wrong")):
        async with http.get(mirror.url + SIGN_IN, headers=headers) as response:
            assert response.status == 401
            assert response.headers["WWW-Authenticate"] == 'Basic realm="here"'
    good = basic("ada", "ada-pw")
    async with http.get(mirror.url + SIGN_IN, headers=good, allow_redirects=False) as response:
        assert response.status == 302
        assert response.headers["Location"] == "/ui/"
    # With no users configured there is nobody to sign in as.
    async with http.get(open_mirror.url + SIGN_IN, allow_redirects=False) as response:
        assert response.status == 302


def test_the_wheel_carries_every_template_and_asset() -> None:
    """Each file of the console's templates and static tree matches a package-data
    pattern, so an installed mirror serves what the source tree does."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = pyproject["tool"]["setuptools"]["package-data"]["mirror.console"]
    package = Path(pages.__file__).parent
    files = [p for d in (pages.TEMPLATES, pages.STATIC) for p in d.rglob("*") if p.is_file()]
    assert len(files) > 10
    for file in files:
        relative = file.relative_to(package).as_posix()
        # setuptools globs: `*` stays within one directory level
        assert any(
            fnmatch.fnmatch(relative, p) and relative.count("/") == p.count("/") for p in patterns
        ), relative
