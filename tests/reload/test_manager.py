"""Zero-downtime reload with real models and traffic running throughout."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import llama_cpp
import pytest
import structlog

from ensemble_ops import embedded
from ensemble_ops.config import Settings
from ensemble_ops.events import (
    DrainTimedOut,
    ModelUnloaded,
    ReloadFinished,
    ReloadProgressed,
    ReloadStateChanged,
)
from ensemble_ops.http.app import create_app
from ensemble_ops.reload.machine import mermaid_diagram
from ensemble_ops.reload.manager import ReloadManager
from ensemble_ops.serving.demo import DemoModel, write_model
from ensemble_ops.serving.engine import Engine
from ensemble_ops.serving.llama_engine import LlamaEngine

from ..conftest import AppClient, FlakyEngine, SettingsFactory, serving

DOCS = Path(__file__).parents[2] / "docs" / "reload.md"


def _events(app: Any, kind: type[Any]) -> list[Any]:
    seen: list[Any] = []
    app.state.bus.subscribe(kind, seen.append)
    return seen


@asynccontextmanager
async def traffic(client: AppClient, model: str, concurrency: int = 4) -> AsyncIterator[list[int]]:
    """Requests to ``model`` without pause for as long as the block runs; yields status codes."""
    codes: list[int] = []
    stop = anyio.Event()

    async def user() -> None:
        while not stop.is_set():
            response = await client.post(
                "/v1/completions", json={"model": model, "prompt": "Hi", "max_tokens": 4}
            )
            codes.append(response.status_code)

    async with anyio.create_task_group() as tasks:
        for _ in range(concurrency):
            tasks.start_soon(user)
        try:
            yield codes
        finally:
            stop.set()


async def _card(client: AppClient, member: str) -> dict[str, Any]:
    """The member's entry in /v1/models."""
    models = (await client.get("/v1/models")).json()["data"]
    card: dict[str, Any] = next(m for m in models if m["id"] == member)
    return card


async def _until(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.01)


class TestReloadUnderLoad:
    async def test_three_reloads_while_requests_flow(self, settings: Settings) -> None:
        """Three reloads in a row under continuous traffic: at least 200 requests, none failed."""
        app = create_app(settings)
        states = _events(app, ReloadStateChanged)
        async with serving(app) as client:
            manager: ReloadManager = app.state.reload
            first = app.state.ensemble.slots["demo-small"].active.generation
            async with traffic(client, "demo-small") as codes:
                for _ in range(3):
                    status = await manager.reload_model("demo-small")
                    assert status.state == "completed", status
                await _until(lambda: len(codes) >= 200)
            last = app.state.ensemble.slots["demo-small"].active.generation
        assert len(codes) >= 200
        assert set(codes) == {200}
        assert last > first
        sequence = [(e.from_state, e.to_state) for e in states]
        one = [("warming_up", "ready"), ("ready", "switching"), ("switching", "completed")]
        assert sequence == [
            ("idle", "warming_up"),
            *one,
            *([("completed", "warming_up"), *one] * 2),
        ]

    async def test_failing_new_copy_rolls_back_without_failed_requests(
        self, settings: Settings
    ) -> None:
        """A new copy whose decodes fail never serves: warm-up fails, the old copy stays."""
        app = create_app(settings)
        states = _events(app, ReloadStateChanged)
        async with serving(app) as client:
            manager: ReloadManager = app.state.reload
            slot = app.state.ensemble.slots["demo-small"]
            old = slot.active
            async with traffic(client, "demo-small") as codes:
                status = await manager.reload_model(
                    "demo-small", loader_func=lambda: FlakyEngine(LlamaEngine.load(slot.spec))
                )
                await _until(lambda: len(codes) >= 50)
            assert slot.active is old
        assert set(codes) == {200}
        assert status.state == "failed"
        assert status.progress_percent == 0.0
        assert status.error is not None
        assert "warm-up iteration 1 failed" in status.error
        assert status.message == f"Reload failed: {status.error}"
        assert status.completed_at is not None
        assert [(e.from_state, e.to_state) for e in states] == [
            ("idle", "warming_up"),
            ("warming_up", "failed"),
        ]

    async def test_progress_is_reported(self, settings: Settings) -> None:
        """Progress goes 0 -> 10 -> 30..80 ("Warmup iteration i/n") -> 90 -> 100."""
        app = create_app(settings)
        progress = _events(app, ReloadProgressed)
        finished = _events(app, ReloadFinished)
        async with serving(app):
            status = await app.state.reload.reload_model("demo-tiny", warmup_iterations=5)
        assert status.state == "completed"
        assert status.progress_percent == 100.0
        messages = [p.message for p in progress]
        assert [m for m in messages if m.startswith("Warmup iteration")] == [
            f"Warmup iteration {i}/5" for i in range(1, 6)
        ]
        percents = [p.progress_percent for p in progress]
        assert percents == sorted(percents)
        assert 10.0 in percents
        assert 90.0 in percents
        assert [(f.model, f.outcome) for f in finished] == [("demo-tiny", "completed")]


