"""Tri-state health, probes, readiness and liveness, through the app in-process."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import httpx
import llama_cpp
import pytest
from asgi_lifespan import LifespanManager

from ensemble_ops import embedded
from ensemble_ops.config import HealthSettings, ModelSpec, Settings
from ensemble_ops.events import HealthChanged, ProbeFinished
from ensemble_ops.health.status import HealthStatus
from ensemble_ops.http.app import create_app
from ensemble_ops.serving.gpu import GpuMonitor
from ensemble_ops.serving.llama_engine import LlamaEngine

from ..conftest import FlakyEngine, GatedEngine, SettingsFactory, serving
from ..redis_server import RedisServer

ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
FIELDS = {
    "model_name",
    "status",
    "loaded",
    "inference_ready",
    "last_inference_ms",
    "memory_mb",
    "gpu_memory_mb",
    "error_message",
    "checked_at",
    "uptime_seconds",
}


def _events(app: Any, kind: type[Any]) -> list[Any]:
    seen: list[Any] = []
    app.state.bus.subscribe(kind, seen.append)
    return seen


def _flaky_loader(flaky: dict[str, FlakyEngine], names: set[str]) -> Any:
    def load(spec: ModelSpec) -> Any:
        engine = LlamaEngine.load(spec)
        if spec.name in names:
            flaky[spec.name] = FlakyEngine(engine)
            return flaky[spec.name]
        return engine

    return load


class TestModelHealth:
    async def test_healthy_contract(self, client: httpx.AsyncClient) -> None:
        """A loaded member is healthy; the body has exactly the contract's fields."""
        response = await client.get("/health/llm", params={"model": "demo-base"})
        assert response.status_code == 200
        body = response.json()
        assert set(body) == FIELDS
        assert body["status"] == "healthy"
        assert body["loaded"]
        assert body["inference_ready"]
        assert body["memory_mb"] > 60  # llama.cpp's weights plus KV cache of a 71 MB file
        assert body["gpu_memory_mb"] is None
        assert body["error_message"] is None
        assert ISO_Z.match(body["checked_at"])
        assert body["uptime_seconds"] >= 0

    async def test_last_inference_is_reported(self, client: httpx.AsyncClient) -> None:
        """After a request, last_inference_ms holds its engine time."""
        await client.post(
            "/v1/completions", json={"model": "demo-tiny", "prompt": "x", "max_tokens": 4}
        )
        body = (await client.get("/health/llm", params={"model": "demo-tiny"})).json()
        assert body["last_inference_ms"] > 0

    async def test_degraded_by_memory(self, make_settings: SettingsFactory) -> None:
        """A member over the memory limit is degraded: still 200, and it says why."""
        settings = make_settings(health={"memory_limit_bytes": 20 * 2**20})
        async with serving(create_app(settings)) as client:
            base = await client.get("/health/llm", params={"model": "demo-base"})
            tiny = await client.get("/health/llm", params={"model": "demo-tiny"})
        assert base.status_code == 200
        assert base.json()["status"] == "degraded"
        assert "over the limit of 20 MiB" in base.json()["error_message"]
        assert tiny.json()["status"] == "healthy"

    async def test_a_long_answer_does_not_degrade(self, make_settings: SettingsFactory) -> None:
        """A 256-token answer longer than latency_limit_s leaves the member healthy: slowness
        is judged per token (and on probes), never by the length of a generation."""
        settings = make_settings(health={"latency_limit_s": 0.01})
        async with serving(create_app(settings)) as client:
            long = {"model": "demo-base", "prompt": "x", "max_tokens": 256}
            answer = await client.post("/v1/completions", json=long)
            health = (await client.get("/health/llm", params={"model": "demo-base"})).json()
        assert answer.json()["usage"]["completion_tokens"] == 256
        assert health["last_inference_ms"] > 10
        assert health["status"] == "healthy"

    async def test_degraded_by_time_per_token(self, make_settings: SettingsFactory) -> None:
        """Answers slower per output token than time_per_token_limit_s degrade the member."""
        settings = make_settings(health={"time_per_token_limit_s": 1e-6})
        async with serving(create_app(settings)) as client:
            await client.post("/v1/completions", json={"model": "demo-base", "prompt": "x"})
            health = (await client.get("/health/llm", params={"model": "demo-base"})).json()
        assert health["status"] == "degraded"
        assert "ms per token" in health["error_message"]

    async def test_unhealthy_after_failures_routed_around_and_recovers(
        self, settings: Settings
    ) -> None:
        """N failures in a row: unhealthy (503), routing avoids it; one success heals it."""
        flaky: dict[str, FlakyEngine] = {}
        app = create_app(settings, loader=_flaky_loader(flaky, {"demo-small"}))
        changes = _events(app, HealthChanged)
        async with serving(app) as client:
            named = {"model": "demo-small", "prompt": "x", "max_tokens": 2}
            for _ in range(3):
                assert (await client.post("/v1/completions", json=named)).status_code == 500
            sick = await client.get("/health/llm", params={"model": "demo-small"})
            assert sick.status_code == 503
            assert sick.json()["status"] == "unhealthy"
            assert "3 inferences failed in a row" in sick.json()["error_message"]
            assert not sick.json()["inference_ready"]
            calls = flaky["demo-small"].calls
            routed = await client.post(
                "/v1/completions",
                json={"model": "ensemble", "mode": "balanced", "prompt": "x", "max_tokens": 2},
            )
            assert routed.json()["model"] == "demo-base"  # balanced prefers demo-small
            assert flaky["demo-small"].calls == calls  # not even tried
            flaky["demo-small"].failing = False
            assert (await client.post("/v1/completions", json=named)).status_code == 200
            healed = await client.get("/health/llm", params={"model": "demo-small"})
            assert healed.json()["status"] == "healthy"
        moves = [(c.old, c.new) for c in changes if c.model == "demo-small"]
        assert moves[:3] == [
            ("unknown", "healthy"),
            ("healthy", "unhealthy"),
            ("unhealthy", "healthy"),
        ]

    async def test_client_errors_do_not_count(self, make_settings: SettingsFactory) -> None:
        """Prompts that are too long are the client's fault, not the model's."""
        settings = make_settings(health={"failure_threshold": 1})
        async with serving(create_app(settings)) as client:
            too_long = {"model": "demo-tiny", "prompt": "word " * 2100}
            assert (await client.post("/v1/completions", json=too_long)).status_code == 400
            body = (await client.get("/health/llm", params={"model": "demo-tiny"})).json()
        assert body["status"] == "healthy"

    @pytest.mark.parametrize(
        ("params", "status"),
        [
            ({"model": "nope"}, 404),
            ({}, 400),
            ({"model": "demo-tiny", "run_inference": "maybe"}, 400),
            ({"model": "demo-tiny", "run_inference": "false"}, 200),
        ],
    )
    async def test_bad_parameters(
        self, client: httpx.AsyncClient, params: dict[str, str], status: int
    ) -> None:
        """Unknown model 404; missing model or a non-boolean run_inference 400."""
        assert (await client.get("/health/llm", params=params)).status_code == status


