"""The status page in a real browser (headless Chromium) against a real HTTP server.

The demo ensemble, served by hypercorn on real ports. Each test reads what a person would
see: the cards, their chips, the progress bar; a reload started through the API and a
member made unhealthy show up live, without reloading the page.
"""

from __future__ import annotations

from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import httpx
import pytest
from PIL import Image
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from ensemble_ops.config import Settings
from ensemble_ops.http.app import create_app
from ensemble_ops.serving.llama_engine import LlamaEngine

from ..browser import LiveApp, chromium, viewport
from ..conftest import FlakyEngine

MEMBERS = ["demo-tiny", "demo-small", "demo-base"]


@pytest.fixture(name="live", scope="module")
def _live(demo_dir: Path) -> Iterator[LiveApp]:
    from ensemble_ops.serving.builtin import demo_settings

    settings: Settings = demo_settings(demo_dir, environ={})
    with LiveApp(create_app(settings)) as live:
        yield live


@pytest.fixture(name="browser", scope="module")
def _browser() -> Iterator[webdriver.Chrome]:
    with chromium() as driver:
        yield driver


def _open(browser: webdriver.Chrome, url: str) -> None:
    browser.get(f"{url}/")
    WebDriverWait(browser, 30).until(
        lambda d: (
            len(d.find_elements(By.CSS_SELECTOR, "article.card")) == len(MEMBERS)
            and d.find_element(By.ID, "connection").text == "live"
        )
    )


# Read in one script call: the page redraws a card as events arrive, so an element found by
# one WebDriver call may be gone by the next.
def _chips(browser: webdriver.Chrome, member: str) -> list[str]:
    chips: list[str] = browser.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map((e) => e.textContent)",
        f'article[data-member="{member}"] h3 .chip',
    )
    return chips


def _text(browser: webdriver.Chrome, selector: str, attribute: str | None = None) -> str:
    value: str = browser.execute_script(
        "const e = document.querySelector(arguments[0]);"
        "return e === null ? '' : (arguments[1] ? e.getAttribute(arguments[1]) : e.textContent)",
        selector,
        attribute,
    )
    return value


def _severe(browser: webdriver.Chrome) -> list[str]:
    log: list[dict[str, str]] = browser.get_log("browser")  # type: ignore[no-untyped-call]
    return [e["message"] for e in log if e["level"] == "SEVERE"]


class TestStatusPage:
    def test_every_member_shows_with_its_health_and_no_console_errors(
        self, live: LiveApp, browser: webdriver.Chrome
    ) -> None:
        _open(browser, live.url)
        for member in MEMBERS:
            assert _chips(browser, member) == ["healthy", "ready"]
            assert f"{member}.gguf" in _text(browser, f'article[data-member="{member}"]')
        assert browser.find_element(By.ID, "listener").text == "read-only"
        assert not browser.find_elements(By.CSS_SELECTOR, ".actions")  # no admin means
        assert _severe(browser) == []

    def test_a_reload_shows_its_progress_and_completes_without_a_page_reload(
        self, live: LiveApp, browser: webdriver.Chrome
    ) -> None:
        _open(browser, live.admin_url)
        assert browser.find_element(By.ID, "listener").text == "admin"
        browser.execute_script("window.sameDocument = true; statusPage.renderLatenciesMs = []")
        started = httpx.post(f"{live.admin_url}/admin/models/demo-base/reload", timeout=30)
        assert started.status_code == 202
        card = 'article[data-member="demo-base"]'
        # Each of the four state changes drawn as its event came (the page also redraws from
        # its snapshot every 5 s, which may show "completed" before the last event arrives).
        WebDriverWait(browser, 60).until(
            lambda d: d.execute_script("return statusPage.renderLatenciesMs.length") == 4
        )
        assert "completed" in _text(browser, f"{card} .reload")
        assert _text(browser, f"{card} .bar", "aria-valuenow") == "100"
        assert browser.execute_script("return window.sameDocument") is True
        assert _severe(browser) == []

    def test_the_admin_page_reloads_a_member_with_its_button(
        self, live: LiveApp, browser: webdriver.Chrome
    ) -> None:
        _open(browser, live.admin_url)
        before = live.app.state.reload.get_reload_status("demo-tiny").completed_at
        button = "//article[@data-member='demo-tiny']//button[text()='Reload']"

        # Found and clicked again if a redraw replaced the button in between.
        def click(driver: webdriver.Chrome) -> bool:
            driver.find_element(By.XPATH, button).click()
            return True

        WebDriverWait(browser, 10, ignored_exceptions=[StaleElementReferenceException]).until(click)
        WebDriverWait(browser, 60).until(
            lambda d: (
                live.app.state.reload.get_reload_status("demo-tiny").completed_at != before
                and live.app.state.reload.get_reload_status("demo-tiny").state == "completed"
            )
        )
        assert _severe(browser) == []

    def test_a_member_made_unhealthy_shows_within_2_s(
        self, live: LiveApp, browser: webdriver.Chrome
    ) -> None:
        """demo-small's engine starts failing every decode (a state no model gives on
        demand); three failed requests make it unhealthy, and the page says so."""
        _open(browser, live.url)
        slot = live.app.state.ensemble.slots["demo-small"]

        async def break_it() -> None:
            previous = slot.active
            slot.install(FlakyEngine(LlamaEngine.load(slot.spec)))
            await previous.close()

        async def mend_it() -> None:
            previous = slot.active
            slot.install(LlamaEngine.load(slot.spec))
            await previous.close()

        body = {"model": "demo-small", "prompt": "x", "max_tokens": 2}
        live.call(break_it())
        try:
            for _ in range(3):
                answer = httpx.post(f"{live.url}/v1/completions", json=body, timeout=30)
                assert answer.status_code >= 500
            assert live.app.state.health.snapshot("demo-small").status == "unhealthy"
            WebDriverWait(browser, 2).until(lambda d: _chips(d, "demo-small")[0] == "unhealthy")
            reason = _text(browser, 'article[data-member="demo-small"] .reason')
            assert "failed in a row" in reason
        finally:  # the module's other tests see a healthy member again
            live.call(mend_it())
            httpx.post(f"{live.url}/v1/completions", json=body, timeout=30)
        assert live.app.state.health.snapshot("demo-small").status == "healthy"


class TestLayout:
    @pytest.mark.parametrize(("width", "height"), [(1280, 800), (390, 844)])
    def test_no_sideways_scroll(
        self, live: LiveApp, browser: webdriver.Chrome, width: int, height: int
    ) -> None:
        viewport(browser, width, height)
        try:
            _open(browser, live.admin_url)
            scroll, inner = browser.execute_script(
                "return [document.documentElement.scrollWidth, window.innerWidth]"
            )
            assert scroll <= inner
        finally:
            viewport(browser, 1280, 800)

    def test_a_screenshot_is_saved_and_is_not_blank(
        self, live: LiveApp, browser: webdriver.Chrome, tmp_path: Path
    ) -> None:
        _open(browser, live.url)
        path = tmp_path / "status.png"
        assert browser.save_screenshot(str(path))
        image = Image.open(BytesIO(path.read_bytes())).convert("RGB")
        assert image.size == (1280, 800)
        colours = image.getcolors(maxcolors=1 << 16)
        assert colours is None or len(colours) > 20  # text, chips and lines, not one fill