class TestDrain:
    async def test_old_copy_closes_only_after_its_last_request(
        self, make_settings: SettingsFactory
    ) -> None:
        """A request still on the old copy finishes there; the copy closes after it."""
        app = create_app(make_settings(reload={"drain_timeout_s": 0.2}))
        drains = _events(app, DrainTimedOut)
        unloaded = _events(app, ModelUnloaded)
        async with serving(app):
            slot = app.state.ensemble.slots["demo-tiny"]
            old = slot.active
            held = slot.acquire()  # a request running on the old copy
            status = await app.state.reload.reload_model("demo-tiny")
            assert status.state == "completed"
            assert slot.active is not old
            assert "closes when its 1 request(s) end" in status.message
            assert [d.generation for d in drains] == [old.generation]
            await anyio.sleep(0.3)
            assert not old.closed  # still in use: never closed under a request
            held.release()
            await _until(lambda: old.closed)
            await _until(lambda: any(u.generation == old.generation for u in unloaded))

    async def test_drain_within_timeout(self, settings: Settings) -> None:
        """A request that ends within drain_timeout_s: the reload waits for it, then closes."""
        app = create_app(settings)
        async with serving(app):
            slot = app.state.ensemble.slots["demo-tiny"]
            old = slot.active
            held = slot.acquire()

            async def release_soon() -> None:
                await anyio.sleep(0.2)
                assert not old.closed
                held.release()

            async with anyio.create_task_group() as tasks:
                tasks.start_soon(release_soon)
                status = await app.state.reload.reload_model("demo-tiny")
            assert status.message.endswith("old copy closed")
            assert old.closed


