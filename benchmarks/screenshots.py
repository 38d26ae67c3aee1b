"""The status page's screenshots in docs/images (``nox -s screenshots``).

Serves the demo ensemble, sends a little traffic (so the sparklines and the recent requests
have something to show) and reloads one member, then saves the public page at 1280 x 800
and at a phone's 390 x 844.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import httpx

from benchmarks.browser import chromium, open_page, viewport
from benchmarks.harness import Server
from ensemble_ops.serving.demo import ensure_demo_models

IMAGES = Path(__file__).resolve().parent.parent / "docs" / "images"


def main() -> None:
    IMAGES.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        with Server.start(workdir, ensure_demo_models(workdir)) as server:
            with httpx.Client(timeout=60) as client:
                for i in range(40):
                    member = server.members[i % len(server.members)]
                    body = {"model": member, "prompt": f"Tell me {i}", "max_tokens": 12}
                    client.post(f"{server.url}/v1/completions", json=body)
                client.post(f"{server.admin_url}/admin/models/{server.members[0]}/reload")
            with chromium() as driver:
                open_page(driver, server.url, len(server.members))
                driver.save_screenshot(str(IMAGES / "status-page.png"))
                viewport(driver, 390, 844)
                open_page(driver, server.url, len(server.members))
                driver.save_screenshot(str(IMAGES / "status-page-phone.png"))
    print(f"written to {IMAGES}")


if __name__ == "__main__":
    main()
