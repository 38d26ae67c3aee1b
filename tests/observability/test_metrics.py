"""Metrics: the contract's names, the JSON view, the helpers, and disabling them."""

from __future__ import annotations

import json
import shutil
import threading
from typing import Any

import anyio
import pytest

from ensemble_ops import embedded
from ensemble_ops.config import Settings
from ensemble_ops.events import (
    EventBus,
    GateJudged,
    InferenceFailed,
    InferenceFinished,
    QualityJudged,
    ReloadFinished,
    ReloadStateChanged,
    RolloutFinished,
    RolloutStepped,
    ShadowFinished,
)
from ensemble_ops.http.app import create_app
from ensemble_ops.observability.metrics import Metrics

from ..conftest import AppClient, SettingsFactory, serving

CONTRACT = {
    "llm_requests_total": "counter",
    "llm_errors_total": "counter",
    "llm_cache_hits_total": "counter",
    "llm_cache_misses_total": "counter",
    "llm_cache_errors_total": "counter",
    "llm_cache_backend_up": "gauge",
    "llm_inference_duration_seconds": "histogram",
    "llm_model_loaded": "gauge",
    "llm_model_memory_bytes": "gauge",
    "llm_active_requests": "gauge",
    "llm_requests_per_second": "gauge",
    "llm_ensemble_info": "gauge",
    "llm_reload_total": "counter",
    "llm_reload_duration_seconds": "histogram",
    "llm_reload_state": "gauge",
    "llm_reload_progress_percent": "gauge",
    "llm_health_status": "gauge",
    "llm_tokens_total": "counter",
    "llm_time_to_first_token_seconds": "histogram",
    "llm_queue_depth": "gauge",
    "llm_event_loop_lag_seconds": "gauge",
    "llm_batch_size": "histogram",
    "llm_kv_cache_usage_ratio": "gauge",
    "llm_time_per_output_token_seconds": "histogram",
    "llm_queue_wait_seconds": "histogram",
    "llm_rollout_weight_percent": "gauge",
    "llm_rollout_gate_verdict": "gauge",
    "llm_rollouts_total": "counter",
    "llm_rate_limited_total": "counter",
    "process_resident_memory_bytes": "gauge",
    "process_cpu_seconds_total": "counter",
}


async def _traffic(client: AppClient) -> None:
    for mode in ("fast", "balanced", "creative"):
        await client.post("/v1/completions", json={"mode": mode, "prompt": "x", "max_tokens": 3})
    cached = {"model": "demo-tiny", "prompt": "same", "max_tokens": 3, "temperature": 0}
    await client.post("/v1/completions", json=cached)
    await client.post("/v1/completions", json=cached)
    await client.post("/v1/completions", json={"model": "demo-tiny", "prompt": "x " * 3000})
    await client.post(
        "/v1/chat/completions",
        json={
            "model": "demo-small",
            "stream": True,
            "max_tokens": 4,
            "messages": [{"role": "user", "content": "hi"}],
        },
    )
    await app_reload(client, "demo-tiny")


async def app_reload(client: AppClient, model: str) -> None:
    await client.admin.post(f"/admin/models/{model}/reload", json={"warmup_iterations": 1})
    with anyio.fail_after(30):
        while (await client.get(f"/health/llm/reload/{model}")).json()["state"] != "completed":
            await anyio.sleep(0.02)


