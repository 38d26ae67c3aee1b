"""Rollouts: canary, shadow and blue-green reloads on real engines, under real load.

A good new copy is promoted step by step; a worse one (failing, silent or slow) rolls itself
back at the first step with enough data; no user request fails either way.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import anyio
import pytest
from starlette.applications import Starlette

from ensemble_ops.config import RolloutSpec, Settings
from ensemble_ops.events import (
    GateJudged,
    InferenceFinished,
    RolloutFinished,
    RolloutStepped,
    ShadowFinished,
)
from ensemble_ops.http.app import create_app
from ensemble_ops.serving.demo import DemoModel, write_model
from ensemble_ops.serving.engine import Engine
from ensemble_ops.serving.llama_engine import LlamaEngine

from ..conftest import (
    AppClient,
    DelayedEngine,
    FlakyEngine,
    GatedEngine,
    Recorded,
    SettingsFactory,
    Traffic,
    route,
    serving,
    under_load,
)

MEMBER = "demo-tiny"


class _Recorder(Recorded):
    """What the app's members and rollouts publish, in order."""

    def __init__(self, app: Starlette) -> None:
        kinds = (InferenceFinished, RolloutStepped, GateJudged, RolloutFinished, ShadowFinished)
        super().__init__(app.state.bus, *kinds)


def _body(i: int, n: int) -> dict[str, Any]:
    """Sampled (every request reaches an engine), a session key per request."""
    return {
        "model": MEMBER,
        "prompt": f"client {i} request {n}",
        "max_tokens": 4,
        "temperature": 0.8,
        "user": f"user-{i}-{n}",
    }


def _under_load(client: AppClient) -> AbstractAsyncContextManager[Traffic]:
    """Three clients on the member, every third request streamed."""
    return under_load(client, _body, stream_every=3)


def _fast(**changes: Any) -> RolloutSpec:
    """A rollout that judges quickly: steps of 10 answers and 0.3 s."""
    return RolloutSpec.model_validate({"min_requests": 10, "min_seconds": 0.3, **changes})


@pytest.fixture(name="settings")
def _settings(make_settings: SettingsFactory) -> Settings:
    return make_settings(cache={"enabled": False})


@pytest.fixture(name="silent")
def _silent(settings: Settings) -> Iterator[Path]:
    """A real model whose answers are all empty, beside the member's file (reload paths stay
    in the model directory); removed afterwards, as the demo folder is the session's."""
    path = write_model(
        DemoModel("silent", n_embd=64, n_layer=2, n_ff=192, n_head=4, seed=1, silent=True),
        settings.model(MEMBER).path.parent / "silent.gguf",
    )
    yield path
    path.unlink()


async def _reload(app: Starlette, rollout: RolloutSpec, **options: Any) -> Any:
    """The rollout's outcome; a rollout that never ends (a gate that never gets its
    figures) fails the test instead of holding it and the traffic forever."""
    with anyio.fail_after(120):
        return await app.state.reload.reload_model(MEMBER, rollout=rollout, **options)


