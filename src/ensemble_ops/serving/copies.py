"""The rollout's copy: which of a member's copies answers a request, and the shadow mirror.

While a rollout runs, a member serves two copies: the stable one and the new candidate. A
request goes to the one it asks for (``X-Ensemble-Copy``), else to the candidate for the
canary's share of session keys (sticky). A candidate that is full, or that cannot do what
the request needs, leaves the request to the stable copy; one that fails a request before
its first piece has it answered by the stable copy too, and the gates count the failure. A
shadow rollout mirrors a share of the answered requests to the candidate in the background
and discards its answers.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

from ensemble_ops.config import ModeName
from ensemble_ops.errors import (
    EngineError,
    ModelUnavailableError,
    OverloadedError,
    error_code,
)
from ensemble_ops.events import Copy, EventBus, ShadowFinished
from ensemble_ops.serving.inference import InferenceRequest, TextStream
from ensemble_ops.serving.member import run_on
from ensemble_ops.serving.slot import Lease, ModelSlot
from ensemble_ops.tasks import TaskRunner

__all__ = ["RETRYABLE", "Copies"]

RETRYABLE = (ModelUnavailableError, OverloadedError, EngineError)
"""Failures another copy or member may answer instead (the request itself was fine)."""


class Copies:
    """Chooses and leases a member's copy for each request, and mirrors shadow traffic."""

    def __init__(
        self, bus: EventBus, runner: TaskRunner, target_s: Callable[[ModeName], float]
    ) -> None:
        """``target_s`` gives a mode's priority in the engines' admission order."""
        self._bus = bus
        self._runner = runner
        self._target_s = target_s

    @staticmethod
    def choose(slot: ModelSlot, request: InferenceRequest) -> Copy:
        """The copy ``request`` goes to on ``slot`` (sticky per session key)."""
        copy = slot.choose(request.session, request.copy)
        candidate = slot.candidate
        # A rollout that was allowed to change what the member can do: the candidate
        # answers only what it can.
        if (
            copy == "candidate"
            and request.copy is None
            and candidate is not None
            and request.needs not in candidate.engine.info.capabilities
        ):
            return "stable"
        return copy

    @staticmethod
    def lease(slot: ModelSlot, request: InferenceRequest, copy: Copy) -> Lease:
        """Lease ``copy``; a candidate that is full or gone leaves the request to the stable
        copy, unless the request asked for the candidate."""
        try:
            return slot.acquire(copy)
        except (ModelUnavailableError, OverloadedError):
            if copy != "candidate" or request.copy is not None:
                raise
            return slot.acquire("stable")

    @staticmethod
    def retries_on_stable(lease: Lease, stream: TextStream, err: Exception) -> bool:
        """Whether a request the candidate failed is answered by the stable copy instead:
        only before its first piece, and not when it asked for the candidate."""
        return (
            lease.copy == "candidate"
            and stream.request.copy is None
            and stream.produced == 0
            and isinstance(err, RETRYABLE)
        )

    def mirror(self, slot: ModelSlot, request: InferenceRequest) -> None:
        """Mirror an answered request to a shadow rollout's candidate, in the background: the
        user's answer never waits for it, and a busy candidate just misses the mirror."""
        if slot.shadow_percent <= 0 or random.random() * 100 >= slot.shadow_percent:
            return
        try:
            lease = slot.acquire("candidate")
        except (ModelUnavailableError, OverloadedError):
            return
        self._runner.spawn(self._run_mirror, slot, request, lease)

    async def _run_mirror(self, slot: ModelSlot, request: InferenceRequest, lease: Lease) -> None:
        """The mirrored generation: not cached, not traced, counted only by the rollout."""
        started = time.perf_counter()
        stream = TextStream(request, incremental=False)
        try:
            completion = await run_on(
                lease, stream, _Silent(), target_s=self._target_s(request.mode)
            )
        except Exception as err:
            finished = ShadowFinished(
                slot.name, time.perf_counter() - started, None, 0, True, error_code(err)
            )
        else:  # on the copy's own time, as the gates judge the answered requests
            ttft = completion.time_to_first_token_s
            finished = ShadowFinished(
                slot.name,
                time.perf_counter() - started - completion.compute_wait_s,
                None if ttft is None else ttft - completion.first_token_compute_wait_s,
                completion.completion_tokens,
                completion.completion_tokens == 0,
            )
        finally:
            lease.release()
        self._bus.publish(finished)


class _Silent:
    """A mirror's progress: nobody follows it."""

    def running(self) -> None:
        pass

    def first_piece(self) -> None:
        pass
