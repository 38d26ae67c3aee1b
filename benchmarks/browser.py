"""Debian's headless Chromium (``chromium``, ``chromium-driver``) for the status page's
figures, screenshots and browser tests."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@contextlib.contextmanager
def chromium(width: int = 1280, height: int = 800) -> Iterator[webdriver.Chrome]:
    """Headless Chromium with its console log kept (``driver.get_log("browser")``)."""
    for binary in (CHROMIUM, CHROMEDRIVER):
        if shutil.which(binary) is None:
            raise RuntimeError(f"{binary} is missing: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(argument)
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


def open_page(driver: webdriver.Chrome, url: str, members: int) -> None:
    """The status page at ``url``, once every card is drawn and its stream is live."""
    driver.get(f"{url}/")
    WebDriverWait(driver, 60).until(
        lambda d: (
            len(d.find_elements(By.CSS_SELECTOR, "article.card")) == members
            and d.find_element(By.ID, "connection").text == "live"
        )
    )
