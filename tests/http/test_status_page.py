"""The status page's routes in-process: the page, its snapshot, and the admin side's
protection against cross-site requests. (The browser tests are in test_browser.py; the
event stream over a real connection in test_events.py.)"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from starlette.applications import Starlette

from ensemble_ops.access.keys import new_key
from ensemble_ops.config import Settings
from ensemble_ops.http.app import create_app

from ..conftest import AppClient, SettingsFactory, serving


@pytest.fixture(name="app")
def _app(settings: Settings) -> Starlette:
    return create_app(settings)


@pytest.fixture(name="client")
async def _client(app: Starlette) -> AsyncIterator[AppClient]:
    async with serving(app) as client:
        yield client


class TestPage:
    @pytest.mark.parametrize("path", ["/", "/status"])
    async def test_the_page_and_its_assets_are_served_by_both_listeners(
        self, client: AppClient, path: str
    ) -> None:
        for http in (client, client.admin):
            page = await http.get(path)
            assert page.status_code == 200
            assert page.headers["content-type"] == "text/html; charset=utf-8"
            assert '<script src="/status/app.js" defer></script>' in page.text
            assert "https://" not in page.text  # nothing from a CDN
            assert "http://" not in page.text
            script = await http.get("/status/app.js")
            assert script.headers["content-type"].startswith("text/javascript")
            style = await http.get("/status/app.css")
            assert style.headers["content-type"].startswith("text/css")

    async def test_the_public_snapshot_shows_file_names_and_no_admin_means(
        self, client: AppClient, demo_dir: Path
    ) -> None:
        await client.post("/v1/completions", json={"model": "demo-tiny", "prompt": "Hi"})
        snapshot = (await client.get("/status.json")).json()
        assert snapshot["admin"] is False
        assert "csrf_token" not in snapshot
        assert str(demo_dir) not in str(snapshot)
        tiny = next(m for m in snapshot["members"] if m["name"] == "demo-tiny")
        assert (tiny["file"], tiny["health"], tiny["state"]) == (
            "demo-tiny.gguf",
            "healthy",
            "ready",
        )
        assert (tiny["in_flight"], tiny["parallel"], tiny["queue_depth"]) == (0, 4, 0)
        assert len(tiny["recent"]["tokens_per_s"]) == 30
        assert tiny["recent"]["tokens_per_s"][-1] > 0
        assert tiny["reload"]["state"] == "idle"
        [request] = snapshot["recent_requests"]
        assert (request["model"], request["status"]) == ("demo-tiny", "success")
        assert "Hi" not in str(request)
        ensemble = snapshot["ensemble"]
        assert (ensemble["ready"], ensemble["live"]) == (True, True)
        assert ensemble["cache"] == {"backend": "memory", "up": True, "reason": None}
        assert ensemble["requests_per_s"] > 0

    async def test_the_admin_snapshot_hands_out_the_csrf_token(
        self, app: Starlette, client: AppClient
    ) -> None:
        snapshot = (
            await client.admin.get("/status.json", headers={"host": "127.0.0.1:8001"})
        ).json()
        assert snapshot["admin"] is True
        assert snapshot["csrf_token"] == app.state.csrf_token
        rebound = await client.admin.get("/status.json", headers={"host": "evil.example:8001"})
        assert rebound.json()["csrf_token"] is None

    async def test_with_protected_observability_the_data_needs_a_key(
        self, make_settings: SettingsFactory
    ) -> None:
        key, digest = new_key()
        settings = make_settings(
            auth={"keys": [{"name": "ops", "key_sha256": digest}], "protect_observability": True}
        )
        async with serving(create_app(settings)) as client:
            assert (await client.get("/")).status_code == 200  # the page holds no data
            assert (await client.get("/status.json")).status_code == 401
            assert (await client.get("/events")).status_code == 401
            keyed = await client.get("/status.json", headers={"Authorization": f"Bearer {key}"})
            assert keyed.status_code == 200


class TestEventsRefusals:
    @pytest.mark.parametrize(
        ("query", "headers", "status", "message"),
        [
            ("?type=nonsense", {}, 400, "Unknown event type 'nonsense'"),
            ("?model=nobody", {}, 404, "'nobody' does not exist; choose one of: demo-"),
            ("", {"Last-Event-ID": "abc"}, 400, "Last-Event-ID must be an event id"),
        ],
    )
    async def test_a_bad_filter_is_a_clear_error(
        self,
        client: AppClient,
        query: str,
        headers: dict[str, str],
        status: int,
        message: str,
    ) -> None:
        answer = await client.get(f"/events{query}", headers=headers)
        assert answer.status_code == status
        assert message in answer.json()["error"]["message"]


class TestCrossSite:
    """A browser on the operator's machine reaches the loopback admin listener from any page;
    its requests carry an Origin, and only the admin page's own may act."""

    PATH = "/admin/models/demo-tiny/reload"
    HOST = "127.0.0.1:8001"

    async def test_the_cli_without_an_origin_is_no_browser(self, client: AppClient) -> None:
        assert (await client.admin.post(self.PATH, json={})).status_code == 202

    @pytest.mark.parametrize(
        ("origin", "host", "token"),
        [
            ("http://evil.example", HOST, True),  # another site
            ("http://evil.example:8001", "evil.example:8001", True),  # DNS rebinding
            (f"http://{HOST}", HOST, False),  # the page's origin, no token
        ],
    )
    async def test_a_cross_site_request_is_refused(
        self, app: Starlette, client: AppClient, origin: str, host: str, token: bool
    ) -> None:
        headers = {"origin": origin, "host": host}
        if token:
            headers["x-csrf-token"] = app.state.csrf_token
        answer = await client.admin.post(self.PATH, json={}, headers=headers)
        assert answer.status_code == 403
        assert app.state.reload.get_reload_status("demo-tiny").state == "idle"

    async def test_the_admin_page_itself_may_act(self, app: Starlette, client: AppClient) -> None:
        headers = {
            "origin": f"http://{self.HOST}",
            "host": self.HOST,
            "x-csrf-token": app.state.csrf_token,
        }
        assert (await client.admin.post(self.PATH, json={}, headers=headers)).status_code == 202