class TestCanary:
    async def test_a_good_copy_is_promoted_through_every_step(self, settings: Settings) -> None:
        """Steps 10% then 50% then all: the new copy answers its share at each step, the
        status names the step, the old copy is gone at the end, and no request fails."""
        app = create_app(settings)
        events = _Recorder(app)
        steps: list[tuple[str | None, float]] = []
        async with serving(app) as client:
            old = app.state.ensemble.slots[MEMBER].active
            async with _under_load(client) as traffic:
                manager = app.state.reload
                rollout = _fast(kind="canary", steps=[10, 50])
                # Identical copies differ only by noise: the test is the promotion, not the
                # latency gates (the slow copy below is their test).
                rollout = rollout.model_copy(
                    update={
                        "gates": rollout.gates.model_copy(
                            update={"max_p95_ratio": 5.0, "max_ttft_ratio": 5.0}
                        )
                    }
                )
                manager.start_reload(MEMBER, rollout=rollout)
                while (status := manager.get_reload_status(MEMBER)).running:
                    if status.rollout is not None:
                        steps.append((status.rollout.step, status.rollout.weight_percent))
                    await anyio.sleep(0.05)
            assert app.state.ensemble.slots[MEMBER].active is not old
        assert status.state == "completed", status
        assert set(traffic.statuses) == {200}
        assert [e.weight_percent for e in events.of(RolloutStepped)] == [10.0, 50.0]
        assert ("1/2", 10.0) in steps
        assert ("2/2", 50.0) in steps
        copies = {e.copy for e in events.of(InferenceFinished)}
        assert copies == {"stable", "candidate"}
        assert [(e.rollout, e.outcome) for e in events.of(RolloutFinished)] == [
            ("canary", "promoted")
        ]

    async def test_a_copy_that_fails_requests_rolls_back_and_no_user_request_fails(
        self, settings: Settings
    ) -> None:
        """A new copy that passed its warm-up, then fails every request it gets: its
        error-rate gate fails at the first step, it is withdrawn, and each of those requests
        was answered by the old copy instead."""
        app = create_app(settings)
        events = _Recorder(app)
        async with serving(app) as client:
            slot = app.state.ensemble.slots[MEMBER]
            old = slot.active
            loaded: list[FlakyEngine] = []

            def flaky() -> Engine:
                loaded.append(FlakyEngine(LlamaEngine.load(slot.spec), failing=False))
                return loaded[0]

            manager = app.state.reload
            async with _under_load(client) as traffic:
                manager.start_reload(
                    MEMBER, loader_func=flaky, rollout=_fast(kind="canary", steps=[20, 50])
                )
                while manager.get_reload_status(MEMBER).state != "canary":
                    await anyio.sleep(0.01)
                loaded[0].failing = True  # it serves now, and breaks
                status = await manager.wait_for_reload(MEMBER)
            assert slot.active is old
        assert status.state == "rolled_back", status
        assert "error_rate" in (status.error or "")
        assert status.rollout is not None
        assert status.rollout.step == "1/2"
        assert set(traffic.statuses) == {200}
        assert [e.weight_percent for e in events.of(RolloutStepped)] == [20.0]
        failed = [e for e in events.of(GateJudged) if e.verdict == "fail"]
        assert {e.gate for e in failed} == {"error_rate"}
        assert events.of(RolloutFinished)[0].outcome == "rolled_back"

    async def test_a_copy_that_answers_nothing_rolls_back(
        self, settings: Settings, silent: Path
    ) -> None:
        """A real model whose answers are all empty: the empty-share gate rolls it back."""
        app = create_app(settings)
        async with serving(app) as client, _under_load(client) as traffic:
            # Its warm-up only checks that it tokenizes: the gate is what must catch it.
            status = await _reload(
                app,
                _fast(kind="canary", steps=[20]),
                path=silent,
                warmup_func=lambda engine: engine.tokenize("Hi"),
            )
        assert status.state == "rolled_back", status
        assert "empty_share" in (status.error or "")
        assert set(traffic.statuses) == {200}

    async def test_a_much_slower_copy_rolls_back(self, settings: Settings) -> None:
        """A new copy that starts every answer half a second late: its p95 latency gate (or
        its time-to-first-token gate) rolls it back."""
        app = create_app(settings)
        spec = settings.model(MEMBER)
        async with serving(app) as client, _under_load(client) as traffic:
            status = await _reload(
                app,
                _fast(kind="canary", steps=[20]),
                loader_func=lambda: DelayedEngine(LlamaEngine.load(spec), delay_s=0.5),
            )
        assert status.state == "rolled_back", status
        assert "p95_latency" in (status.error or "") or "ttft" in (status.error or "")
        assert set(traffic.statuses) == {200}