class TestExposition:
    async def test_every_contract_metric_with_its_type(self, client: AppClient) -> None:
        """/metrics and /health/metrics expose each contract name with its type."""
        await _traffic(client)
        text = (await client.get("/metrics")).text
        assert (await client.get("/health/metrics")).status_code == 200
        for name, kind in CONTRACT.items():
            assert f"# TYPE {name} {kind}" in text, name
        assert (
            'llm_inference_duration_seconds_bucket{copy="stable",key="anonymous",le="30.0"' in text
        )
        assert (
            'llm_requests_total{copy="stable",key="anonymous",mode="fast",model="demo-tiny",'
            'status="success"} 1' in text
        )
        assert 'llm_errors_total{error_type="context_length_exceeded",model="demo-tiny"} 1' in text
        assert "llm_cache_hits_total 1" in text
        assert 'llm_reload_total{model="demo-tiny",outcome="completed"} 1' in text
        assert 'llm_reload_state{model="demo-tiny",state="completed"} 1' in text
        assert 'llm_kv_cache_usage_ratio{model="demo-base"}' in text  # every member, from start
        assert 'llm_rollout_weight_percent{model="demo-base"} 0' in text

    @pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
    async def test_promtool_accepts_it(self, client: AppClient) -> None:
        """`promtool check metrics` finds nothing to complain about."""
        await _traffic(client)
        text = (await client.get("/metrics")).text
        check = await anyio.run_process(
            ["promtool", "check", "metrics"], input=text.encode(), check=False
        )
        assert check.returncode == 0, check.stdout + check.stderr
        assert check.stdout.strip() == b""
        assert check.stderr.strip() == b""

    async def test_json_view(self, client: AppClient) -> None:
        """Flat keys name=...,labels: value; histograms as _bucket/_sum/_count; valid JSON."""
        await _traffic(client)
        response = await client.get("/health/metrics/json")
        body = json.loads(response.text)  # strict: no NaN or Infinity literals
        assert (
            body[
                "llm_requests_total_model=demo-tiny,copy=stable,key=anonymous,mode=fast,status=success"
            ]
            == 1
        )
        assert body["llm_cache_hits_total"] == 1
        labels = "model=demo-tiny,copy=stable,key=anonymous,mode=fast"
        assert body[f"llm_inference_duration_seconds_bucket_{labels},le=+Inf"] == 1
        assert body[f"llm_inference_duration_seconds_count_{labels}"] == 1
        assert body[f"llm_inference_duration_seconds_sum_{labels}"] > 0


class TestCounting:
    async def test_each_request_counts_once_even_with_fallback(
        self, make_settings: SettingsFactory
    ) -> None:
        """A request that falls back is one request (success) plus one error on the member."""
        settings = make_settings()
        models = [
            {**mm.model_dump(), "path": str(mm.path), "queue_size": 0, "parallel": 1}
            for mm in settings.models
        ]
        async with serving(app := create_app(make_settings(models=models))) as client:
            request = {"model": "ensemble", "prompt": "x", "max_tokens": 200}

            async def send() -> None:
                await client.post("/v1/completions", json=request)

            async with anyio.create_task_group() as tasks:
                for _ in range(2):
                    tasks.start_soon(send)
            flat = app.state.metrics.flat()
        requests = {k: v for k, v in flat.items() if k.startswith("llm_requests_total_")}
        assert sum(requests.values()) == 2
        errors = {k: v for k, v in flat.items() if k.startswith("llm_errors_total_")}
        assert errors == {"llm_errors_total_model=demo-tiny,error_type=overloaded": 1}


class TestDisabled:
    async def test_disabled_means_404_and_nothing_recorded(
        self, make_settings: SettingsFactory
    ) -> None:
        """metrics.enabled = false: all three routes 404, and no recording method records."""
        async with serving(app := create_app(make_settings(metrics={"enabled": False}))) as c:
            codes = {
                p: (await c.get(p)).status_code
                for p in ("/metrics", "/health/metrics", "/health/metrics/json")
            }
            await c.post("/v1/completions", json={"model": "demo-tiny", "prompt": "x"})
            metrics = app.state.metrics
            _record_everything(metrics)
            await anyio.sleep(0.05)
            flat = metrics.flat()
        assert set(codes.values()) == {404}
        assert {k: v for k, v in flat.items() if k.startswith("llm_") and v} == {}


def _record_everything(metrics: Metrics) -> None:
    """Every public recording method once, as a user who calls models would, from threads too."""

    @metrics.track_llm_request("mine", "fast")
    def sync_call() -> str:
        return "ok"

    @metrics.track_llm_request("mine", "fast")
    def broken() -> None:
        raise ValueError("nope")

    assert sync_call() == "ok"
    with pytest.raises(ValueError, match="nope"):
        broken()
    metrics.record_request("mine", "creative", "success")
    metrics.record_error("mine", "timeout")
    metrics.record_cache_hit()
    metrics.record_cache_miss()
    metrics.update_model_status("mine", True, memory_bytes=1234)
    metrics.observe_batch_sizes("mine", [1, 3])
    metrics.set_kv_cache_usage("mine", 0.5)
    with metrics.track_inference_time("mine", "creative"):
        pass
    thread = threading.Thread(target=metrics.record_request, args=("mine", "fast", "success"))
    thread.start()
    thread.join()


