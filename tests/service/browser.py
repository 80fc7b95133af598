"""A real browser for the tests: Debian's ``chromium`` driven through ``chromium-driver``
(Selenium), headless, unable to resolve any host but 127.0.0.1 (as offline as a cluster
without internet, whatever the machine running the suite can reach), with its network log
kept so that a test can list every request a page made."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from starlette.types import ASGIApp, Receive, Scope, Send

BROWSERS = ("chromium", "chromium-browser")
DRIVERS = ("chromedriver", "chromium-driver")
WAIT_S = 60  # the longest any rendered element is waited for (a busy 2-core CI machine)


def _which(names: tuple[str, ...]) -> str | None:
    return next((path for name in names if (path := shutil.which(name))), None)


def find_browser() -> tuple[str, str]:
    """(chromium, chromedriver): missing ones skip the test, and fail it under CI."""
    browser, driver = _which(BROWSERS), _which(DRIVERS)
    if browser is None or driver is None:
        why = "Debian's chromium and chromium-driver are needed (apt-get install them, as root)"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    return browser, driver


@pytest.fixture(scope="session")
def chrome() -> Iterator[object]:
    """One headless Chromium for the session's browser tests."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    browser, driver = find_browser()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root, where Chromium's sandbox cannot start
        "--disable-dev-shm-usage",
        "--window-size=1280,900",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        # No name resolves but the test server's address: offline, as a cluster would be.
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    chromium = webdriver.Chrome(service=Service(driver), options=options)
    chromium.set_page_load_timeout(WAIT_S)
    try:
        yield chromium
    finally:
        chromium.quit()


def requested_urls(driver) -> list[str]:  # type: ignore[no-untyped-def]
    """Every URL the browser requested since the last call (the log is consumed)."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def foreign(urls: list[str], origin: str) -> list[str]:
    """The URLs not on ``origin`` (inline data: and blob: URLs are the page's own)."""
    return [u for u in urls if urlsplit(u).scheme not in ("data", "blob") and
            not u.startswith(origin + "/")]  # fmt: skip


def screenshots_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where screenshots go: $RESNET_SERVE_SCREENSHOTS (CI's artefacts), else a temp dir."""
    given = os.environ.get("RESNET_SERVE_SCREENSHOTS")
    path = Path(given) if given else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


class PathPrefix:
    """What a reverse proxy that serves the service under ``prefix`` does (nginx's
    ``location /prefix/ { proxy_pass http://service/; }``): requests under the prefix reach
    the service without it; others reach it unchanged."""

    def __init__(self, app: ASGIApp, prefix: str) -> None:
        self.app = app
        self.prefix = prefix
        # The paths that came without the prefix: behind a real proxy, none would arrive.
        self.unprefixed: list[str] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http":
            if (path + "/").startswith(self.prefix + "/"):
                stripped = path[len(self.prefix) :] or "/"
                scope = {**scope, "path": stripped, "raw_path": stripped.encode()}
            else:
                self.unprefixed.append(path)
        await self.app(scope, receive, send)
