"""The console in a real browser: Debian's headless chromium, driven by selenium through
chromedriver, over a mirror that skopeo has pulled through from a real registry.

One scripted workload, then what an operator sees and does: the overview's numbers
and charts match the workload; browse lists the pulled images with their platforms;
an admin pins an image from the page and an eviction pass spares it; a viewer sees no
action and is refused one (403) even from the page's own script; no page logs an error
or asks another origin for anything.

`MIRROR_SCREENSHOT=docs/console.png` also writes the overview's screenshot there (it
is always written to the test's tmp dir).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import aiohttp
import pytest
from conftest import TAG, Mirror, MirrorFactory, Upstream
from support.browser import Browser, browser_available, chromium, foreign
from support.htpasswd import basic, write_htpasswd
from support.images import Image
from support.skopeo import skopeo_copy_async

from mirror.app import EVICTOR, METADATA, STORE
from mirror.console.api import CATALOG

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not browser_available(), reason="chromium and chromedriver not installed"),
]

ADMIN, ADMIN_PW = "ada", "ada-pw"
VIEWER, VIEWER_PW = "victor", "victor-pw"
KIB = 1024


@pytest.fixture
def browser(monkeypatch: pytest.MonkeyPatch) -> Iterator[Browser]:
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager never downloads
    with chromium(1280, 900) as browser:
        yield browser


@pytest.fixture
async def console_mirror(make_mirror: MirrorFactory, upstream: Upstream, tmp_path: Path) -> Mirror:
    htpasswd = write_htpasswd(tmp_path / "htpasswd", {ADMIN: ADMIN_PW, VIEWER: VIEWER_PW})
    return await make_mirror(
        {"local": {"url": upstream.url, "tag_ttl": "1h"}},
        auth={"htpasswd": str(htpasswd), "groups": {"admins": [ADMIN]}},
        ui={"admins": "admins"},
        storage={"eviction_interval": "1h"},  # eviction runs when the test says
    )


def transfers(image: Image) -> list[int]:
    """The body sizes of what a pull of `image` (every platform) GETs: its manifest,
    each platform's manifest, every blob."""
    sizes = [image.size, *(len(blob) for blob in image.blobs.values())]
    for child in image.children:
        sizes += transfers(child)
    return sizes


def digests(image: Image) -> set[str]:
    found = {image.digest, *image.blobs}
    for child in image.children:
        found |= digests(child)
    return found


async def pull(mirror: Mirror, kind: str, destination: Path) -> None:
    await skopeo_copy_async(
        f"docker://{mirror.host}/{Upstream.repo(kind)}:{TAG}", f"dir:{destination}"
    )


def mirror_origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def browse_url(mirror: Mirror, **query: str) -> str:
    return f"{mirror.url}/ui/browse" + (f"?{urlencode(query)}" if query else "")


# Each phase in the browser is one synchronous function, run in a thread
# (`asyncio.to_thread`): selenium blocks, and the mirror serves on the test's loop.


@dataclasses.dataclass
class Overview:
    values: dict[str, str]
    hit_ratio_text: str
    session: str
    charts_drawn: bool
    pulled: set[str]
    upstream_row: str


def sign_in(browser: Browser, mirror: Mirror) -> tuple[str, str]:
    """As a person does: the address, then /sign-in's Basic prompt (answered with the
    address's credentials). The console first opens anonymously (a loopback viewer is
    let in unasked), then signed in, and stays signed in without them in the address.
    Returns the session badge before and after."""
    browser.open(f"http://{ADMIN}:{ADMIN_PW}@{mirror.host}/")  # `/` leads to the console
    browser.wait(lambda _: browser.find("#sign-in").is_displayed(), "no sign-in link")
    before = browser.find("#session").text
    browser.find("#sign-in").click()
    browser.wait(lambda _: browser.find("#session").text == f"{ADMIN} · admin", "not signed in")
    browser.open(f"{mirror.url}/")
    browser.wait(lambda _: browser.find("#session").text != "…", "no session")
    assert browser.driver.current_url == f"{mirror.url}/ui/"
    return before, browser.find("#session").text


def read_overview(browser: Browser, hits: int, misses: int) -> Overview:
    # It polls: wait for the update that shows the whole workload.
    browser.wait(
        lambda _: browser.value("hits") == str(hits) and browser.value("misses") == str(misses),
        f"the overview never showed {hits} hits and {misses} misses",
    )
    ids = ("hit-ratio", "bytes-upstream", "bytes-cache", "bytes-peer", "saved")
    ids += ("usage-bytes", "usage-blobs")
    values = {name: browser.value(name) for name in ids}
    # The day's window holds the same traffic; back to the hour for the screenshot.
    browser.find('[data-range="day"]').click()
    values["day-hits"] = browser.value("hits")
    browser.find('[data-range="hour"]').click()
    return Overview(
        values=values,
        hit_ratio_text=browser.find("#hit-ratio").text,
        session=browser.find("#session").text,
        charts_drawn=all(
            browser.find_all(f"#{chart} canvas") for chart in ("chart-requests", "chart-bytes")
        ),
        pulled={cell.text for cell in browser.find_all("#pulls tbody tr td:nth-child(3)")},
        upstream_row=browser.find('#upstreams tr[data-upstream="local"]').text,
    )


