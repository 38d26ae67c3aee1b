"""Inference probes: never behind user traffic, and reading health changes nothing."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import anyio

from ensemble_ops.config import Settings
from ensemble_ops.events import HealthChanged, InferenceFinished, ProbeFinished
from ensemble_ops.http.app import create_app
from ensemble_ops.serving.engine import GenerationParams
from ensemble_ops.serving.ensemble import InferenceRequest

from ..conftest import serving


def _record(app: Any, *kinds: type[Any]) -> list[Any]:
    seen: list[Any] = []
    for kind in kinds:
        app.state.bus.subscribe(kind, seen.append)
    return seen


class TestProbeOrder:
    async def test_a_request_arriving_with_the_probe_waits_behind_it(
        self, settings: Settings
    ) -> None:
        """A probe and a long request started in the same instant: the probe takes the member
        first, so it measures one token, not the request's whole generation."""
        async with serving(app := create_app(settings)):
            seen = _record(app, ProbeFinished, InferenceFinished)
            request = InferenceRequest(
                model="demo-base",
                mode="balanced",
                params=GenerationParams(max_tokens=300, temperature=0.7, top_p=0.95),
                prompt="A long story",
            )
            probe = asyncio.ensure_future(app.state.health.check_model_health("demo-base", True))
            user = asyncio.ensure_future(app.state.ensemble.complete(request))
            health = await probe
            answer = await user
        assert health.probe is not None
        assert health.probe.outcome == "ok"
        assert answer.completion.completion_tokens == 300
        assert [type(e) for e in seen] == [ProbeFinished, InferenceFinished]

    async def test_a_probe_joins_a_running_batch(self, settings: Settings) -> None:
        """With requests running and a sequence slot free, the probe runs at once beside them
        (a one-token sequence in the same batch) and measures real latency."""
        async with serving(app := create_app(settings)):
            seen = _record(app, ProbeFinished, InferenceFinished)
            engine = app.state.ensemble.slots["demo-base"].active.engine
            user = asyncio.ensure_future(app.state.ensemble.complete(_long("demo-base")))
            await _until(lambda: engine.free_slots < engine.info.parallel)
            health = await app.state.health.check_model_health("demo-base", True)
            await user
        assert health.probe is not None
        assert health.probe.outcome == "ok"
        assert [type(e) for e in seen] == [ProbeFinished, InferenceFinished]

    async def test_a_full_batch_is_reported_busy_not_queued(self, settings: Settings) -> None:
        """With every sequence slot taken, a probe answers at once as busy with the latest
        real inference, and runs nothing."""
        async with serving(app := create_app(settings)) as client:
            await client.post("/v1/completions", json={"model": "demo-base", "prompt": "x"})
            seen = _record(app, ProbeFinished)
            engine = app.state.ensemble.slots["demo-base"].active.engine
            users = [
                asyncio.ensure_future(app.state.ensemble.complete(_long("demo-base")))
                for _ in range(engine.info.parallel)
            ]
            await _until(lambda: engine.free_slots == 0)
            body = (
                await client.get(
                    "/health/llm", params={"model": "demo-base", "run_inference": "true"}
                )
            ).json()
            await asyncio.gather(*users)
        assert body["probe"]["outcome"] == "busy"
        assert body["probe"]["latency_ms"] == body["last_inference_ms"] > 0
        assert "busy" in body["probe"]["error"]
        assert body["status"] == "healthy"
        assert seen == []


def _long(model: str) -> InferenceRequest:
    return InferenceRequest(
        model=model,
        mode="balanced",
        params=GenerationParams(max_tokens=300, temperature=0.7, top_p=0.95),
        prompt="A long story",
    )


async def _until(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.005)


class TestReadingHealth:
    async def test_reading_health_publishes_nothing(self, settings: Settings) -> None:
        """GETs of every health route, over and over, publish no event."""
        async with serving(app := create_app(settings)) as client:
            seen = _record(app, HealthChanged)
            for _ in range(3):
                for name in app.state.ensemble.slots:
                    await client.get("/health/llm", params={"model": name})
                await client.get("/health/llm/all")
                await client.get("/health/ready")
            during = list(seen)  # before shutdown, whose unloads do change health
        assert during == []
