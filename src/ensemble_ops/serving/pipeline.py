"""The request path: one walk per request, each stage visited once, in order.

    routing -> the rollout's copy -> answers already known -> running on the member

Every answer is a stream (a non-streamed answer is the stream collected), so cache hits,
single flight, retries on the stable copy and fallback to the next member behave the same
whether the client streams or not. The walk moves to the next candidate member when one is
busy, loading or fails before the answer's first piece was sent, and when the prompt does
not fit a member's context; past the first piece a failure ends the stream with an error.
The ``Attempt`` of each try reports it (events and span) in one place.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from opentelemetry.trace import Tracer

from ensemble_ops.config import ModeName
from ensemble_ops.errors import (
    ContextLengthExceededError,
    EnsembleOpsError,
    ModelUnavailableError,
    NoMemberAvailableError,
    OverloadedError,
)
from ensemble_ops.events import EventBus
from ensemble_ops.serving.accounting import Attempt, report_unanswered
from ensemble_ops.serving.answers import KnownAnswers
from ensemble_ops.serving.copies import RETRYABLE, Copies
from ensemble_ops.serving.engine import Completion
from ensemble_ops.serving.inference import ClientGoneError, InferenceRequest, TextStream
from ensemble_ops.serving.member import run_on
from ensemble_ops.serving.routing import Router
from ensemble_ops.serving.slot import Loaded, ModelSlot
from ensemble_ops.tasks import TaskRunner

__all__ = ["Pipeline"]


class Pipeline:
    """Walks each request through the stages; ``start`` returns its answer's stream."""

    def __init__(
        self,
        *,
        router: Router,
        copies: Copies,
        known: KnownAnswers,
        bus: EventBus,
        runner: TaskRunner,
        tracer: Tracer,
        target_s: Callable[[ModeName], float],
        capture_content: bool,
    ) -> None:
        self._router = router
        self._copies = copies
        self._known = known
        self._bus = bus
        self._runner = runner
        self._tracer = tracer
        self._target_s = target_s
        self._capture = capture_content

    def start(self, request: InferenceRequest, *, incremental: bool) -> TextStream:
        """Start answering ``request`` in a task of its own; pieces flow as they come when
        ``incremental``."""
        stream = TextStream(request, incremental=incremental)
        self._runner.spawn(self._answer, stream)
        return stream

    async def _answer(self, stream: TextStream) -> None:
        """The walk, guarded: however it stops (a stage's own bug, or a shutdown cancelling
        it), the stream ends, so no client waits for an answer that will never come."""
        try:
            await self._walk(stream)
        except Exception as err:
            if not stream.ended:
                stream.end(None, err)  # a 500 for the client; the task runner logs it
            raise
        finally:
            if not stream.ended:  # cancelled: the server is stopping
                stream.end(None, ModelUnavailableError(stream.request.model, "shutting down"))

    async def _walk(self, stream: TextStream) -> None:
        request = stream.request
        started = time.perf_counter()
        try:
            candidates = self._router.route(request)
        except EnsembleOpsError as err:  # an unknown model: nothing was tried
            stream.end(None, err)
            return
        several = len(candidates) > 1
        reasons: dict[str, str] = {}
        too_long: ContextLengthExceededError | None = None
        for slot in candidates:
            attempt = Attempt.open(
                self._bus,
                self._tracer,
                request,
                slot.name,
                stream=stream.incremental,
                capture_content=self._capture,
            )
            with attempt.current():
                try:
                    await self._on_member(slot, stream, attempt)
                    return
                except ClientGoneError:
                    attempt.cancelled(stream.produced)
                    stream.end(None)
                    return
                except ContextLengthExceededError as err:
                    if not several:
                        attempt.failed(err, final=True)
                        stream.end(None, err)
                        return
                    # Not the member's failure, nor the request's while another has room.
                    attempt.skipped("the prompt does not fit its context")
                    reasons[slot.name] = "the prompt does not fit its context"
                    too_long = _larger(too_long, err)
                except RETRYABLE as err:
                    if not several or stream.produced:
                        attempt.failed(err, final=True)
                        stream.end(None, err)
                        return
                    attempt.failed(err, final=False)  # the next member answers
                    reasons[slot.name] = _short(err)
                except Exception as err:  # the request's own mistake: no member does better
                    attempt.failed(err, final=True)
                    stream.end(None, err)
                    return
        # Every candidate was tried: when none had room, the client must shorten the prompt.
        unanswered: Exception = (
            too_long
            if too_long is not None and _all_too_long(reasons)
            else NoMemberAvailableError(reasons)
        )
        report_unanswered(self._bus, request, unanswered, started)
        stream.end(None, unanswered)

    async def _on_member(self, slot: ModelSlot, stream: TextStream, attempt: Attempt) -> None:
        """The stages on one member: the copy, what is known under its key, the engine."""
        request = stream.request
        copy = self._copies.choose(slot, request)
        attempt.copy = copy
        key = self._known.key(slot.serving(copy), request)
        async with self._known.lookup(key) as known:
            if key is not None:
                attempt.looked_up(known.how)
            if known.answer is not None:
                stream.answering(slot.name, cached=True)
                if stream.incremental and known.answer.text:
                    stream.deliver(known.answer.text)
                attempt.finished(known.answer, cached=True)
                stream.end(known.answer)
                return
            completion, answered_by = await self._generate(slot, stream, attempt)
            known.keep(completion, self._known.key(answered_by, request))
            attempt.finished(completion, cached=False)
            stream.end(completion)
        self._copies.mirror(slot, request)

    async def _generate(
        self, slot: ModelSlot, stream: TextStream, attempt: Attempt
    ) -> tuple[Completion, Loaded]:
        """Run on the chosen copy; a candidate's failure before any text is retried on the
        stable copy (the gates count it)."""
        target_s = self._target_s(stream.request.mode)
        lease = self._copies.lease(slot, stream.request, attempt.copy)
        attempt.copy = lease.copy
        stream.answering(slot.name, cached=False)
        try:
            return await run_on(lease, stream, attempt, target_s=target_s), lease.loaded
        except RETRYABLE as err:
            if not self._copies.retries_on_stable(lease, stream, err):
                raise
            attempt.failed(err, final=False, retried=True)
        finally:
            lease.release()
        attempt.copy = "stable"
        stable = slot.acquire("stable")
        try:
            return await run_on(stable, stream, attempt, target_s=target_s), stable.loaded
        finally:
            stable.release()


def _larger(
    held: ContextLengthExceededError | None, new: ContextLengthExceededError
) -> ContextLengthExceededError:
    """The refusal of the member with the largest context: the one the client must fit."""
    if held is None or new.n_ctx > held.n_ctx:
        return new
    return held


def _all_too_long(reasons: dict[str, str]) -> bool:
    return all(reason == "the prompt does not fit its context" for reason in reasons.values())


def _short(err: Exception) -> str:
    if isinstance(err, ModelUnavailableError):
        return err.reason
    if isinstance(err, OverloadedError):
        return "overloaded"
    return str(err)