def read_browse(browser: Browser, mirror: Mirror) -> tuple[set[str], dict[str, str]]:
    """The repositories listed, and the index's platforms (name -> manifest digest)."""
    browser.open(browse_url(mirror))
    browser.wait(lambda _: browser.find_all("#repositories tbody tr"), "no repository listed")
    listed = {
        str(row.get_attribute("data-repository"))
        for row in browser.find_all("#repositories tbody tr")
    }
    # The search box narrows the list by name.
    browser.find("#q").send_keys("index\n")
    browser.wait(lambda _: "q=index" in browser.driver.current_url, "the search did not run")
    browser.wait(lambda _: browser.find_all("#repositories tbody tr"), "nothing found")
    found = [
        row.get_attribute("data-repository") for row in browser.find_all("#repositories tbody tr")
    ]
    assert found == [f"local/{Upstream.repo('oci-index')}"], found
    browser.open(
        browse_url(mirror, upstream="local", repository=Upstream.repo("oci-index"), reference=TAG)
    )
    browser.wait(lambda _: browser.find_all("section.platform"), "no platform shown")
    platforms = {
        str(section.get_attribute("data-platform")): str(section.get_attribute("data-digest"))
        for section in browser.find_all("section.platform")
    }
    return listed, platforms


def pin_from_page(browser: Browser, page: str) -> str:
    """Pin, then refresh the tag; the page's answer to the refresh."""
    browser.open(page)
    browser.wait(lambda _: browser.find("#pin").is_displayed(), "no pin button for an admin")
    browser.find("#pin").click()
    browser.wait(
        lambda _: browser.find("#manifest-view").get_attribute("data-pinned") == "true",
        "the page never showed the image pinned",
    )
    browser.find("#refresh").click()  # revalidates the tag with the upstream now
    browser.wait(lambda _: browser.find("#flash").text.startswith("Tag "), "no refresh answer")
    return browser.find("#flash").text


def seed_from_page(browser: Browser, mirror: Mirror, reference: str) -> list[str]:
    """Submit the seed form; the job's row (id, state, progress, bytes, errors) once done."""
    browser.open(f"{mirror.url}/ui/seed")
    browser.wait(lambda _: browser.find("#seed-form").is_displayed(), "no seed form for an admin")
    browser.find("#references").send_keys(reference)
    browser.find("#seed-form button[type=submit]").click()
    browser.wait(
        lambda _: browser.find_all('#jobs tr[data-state="done"], #jobs tr[data-state="failed"]'),
        "the seed job never finished on the page",
    )
    row = browser.find("#jobs tbody tr")
    return [str(row.get_attribute("data-state"))] + [
        c.text for c in row.find_elements("css selector", "td")
    ]


def act_as_viewer(browser: Browser, page: str) -> tuple[list[bool], int]:
    """Whether any action control shows for a viewer, and the status of the page's own
    unpin POST."""
    browser.authenticate(VIEWER, VIEWER_PW)
    browser.open(page)
    browser.wait(lambda _: browser.find("#session").text == VIEWER, "no viewer session")
    browser.wait(lambda _: browser.find_all("section.platform"), "no platform shown")
    shown = [browser.find(f"#{c}").is_displayed() for c in ("actions", "pin", "unpin", "evict")]
    browser.open(f"{mirror_origin(page)}/ui/seed")
    browser.wait(lambda _: browser.find("#seed-denied").is_displayed(), "no note for a viewer")
    shown.append(browser.find("#seed-form").is_displayed())
    status = browser.run_async(
        "Console.post('/api/v1/unpin', arguments[0])"
        ".then(() => done(200), (error) => done(error.status));",
        {"upstream": "local", "repository": Upstream.repo("oci"), "reference": TAG},
    )
    return shown, int(status)


