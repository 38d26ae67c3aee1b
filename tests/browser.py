"""A real browser and a real HTTP server for the status page's tests.

Chromium and ChromeDriver are Debian's (``chromium``, ``chromium-driver``: `.ci/run`
installs them), driven by Selenium. The app is served by hypercorn on real ports from a
thread of the test process, so a test can also reach into it (swap a member's engine for
one that fails, which a real model cannot do on demand) while the browser sees only HTTP.
"""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import httpx
from hypercorn.asyncio import serve
from hypercorn.config import Config
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from starlette.applications import Starlette

from .conftest import free_port

T = TypeVar("T")
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@contextmanager
def chromium(width: int = 1280, height: int = 800) -> Iterator[webdriver.Chrome]:
    """Headless Chromium with its console log kept (``driver.get_log("browser")``)."""
    for binary in (CHROMIUM, CHROMEDRIVER):
        assert shutil.which(binary), (
            f"{binary} is missing: apt-get install chromium chromium-driver"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    options.add_argument(f"--window-size={width},{height}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        viewport(driver, width, height)
        yield driver
    finally:
        driver.quit()


def viewport(driver: webdriver.Chrome, width: int, height: int) -> None:
    """The page's viewport exactly (a phone's: 390 x 844), whatever the window's frame."""
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600},
    )


class LiveApp:
    """``app`` and its admin app served by hypercorn from a thread, on free ports."""

    def __init__(self, app: Starlette) -> None:
        self.app = app
        self.url = f"http://127.0.0.1:{free_port()}"
        self.admin_url = f"http://127.0.0.1:{free_port()}"
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._main(),))

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        served = []
        for app, url in ((self.app, self.url), (self.app.state.admin_app, self.admin_url)):
            config = Config()
            config.bind = [url.removeprefix("http://")]
            config.accesslog = None
            served.append(serve(app, config, shutdown_trigger=self._stop.wait))  # type: ignore[arg-type]
        await asyncio.gather(*served)

    def call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run ``coroutine`` on the server's event loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=120)

    def __enter__(self) -> LiveApp:
        self._thread.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                models = httpx.get(f"{self.admin_url}/v1/models", timeout=2).json()["data"][1:]
                if all(m["meta"]["state"] in ("ready", "failed") for m in models):
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError("the app did not load its members")

    def __exit__(self, *exc: object) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=120)
        self._loop.close()