class TestRecordingApi:
    async def test_an_apps_metrics_record_from_any_thread(self, settings: Settings) -> None:
        """Code that calls models itself records into the app's metrics, from any thread."""
        async with serving(app := create_app(settings)):
            metrics: Metrics = app.state.metrics

            @metrics.track_llm_request("mine", "fast")
            async def async_call() -> str:
                return "ok"

            _record_everything(metrics)
            assert await async_call() == "ok"
            await anyio.sleep(0.05)  # the thread's update hops onto the loop
            flat = metrics.flat()
        assert (
            flat["llm_requests_total_model=mine,copy=stable,key=anonymous,mode=fast,status=success"]
            == 3
        )
        assert (
            flat["llm_requests_total_model=mine,copy=stable,key=anonymous,mode=fast,status=error"]
            == 1
        )
        assert flat["llm_errors_total_model=mine,error_type=ValueError"] == 1
        assert flat["llm_errors_total_model=mine,error_type=timeout"] == 1
        assert flat["llm_cache_hits_total"] == 1
        assert flat["llm_cache_misses_total"] == 1
        assert flat["llm_model_memory_bytes_model=mine,memory_type=ram"] == 1234
        assert flat["llm_batch_size_count_model=mine"] == 2
        assert flat["llm_kv_cache_usage_ratio_model=mine"] == 0.5
        assert (
            flat[
                "llm_inference_duration_seconds_count_model=mine,copy=stable,key=anonymous,mode=fast"
            ]
            == 3
        )
        assert (
            flat[
                "llm_inference_duration_seconds_count_model=mine,copy=stable,key=anonymous,mode=creative"
            ]
            == 1
        )

    async def test_embedded_helpers_feed_the_process_wide_metrics_only(
        self, settings: Settings
    ) -> None:
        """The module-level helpers write to embedded.get_metrics(), never to an app's."""
        embedded.reset()
        try:
            async with serving(app := create_app(settings)):
                embedded.record_request("mine", "fast", "success")
                with embedded.track_inference_time("mine", "fast"):
                    pass
                app_flat = app.state.metrics.flat()
            process_flat = embedded.get_metrics().flat()
        finally:
            embedded.reset()
        key = "llm_requests_total_model=mine,copy=stable,key=anonymous,mode=fast,status=success"
        assert process_flat[key] == 1
        duration = (
            "llm_inference_duration_seconds_count_model=mine,copy=stable,key=anonymous,mode=fast"
        )
        assert process_flat[duration] == 1
        assert key not in app_flat

    async def test_two_apps_in_one_process_never_clash(self, settings: Settings) -> None:
        """Traffic to one app moves its own counters and not another app's."""
        async with (
            serving(first := create_app(settings)) as client,
            serving(second := create_app(settings)),
        ):
            await client.post("/v1/completions", json={"model": "demo-tiny", "prompt": "x"})
            key = (
                "llm_requests_total_model=demo-tiny,copy=stable,key=anonymous,mode=balanced,"
                "status=success"
            )
            assert first.state.metrics.flat()[key] == 1
            assert key not in second.state.metrics.flat()


def _finished(model: str, mode: str, **fields: Any) -> InferenceFinished:
    base: dict[str, Any] = {
        "latency_s": 0.5,
        "prompt_tokens": 3,
        "completion_tokens": 8,
        "cached": False,
        "stream": False,
    }
    return InferenceFinished(model, mode, **{**base, **fields})


