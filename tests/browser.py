"""A real browser and a real HTTP server for the status page's tests.

The browser is the benchmarks' (Debian's Chromium and ChromeDriver, which `.ci/run`
installs, driven by Selenium). The app is served by hypercorn on real ports from a
thread of the test process, so a test can also reach into it (swap a member's engine for
one that fails, which a real model cannot do on demand) while the browser sees only HTTP.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import httpx
from benchmarks.browser import chromium, viewport
from hypercorn.asyncio import serve
from hypercorn.config import Config
from starlette.applications import Starlette

from .conftest import free_port

__all__ = ["LiveApp", "chromium", "viewport"]

T = TypeVar("T")


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