class TestCacheState:
    async def test_a_redis_that_is_down_degrades_the_cache_not_the_ensemble(
        self, make_settings: SettingsFactory, tmp_path: Path
    ) -> None:
        """Nothing listens at cache.url: /health/llm/all stays 200 and healthy with the
        cache degraded and why; requests are answered; the metrics count the errors and
        show the backend down; then Redis starts there and the cache is healthy again."""
        redis = RedisServer(tmp_path / "redis")
        settings = make_settings(cache={"backend": "redis", "url": redis.url})
        async with serving(create_app(settings)) as client:
            answer = await client.post(
                "/v1/completions",
                json={"model": "demo-tiny", "prompt": "Hi", "max_tokens": 3, "temperature": 0},
            )
            assert answer.status_code == 200
            assert answer.headers["x-cache"] == "MISS"
            response = await client.get("/health/llm/all")
            assert response.status_code == 200
            body = response.json()
            assert body["status"] == "healthy"
            assert body["cache"]["backend"] == "redis"
            assert body["cache"]["status"] == "degraded"
            # "get: ConnectionError: ..." (or a connect timeout on a loaded machine)
            assert body["cache"]["reason"].split(": ")[0] in {"get", "put", "claim", "ping"}
            metrics = (await client.get("/health/metrics/json")).json()
            assert metrics["llm_cache_backend_up_backend=redis"] == 0
            assert metrics["llm_cache_errors_total_backend=redis"] >= 1
            redis.start()
            try:
                deadline = time.monotonic() + 10
                while (await client.get("/health/llm/all")).json()["cache"]["status"] != "healthy":
                    assert time.monotonic() < deadline, "the cache did not come back"
                    await anyio.sleep(0.2)
                metrics = (await client.get("/health/metrics/json")).json()
                assert metrics["llm_cache_backend_up_backend=redis"] == 1
            finally:
                redis.kill()

    async def test_no_cache_section_with_the_cache_off(
        self, make_settings: SettingsFactory
    ) -> None:
        """cache.enabled = false: /health/llm/all has no cache key."""
        async with serving(create_app(make_settings(cache={"enabled": False}))) as client:
            assert "cache" not in (await client.get("/health/llm/all")).json()


