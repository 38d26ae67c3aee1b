"""The one place that reports a request, field by field where the request path's own tests
leave a field at its default (a candidate copy, a named caller, a skipped member's span)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from ensemble_ops.errors import NoMemberAvailableError
from ensemble_ops.events import EventBus, InferenceFailed, InferenceFinished
from ensemble_ops.serving.accounting import Attempt, report_unanswered
from ensemble_ops.serving.engine import GenerationParams
from ensemble_ops.serving.inference import InferenceRequest

from ..conftest import Recorded

ASKED = InferenceRequest(
    "ensemble", "balanced", GenerationParams(4, 0.0, 1.0), prompt="Hi", caller="ops"
)


@pytest.fixture(name="provider")
def _provider() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


def _attempt(bus: EventBus, provider: tuple[TracerProvider, InMemorySpanExporter]) -> Attempt:
    return Attempt.open(bus, provider[0].get_tracer("test"), ASKED, "a", stream=True)


def _only_span(provider: tuple[TracerProvider, InMemorySpanExporter]) -> ReadableSpan:
    (span,) = provider[1].get_finished_spans()
    return span


class TestAttempt:
    def test_a_cancelled_attempt_names_its_copy_and_caller(
        self, provider: tuple[TracerProvider, InMemorySpanExporter]
    ) -> None:
        bus = EventBus()
        events = Recorded(bus, InferenceFinished)
        attempt = _attempt(bus, provider)
        attempt.copy = "candidate"
        with attempt.current():
            attempt.cancelled(3)
        (finished,) = events.of(InferenceFinished)
        assert (finished.model, finished.mode, finished.outcome) == ("a", "balanced", "cancelled")
        assert (finished.copy, finished.key) == ("candidate", "ops")
        assert (finished.prompt_tokens, finished.completion_tokens) == (0, 3)
        assert (finished.stream, finished.cached) == (True, False)

    def test_a_skipped_member_says_why_on_its_span(
        self, provider: tuple[TracerProvider, InMemorySpanExporter]
    ) -> None:
        attempt = _attempt(EventBus(), provider)
        with attempt.current():
            attempt.skipped("the prompt does not fit its context")
        attributes = _only_span(provider).attributes or {}
        assert attributes["ensemble_ops.skipped"] == "the prompt does not fit its context"


class TestUnanswered:
    def test_the_final_failure_names_the_ensemble_the_error_and_the_caller(self) -> None:
        bus = EventBus()
        events = Recorded(bus, InferenceFailed)
        err = NoMemberAvailableError({"a": "overloaded", "b": "loading"})
        started = time.perf_counter()
        report_unanswered(bus, ASKED, err, started)
        (failed,) = events.of(InferenceFailed)
        assert (failed.model, failed.mode, failed.final, failed.key) == (
            "ensemble",
            "balanced",
            True,
            "ops",
        )
        assert failed.error_type == "no_member_available"
        assert failed.message == str(err)
        assert 0 <= failed.latency_s < time.perf_counter() - started + 1e-6
