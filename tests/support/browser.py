"""Debian's headless chromium driven through its chromedriver with selenium, offline.

Selenium is pointed at /usr/bin/chromedriver and /usr/bin/chromium explicitly, and
`SE_OFFLINE=true` is set, so Selenium Manager never looks for (or downloads) a driver
or a browser. The browser keeps its console log and its network (performance) log, so
a test can assert that a page logged no error and asked no other origin for anything.

Selenium is synchronous: a test whose mirror runs on its own event loop calls these
methods through `asyncio.to_thread`, so the mirror keeps serving while the browser
waits for it.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WAIT = 20.0


def browser_available() -> bool:
    return shutil.which(CHROMIUM) is not None and shutil.which(CHROMEDRIVER) is not None


class Browser:
    """One headless chromium window of a fixed size (`width` x `height` CSS pixels)."""

    def __init__(self, driver: webdriver.Chrome, width: int, height: int) -> None:
        self.driver = driver
        self.size = (width, height)
        # The viewport itself, not the window around it: screenshots come out this size.
        driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )
        driver.execute_cdp_cmd("Network.enable", {})

    def authenticate(self, user: str | None, password: str = "") -> None:
        """Send HTTP Basic credentials with every request from now on (None: none).

        A CDP header: it replaces whatever credentials the browser remembered (from an
        address like http://user:pass@host/sign-in), so a test can switch users."""
        headers = {}
        if user is not None:
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            headers["Authorization"] = f"Basic {token}"
        self.driver.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": headers})

    def open(self, url: str) -> None:
        self.driver.get(url)

    def wait(self, condition: Callable[[webdriver.Chrome], Any], message: str = "") -> Any:
        return WebDriverWait(self.driver, WAIT, poll_frequency=0.1).until(condition, message)

    def find(self, css: str) -> WebElement:
        return self.driver.find_element(By.CSS_SELECTOR, css)

    def find_all(self, css: str) -> list[WebElement]:
        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def value(self, element_id: str) -> str:
        """The raw value (`data-value`) beside an element's formatted text."""
        return str(self.find(f"#{element_id}").get_attribute("data-value") or "")

    def run_async(self, script: str, *args: Any) -> Any:
        """Run `script` in the page; it calls `done(result)` (the last argument)."""
        body = f"const done = arguments[arguments.length - 1];\n{script}"
        return self.driver.execute_async_script(body, *args)

    def console_errors(self) -> list[dict[str, Any]]:
        """The page console's errors and warnings since the last call."""
        entries = self.driver.get_log("browser")
        return [e for e in entries if e["level"] in ("SEVERE", "WARNING")]

    def requested_urls(self) -> list[str]:
        """Every URL the browser asked for since the last call (its network log)."""
        urls = []
        for entry in self.driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            if message["method"] == "Network.requestWillBeSent":
                urls.append(message["params"]["request"]["url"])
        return urls

    def screenshot(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        assert self.driver.save_screenshot(str(path)), f"no screenshot written to {path}"


@contextmanager
def chromium(width: int = 1280, height: int = 900) -> Iterator[Browser]:
    """A browser for the block. The caller sets `SE_OFFLINE=true` in the environment
    (the fixture does, with monkeypatch), so Selenium Manager never downloads."""
    assert os.environ.get("SE_OFFLINE") == "true", "set SE_OFFLINE=true first"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",  # root in a container has no user namespaces for the sandbox
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",  # no update checks, no safe-browsing lists
        "--disable-component-update",
        "--disable-sync",
        f"--window-size={width},{height}",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield Browser(driver, width, height)
    finally:
        driver.quit()


def foreign(urls: list[str], origin: str) -> list[str]:
    """The URLs not on `origin` (scheme://host:port, whatever credentials an address
    held); data: URLs are local."""

    def origin_of(url: str) -> tuple[str, str | None, int | None]:
        parts = urlsplit(url)
        return parts.scheme, parts.hostname, parts.port

    own = origin_of(origin)
    return [url for url in urls if not url.startswith("data:") and origin_of(url) != own]