class TestAllModels:
    async def test_summary(self, client: httpx.AsyncClient) -> None:
        """Counts, per-model statuses, process memory and GPU availability."""
        response = await client.get("/health/llm/all")
        assert response.status_code == 200
        body = response.json()
        assert body["status"] == "healthy"
        assert (body["healthy_count"], body["degraded_count"], body["unhealthy_count"]) == (3, 0, 0)
        assert body["total_models"] == 3
        assert body["models"] == {
            "demo-tiny": "healthy",
            "demo-small": "healthy",
            "demo-base": "healthy",
        }
        assert body["memory_mb"] > 100
        assert body["gpu_available"] is False
        assert body["cache"] == {"backend": "memory", "status": "healthy"}
        assert ISO_Z.match(body["checked_at"])

    async def test_503_only_when_no_model_serves(
        self, make_settings: SettingsFactory, demo_dir: Path
    ) -> None:
        """One sick member of two: 200 degraded; both sick: 503 and not ready."""
        flaky: dict[str, FlakyEngine] = {}
        models = [
            {"name": "a", "path": str(demo_dir / "demo-tiny.gguf")},
            {"name": "b", "path": str(demo_dir / "demo-tiny.gguf")},
        ]
        settings = make_settings(models=models, health={"failure_threshold": 1})
        app = create_app(settings, loader=_flaky_loader(flaky, {"a", "b"}))
        async with serving(app) as client:
            await client.post("/v1/completions", json={"model": "a", "prompt": "x"})
            one = await client.get("/health/llm/all")
            assert one.status_code == 200
            assert one.json()["status"] == "degraded"
            assert one.json()["unhealthy_count"] == 1
            await client.post("/v1/completions", json={"model": "b", "prompt": "x"})
            both = await client.get("/health/llm/all")
            assert both.status_code == 503
            assert both.json()["status"] == "unhealthy"
            ready = await client.get("/health/ready")
            assert ready.status_code == 503
            assert ready.json()["reason"] == "every loaded model is unhealthy"