class TestBatching:
    def test_finished_events_fill_queue_wait_and_time_per_token(self) -> None:
        """queue_wait_s and time_per_output_token_s land in their histograms by model/mode."""
        metrics, bus = Metrics(members=["a"]), EventBus()
        metrics.subscribe(bus)
        bus.publish(_finished("a", "fast", queue_wait_s=0.07, time_per_output_token_s=0.015))
        bus.publish(_finished("a", "fast", queue_wait_s=3.0, time_per_output_token_s=0.3))
        bus.publish(_finished("a", "creative", queue_wait_s=0.0, stream=True))
        bus.publish(_finished("a", "fast", cached=True, latency_s=0.001))  # hit: both None
        flat = metrics.flat()
        assert flat["llm_queue_wait_seconds_count_model=a,mode=fast"] == 2
        assert flat["llm_queue_wait_seconds_bucket_model=a,mode=fast,le=0.1"] == 1
        assert flat["llm_queue_wait_seconds_bucket_model=a,mode=fast,le=5"] == 2
        assert flat["llm_queue_wait_seconds_sum_model=a,mode=fast"] == pytest.approx(3.07)
        assert flat["llm_queue_wait_seconds_count_model=a,mode=creative"] == 1
        assert flat["llm_time_per_output_token_seconds_count_model=a,mode=fast"] == 2
        assert flat["llm_time_per_output_token_seconds_bucket_model=a,mode=fast,le=0.02"] == 1
        assert flat["llm_time_per_output_token_seconds_bucket_model=a,mode=fast,le=0.5"] == 2
        assert "llm_time_per_output_token_seconds_count_model=a,mode=creative" not in flat

    def test_a_cancelled_stream_still_counts_its_wait(self) -> None:
        """A client that left a stream had waited for its slot: the wait is observed."""
        metrics, bus = Metrics(members=["a"]), EventBus()
        metrics.subscribe(bus)
        bus.publish(_finished("a", "fast", stream=True, outcome="cancelled", queue_wait_s=8.0))
        flat = metrics.flat()
        assert flat["llm_queue_wait_seconds_count_model=a,mode=fast"] == 1
        assert (
            "llm_inference_duration_seconds_count_model=a,copy=stable,key=anonymous,mode=fast"
            not in flat
        )

    def test_batch_sizes_and_kv_usage_in_the_exposition_and_json(self) -> None:
        """observe_batch_sizes fills llm_batch_size{model}; the KV gauge starts at 0."""
        metrics = Metrics(members=["a", "b"])
        assert metrics.flat()["llm_kv_cache_usage_ratio_model=b"] == 0
        metrics.observe_batch_sizes("a", iter([1, 4, 4, 300]))  # any iterable, once
        metrics.set_kv_cache_usage("a", 0.25)
        text = metrics.render([])[0].decode()
        assert 'llm_batch_size_bucket{le="1.0",model="a"} 1' in text
        assert 'llm_batch_size_bucket{le="4.0",model="a"} 3' in text
        assert 'llm_batch_size_bucket{le="512.0",model="a"} 4' in text
        assert 'llm_batch_size_count{model="a"} 4' in text
        assert 'llm_batch_size_sum{model="a"} 309' in text
        assert 'llm_kv_cache_usage_ratio{model="a"} 0.25' in text
        assert 'llm_kv_cache_usage_ratio{model="b"} 0' in text
        flat = metrics.flat()
        assert flat["llm_batch_size_bucket_model=a,le=2"] == 1
        assert flat["llm_batch_size_bucket_model=a,le=+Inf"] == 4
        assert flat["llm_kv_cache_usage_ratio_model=a"] == 0.25

    def test_kv_usage_stays_a_ratio(self) -> None:
        """A reading outside 0..1 (rounding) is clamped to the gauge's range."""
        metrics = Metrics(members=["a"])
        metrics.set_kv_cache_usage("a", 1.0000001)
        assert metrics.flat()["llm_kv_cache_usage_ratio_model=a"] == 1
        metrics.set_kv_cache_usage("a", -0.1)
        assert metrics.flat()["llm_kv_cache_usage_ratio_model=a"] == 0

    def test_disabled_records_none_of_them(self) -> None:
        """enabled=False: no KV series at start, and neither events nor methods record."""
        metrics, bus = Metrics(enabled=False, members=["a"]), EventBus()
        metrics.subscribe(bus)
        bus.publish(_finished("a", "fast", queue_wait_s=1.0, time_per_output_token_s=0.01))
        metrics.observe_batch_sizes("a", [1, 2])
        metrics.set_kv_cache_usage("a", 0.5)
        names = ("llm_batch_size", "llm_kv_cache_usage", "llm_time_per_output", "llm_queue_wait")
        assert [k for k in metrics.flat() if k.startswith(names)] == []


def _user_facing(metrics: Metrics) -> dict[str, float | str]:
    """Every llm_ sample except the rollout's own series: what users' requests move."""
    return {
        key: value
        for key, value in metrics.flat().items()
        if key.startswith("llm_") and not key.startswith("llm_rollout")
    }


