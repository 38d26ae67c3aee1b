"""The span of one attempt on a member, with the OpenTelemetry GenAI conventions.

Followed version: semantic conventions 1.37.0 (``SEMCONV_VERSION``), GenAI spans, which are
still "development" there. One INTERNAL span per attempt, named
``{gen_ai.operation.name} {gen_ai.request.model}``; a fallback makes sibling attempts under
the request's span. Only the OpenTelemetry *API* is used here: without an SDK (tracing off)
every call is a no-op on a non-recording span.

Attributes beyond the conventions, for what they do not cover (yet): ``gen_ai.request.stream``
(asked of this project; not in 1.37), ``ensemble_ops.cache`` (``hit``, ``miss`` or
``coalesced`` for deterministic requests), ``ensemble_ops.mode``, ``ensemble_ops.skipped`` (why
routing passed a member over). Span events:
``ensemble_ops.started`` (the worker began: ``ensemble_ops.queue_wait_s``) and, for streams,
``ensemble_ops.first_token`` (``ensemble_ops.prefill_s``: prompt evaluation plus the first
token).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer

from ensemble_ops.errors import error_code

if TYPE_CHECKING:
    from ensemble_ops.serving.engine import Completion
    from ensemble_ops.serving.inference import InferenceRequest

__all__ = ["PROVIDER", "SEMCONV_VERSION", "AttemptSpan"]

SEMCONV_VERSION = "1.37.0"
PROVIDER = "llama.cpp"
_OPERATIONS = {"chat": "chat", "completion": "text_completion"}


class AttemptSpan:
    """One attempt of a request on one member; ``record_*`` and ``fail`` fill it in."""

    def __init__(self, span: Span, capture_content: bool, *, stream: bool = False) -> None:
        self.span = span
        self.stream = stream
        self._capture = capture_content
        self._started = time.perf_counter()
        self._running_at: float | None = None

    @classmethod
    def open(
        cls,
        tracer: Tracer,
        request: InferenceRequest,
        member: str,
        *,
        stream: bool,
        capture_content: bool = False,
    ) -> AttemptSpan:
        """Start the attempt's span as a child of the current one (the request's)."""
        operation = _OPERATIONS[request.kind]
        params = request.params
        attributes: dict[str, str | bool | int | float | Sequence[str]] = {
            "gen_ai.operation.name": operation,
            "gen_ai.provider.name": PROVIDER,
            "gen_ai.request.model": request.model,
            "gen_ai.response.model": member,
            "gen_ai.request.max_tokens": params.max_tokens,
            "gen_ai.request.temperature": params.temperature,
            "gen_ai.request.top_p": params.top_p,
            "gen_ai.request.stream": stream,
            "ensemble_ops.mode": request.mode,
        }
        if request.response_id:
            attributes["gen_ai.response.id"] = request.response_id
        if params.seed is not None:
            attributes["gen_ai.request.seed"] = params.seed
        if params.stop:
            attributes["gen_ai.request.stop_sequences"] = list(params.stop)
        if capture_content:
            attributes["gen_ai.input.messages"] = _input_messages(request)
        span = tracer.start_span(
            f"{operation} {request.model}", kind=SpanKind.INTERNAL, attributes=attributes
        )
        return cls(span, capture_content, stream=stream)

    @contextmanager
    def current(self) -> Iterator[AttemptSpan]:
        """Make the span current (log lines inside carry its ids) and end it afterwards."""
        with trace.use_span(
            self.span,
            end_on_exit=True,
            record_exception=False,  # fail() records it, with the error's own code
            set_status_on_exception=False,
        ):
            yield self

    def cache(self, how: str) -> None:
        """``hit``, ``miss``, or ``coalesced`` (answered by an identical request in flight)."""
        self.span.set_attribute("ensemble_ops.cache", how)

    def skipped(self, reason: str) -> None:
        """Routing passed the member over without running the request on it."""
        self.span.set_attribute("ensemble_ops.skipped", reason)

    def running(self) -> None:
        """The worker thread took the request: the queue wait ends here."""
        self._running_at = time.perf_counter()
        self.span.add_event(
            "ensemble_ops.started", {"ensemble_ops.queue_wait_s": self._running_at - self._started}
        )

    def first_token(self) -> None:
        start = self._running_at if self._running_at is not None else self._started
        self.span.add_event(
            "ensemble_ops.first_token", {"ensemble_ops.prefill_s": time.perf_counter() - start}
        )

    def done(self, completion: Completion) -> None:
        span = self.span
        span.set_attribute("gen_ai.usage.input_tokens", completion.prompt_tokens)
        span.set_attribute("gen_ai.usage.output_tokens", completion.completion_tokens)
        span.set_attribute("gen_ai.response.finish_reasons", [completion.finish_reason])
        if self._capture:
            message = {
                "role": "assistant",
                "parts": [{"type": "text", "content": completion.text}],
                "finish_reason": completion.finish_reason,
            }
            span.set_attribute("gen_ai.output.messages", json.dumps([message]))

    def fail(self, err: BaseException) -> None:
        self.span.set_attribute("error.type", error_code(err))
        self.span.record_exception(err)
        self.span.set_status(Status(StatusCode.ERROR, str(err)))


def _input_messages(request: InferenceRequest) -> str:
    """The prompt as the conventions' input messages, JSON (only with capture_content)."""
    if request.prompt is not None:
        turns = [("user", request.prompt)]
    else:
        turns = [(m.role, m.content) for m in request.messages]
    return json.dumps(
        [{"role": role, "parts": [{"type": "text", "content": text}]} for role, text in turns]
    )
