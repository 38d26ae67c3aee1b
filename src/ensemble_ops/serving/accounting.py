"""The one place that reports a request: each attempt on a member publishes its events and
fills in its span, whatever path the answer took (the engine, the cache, an identical request
in flight, a retry on the stable copy, a fallback to the next member).

Each request ends in exactly one ``InferenceFinished`` or one final ``InferenceFailed``;
failures that another attempt recovers from are published with ``final=False``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

from opentelemetry.trace import Tracer

from ensemble_ops.errors import error_code
from ensemble_ops.events import CacheLookedUp, Copy, EventBus, InferenceFailed, InferenceFinished
from ensemble_ops.serving.engine import Completion
from ensemble_ops.serving.inference import ENSEMBLE, InferenceRequest
from ensemble_ops.serving.spans import AttemptSpan

__all__ = ["Attempt", "CacheHow", "report_unanswered"]

CacheHow = Literal["hit", "coalesced", "miss"]
"""How a deterministic request's lookup ended: cached, shared with one in flight, or not."""


class Attempt:
    """One attempt of a request on one member: its span and its events."""

    def __init__(self, bus: EventBus, span: AttemptSpan, request: InferenceRequest, member: str):
        self._bus = bus
        self._span = span
        self.request = request
        self.member = member
        self.copy: Copy = "stable"
        """The copy the attempt runs on (a retry moves it to the stable one)."""
        self.started = time.perf_counter()
        self._first_piece_s: float | None = None

    @classmethod
    def open(
        cls,
        bus: EventBus,
        tracer: Tracer,
        request: InferenceRequest,
        member: str,
        *,
        stream: bool,
        capture_content: bool = False,
    ) -> Attempt:
        span = AttemptSpan.open(
            tracer, request, member, stream=stream, capture_content=capture_content
        )
        return cls(bus, span, request, member)

    @contextmanager
    def current(self) -> Iterator[Attempt]:
        """The attempt's span is current inside (log lines carry its ids) and ends after."""
        with self._span.current():
            yield self

    # -- along the way -----------------------------------------------------------------------

    def looked_up(self, how: CacheHow) -> None:
        self._bus.publish(CacheLookedUp(self.member, how != "miss"))
        self._span.cache(how)

    def running(self) -> None:
        """The engine took the sequence."""
        self._span.running()

    def first_piece(self) -> None:
        """The first streamed piece reached the request (its time to first token)."""
        if self._first_piece_s is None:
            self._first_piece_s = time.perf_counter() - self.started
            self._span.first_token()

    def skipped(self, reason: str) -> None:
        """Routing moved on without trying the member (the prompt does not fit its context)."""
        self._span.skipped(reason)

    # -- the end -----------------------------------------------------------------------------

    def finished(self, completion: Completion, *, cached: bool) -> None:
        self._span.done(completion)
        ttft = self._first_piece_s
        if ttft is None and not cached:
            ttft = completion.time_to_first_token_s
        self._bus.publish(
            InferenceFinished(
                self.member,
                self.request.mode,
                time.perf_counter() - self.started,
                completion.prompt_tokens,
                completion.completion_tokens,
                cached=cached,
                stream=self._stream,
                time_to_first_token_s=ttft,
                engine_s=0.0 if cached else completion.engine_s,
                queue_wait_s=None if cached else completion.queue_wait_s,
                time_per_output_token_s=None if cached else completion.time_per_output_token_s,
                copy=self.copy,
                cached_tokens=0 if cached else completion.cached_tokens,
                compute_wait_s=0.0 if cached else completion.compute_wait_s,
                first_token_compute_wait_s=0.0 if cached else completion.first_token_compute_wait_s,
                key=self.request.caller,
            )
        )

    def failed(self, err: Exception, *, final: bool, retried: bool = False) -> None:
        """The attempt failed; ``final`` False when another attempt then serves the request.
        ``retried``: the stable copy answers within this attempt (its span goes on)."""
        if not retried:
            self._span.fail(err)
        self._bus.publish(
            InferenceFailed(
                self.member,
                self.request.mode,
                error_code(err),
                str(err),
                time.perf_counter() - self.started,
                final=final,
                copy=self.copy,
                key=self.request.caller,
            )
        )

    def cancelled(self, produced_tokens: int) -> None:
        """The client left before the end; the generation was stopped."""
        self._bus.publish(
            InferenceFinished(
                self.member,
                self.request.mode,
                time.perf_counter() - self.started,
                0,
                produced_tokens,
                cached=False,
                stream=self._stream,
                outcome="cancelled",
                copy=self.copy,
                key=self.request.caller,
            )
        )

    @property
    def _stream(self) -> bool:
        return self._span.stream


def report_unanswered(
    bus: EventBus, request: InferenceRequest, err: Exception, started: float
) -> None:
    """No member answered ``request`` (all busy, failing, or too small for its prompt)."""
    bus.publish(
        InferenceFailed(
            ENSEMBLE,
            request.mode,
            error_code(err),
            str(err),
            time.perf_counter() - started,
            final=True,
            key=request.caller,
        )
    )
