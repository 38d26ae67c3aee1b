"""The log view: rollout events become one structured line each, at the level they deserve."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator, MutableMapping
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from ensemble_ops.events import (
    EventBus,
    GateJudged,
    InferenceFailed,
    InferenceFinished,
    QualityJudged,
    QualitySkipped,
    RolloutFinished,
    RolloutStepped,
    ShadowFinished,
)
from ensemble_ops.observability.log_view import subscribe_log
from ensemble_ops.observability.logs import configure_logging


@pytest.fixture(name="bus")
def _bus() -> EventBus:
    bus = EventBus()
    subscribe_log(bus)
    return bus


def _publish(bus: EventBus, *events: object) -> list[MutableMapping[str, Any]]:
    with capture_logs() as logs:
        for event in events:
            bus.publish(event)
    return logs


class TestRolloutLines:
    def test_a_step_is_an_info_line_with_its_weight(self, bus: EventBus) -> None:
        """rollout.stepped carries the member, the rollout, the new weight and the message."""
        (line,) = _publish(bus, RolloutStepped("a", "canary", 25.0, "25% to the new copy"))
        assert line == {
            "event": "rollout.stepped",
            "log_level": "info",
            "model": "a",
            "rollout": "canary",
            "weight_percent": 25.0,
            "message": "25% to the new copy",
        }

    def test_a_failed_gate_is_info_and_the_others_debug(self, bus: EventBus) -> None:
        """rollout.gate: a failure is news (info); pass and hold are each window's routine."""
        lines = _publish(
            bus,
            GateJudged("a", "p95_latency", "fail", 2.4, 0.7, 1.5, "3.4x the stable copy"),
            GateJudged("a", "error_rate", "pass", 0.0, 0.01, 0.02, "within 0.02"),
            GateJudged("a", "ttft", "hold", None, 0.1, 1.5, "2 of 20 requests"),
        )
        assert [(line["gate"], line["log_level"]) for line in lines] == [
            ("p95_latency", "info"),
            ("error_rate", "debug"),
            ("ttft", "debug"),
        ]
        assert lines[0] == {
            "event": "rollout.gate",
            "log_level": "info",
            "model": "a",
            "gate": "p95_latency",
            "verdict": "fail",
            "candidate": 2.4,
            "stable": 0.7,
            "limit": 1.5,
            "reason": "3.4x the stable copy",
        }
        assert lines[2]["candidate"] is None

    @pytest.mark.parametrize(
        ("outcome", "level"),
        [("promoted", "info"), ("rolled_back", "warning"), ("failed", "warning")],
    )
    def test_the_end_is_a_warning_unless_promoted(
        self, bus: EventBus, outcome: Any, level: str
    ) -> None:
        """rollout.finished: promoted is info; rolled back or failed is a warning."""
        (line,) = _publish(bus, RolloutFinished("a", "canary", outcome, "gate ttft failed"))
        assert line == {
            "event": "rollout.finished",
            "log_level": level,
            "model": "a",
            "rollout": "canary",
            "outcome": outcome,
            "reason": "gate ttft failed",
        }

    def test_shadow_requests_are_not_logged(self, bus: EventBus) -> None:
        """A mirrored request's answer is discarded: no line (only the gates read it)."""
        assert _publish(bus, ShadowFinished("a", 0.2, 0.05, 8, empty=False)) == []

    def test_inference_lines_name_the_copy(self, bus: EventBus) -> None:
        """inference.finished and inference.failed say which copy answered."""
        finished = InferenceFinished("a", "fast", 0.2, 3, 8, cached=False, stream=False)
        failed = InferenceFailed("a", "fast", "engine_error", "boom", 0.1, copy="candidate")
        lines = _publish(bus, finished, failed)
        assert [(line["event"], line["copy"]) for line in lines] == [
            ("inference.finished", "stable"),
            ("inference.failed", "candidate"),
        ]


class TestAtInfoLevel:
    @pytest.fixture(name="stream")
    def _stream(self) -> Iterator[io.StringIO]:
        stream = io.StringIO()
        configure_logging("json", "info", stream=stream)
        yield stream
        logging.getLogger().handlers.clear()
        structlog.reset_defaults()

    def test_only_the_failed_gate_reaches_the_log(self, bus: EventBus, stream: io.StringIO) -> None:
        """At the default level each window's pass and hold verdicts write nothing."""
        bus.publish(GateJudged("a", "ttft", "pass", 0.1, 0.1, 1.5, "ok"))
        bus.publish(GateJudged("a", "ttft", "hold", None, None, 1.5, "too few"))
        bus.publish(GateJudged("a", "ttft", "fail", 0.9, 0.1, 1.5, "9x"))
        lines = [json.loads(line) for line in stream.getvalue().splitlines()]
        assert [(line["event"], line["verdict"], line["level"]) for line in lines] == [
            ("rollout.gate", "fail", "info")
        ]


class TestQualityLines:
    def test_a_failed_gate_logs_each_failed_case_as_a_warning(self, bus: EventBus) -> None:
        failure = ("capital", "user: What is the capital of France?", 'contains ["Paris"]', "Lyon")
        lines = _publish(
            bus,
            QualityJudged("a", "candidate", "chat.jsonl", 20, 3, 4.2, (failure,)),
            QualityJudged("a", "stable", "chat.jsonl", 20, 16, 4.0),
            QualitySkipped("b", "chat.jsonl"),
        )
        assert lines == [
            {
                "event": "quality.judged",
                "log_level": "warning",
                "model": "a",
                "copy": "candidate",
                "golden_set": "chat.jsonl",
                "passed": 3,
                "cases": 20,
                "pass_ratio": 0.15,
                "seconds": 4.2,
                "failures": [
                    {
                        "case": "capital",
                        "input": "user: What is the capital of France?",
                        "expected": 'contains ["Paris"]',
                        "got": "Lyon",
                    }
                ],
            },
            {
                "event": "quality.judged",
                "log_level": "info",
                "model": "a",
                "copy": "stable",
                "golden_set": "chat.jsonl",
                "passed": 16,
                "cases": 20,
                "pass_ratio": 0.8,
                "seconds": 4.0,
                "failures": [],
            },
            {
                "event": "quality.skipped",
                "log_level": "warning",
                "model": "b",
                "golden_set": "chat.jsonl",
            },
        ]