async def test_console_in_a_browser(
    console_mirror: Mirror,
    upstream: Upstream,
    browser: Browser,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    mirror = console_mirror
    oci, index = upstream.images["oci"], upstream.images["oci-index"]

    # The workload: two images pulled once (misses), one of them again (hits).
    await pull(mirror, "oci", tmp_path / "pull-1")
    await pull(mirror, "oci-index", tmp_path / "pull-2")
    await pull(mirror, "oci", tmp_path / "pull-3")
    await mirror.settled()
    # The blob count comes from a periodic catalog snapshot: take it now.
    await mirror.server.app[CATALOG].refresh()
    from_upstream = transfers(oci) + transfers(index)
    from_cache = transfers(oci)
    hits, misses = len(from_cache), len(from_upstream)

    # The overview, as an admin: numbers as the workload made them, charts drawn.
    badges = await asyncio.to_thread(sign_in, browser, mirror)
    assert badges == ("anonymous", f"{ADMIN} · admin")
    overview = await asyncio.to_thread(read_overview, browser, hits, misses)
    # The API rounds the ratio to four places.
    assert float(overview.values["hit-ratio"]) == pytest.approx(hits / (hits + misses), abs=1e-4)
    assert overview.hit_ratio_text == f"{100 * hits / (hits + misses):.1f} %"
    assert int(overview.values["bytes-upstream"]) == sum(from_upstream)
    assert int(overview.values["bytes-cache"]) == sum(from_cache)
    assert int(overview.values["bytes-peer"]) == 0
    assert int(overview.values["day-hits"]) == hits
    assert int(overview.values["saved"]) == sum(from_cache)
    assert int(overview.values["usage-bytes"]) == sum(from_upstream)
    assert int(overview.values["usage-blobs"]) == len(digests(oci) | digests(index))
    assert overview.session == f"{ADMIN} · admin"
    assert overview.charts_drawn
    assert f"local/{Upstream.repo('oci')}:{TAG}" in overview.pulled
    assert f"local/{Upstream.repo('oci-index')}:{TAG}" in overview.pulled
    assert upstream.url in overview.upstream_row
    shot = tmp_path / "console.png"
    await asyncio.to_thread(browser.screenshot, shot)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if target := os.environ.get("MIRROR_SCREENSHOT"):
        await asyncio.to_thread(browser.screenshot, Path(target))

    # Browse: the pulled repositories, then the index with its two platforms.
    listed, platforms = await asyncio.to_thread(read_browse, browser, mirror)
    assert listed == {f"local/{Upstream.repo('oci')}", f"local/{Upstream.repo('oci-index')}"}
    assert platforms == {"/".join(child.platform or ()): child.digest for child in index.children}

    # Pinning from the page pins the image; an eviction pass then spares it alone.
    oci_page = browse_url(mirror, upstream="local", repository=Upstream.repo("oci"), reference=TAG)
    refreshed = await asyncio.to_thread(pin_from_page, browser, oci_page)
    assert refreshed == f"Tag {TAG} is {oci.digest}."
    metadata = mirror.server.app[METADATA]
    for digest in digests(oci):
        record = await metadata.get_blob(digest)
        assert record is not None
        assert record.pinned, digest
    app = mirror.server.app
    quota = app[STORE].quota
    app[STORE].quota = dataclasses.replace(quota, max_size=64 * KIB)
    await app[EVICTOR].evict()
    app[STORE].quota = quota  # room again for what comes next
    cached = {path.name for path in mirror.blob_files()}
    assert {d.removeprefix("sha256:") for d in digests(oci)} <= cached
    assert not {d.removeprefix("sha256:") for d in index.all_blobs()} & cached
    # Seeding from the page: the job runs, and the page follows it to the end.
    docker = upstream.images["docker"]
    row = await asyncio.to_thread(
        seed_from_page, browser, mirror, f"{Upstream.repo('docker')}:{TAG}"
    )
    assert row[0] == "done", row
    assert row[3] == "1 of 1"
    assert row[5] == "none"
    assert {d.removeprefix("sha256:") for d in digests(docker)} <= {
        path.name for path in mirror.blob_files()
    }
    admin_errors = await asyncio.to_thread(browser.console_errors)

    # A viewer: no action on the page, and the page's own POST is refused.
    shown, status = await asyncio.to_thread(act_as_viewer, browser, oci_page)
    assert shown == [False, False, False, False, False]
    assert status == 403
    record = await metadata.get_blob(oci.digest)
    assert record is not None
    assert record.pinned
    viewer_errors = await asyncio.to_thread(browser.console_errors)

    # No page logged an error; the refused POST is the browser's one report.
    assert admin_errors == []
    assert [e for e in viewer_errors if "status of 403" not in e["message"]] == []
    # Nothing was asked of another origin, and the policy would have stopped it.
    requested = await asyncio.to_thread(browser.requested_urls)
    assert f"{mirror.url}/api/v1/overview" in requested  # the log saw the pages' traffic
    assert foreign(requested, mirror.url) == []
    async with http.get(f"{mirror.url}/ui/", headers=basic(ADMIN, ADMIN_PW)) as response:
        assert "connect-src 'self'" in response.headers["Content-Security-Policy"]