class TestShadow:
    async def test_a_shadow_changes_nothing_a_user_sees(self, settings: Settings) -> None:
        """Every request is mirrored to a new copy that hangs: users are answered by the old
        copy all the same, never waiting for the mirror, and mirrored requests appear in no
        user-facing metric; the undecided rollout is aborted and rolls back."""
        app = create_app(settings)
        release = threading.Event()
        hanging: list[GatedEngine] = []
        async with serving(app) as client:
            spec = app.state.ensemble.slots[MEMBER].spec

            def hangs() -> Engine:
                engine = GatedEngine(LlamaEngine.load(spec), release)  # answers nothing
                hanging.append(engine)
                return engine

            manager = app.state.reload
            # Warm-up would hang too: the copy starts hanging once it serves.
            manager.start_reload(
                MEMBER,
                loader_func=hangs,
                warmup_func=lambda engine: "ok",
                rollout=_fast(kind="shadow", shadow_percent=100),
            )
            while manager.get_reload_status(MEMBER).state != "shadowing":
                await anyio.sleep(0.02)
            body = {"model": MEMBER, "prompt": "Hi", "max_tokens": 3, "temperature": 0.5}
            answers = [await client.post("/v1/completions", json=body) for _ in range(10)]
            await anyio.sleep(0.2)
            mirrored = hanging[0].calls
            text = (await client.get("/metrics")).text
            manager.abort(MEMBER)
            status = await manager.wait_for_reload(MEMBER)
            release.set()
        assert [a.status_code for a in answers] == [200] * 10
        assert mirrored >= 1  # the mirrors reached the new copy, which hung
        served = [
            float(line.rpartition(" ")[2])
            for line in text.splitlines()
            if line.startswith("llm_requests_total{") and f'model="{MEMBER}"' in line
        ]
        assert sum(served) == 10  # the users' requests, none of the mirrors
        assert status.state == "rolled_back"
        assert "aborted" in (status.error or "")

    async def test_a_shadow_copy_that_fails_rolls_back_on_its_errors(
        self, settings: Settings
    ) -> None:
        """Every mirrored request fails on the new copy: each is recorded as a failure of
        the new copy (nothing generated, no first token), the error-rate gate rolls the
        shadow back, and users never see it."""
        app = create_app(settings)
        events = _Recorder(app)
        spec = settings.model(MEMBER)
        async with serving(app) as client, _under_load(client) as traffic:
            status = await _reload(
                app,
                _fast(kind="shadow", shadow_percent=100),
                loader_func=lambda: FlakyEngine(LlamaEngine.load(spec)),  # fails every decode
                warmup_func=lambda engine: "ok",  # it fails once it is mirrored to
            )
        assert status.state == "rolled_back", status
        assert "error_rate" in (status.error or "")
        assert set(traffic.statuses) == {200}
        assert {e.copy for e in events.of(InferenceFinished)} == {"stable"}
        mirrored = events.of(ShadowFinished)
        assert len(mirrored) >= 10
        for shadow in mirrored:
            assert (shadow.model, shadow.error_type) == (MEMBER, "engine_error")
            assert (shadow.time_to_first_token_s, shadow.completion_tokens) == (None, 0)
            assert shadow.empty
            assert 0 < shadow.latency_s < 60

    async def test_a_shadow_copy_that_answers_nothing_rolls_back(
        self, settings: Settings, silent: Path
    ) -> None:
        """A real model whose answers are all empty, mirrored to: each mirror is recorded as
        an empty answer, and the empty-share gate rolls it back."""
        app = create_app(settings)
        events = _Recorder(app)
        async with serving(app) as client, _under_load(client) as traffic:
            status = await _reload(
                app,
                _fast(kind="shadow", shadow_percent=100),
                path=silent,
                warmup_func=lambda engine: engine.tokenize("Hi"),
            )
        assert status.state == "rolled_back", status
        assert "empty_share" in (status.error or "")
        assert set(traffic.statuses) == {200}
        mirrored = events.of(ShadowFinished)
        assert mirrored
        for shadow in mirrored:
            assert (shadow.model, shadow.error_type, shadow.empty) == (MEMBER, None, True)
            assert shadow.completion_tokens == 0

    async def test_a_good_shadow_goes_on_to_switch(self, settings: Settings) -> None:
        """A mirrored copy that keeps the gates is switched to."""
        app = create_app(settings)
        events = _Recorder(app)
        async with serving(app) as client, _under_load(client) as traffic:
            rollout = _fast(kind="shadow", shadow_percent=100)
            rollout = rollout.model_copy(
                update={
                    "gates": rollout.gates.model_copy(
                        update={"max_p95_ratio": 5.0, "max_ttft_ratio": 5.0}
                    )
                }
            )
            status = await _reload(app, rollout)
        assert status.state == "completed", status
        assert set(traffic.statuses) == {200}
        mirrored = events.of(ShadowFinished)
        assert len(mirrored) >= 10
        for shadow in mirrored:
            assert (shadow.model, shadow.error_type, shadow.empty) == (MEMBER, None, False)
            assert shadow.completion_tokens > 0
            assert shadow.time_to_first_token_s is not None
            assert 0 < shadow.time_to_first_token_s <= shadow.latency_s < 60
        assert {e.copy for e in events.of(InferenceFinished)} == {"stable"}


