"""The quality gate on the demo models: wiring, thresholds, skips and bad golden sets.

The demo models have random weights, so the sets here ask only what such a model does by
construction: any answer at all passes ``regex "."``, and none is exactly ``zzz-never``. The
real-model tests (``test_gate_real.py``) show the gate telling a good model from a bad one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from ensemble_ops.config import Settings
from ensemble_ops.errors import ConfigError
from ensemble_ops.events import GateJudged, QualityJudged, QualitySkipped
from ensemble_ops.http.app import create_app

from ..conftest import Recorded, SettingsFactory, serving

MEMBER = "demo-tiny"
ANSWERS = {"prompt": "Once upon a time", "max_tokens": 4, "regex": "."}
NEVER = {"prompt": "Once upon a time", "max_tokens": 4, "exact": "zzz-never"}


def _golden(tmp_path: Path, *cases: dict[str, Any]) -> Path:
    path = tmp_path / "golden.jsonl"
    path.write_text("".join(json.dumps(case) + "\n" for case in cases))
    return path


@pytest.fixture(name="half")
def _half(tmp_path: Path) -> Path:
    """A set the demo members pass half of."""
    return _golden(tmp_path, ANSWERS, NEVER)


def _with_golden(make_settings: SettingsFactory, path: Path, **quality: Any) -> Settings:
    return make_settings(quality={"golden_set": str(path), **quality})


class TestGate:
    async def test_a_copy_below_the_floor_fails_the_reload_and_the_old_copy_serves(
        self, make_settings: SettingsFactory, half: Path
    ) -> None:
        """50% against the default floor of 80%: failed, with the failing case in the
        status; the old copy still serves; the verdict is in the events and metrics."""
        app = create_app(_with_golden(make_settings, half))
        events = Recorded(app.state.bus, QualityJudged, GateJudged)
        async with serving(app) as client:
            old = app.state.ensemble.slots[MEMBER].active
            started = await client.admin.post(f"/admin/models/{MEMBER}/reload", json={})
            assert started.status_code == 202
            await app.state.reload.wait_for_reload(MEMBER)
            status = (await client.get(f"/health/llm/reload/{MEMBER}")).json()
            assert app.state.ensemble.slots[MEMBER].active is old
            metrics = (await client.get("/metrics")).text
        assert status["state"] == "failed"
        assert status["error"] == (
            "quality gate failed: passed 1/2 (50%); needs 80% (min_pass_rate 80%)"
        )
        quality = status["quality"]
        assert quality["verdict"] == "fail"
        assert (quality["pass_rate"], quality["stable_pass_rate"]) == (0.5, 0.5)
        assert quality["golden_set"] == "golden.jsonl"
        [failure] = quality["failures"]
        assert failure["case"] == "line 2"
        assert failure["input"] == "Once upon a time"
        assert failure["expected"] == 'exact "zzz-never"'
        assert failure["got"]
        assert failure["why"] == "not exactly 'zzz-never'"
        assert [e.copy for e in events.of(QualityJudged)] == ["candidate", "stable"]
        [verdict] = [e for e in events.of(GateJudged) if e.gate == "quality"]
        assert (verdict.verdict, verdict.candidate, verdict.limit) == ("fail", 0.5, 0.8)
        assert 'llm_quality_runs_total{model="demo-tiny",outcome="fail"} 1' in metrics
        assert (
            'llm_rollout_gate_verdict{gate="quality",model="demo-tiny",verdict="fail"} 1' in metrics
        )
        assert 'llm_quality_pass_ratio{copy="candidate",model="demo-tiny"} 0.5' in metrics

    async def test_a_request_may_lower_the_floor_and_the_serving_score_is_kept(
        self, make_settings: SettingsFactory, half: Path
    ) -> None:
        """quality {min_pass_rate: 0.5} passes the same copy; the new copy's score becomes
        the serving one's, so the next reload scores only its own new copy."""
        app = create_app(_with_golden(make_settings, half))
        events = Recorded(app.state.bus, QualityJudged)
        body = {"quality": {"min_pass_rate": 0.5}}
        async with serving(app) as client:
            for _ in range(2):
                started = await client.admin.post(f"/admin/models/{MEMBER}/reload", json=body)
                assert started.status_code == 202
                status = await app.state.reload.wait_for_reload(MEMBER)
                assert status.state == "completed", status
                assert status.quality is not None
                assert status.quality.passed
                assert status.quality.required_pass_rate == 0.5
        assert [e.copy for e in events.of(QualityJudged)] == ["candidate", "stable", "candidate"]

    async def test_a_reread_config_applies_quality_to_the_next_reload(
        self, make_settings: SettingsFactory, half: Path
    ) -> None:
        """SIGHUP's new ``[quality]`` floor (members unchanged, so nothing reloads then)
        decides the next reload's gate."""
        settings = _with_golden(make_settings, half)
        app = create_app(settings)
        lowered = _with_golden(make_settings, half, min_pass_rate=0.5)
        assert lowered.models == settings.models
        async with serving(app) as client:
            assert app.state.reload.apply_settings(lowered) == {}
            started = await client.admin.post(f"/admin/models/{MEMBER}/reload", json={})
            assert started.status_code == 202
            status = await app.state.reload.wait_for_reload(MEMBER)
        assert status.state == "completed", status
        assert status.quality is not None
        assert status.quality.required_pass_rate == 0.5

    async def test_quality_false_skips_the_gate_and_says_so(
        self, make_settings: SettingsFactory, half: Path
    ) -> None:
        app = create_app(_with_golden(make_settings, half))
        events = Recorded(app.state.bus, QualityJudged, QualitySkipped)
        async with serving(app) as client:
            started = await client.admin.post(
                f"/admin/models/{MEMBER}/reload", json={"quality": False}
            )
            assert started.status_code == 202
            status = await app.state.reload.wait_for_reload(MEMBER)
            metrics = (await client.get("/metrics")).text
        assert status.state == "completed"
        assert status.quality is None
        assert events.of(QualityJudged) == []
        assert events.of(QualitySkipped) == [QualitySkipped(MEMBER, "golden.jsonl")]
        assert 'llm_quality_runs_total{model="demo-tiny",outcome="skipped"} 1' in metrics

    async def test_a_member_may_turn_the_gate_off_or_use_its_own_set(
        self, make_settings: SettingsFactory, tmp_path: Path, half: Path
    ) -> None:
        """demo-tiny opts out; demo-small has a set it passes in full."""
        (tmp_path / "own").mkdir()
        own = _golden(tmp_path / "own", ANSWERS)
        settings = _with_golden(make_settings, half)
        quality: dict[str, dict[str, Any]] = {
            MEMBER: {"enabled": False},
            "demo-small": {"golden_set": own},
        }
        models = [
            m.model_copy(update={"quality": m.quality.model_copy(update=quality[m.name])})
            if m.name in quality
            else m
            for m in settings.models
        ]
        app = create_app(settings.model_copy(update={"models": tuple(models)}))
        async with serving(app):
            tiny = await app.state.reload.reload_model(MEMBER)
            small = await app.state.reload.reload_model("demo-small")
        assert (tiny.state, tiny.quality) == ("completed", None)
        assert small.state == "completed"
        assert small.quality is not None
        assert (small.quality.golden_set, small.quality.pass_rate) == ("golden.jsonl", 1.0)


