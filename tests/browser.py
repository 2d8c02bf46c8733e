"""A real headless Chromium (Debian's ``chromium`` + ``chromium-driver``) driven by Selenium
(pages come from ``tests.service_fixtures.serve_process``).

Chromium gets no network but loopback (``--host-resolver-rules``), so a page that needs a
CDN fails to render, and every request it makes is logged (``requests()``) for tests to
check that none left the machine.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1320,1500",
         "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1")


def missing() -> str:
    """Why no browser test can run here ('' when they can)."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not Path(path).is_file():
            return (f"{path} is missing: apt-get install chromium chromium-driver "
                    f"(./dev test does it where apt-get works; package {package})")
    return ""


class Browser:
    def __init__(self, driver: Any) -> None:
        self.driver = driver

    def requests(self) -> list[str]:
        """URLs of every request the pages made since the last call."""
        urls = []
        for entry in self.driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            if message["method"] == "Network.requestWillBeSent":
                urls.append(message["params"]["request"]["url"])
        return urls

    def wait_for(self, script: str, timeout: float = 120) -> Any:
        """Poll the JavaScript expression ``script`` until it is truthy; return its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.driver.execute_script(f"return ({script});")
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"{script!r} stayed falsy for {timeout:.0f} s")
            time.sleep(0.2)


@contextmanager
def chromium() -> Iterator[Browser]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="ivvae-chromium-")
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=DriverService(CHROMEDRIVER), options=options)
    try:
        yield Browser(driver)
    finally:
        driver.quit()  # ends chromedriver and the browser it started
        shutil.rmtree(profile, ignore_errors=True)