class TestBlueGreen:
    async def test_waits_for_promote_and_serves_the_new_copy_on_request(
        self, settings: Settings
    ) -> None:
        """Both copies serve; only requests naming the candidate reach it; promote makes it
        the member."""
        app = create_app(settings)
        events = _Recorder(app)
        async with serving(app) as client:
            manager = app.state.reload
            manager.start_reload(MEMBER, rollout=_fast(kind="blue_green"))
            while manager.get_reload_status(MEMBER).state != "awaiting_promotion":
                await anyio.sleep(0.02)
            body = {"model": MEMBER, "prompt": "Hi", "max_tokens": 2, "temperature": 0.5}
            plain = await client.post("/v1/completions", json=body)
            tried = await client.admin.post(
                "/v1/completions", json=body, headers={"X-Ensemble-Copy": "candidate"}
            )
            new = app.state.ensemble.slots[MEMBER].candidate
            promoted = await client.admin.post(f"/admin/models/{MEMBER}/promote")
            status = await manager.wait_for_reload(MEMBER)
            active = app.state.ensemble.slots[MEMBER].active
        assert (plain.status_code, tried.status_code, promoted.status_code) == (200, 200, 200)
        assert [e.copy for e in events.of(InferenceFinished)] == ["stable", "candidate"]
        assert status.state == "completed"
        assert active is new

    async def test_rolls_back_when_not_promoted_in_time(self, settings: Settings) -> None:
        """promote_timeout_s passes without a promote: rolled back, the old copy serves."""
        app = create_app(settings)
        async with serving(app):
            old = app.state.ensemble.slots[MEMBER].active
            status = await _reload(app, _fast(kind="blue_green", promote_timeout_s=0.3))
            assert app.state.ensemble.slots[MEMBER].active is old
            assert app.state.ensemble.slots[MEMBER].candidate is None
        assert status.state == "rolled_back"
        assert "not promoted within 0.3 s" in (status.error or "")


class TestIsolation:
    async def test_a_failing_new_copy_leaves_the_member_healthy_and_ready(
        self, settings: Settings
    ) -> None:
        """Requests that fail on a blue-green's new copy never make the member unhealthy or
        the replica unready: the old copy serves, and the gates are the new copy's judge."""
        app = create_app(settings)
        async with serving(app) as client:
            slot = app.state.ensemble.slots[MEMBER]
            manager = app.state.reload
            loaded: list[FlakyEngine] = []

            def flaky() -> Engine:
                loaded.append(FlakyEngine(LlamaEngine.load(slot.spec), failing=False))
                return loaded[0]

            manager.start_reload(MEMBER, loader_func=flaky, rollout=_fast(kind="blue_green"))
            while manager.get_reload_status(MEMBER).state != "awaiting_promotion":
                await anyio.sleep(0.02)
            loaded[0].failing = True
            body = {"model": MEMBER, "prompt": "Hi", "max_tokens": 2, "temperature": 0.5}
            tried = [
                await client.admin.post(
                    "/v1/completions", json=body, headers={"X-Ensemble-Copy": "candidate"}
                )
                for _ in range(5)
            ]
            health = await client.get("/health/llm", params={"model": MEMBER})
            ready = await client.get("/health/ready")
            manager.abort(MEMBER)
            await manager.wait_for_reload(MEMBER)
        assert {t.status_code for t in tried} == {500}
        assert health.json()["status"] == "healthy"
        assert ready.status_code == 200

    async def test_asking_for_a_copy_is_for_the_admin_listener(
        self, make_settings: SettingsFactory
    ) -> None:
        """X-Ensemble-Copy on the public listener is a 403, even with the admin token; on
        the admin listener it needs the token when one is set."""
        settings = make_settings(cache={"enabled": False}, server={"admin_token": "s3cret"})
        body = {"model": MEMBER, "prompt": "Hi", "max_tokens": 2}
        copy = {"X-Ensemble-Copy": "stable"}
        token = {"Authorization": "Bearer s3cret"}
        async with serving(create_app(settings)) as client:
            public = await client.post("/v1/completions", json=body, headers=copy | token)
            plain = await client.post("/v1/completions", json=body)
            admin = await client.admin.post("/v1/completions", json=body, headers=copy | token)
        assert (public.status_code, plain.status_code, admin.status_code) == (403, 200, 200)
        assert "admin listener" in public.json()["error"]["message"]

    async def test_a_split_members_sessions_reach_its_canary(
        self, make_settings: SettingsFactory
    ) -> None:
        """A member behind an A/B split still sends its canary's share of sessions to the
        new copy: the rollout's draw is not the split's draw."""
        settings = make_settings(
            cache={"enabled": False},
            splits={"ab": {"weights": {"demo-tiny": 50, "demo-small": 50}}},
        )
        app = create_app(settings)
        async with serving(app):
            slot = app.state.ensemble.slots[MEMBER]
            slot.offer(slot.active, weight_percent=50)  # the same copy twice: only routing
            ensemble = app.state.ensemble
            keys = [f"user-{i}" for i in range(2000)]
            split_side = [k for k in keys if route(ensemble, "ab", "fast", k)[0] == MEMBER]
            chosen = [slot.choose(k) for k in split_side]
            slot.withdraw()
        share = chosen.count("candidate") / len(chosen)
        assert 0.4 < share < 0.6, share