class TestCopy:
    def test_requests_and_latency_are_labelled_by_copy(self) -> None:
        """The copy that answered labels llm_requests_total and the latency histogram."""
        metrics, bus = Metrics(members=["a"]), EventBus()
        metrics.subscribe(bus)
        bus.publish(_finished("a", "fast", latency_s=0.3))
        bus.publish(_finished("a", "fast", latency_s=4.0, copy="candidate"))
        bus.publish(_finished("a", "fast", latency_s=0.2, copy="candidate"))
        bus.publish(InferenceFailed("a", "fast", "engine_error", "boom", 0.1, copy="candidate"))
        flat = metrics.flat()
        assert (
            flat["llm_requests_total_model=a,copy=stable,key=anonymous,mode=fast,status=success"]
            == 1
        )
        assert (
            flat["llm_requests_total_model=a,copy=candidate,key=anonymous,mode=fast,status=success"]
            == 2
        )
        assert (
            flat["llm_requests_total_model=a,copy=candidate,key=anonymous,mode=fast,status=error"]
            == 1
        )
        stable, candidate = (
            "model=a,copy=stable,key=anonymous,mode=fast",
            "model=a,copy=candidate,key=anonymous,mode=fast",
        )
        assert flat[f"llm_inference_duration_seconds_count_{stable}"] == 1
        assert flat[f"llm_inference_duration_seconds_count_{candidate}"] == 2
        assert flat[f"llm_inference_duration_seconds_bucket_{candidate},le=0.5"] == 1
        assert flat[f"llm_inference_duration_seconds_sum_{candidate}"] == pytest.approx(4.2)
        # The other series keep their labels: both copies' tokens are the member's.
        assert flat["llm_tokens_total_model=a,kind=completion"] == 3 * 8
        text = metrics.render([])[0].decode()
        assert (
            'llm_requests_total{copy="candidate",key="anonymous",mode="fast",model="a",'
            'status="error"} 1' in text
        )

    def test_the_recording_helpers_record_the_stable_copy(self) -> None:
        """record_request and observe_inference default to copy=stable; candidate on request."""
        metrics = Metrics()
        metrics.record_request("mine", "fast", "success")
        metrics.record_request("mine", "fast", "success", copy="candidate")
        metrics.observe_inference("mine", "fast", 0.2)
        with metrics.track_inference_time("mine", "fast"):
            pass
        flat = metrics.flat()
        assert (
            flat["llm_requests_total_model=mine,copy=stable,key=anonymous,mode=fast,status=success"]
            == 1
        )
        assert (
            flat[
                "llm_requests_total_model=mine,copy=candidate,key=anonymous,mode=fast,status=success"
            ]
            == 1
        )
        assert (
            flat[
                "llm_inference_duration_seconds_count_model=mine,copy=stable,key=anonymous,mode=fast"
            ]
            == 2
        )


