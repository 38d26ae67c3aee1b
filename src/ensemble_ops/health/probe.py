"""Inference probes that cannot hurt the service.

A probe is one one-token completion on a member. It never waits behind user traffic (a busy
member is reported as busy, with its latest real latency), it has its own timeout, callers
that arrive while one runs share it, and its result is cached for ``probe_cache_ttl_s`` per
loaded copy, so a storm of ``run_inference=true`` costs at most one inference per member per
TTL.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import anyio

from ensemble_ops.config import HealthSettings
from ensemble_ops.errors import ModelUnavailableError, OverloadedError
from ensemble_ops.events import EventBus, ProbeFinished
from ensemble_ops.health.status import ProbeResult
from ensemble_ops.serving.engine import PROBE_TARGET_S, Engine, GenerationParams, complete
from ensemble_ops.serving.slot import Lease, ModelSlot
from ensemble_ops.tasks import TaskRunner

__all__ = ["Prober"]


@dataclass(frozen=True)
class _Outcome:
    """A finished probe, kept for the cache: which copy it ran on and when it ended."""

    result: ProbeResult
    generation: int
    at: float  # monotonic


class Prober:
    """Runs and caches inference probes of members."""

    def __init__(
        self,
        bus: EventBus,
        settings: HealthSettings,
        runner: TaskRunner,
        last_latency_s: Callable[[str], float | None],
    ) -> None:
        """``last_latency_s`` gives a member's latest real inference time (shown for a busy
        member instead of queueing a probe behind its requests)."""
        self._bus = bus
        self._settings = settings
        self._runner = runner
        self._last_latency_s = last_latency_s
        self._outcomes: dict[str, _Outcome] = {}
        self._running: dict[str, anyio.Event] = {}

    async def probe(self, slot: ModelSlot) -> ProbeResult:
        """Probe ``slot`` now, or answer from the cache, a running probe, or as busy."""
        name, settings = slot.name, self._settings
        loaded = slot.active
        if loaded is None:
            reason = slot.unavailable_reason()
            return ProbeResult("not_loaded", None, cached=False, error=reason)
        now = time.monotonic()
        cached = self._outcomes.get(name)
        if (
            cached is not None
            and cached.generation == loaded.generation
            and now - cached.at < settings.probe_cache_ttl_s
        ):
            return ProbeResult(
                cached.result.outcome, cached.result.latency_ms, True, cached.result.error
            )
        running = self._running.get(name)
        if running is None:
            # The member is taken now, in this step of the event loop: a request arriving
            # after this point waits behind the probe, never the other way round.
            try:
                lease = slot.acquire()
            except (ModelUnavailableError, OverloadedError) as err:
                return ProbeResult("not_loaded", None, cached=False, error=str(err))
            token = self._claim_idle(lease)
            if token is None:
                lease.release()
                last = self._last_latency_s(name)
                return ProbeResult(
                    "busy",
                    round(last * 1000, 3) if last is not None else None,
                    cached=False,
                    error="model busy with requests: showing the latest real inference",
                )
            running = self._running[name] = anyio.Event()
            # In the runner, not this request: a probe that outlives the caller's timeout
            # still finishes and releases the member.
            self._runner.spawn(self._run, name, lease, token, running)
        with anyio.move_on_after(settings.probe_timeout_s):
            await running.wait()
        outcome = self._outcomes.get(name)
        if outcome is None or outcome.at < now:
            return ProbeResult(
                "timeout",
                None,
                cached=False,
                error=f"no answer within {settings.probe_timeout_s:g} s",
            )
        return outcome.result

    @staticmethod
    def _claim_idle(lease: Lease) -> object | None:
        """A worker thread for the probe if the member has a free sequence slot: the probe
        then joins the batch at once as a one-token sequence (first in the admission order),
        and never waits behind queued requests."""
        loaded = lease.loaded
        if loaded.engine.free_slots < 1:
            return None
        try:
            return loaded.claim()
        except anyio.WouldBlock:
            return None

    async def _run(self, name: str, lease: Lease, token: object, done: anyio.Event) -> None:
        started = time.monotonic()
        params = GenerationParams(max_tokens=1, temperature=0.0, top_p=1.0)
        prompt = self._settings.probe_prompt

        def one_token(engine: Engine) -> None:
            complete(engine, engine.tokenize(prompt), params, target_s=PROBE_TARGET_S)

        loaded = lease.loaded
        error: str | None = None
        try:
            try:
                await loaded.run_claimed(token, one_token, loaded.engine)
            except Exception as err:
                error = str(err)
            elapsed = time.monotonic() - started
            result = ProbeResult(
                "ok" if error is None else "failed", round(elapsed * 1000, 3), False, error
            )
            self._outcomes[name] = _Outcome(result, loaded.generation, time.monotonic())
        finally:  # cancelled too: waiters then see no new outcome and report a timeout
            lease.release()
            del self._running[name]
            done.set()
        self._bus.publish(ProbeFinished(name, error is None, elapsed, error))