class TestSticky:
    async def test_a_session_stays_on_one_copy(self, settings: Settings) -> None:
        """At a 50% step, each session key always lands on the same copy, and keys spread
        over both copies."""
        app = create_app(settings)
        events = _Recorder(app)
        async with serving(app) as client:
            manager = app.state.reload
            manager.start_reload(
                MEMBER, rollout=_fast(kind="canary", steps=[50], min_requests=10_000)
            )
            while app.state.ensemble.slots[MEMBER].candidate is None:  # offered, not just entered
                await anyio.sleep(0.02)
            body = {"model": MEMBER, "prompt": "Hi", "max_tokens": 1, "temperature": 0.5}
            seen: dict[str, set[str]] = {}
            for key in [f"s{i}" for i in range(12)] * 3:
                before = len(events.of(InferenceFinished))
                answer = await client.post(
                    "/v1/completions", json=body, headers={"X-Session-ID": key}
                )
                assert answer.status_code == 200
                seen.setdefault(key, set()).add(events.of(InferenceFinished)[before].copy)
            manager.abort(MEMBER)
            await manager.wait_for_reload(MEMBER)
        assert all(len(copies) == 1 for copies in seen.values()), seen
        assert set().union(*seen.values()) == {"stable", "candidate"}


class TestBadInput:
    @pytest.mark.parametrize(
        ("body", "message"),
        [
            ({"rollout": "canary", "steps": [50, 25]}, "steps: steps must increase"),
            ({"rollout": "canary", "steps": [0, 50]}, "steps: each step must be a percentage"),
            ({"rollout": "canary", "steps": [50, 150]}, "steps: each step must be a percentage"),
            ({"rollout": "canary", "steps": [50, 100]}, "100 is implied"),
            (
                {"rollout": "canary", "gates": {"max_p99_ratio": 2}},
                "gates.max_p99_ratio: unknown gate",
            ),
            ({"rollout": "sometimes"}, "rollout: Input should be"),
            ({"rollout": "canary", "stepz": [5]}, "stepz: unknown field"),
        ],
    )
    async def test_a_bad_rollout_is_a_400_naming_the_field(
        self, client: AppClient, body: dict[str, Any], message: str
    ) -> None:
        """Steps not increasing or outside (0, 100], unknown gates or fields: 400."""
        answer = await client.admin.post(f"/admin/models/{MEMBER}/reload", json=body)
        assert answer.status_code == 400
        assert message in answer.json()["error"]["message"]

    async def test_promote_or_abort_without_a_rollout_is_a_400(self, client: AppClient) -> None:
        """Nothing to promote or abort: 400 naming the member's state."""
        for action in ("promote", "abort"):
            answer = await client.admin.post(f"/admin/models/{MEMBER}/{action}")
            assert answer.status_code == 400
            assert "No rollout" in answer.json()["error"]["message"]

    async def test_a_replace_member_can_only_switch(self, make_settings: SettingsFactory) -> None:
        """reload_strategy = "replace" never holds two copies: a canary is refused."""
        settings = make_settings()
        models = [
            spec.model_copy(update={"reload_strategy": "replace"}) if spec.name == MEMBER else spec
            for spec in settings.models
        ]
        app = create_app(settings.model_copy(update={"models": tuple(models)}))
        async with serving(app) as client:
            answer = await client.admin.post(
                f"/admin/models/{MEMBER}/reload", json={"rollout": "canary"}
            )
        assert answer.status_code == 400
        assert answer.json()["error"]["param"] == "rollout"


class TestShutdown:
    async def test_shutdown_during_a_rollout_keeps_the_old_copy(self, settings: Settings) -> None:
        """The app stops mid-canary: the old copy served to the end and the new one was
        withdrawn and closed, not promoted."""
        app = create_app(settings)
        async with serving(app):
            slot = app.state.ensemble.slots[MEMBER]
            old = slot.active
            manager = app.state.reload
            manager.start_reload(
                MEMBER, rollout=_fast(kind="canary", steps=[50], min_requests=10_000)
            )
            # The candidate, not the state: the machine enters "canary" a step before the
            # state's work offers the new copy.
            while slot.candidate is None:
                await anyio.sleep(0.02)
            new = slot.candidate
        assert slot.candidate is None
        assert new is not None
        assert new.closed
        assert old is not None
        assert old.closed
        assert manager.get_reload_status(MEMBER).state != "completed"