class TestProbes:
    async def test_probe_runs_then_is_cached(self, settings: Settings) -> None:
        """run_inference=true runs one token; a second probe within the TTL is cached."""
        app = create_app(settings)
        probes = _events(app, ProbeFinished)
        async with serving(app) as client:
            await self._probe_twice(client)
        assert [p.model for p in probes].count("demo-small") == 1

    async def _probe_twice(self, client: httpx.AsyncClient) -> None:
        params = {"model": "demo-small", "run_inference": "true"}
        first = (await client.get("/health/llm", params=params)).json()
        second = (await client.get("/health/llm", params=params)).json()
        everyone = (await client.get("/health/llm/all", params={"run_inference": "true"})).json()
        assert first["probe"]["outcome"] == "ok"
        assert not first["probe"]["cached"]
        assert second["probe"]["cached"]
        assert everyone["status"] == "healthy"

    async def test_probe_timeout_is_unhealthy(self, make_settings: SettingsFactory) -> None:
        """A probe with no answer in probe_timeout_s reports it (and never hangs)."""
        settings = make_settings(health={"probe_timeout_s": 0.0001})
        async with serving(create_app(settings)) as client:
            body = (
                await client.get(
                    "/health/llm", params={"model": "demo-base", "run_inference": "true"}
                )
            ).json()
        assert body["probe"]["outcome"] == "timeout"

    async def test_failed_probe_is_unhealthy(self, settings: Settings) -> None:
        """A probe whose inference fails makes the member unhealthy at once."""
        flaky: dict[str, FlakyEngine] = {}
        app = create_app(settings, loader=_flaky_loader(flaky, {"demo-tiny"}))
        async with serving(app) as client:
            response = await client.get(
                "/health/llm", params={"model": "demo-tiny", "run_inference": "true"}
            )
        assert response.status_code == 503
        assert response.json()["probe"]["outcome"] == "failed"
        assert "inference probe failed" in response.json()["error_message"]


