"""The one place that reports a request, field by field where the request path's own tests
leave a field at its default (a candidate copy, a named caller, a skipped member's span)."""

from __future__ import annotations

import time

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from ensemble_ops.errors import EngineError, NoMemberAvailableError
from ensemble_ops.events import EventBus, InferenceFailed, InferenceFinished
from ensemble_ops.serving.accounting import Attempt, report_unanswered
from ensemble_ops.serving.engine import Completion, GenerationParams
from ensemble_ops.serving.inference import InferenceRequest

from ..conftest import Recorded

ASKED = InferenceRequest(
    "ensemble", "balanced", GenerationParams(4, 0.0, 1.0), prompt="Hi", caller="ops"
)


def _attempt(bus: EventBus, provider: TracerProvider) -> Attempt:
    return Attempt.open(bus, provider.get_tracer("test"), ASKED, "a", stream=True)


def _only_span(exporter: InMemorySpanExporter) -> ReadableSpan:
    (span,) = exporter.get_finished_spans()
    return span


class TestAttempt:
    def test_a_cancelled_attempt_names_its_copy_and_caller(self, provider: TracerProvider) -> None:
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

    def test_a_failed_attempt_names_its_copy_caller_and_error(
        self, provider: TracerProvider, exporter: InMemorySpanExporter
    ) -> None:
        bus = EventBus()
        events = Recorded(bus, InferenceFailed)
        attempt = _attempt(bus, provider)
        attempt.copy = "candidate"
        err = EngineError("a", "llama_decode returned -3")
        with attempt.current():
            attempt.failed(err, final=False)
        (failed,) = events.of(InferenceFailed)
        assert (failed.model, failed.mode, failed.final) == ("a", "balanced", False)
        assert (failed.copy, failed.key) == ("candidate", "ops")
        assert (failed.error_type, failed.message) == ("engine_error", str(err))
        assert (_only_span(exporter).attributes or {})["error.type"] == "engine_error"

    def test_a_skipped_member_says_why_on_its_span(
        self, provider: TracerProvider, exporter: InMemorySpanExporter
    ) -> None:
        attempt = _attempt(EventBus(), provider)
        with attempt.current():
            attempt.skipped("the prompt does not fit its context")
        attributes = _only_span(exporter).attributes or {}
        assert attributes["ensemble_ops.skipped"] == "the prompt does not fit its context"


GENERATED = Completion(
    "Hello there",
    "stop",
    prompt_tokens=5,
    completion_tokens=3,
    engine_s=0.5,
    queue_wait_s=0.25,
    time_to_first_token_s=0.125,
    decode_s=0.2,
    cached_tokens=2,
    compute_wait_s=0.0625,
    first_token_compute_wait_s=0.03125,
)
"""A generated answer whose every figure differs from the others and from the defaults."""


class TestFinished:
    """Each figure of a finished attempt, from the engine's completion or, for an answer that
    did not run on the engine, the values that say so."""

    def test_a_generated_answer_reports_the_engines_figures(
        self, provider: TracerProvider, exporter: InMemorySpanExporter
    ) -> None:
        bus = EventBus()
        events = Recorded(bus, InferenceFinished)
        attempt = Attempt.open(bus, provider.get_tracer("test"), ASKED, "a", stream=False)
        attempt.copy = "candidate"
        started = time.perf_counter()
        with attempt.current():
            attempt.finished(GENERATED, cached=False)
        (finished,) = events.of(InferenceFinished)
        assert (finished.model, finished.mode, finished.key) == ("a", "balanced", "ops")
        assert (finished.copy, finished.stream, finished.cached) == ("candidate", False, False)
        assert finished.outcome == "success"
        assert (finished.prompt_tokens, finished.completion_tokens) == (5, 3)
        assert finished.time_to_first_token_s == 0.125  # no piece was streamed: the engine's
        assert (finished.engine_s, finished.queue_wait_s) == (0.5, 0.25)
        assert finished.time_per_output_token_s == pytest.approx(0.1)  # 0.2 s over 2 tokens
        assert finished.cached_tokens == 2
        assert (finished.compute_wait_s, finished.first_token_compute_wait_s) == (0.0625, 0.03125)
        assert 0 <= finished.latency_s <= time.perf_counter() - started + 1e-3
        attributes = _only_span(exporter).attributes or {}
        assert attributes["gen_ai.usage.input_tokens"] == 5
        assert attributes["gen_ai.usage.output_tokens"] == 3
        assert attributes["gen_ai.request.stream"] is False
        assert "gen_ai.input.messages" not in attributes  # content is captured only when asked

    def test_a_streamed_answer_reports_when_its_first_piece_reached_the_request(
        self, provider: TracerProvider
    ) -> None:
        bus = EventBus()
        events = Recorded(bus, InferenceFinished)
        attempt = _attempt(bus, provider)
        before = time.perf_counter()
        with attempt.current():
            attempt.first_piece()
            attempt.first_piece()  # only the first one counts
            attempt.finished(GENERATED, cached=False)
        (finished,) = events.of(InferenceFinished)
        assert finished.stream is True
        assert finished.time_to_first_token_s is not None
        assert finished.time_to_first_token_s != 0.125  # the request's own, not the engine's
        assert 0 <= finished.time_to_first_token_s <= time.perf_counter() - before + 1e-3
        assert finished.time_to_first_token_s <= finished.latency_s

    def test_a_cached_answer_reports_no_engine_figures(self, provider: TracerProvider) -> None:
        bus = EventBus()
        events = Recorded(bus, InferenceFinished)
        attempt = Attempt.open(bus, provider.get_tracer("test"), ASKED, "a", stream=False)
        with attempt.current():
            attempt.finished(GENERATED, cached=True)
        (finished,) = events.of(InferenceFinished)
        assert (finished.cached, finished.copy, finished.outcome) == (True, "stable", "success")
        assert (finished.prompt_tokens, finished.completion_tokens) == (5, 3)
        assert finished.time_to_first_token_s is None  # the stored figure is not this request's
        assert (finished.engine_s, finished.queue_wait_s) == (0.0, None)
        assert finished.time_per_output_token_s is None
        assert finished.cached_tokens == 0
        assert (finished.compute_wait_s, finished.first_token_compute_wait_s) == (0.0, 0.0)

    def test_content_is_captured_on_the_span_when_asked(
        self, provider: TracerProvider, exporter: InMemorySpanExporter
    ) -> None:
        tracer = provider.get_tracer("test")
        attempt = Attempt.open(EventBus(), tracer, ASKED, "a", stream=True, capture_content=True)
        with attempt.current():
            attempt.finished(GENERATED, cached=False)
        attributes = _only_span(exporter).attributes or {}
        assert "Hi" in str(attributes["gen_ai.input.messages"])
        assert "Hello there" in str(attributes["gen_ai.output.messages"])
        assert attributes["gen_ai.request.stream"] is True
        assert attributes["gen_ai.response.model"] == "a"


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