class TestTrace:
    async def test_the_verdict_and_each_failed_case_are_on_the_warm_up_span(
        self,
        make_settings: SettingsFactory,
        half: Path,
        provider: TracerProvider,
        exporter: InMemorySpanExporter,
    ) -> None:
        app = create_app(_with_golden(make_settings, half), tracer_provider=provider)
        async with serving(app):
            status = await app.state.reload.reload_model(MEMBER)
        assert status.state == "failed"
        [span] = [s for s in exporter.get_finished_spans() if s.name == "reload.warming_up"]
        attributes = dict(span.attributes or {})
        assert attributes["ensemble_ops.quality.verdict"] == "fail"
        assert attributes["ensemble_ops.quality.pass_rate"] == 0.5
        [failed] = [e for e in span.events if e.name == "quality.case_failed"]
        event = dict(failed.attributes or {})
        assert (event["case"], event["input"], event["expected"]) == (
            "line 2",
            "Once upon a time",
            'exact "zzz-never"',
        )
        assert event["got"]


class TestBadGoldenSets:
    def test_a_malformed_set_stops_start_up_naming_the_line(
        self, make_settings: SettingsFactory, tmp_path: Path
    ) -> None:
        path = tmp_path / "golden.jsonl"
        path.write_text(json.dumps(ANSWERS) + "\n" + json.dumps({**NEVER, "exact": 3}) + "\n")
        with pytest.raises(ConfigError) as raised:
            _with_golden(make_settings, path)
        assert str(raised.value).startswith(
            f"quality.golden_set: {path}:2: exact: Input should be a valid string"
        )

    async def test_a_set_edited_into_a_bad_one_refuses_the_reload_before_loading(
        self, make_settings: SettingsFactory, half: Path
    ) -> None:
        app = create_app(_with_golden(make_settings, half))
        async with serving(app) as client:
            await anyio.Path(half).write_text(json.dumps(ANSWERS) + "\n{broken\n")
            answer = await client.admin.post(f"/admin/models/{MEMBER}/reload", json={})
            status = app.state.reload.get_reload_status(MEMBER)
        assert answer.status_code == 400
        error = answer.json()["error"]
        assert (
            error["message"]
            == f"{half}:2: not JSON: Expecting property name enclosed in double quotes"
        )
        assert error["param"] == "quality"
        assert status.state == "idle"

    @pytest.mark.parametrize(
        ("quality", "message"),
        [
            (True, "quality: false (skip the gate) or an object with min_pass_rate, max_drop"),
            ({"min_pass": 1}, "quality.min_pass: unknown quality threshold"),
            ({"max_drop": 2}, "quality.max_drop: Input should be less than or equal to 1"),
        ],
    )
    async def test_bad_thresholds_in_a_request_are_named(
        self, make_settings: SettingsFactory, half: Path, quality: object, message: str
    ) -> None:
        app = create_app(_with_golden(make_settings, half))
        async with serving(app) as client:
            answer = await client.admin.post(
                f"/admin/models/{MEMBER}/reload", json={"quality": quality}
            )
        assert answer.status_code == 400
        assert answer.json()["error"]["message"].startswith(message)