class TestReadinessAndLiveness:
    async def test_readiness_while_loading(self, settings: Settings) -> None:
        """Readiness is 503 while the models load, 200 once one can serve."""
        gate = threading.Event()

        def slow_loader(spec: ModelSpec) -> LlamaEngine:
            gate.wait(timeout=30)
            return LlamaEngine.load(spec)

        app = create_app(settings, loader=slow_loader)
        async with LifespanManager(app) as manager:
            transport = httpx.ASGITransport(app=manager.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                waiting = await client.get("/health/ready")
                assert waiting.status_code == 503
                assert waiting.json() == {
                    "status": "not_ready",
                    "reason": "models are still loading",
                }
                health = await client.get("/health/llm", params={"model": "demo-tiny"})
                assert health.status_code == 503
                assert health.json()["status"] == "unknown"
                refused = await client.post("/v1/completions", json={"prompt": "x"})
                assert refused.status_code == 503
                assert "retry-after" in refused.headers
                assert (await client.get("/health/live")).status_code == 200
                gate.set()
                await app.state.ensemble.loading_done.wait()
                assert (await client.get("/health/ready")).json() == {"status": "ready"}

    async def test_liveness_fails_on_a_lease_held_too_long(
        self, make_settings: SettingsFactory
    ) -> None:
        """A request holding a member past lease_hard_limit_s: 503 dead, and back after."""
        settings = make_settings(health={"lease_hard_limit_s": 0.2})
        app = create_app(settings)
        async with serving(app) as client:
            assert (await client.get("/health/live")).json() == {"status": "alive"}
            lease = app.state.ensemble.slots["demo-small"].acquire()
            await anyio_sleep(0.3)
            dead = await client.get("/health/live")
            lease.release()
            alive = await client.get("/health/live")
        assert dead.status_code == 503
        assert dead.json()["status"] == "dead"
        assert "has held demo-small" in dead.json()["reason"]
        assert alive.status_code == 200

    async def test_liveness_fails_after_event_loop_lag(
        self, make_settings: SettingsFactory
    ) -> None:
        """A loop that was blocked longer than the limit fails liveness for the window."""
        settings = make_settings(
            health={"loop_lag_limit_s": 0.2, "loop_lag_window_s": 60, "watchdog_interval_s": 0.05}
        )
        async with serving(create_app(settings)) as client:
            await anyio_sleep(0.1)
            time.sleep(0.4)  # noqa: ASYNC251 -- blocks the event loop, as a CPU-bound bug would
            await anyio_sleep(0.1)  # let the watchdog wake up late and notice
            response = await client.get("/health/live")
        assert response.status_code == 503
        assert "event loop lagged" in response.json()["reason"]


async def anyio_sleep(seconds: float) -> None:
    await anyio.sleep(seconds)


async def _until(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.01)


class TestEmbeddedApi:
    async def test_register_a_llama_and_check_it(self, demo_dir: Path) -> None:
        """Users who load models themselves get the same checks through the embedded API."""
        llm = llama_cpp.Llama(str(demo_dir / "demo-tiny.gguf"), n_ctx=128, verbose=False)
        embedded.reset()
        try:
            assert embedded.check_readiness() == (False, "no model is loaded")
            embedded.register_model("mine", llm)
            health = await embedded.check_model_health("mine", run_inference=True)
            everyone = await embedded.check_all_models()
            assert health.status is HealthStatus.HEALTHY
            assert health.probe is not None
            assert health.probe.outcome == "ok"
            assert everyone["mine"].loaded
            assert embedded.check_readiness() == (True, None)
        finally:
            embedded.reset()
            llm.close()

    async def test_liveness_sees_a_stuck_inference(self, demo_dir: Path) -> None:
        """Embedded liveness is a real verdict: an inference past the hard limit fails it."""
        engine = GatedEngine(  # its inferences wait at the gate: stuck until released
            LlamaEngine.load(
                ModelSpec.model_validate(
                    {"name": "stuck", "path": demo_dir / "demo-tiny.gguf", "n_ctx": 128}
                )
            )
        )
        embedded.configure(health=HealthSettings(inference_hard_limit_s=0.05))
        try:
            embedded.register_model("stuck", engine)
            assert embedded.check_liveness() == (True, None)
            checker = embedded.get_health_checker()
            probing = asyncio.ensure_future(checker.check_model_health("stuck", True))
            await _until(engine.arrived.is_set)
            await anyio.sleep(0.1)
            alive, reason = embedded.check_liveness()
            assert alive is False
            assert reason is not None
            assert reason.startswith("an inference on stuck has run for")
        finally:
            engine.release.set()
            await probing
            embedded.reset()
            engine.close()


class _FakeNvml:
    """NVML's answers on a GPU host, for the container case a CPU machine cannot show."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids

    def nvmlInit(self) -> None: ...  # noqa: N802 -- NVML's own names
    def nvmlShutdown(self) -> None: ...  # noqa: N802
    def nvmlDeviceGetCount(self) -> int:  # noqa: N802
        return 1

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:  # noqa: N802
        return index

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[Any]:  # noqa: N802
        return [SimpleNamespace(pid=pid, usedGpuMemory=1000) for pid in self.pids]

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:  # noqa: N802
        return SimpleNamespace(used=5000, total=80000)


class TestGpu:
    def test_no_nvml_means_no_figures(self) -> None:
        """Without NVML (this machine) GPU figures are None and gpu_available is False."""
        monitor = GpuMonitor()
        assert monitor.available is False
        assert monitor.process_memory() is None

    def test_own_pid_visible(self) -> None:
        """With the host PID namespace, the process's own usage is reported."""
        monitor = GpuMonitor(nvml=_FakeNvml([42, 7]))
        reading = monitor.process_memory(pid=42)
        assert reading is not None
        assert (reading.used_bytes, reading.source) == (1000, "process")

    def test_container_without_own_pid(self) -> None:
        """In a container NVML lists host PIDs: fall back to the device's used memory."""
        monitor = GpuMonitor(nvml=_FakeNvml([90001]))
        reading = monitor.process_memory(pid=12)
        assert reading is not None
        assert (reading.used_bytes, reading.source) == (5000, "device")