class TestRollouts:
    def test_every_member_has_its_rollout_series_from_the_start(self) -> None:
        """Weight 0, no gate verdict, and every rollout and reload counter at 0, per member."""
        flat = Metrics(members=["a", "b"]).flat()
        for member in ("a", "b"):
            assert flat[f"llm_rollout_weight_percent_model={member}"] == 0
            verdicts = {
                k: v
                for k, v in flat.items()
                if k.startswith(f"llm_rollout_gate_verdict_model={member},")
            }
            assert len(verdicts) == 5 * 3  # four live gates and quality, three verdicts each
            assert set(verdicts.values()) == {0}
            assert f"llm_rollout_gate_verdict_model={member},gate=ttft,verdict=hold" in verdicts
            assert f"llm_rollout_gate_verdict_model={member},gate=quality,verdict=fail" in verdicts
            for outcome in ("pass", "fail", "skipped"):
                assert flat[f"llm_quality_runs_total_model={member},outcome={outcome}"] == 0
            rollouts = {
                k: v for k, v in flat.items() if k.startswith(f"llm_rollouts_total_model={member},")
            }
            assert len(rollouts) == 4 * 3  # switch, canary, shadow, blue_green x outcomes
            assert set(rollouts.values()) == {0}
            assert (
                flat[f"llm_rollouts_total_model={member},outcome=rolled_back,rollout=canary"] == 0
            )
            for outcome in ("completed", "failed", "rolled_back"):
                assert flat[f"llm_reload_total_model={member},outcome={outcome}"] == 0

    def test_a_canary_steps_then_promotes(self) -> None:
        """Each step sets the candidate's share; the promotion counts and clears it."""
        metrics, bus = Metrics(members=["a", "b"]), EventBus()
        metrics.subscribe(bus)
        bus.publish(RolloutStepped("a", "canary", 10.0, "10% of requests to the new copy"))
        assert metrics.flat()["llm_rollout_weight_percent_model=a"] == 10
        bus.publish(RolloutStepped("a", "canary", 50.0, "50% of requests to the new copy"))
        flat = metrics.flat()
        assert flat["llm_rollout_weight_percent_model=a"] == 50
        assert flat["llm_rollout_weight_percent_model=b"] == 0
        bus.publish(RolloutFinished("a", "canary", "promoted"))
        flat = metrics.flat()
        assert flat["llm_rollout_weight_percent_model=a"] == 0  # the new copy is the stable one
        assert flat["llm_rollouts_total_model=a,outcome=promoted,rollout=canary"] == 1
        assert flat["llm_rollouts_total_model=a,outcome=rolled_back,rollout=canary"] == 0

    def test_each_gate_reads_one_on_its_current_verdict(self) -> None:
        """llm_rollout_gate_verdict is one-hot per (member, gate)."""
        metrics, bus = Metrics(members=["a"]), EventBus()
        metrics.subscribe(bus)
        bus.publish(GateJudged("a", "p95_latency", "pass", 0.8, 0.7, 1.5, "within 1.5x"))
        bus.publish(GateJudged("a", "error_rate", "hold", None, None, 0.02, "3 of 20 requests"))
        bus.publish(GateJudged("a", "p95_latency", "fail", 2.4, 0.7, 1.5, "3.4x the stable"))
        flat = metrics.flat()

        def verdicts(gate: str) -> dict[str, float | str]:
            prefix = f"llm_rollout_gate_verdict_model=a,gate={gate},verdict="
            return {k.removeprefix(prefix): v for k, v in flat.items() if k.startswith(prefix)}

        assert verdicts("p95_latency") == {"pass": 0, "fail": 1, "hold": 0}
        assert verdicts("error_rate") == {"pass": 0, "fail": 0, "hold": 1}
        assert verdicts("ttft") == {"pass": 0, "fail": 0, "hold": 0}

    def test_a_rollbacks_verdicts_stay_until_the_next_rollout(self) -> None:
        """The gate that failed still reads fail after the rollback, until a new rollout."""
        metrics, bus = Metrics(members=["a"]), EventBus()
        metrics.subscribe(bus)
        bus.publish(RolloutStepped("a", "canary", 25.0, "25%"))
        bus.publish(GateJudged("a", "empty_share", "fail", 0.4, 0.0, 0.05, "40% empty"))
        bus.publish(RolloutFinished("a", "canary", "rolled_back", "gate empty_share failed"))
        flat = metrics.flat()
        assert flat["llm_rollout_weight_percent_model=a"] == 0
        assert flat["llm_rollouts_total_model=a,outcome=rolled_back,rollout=canary"] == 1
        assert flat["llm_rollout_gate_verdict_model=a,gate=empty_share,verdict=fail"] == 1
        bus.publish(RolloutStepped("a", "shadow", 0.0, "mirroring 20% of requests"))
        flat = metrics.flat()
        assert flat["llm_rollout_gate_verdict_model=a,gate=empty_share,verdict=fail"] == 0
        assert (
            sum(float(v) for k, v in flat.items() if k.startswith("llm_rollout_gate_verdict_")) == 0
        )

    def test_a_promoted_copys_quality_score_becomes_the_stable_ones(self) -> None:
        """After a reload that completed, copy="stable" reads the new copy's score; after
        one rolled back, it keeps the serving copy's."""
        metrics, bus = Metrics(members=["a"]), EventBus()
        metrics.subscribe(bus)

        def scores() -> tuple[float | str, float | str]:
            flat = metrics.flat()
            name = "llm_quality_pass_ratio_model=a,copy="
            return flat[f"{name}stable"], flat[f"{name}candidate"]

        bus.publish(QualityJudged("a", "candidate", "set.jsonl", 20, 18, 1.0))
        bus.publish(QualityJudged("a", "stable", "set.jsonl", 20, 14, 1.0))
        assert scores() == (0.7, 0.9)
        bus.publish(ReloadFinished("a", "completed", 3.0))
        assert scores() == (0.9, 0.9)
        bus.publish(QualityJudged("a", "candidate", "set.jsonl", 20, 19, 1.0))
        bus.publish(ReloadFinished("a", "rolled_back", 3.0, "the p95_latency gate failed"))
        assert scores() == (0.9, 0.95)

    def test_every_reload_state_of_a_rollout_is_one_hot(self) -> None:
        """The rollout stages are reload states like the others, each a series from the start;
        a state this view does not know yet still reads 1 when entered."""
        metrics, bus = Metrics(members=["a"]), EventBus()
        metrics.subscribe(bus)
        flat = metrics.flat()
        for state in ("shadowing", "canary", "awaiting_promotion", "rolled_back"):
            assert flat[f"llm_reload_state_model=a,state={state}"] == 0
        bus.publish(ReloadStateChanged("a", "ready", "canary", 80.0, "10%", 1.0))
        flat = metrics.flat()
        assert flat["llm_reload_state_model=a,state=canary"] == 1
        assert flat["llm_reload_state_model=a,state=ready"] == 0
        bus.publish(ReloadStateChanged("a", "canary", "verifying", 90.0, "new stage", 2.0))
        flat = metrics.flat()
        assert flat["llm_reload_state_model=a,state=verifying"] == 1
        assert flat["llm_reload_state_model=a,state=canary"] == 0
        bus.publish(ReloadStateChanged("a", "verifying", "rolled_back", 100.0, "gate", 3.0))
        flat = metrics.flat()
        assert flat["llm_reload_state_model=a,state=verifying"] == 0
        assert flat["llm_reload_state_model=a,state=rolled_back"] == 1

    async def test_shadow_requests_move_nothing_an_app_serves(self, settings: Settings) -> None:
        """Published on a running app's bus, ShadowFinished changes no series of its /metrics
        (whatever the app wires to the bus); an answered request does."""
        async with serving(app := create_app(settings)) as client:
            request = {"model": "demo-tiny", "prompt": "x", "max_tokens": 3}
            await client.post("/v1/completions", json=request)

            async def series() -> dict[str, Any]:
                body: dict[str, Any] = (await client.get("/health/metrics/json")).json()
                # The watchdog's lag sample, and the compute share since the last scrape, move
                # on their own.
                moving = ("llm_event_loop_lag", "llm_compute_busy_ratio")
                return {
                    k: v
                    for k, v in body.items()
                    if k.startswith("llm_") and not k.startswith(moving)
                }

            before = await series()
            app.state.bus.publish(ShadowFinished("demo-tiny", 0.3, 0.02, 3, empty=False))
            app.state.bus.publish(ShadowFinished("demo-tiny", 0.1, None, 0, True, "engine_error"))
            after_shadow = await series()
            await client.post("/v1/completions", json=request)
            after_request = await series()
        assert after_shadow == before
        key = (
            "llm_requests_total_model=demo-tiny,copy=stable,key=anonymous,mode=balanced,"
            "status=success"
        )
        assert (before[key], after_request[key]) == (1, 2)

    def test_shadow_requests_move_no_user_facing_series(self) -> None:
        """ShadowFinished changes no series users' requests move; the same figures as an
        answered request would (so the comparison can see a change)."""
        metrics, bus = Metrics(members=["a"], cache_backend="memory"), EventBus()
        metrics.subscribe(bus)
        bus.publish(_finished("a", "fast", time_to_first_token_s=0.05, queue_wait_s=0.01))
        before = _user_facing(metrics)
        bus.publish(ShadowFinished("a", 0.4, 0.05, 8, empty=False))
        bus.publish(ShadowFinished("a", 0.1, None, 0, empty=True))
        bus.publish(ShadowFinished("a", 0.2, None, 0, empty=True, error_type="engine_error"))
        assert _user_facing(metrics) == before
        bus.publish(_finished("a", "fast", latency_s=0.4, time_to_first_token_s=0.05))
        changed = {k for k, v in _user_facing(metrics).items() if before.get(k) != v}
        assert (
            "llm_requests_total_model=a,copy=stable,key=anonymous,mode=fast,status=success"
            in changed
        )
        assert "llm_tokens_total_model=a,kind=completion" in changed