class TestFailures:
    async def test_warmup_returning_nothing_fails(self, settings: Settings) -> None:
        """A warm-up that returns nothing fails the reload."""
        async with serving(app := create_app(settings)):
            status = await app.state.reload.reload_model("demo-tiny", warmup_func=lambda e: "")
        assert status.state == "failed"
        assert status.error == "warm-up iteration 1 returned nothing"

    async def test_warmup_timeout_fails(self, make_settings: SettingsFactory) -> None:
        """A warm-up slower than warmup_timeout_s fails the reload (and nothing hangs)."""
        settings = make_settings(reload={"warmup_timeout_s": 0.05})
        async with serving(app := create_app(settings)):
            status = await app.state.reload.reload_model(
                "demo-tiny", warmup_func=lambda e: __import__("time").sleep(0.5) or "late"
            )
            assert status.state == "failed"
            assert status.error == "warm-up iteration 1 timed out after 0.05 s"

    async def test_corrupt_file_in_new_spec_rolls_back(
        self, settings: Settings, tmp_path: Path
    ) -> None:
        """A changed spec pointing at a corrupt file (as after a config edit) fails cleanly."""
        corrupt = tmp_path / "corrupt.gguf"
        data = (settings.model("demo-tiny").path).read_bytes()
        corrupt.write_bytes(data[: len(data) // 3])
        async with serving(app := create_app(settings)):
            slot = app.state.ensemble.slots["demo-tiny"]
            old = slot.active
            spec = slot.spec.model_copy(update={"path": corrupt})
            app.state.reload.start_reload("demo-tiny", spec=spec)
            status = await app.state.reload.wait_for_reload("demo-tiny")
            assert status.state == "failed"
            assert "corrupt or truncated" in (status.error or "")
            assert slot.active is old
            assert slot.spec.path != corrupt

    async def test_side_by_side_fails_fast_without_memory(
        self, make_settings: SettingsFactory
    ) -> None:
        """Not enough memory for a second copy: fail at once, the old copy keeps serving."""
        # A headroom no machine has: the second copy "needs" a million times its size.
        settings = make_settings(reload={"memory_headroom": 1e6})
        async with serving(app := create_app(settings)):
            manager: ReloadManager = app.state.reload
            old = app.state.ensemble.slots["demo-base"].active
            status = await manager.reload_model("demo-base")
            assert app.state.ensemble.slots["demo-base"].active is old
        assert status.state == "failed"
        assert status.error is not None
        assert status.error.startswith("not enough RAM")
        assert 'reload_strategy = "replace"' in status.error

    async def test_replace_strategy_unloads_first_and_others_serve(
        self, make_settings: SettingsFactory
    ) -> None:
        """replace: the old copy goes first, traffic moves to the others, readiness stays 200."""
        base = make_settings()
        models = [
            {
                **m.model_dump(),
                "path": str(m.path),
                **({"reload_strategy": "replace"} if m.name == "demo-base" else {}),
            }
            for m in base.models
        ]
        settings = make_settings(models=models, reload={"memory_headroom": 1e6})
        gate = anyio.Event()
        gated: list[str] = []

        def slow_loader(spec: Any) -> Engine:
            if gated:  # start-up loads at once; the reload waits for the gate
                anyio.from_thread.run(gate.wait)
            return LlamaEngine.load(spec)

        async with serving(app := create_app(settings, loader=slow_loader)) as client:
            manager: ReloadManager = app.state.reload
            seen: dict[str, Any] = {}
            gated.append("reload")
            manager.start_reload("demo-base")
            slot = app.state.ensemble.slots["demo-base"]
            await _until(lambda: slot.state == "reloading")
            seen["ready"] = (await client.get("/health/ready")).status_code
            seen["named"] = await client.post(
                "/v1/completions", json={"model": "demo-base", "prompt": "x"}
            )
            seen["routed"] = await client.post(
                "/v1/completions",
                json={"model": "ensemble", "mode": "creative", "prompt": "x", "max_tokens": 2},
            )
            gate.set()
            status = await manager.wait_for_reload("demo-base")
        assert status.state == "completed", status
        assert seen["ready"] == 200
        assert seen["named"].status_code == 503
        assert "being reloaded" in seen["named"].text
        assert seen["routed"].status_code == 200
        assert seen["routed"].json()["model"] != "demo-base"


class TestHttp:
    async def test_reload_over_http(self, client: AppClient) -> None:
        """POST returns 202 + Location; the status URL follows it to completed."""
        idle = await client.get("/health/llm/reload/demo-tiny")
        assert idle.json() == {
            "model": "demo-tiny",
            "state": "idle",
            "progress_percent": 0.0,
            "message": "No reload has run yet.",
            "started_at": None,
            "completed_at": None,
            "error": None,
            "rollout": None,
            "quality": None,
        }
        started = await client.admin.post(
            "/admin/models/demo-tiny/reload", json={"warmup_iterations": 2}
        )
        assert started.status_code == 202
        assert started.headers["location"] == "/health/llm/reload/demo-tiny"
        assert started.json()["state"] == "warming_up"
        second = await client.admin.post("/admin/models/demo-tiny/reload")
        assert second.status_code == 409
        assert second.json()["status"]["model"] == "demo-tiny"
        assert second.json()["error"]["code"] == "reload_in_progress"

        async def finished() -> dict[str, Any]:
            while True:
                body: dict[str, Any] = (await client.get(started.headers["location"])).json()
                if body["state"] in ("completed", "failed"):
                    return body
                await anyio.sleep(0.02)

        with anyio.fail_after(30):
            body = await finished()
        assert body["state"] == "completed"
        assert body["completed_at"].endswith("Z")
        health = (await client.get("/health/llm", params={"model": "demo-tiny"})).json()
        assert health["reload"] == {"state": "completed", "progress_percent": 100.0}

    async def test_reload_to_a_new_path(self, client: AppClient, demo_dir: Path) -> None:
        """A path inside the model directory is loaded, and the member's spec follows it."""
        copy = demo_dir / "demo-tiny-v2.gguf"
        copy.write_bytes((demo_dir / "demo-tiny.gguf").read_bytes())
        response = await client.admin.post(
            "/admin/models/demo-tiny/reload", json={"path": "demo-tiny-v2.gguf"}
        )
        assert response.status_code == 202
        with anyio.fail_after(30):
            while (await client.get("/health/llm/reload/demo-tiny")).json()["state"] != "completed":
                await anyio.sleep(0.02)
        members = (await client.admin.get("/admin/models")).json()["models"]
        assert next(m for m in members if m["name"] == "demo-tiny")["path"] == str(copy)

    async def test_a_copy_that_cannot_chat_fails_unless_allowed(
        self, client: AppClient, demo_dir: Path
    ) -> None:
        """A chat member reloaded with a file without a chat template fails at warm-up, the
        old copy still serving and chat still routed to it; with allow_capability_change
        the same reload completes and the member then only completes text."""
        base = DemoModel("base", 64, 2, 192, 4, seed=3, chat_template="")
        write_model(base, demo_dir / "no-template.gguf")

        async def reload(body: dict[str, Any]) -> dict[str, Any]:
            started = await client.admin.post("/admin/models/demo-tiny/reload", json=body)
            assert started.status_code == 202, started.text
            with anyio.fail_after(30):
                while True:
                    status: dict[str, Any] = (
                        await client.get("/health/llm/reload/demo-tiny")
                    ).json()
                    if status["state"] in ("completed", "failed"):
                        return status
                    await anyio.sleep(0.02)

        refused = await reload({"path": "no-template.gguf"})
        assert refused["state"] == "failed"
        assert "cannot do what 'demo-tiny' does now: chat" in refused["error"]
        assert refused["progress_percent"] == 0.0
        card = await _card(client, "demo-tiny")
        assert card["meta"]["capabilities"] == ["chat", "completion"]
        allowed = await reload({"path": "no-template.gguf", "allow_capability_change": True})
        assert allowed["state"] == "completed", allowed
        card = await _card(client, "demo-tiny")
        assert card["meta"]["capabilities"] == ["completion"]

    @pytest.mark.parametrize(
        ("body", "message"),
        [
            ({"path": "../../etc/passwd"}, "outside the model directory"),
            ({"path": "/etc/hostname"}, "outside the model directory"),
            ({"path": "missing.gguf"}, "No GGUF file"),
            ({"path": "not-a-model.gguf"}, "bad magic"),
            ({"path": "escape.gguf"}, "outside the model directory"),
            ({"warmup_iterations": 0}, "warmup_iterations"),
            ({"warmup_iterations": "5"}, "warmup_iterations"),
            ({"surprise": 1}, "surprise: unknown field (known: path, warmup_iterations"),
        ],
    )
    async def test_bad_reload_requests(
        self, client: AppClient, demo_dir: Path, body: dict[str, Any], message: str
    ) -> None:
        """Paths outside the directory (also through a symlink), missing or not GGUF: 400."""
        (demo_dir / "not-a-model.gguf").write_text("hello")
        link = demo_dir / "escape.gguf"
        if not link.is_symlink():
            link.symlink_to("/etc/hostname")
        response = await client.admin.post("/admin/models/demo-tiny/reload", json=body)
        assert response.status_code == 400
        assert message in response.json()["error"]["message"]
        status = await client.get("/health/llm/reload/demo-tiny")
        assert status.json()["state"] == "idle"  # nothing started

    async def test_unknown_model(self, client: AppClient, settings: Settings) -> None:
        """404 for the reload and for its status, offering the members only: ``ensemble``
        is a name to ask for inference, not one to reload."""
        for response in (
            await client.admin.post("/admin/models/nope/reload"),
            await client.get("/health/llm/reload/nope"),
            await client.get("/health/llm?model=nope"),
        ):
            assert response.status_code == 404
            message = response.json()["error"]["message"]
            choices = message.removeprefix("The model 'nope' does not exist; choose one of: ")
            assert choices.rstrip(".").split(", ") == [spec.name for spec in settings.models]

    async def test_admin_token(self, make_settings: SettingsFactory) -> None:
        """With a token configured: 401 without it or with a wrong one, 202 with it."""
        settings = make_settings(server={"admin_token": "s3cret"})
        async with serving(create_app(settings)) as client:
            none = await client.admin.post("/admin/models/demo-tiny/reload")
            wrong = await client.admin.post(
                "/admin/models/demo-tiny/reload", headers={"Authorization": "Bearer nope"}
            )
            right = await client.admin.post(
                "/admin/models/demo-tiny/reload", headers={"Authorization": "Bearer s3cret"}
            )
            listing = await client.admin.get("/admin/models")
        assert (none.status_code, wrong.status_code, right.status_code) == (401, 401, 202)
        assert none.headers["www-authenticate"] == "Bearer"
        assert none.json()["error"]["code"] == "unauthorized"
        assert listing.status_code == 401

    async def test_the_public_listener_has_no_admin_routes(self, client: AppClient) -> None:
        """Every admin route is a 404 on the public listener, whatever the client claims
        to be (a proxy's forwarding headers, loopback); the status route stays open."""
        proxied = {"X-Forwarded-For": "127.0.0.1", "Forwarded": "for=127.0.0.1"}
        answers = [
            await client.post("/admin/models/demo-tiny/reload", headers=proxied),
            await client.post("/admin/models/demo-tiny/promote"),
            await client.post("/admin/models/demo-tiny/abort"),
            await client.get("/admin/models"),
        ]
        status = await client.get("/health/llm/reload/demo-tiny")
        assert [a.status_code for a in answers] == [404, 404, 404, 404]
        assert status.json()["state"] == "idle"  # nothing ran


class TestMachine:
    def test_docs_diagram_matches_the_machine(self) -> None:
        """docs/reload.md carries the Mermaid diagram generated from STATES/TRANSITIONS."""
        assert f"```mermaid\n{mermaid_diagram()}\n```" in DOCS.read_text()

    async def test_reloads_of_different_members_overlap(self, settings: Settings) -> None:
        """Two members reload at once; their machines do not wait for each other."""
        async with serving(app := create_app(settings)):
            manager: ReloadManager = app.state.reload
            manager.start_reload("demo-tiny")
            manager.start_reload("demo-small")
            running = {manager.get_reload_status(n).running for n in ("demo-tiny", "demo-small")}
            assert running == {True}
            for name in ("demo-tiny", "demo-small"):
                assert (await manager.wait_for_reload(name)).state == "completed"


class TestRollback:
    async def test_a_failed_reload_closes_its_new_copy(self, settings: Settings) -> None:
        """The copy that failed its warm-up is closed (a leaked copy is a whole model of RAM
        or VRAM per failed reload), and the old one is not."""
        async with serving(app := create_app(settings)):
            slot = app.state.ensemble.slots["demo-small"]
            old = slot.active
            new: list[FlakyEngine] = []

            def load_flaky() -> Engine:
                new.append(FlakyEngine(LlamaEngine.load(slot.spec)))
                return new[0]

            status = await app.state.reload.reload_model("demo-small", loader_func=load_flaky)
            await _until(lambda: new[0].closed)
            assert slot.active is old
            assert old.closed is False
        assert status.state == "failed"

    async def test_a_reload_to_new_weights_never_answers_from_the_old_cache(
        self, settings: Settings
    ) -> None:
        """A cached answer of the old weights is not served once other weights are loaded
        under the same member name; the new weights' answer is cached in turn."""
        request = {"model": "demo-tiny", "prompt": "Cached?", "max_tokens": 8, "temperature": 0}
        async with serving(app := create_app(settings)) as client:
            before = [await client.post("/v1/completions", json=request) for _ in range(2)]
            status = await app.state.reload.reload_model(
                "demo-tiny", path=settings.model("demo-small").path
            )
            after = [await client.post("/v1/completions", json=request) for _ in range(2)]
        assert status.state == "completed"
        assert [r.headers["x-cache"] for r in before] == ["MISS", "HIT"]
        assert [r.headers["x-cache"] for r in after] == ["MISS", "HIT"]
        texts = [r.json()["choices"][0]["text"] for r in (*before, *after)]
        assert texts[0] == texts[1]
        assert texts[2] == texts[3]
        assert texts[0] != texts[2]

    async def test_a_reload_of_the_same_weights_keeps_the_cached_answers(
        self, settings: Settings
    ) -> None:
        """Reloading the same file with the same settings loads a copy that answers alike:
        the answers cached before are still hits (they are keyed by content, not by copy)."""
        request = {"model": "demo-tiny", "prompt": "Again?", "max_tokens": 8, "temperature": 0}
        async with serving(app := create_app(settings)) as client:
            before = await client.post("/v1/completions", json=request)
            old = app.state.ensemble.slots["demo-tiny"].active
            status = await app.state.reload.reload_model("demo-tiny")
            assert app.state.ensemble.slots["demo-tiny"].active is not old
            after = await client.post("/v1/completions", json=request)
        assert status.state == "completed"
        assert (before.headers["x-cache"], after.headers["x-cache"]) == ("MISS", "HIT")
        assert after.json()["choices"][0]["text"] == before.json()["choices"][0]["text"]


class TestEmbeddedApi:
    async def test_embedded_reloads_are_logged_counted_and_use_the_settings(
        self, demo_dir: Path
    ) -> None:
        """An embedded reload runs [reload] warmup_iterations (3 by default), is logged as
        state changes and counted in the process-wide llm_reload_total."""
        llm = llama_cpp.Llama(str(demo_dir / "demo-tiny.gguf"), n_ctx=256, verbose=False)
        embedded.reset()
        warmups: list[int] = []

        def warm(engine: Engine) -> bool:
            warmups.append(1)
            return True

        try:
            embedded.register_model("logged-tiny", llm)
            with structlog.testing.capture_logs() as logs:
                status = await embedded.reload_model("logged-tiny", warmup_func=warm)
            flat = embedded.get_metrics().flat()
        finally:
            engine = embedded.get_reload_manager().get_active_model("logged-tiny")
            if engine is not None:
                engine.close()
            embedded.reset()
        assert status.state == "completed"
        assert len(warmups) == 3
        states = [e["to"] for e in logs if e["event"] == "reload.state_changed"]
        assert states == ["warming_up", "ready", "switching", "completed"]
        assert flat["llm_reload_total_model=logged-tiny,outcome=completed"] == 1

    async def test_registered_model_reloads(self, demo_dir: Path) -> None:
        """embedded.reload_model reloads a model registered with embedded.register_model."""
        path = str(demo_dir / "demo-tiny.gguf")
        llm = llama_cpp.Llama(path, n_ctx=256, verbose=False)
        embedded.register_model("embedded-tiny", llm)
        try:
            status = await embedded.reload_model(
                "embedded-tiny",
                loader_func=lambda: LlamaEngine.from_llama(
                    "embedded-tiny", llama_cpp.Llama(path, n_ctx=512, verbose=False)
                ),
                warmup_iterations=2,
            )
            assert status.state == "completed"
            engine = embedded.get_reload_manager().get_active_model("embedded-tiny")
            assert engine is not None
            assert engine.info.n_ctx == 512
            health = await embedded.check_model_health("embedded-tiny")
            assert health.status.value == "healthy"
        finally:
            engine = embedded.get_reload_manager().get_active_model("embedded-tiny")
            if engine is not None:
                engine.close()
            embedded.reset()


class TestRecovery:
    async def test_reload_fixes_a_member_whose_decodes_fail(self, settings: Settings) -> None:
        """Decodes fail: the member goes unhealthy, routing avoids it, a reload heals it."""
        flaky: dict[str, FlakyEngine] = {}

        def loader(spec: Any) -> Engine:
            engine = LlamaEngine.load(spec)
            if spec.name == "demo-small" and "demo-small" not in flaky:
                flaky["demo-small"] = FlakyEngine(engine)
                return flaky["demo-small"]
            return engine

        async with serving(app := create_app(settings, loader=loader)) as client:
            named = {"model": "demo-small", "prompt": "x", "max_tokens": 2}
            for _ in range(3):
                assert (await client.post("/v1/completions", json=named)).status_code == 500
            sick = await client.get("/health/llm", params={"model": "demo-small"})
            assert sick.json()["status"] == "unhealthy"
            routed = await client.post(
                "/v1/completions", json={"mode": "balanced", "prompt": "x", "max_tokens": 2}
            )
            assert routed.json()["model"] == "demo-base"
            status = await app.state.reload.reload_model("demo-small")
            assert status.state == "completed"
            healed = await client.get("/health/llm", params={"model": "demo-small"})
            assert healed.json()["status"] == "healthy"
            assert (await client.post("/v1/completions", json=named)).status_code == 200
