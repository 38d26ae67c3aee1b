"""The reload state machine of one member, declared as data and driven by ``transitions``.

::

    idle | completed | failed | rolled_back --start--> warming_up --warmed--> ready
    ready --switch--> switching --complete--> completed          (rollout "switch")
    ready --shadow--> shadowing --switch | canary--> ...         (rollout "shadow")
    ready | shadowing --canary--> canary --switch--> switching   (rollout "canary")
    ready --await_promotion--> awaiting_promotion --switch-->    (rollout "blue_green")
    shadowing | canary | awaiting_promotion --roll_back--> rolled_back
    any running state --fail--> failed

The rollout states serve the new copy beside the old one from the same slot (a share of
requests, mirrored requests, or only those that ask for it) while the gates compare the two
(``reload/rollout.py``); a failed gate, an abort or the deadline rolls back: the new copy is
withdrawn, drained and closed, and the old one never stopped serving.

Each state's ``on_enter_`` callback does that state's work and fires the next trigger; with
``queued="model"`` the trigger waits until the callback returns, and the first ``start``
call drives the whole chain. A callback that raises goes to the machine's ``on_exception``,
which records the reason and fires ``fail``; ``on_enter_failed`` rolls back.

warming_up validates the file, checks memory for a second copy, loads it in a worker thread
(10%) and runs N warm-up inferences (30 -> 80%). switching swaps the slot's reference in one
assignment (90%): new requests go to the new copy from that moment, requests already running
finish on the old one, which is closed when its last lease ends (100%). Any failure before the
swap leaves the old copy serving, closes the new one and ends in failed.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import anyio
import anyio.to_thread
import structlog
from opentelemetry import trace
from opentelemetry.trace import Span, Status, StatusCode
from transitions.extensions.asyncio import AsyncEventData as EventData

from ensemble_ops.config import ModelSpec
from ensemble_ops.errors import InvalidModelFileError
from ensemble_ops.events import (
    ROLLING_STATES,
    InferenceFailed,
    InferenceFinished,
    ReloadProgressed,
    ReloadStateChanged,
    RolloutStepped,
    ShadowFinished,
)
from ensemble_ops.quality.gate import QualityPlan, QualityStatus, record_quality
from ensemble_ops.reload.plan import Host, LoaderFunc, Plan, ReloadFailedError, keeps_capabilities
from ensemble_ops.reload.rollout import LiveRollout, failed_gates, hold_until_judged
from ensemble_ops.reload.states import STATES, TRANSITIONS, mermaid_diagram, new_machine
from ensemble_ops.reload.status import RUNNING, ReloadStatus, iso_time
from ensemble_ops.reload.warmup import WarmupFailedError, warm_up
from ensemble_ops.serving.gguf_check import inspect_gguf
from ensemble_ops.serving.slot import Loaded, ModelSlot, loaded_event

__all__ = [
    "STATES",
    "TRANSITIONS",
    "LoaderFunc",
    "Plan",
    "ReloadJob",
    "mermaid_diagram",
    "new_machine",
]

_log = structlog.get_logger("ensemble_ops.reload")


class ReloadJob:
    """One member's reload: the model object of the state machine."""

    state: str  # set by the machine
    if TYPE_CHECKING:  # triggers the machine adds (declared, not defined: it would skip them)
        start: Callable[[], Awaitable[bool]]
        warmed: Callable[[], Awaitable[bool]]
        switch: Callable[[], Awaitable[bool]]
        shadow: Callable[[], Awaitable[bool]]
        canary: Callable[[], Awaitable[bool]]
        await_promotion: Callable[[], Awaitable[bool]]
        roll_back: Callable[[], Awaitable[bool]]
        complete: Callable[[], Awaitable[bool]]
        fail: Callable[[], Awaitable[bool]]

    def __init__(self, host: Host, slot: ModelSlot) -> None:
        self._host = host
        self.slot = slot
        self.progress = 0.0
        self.message = "No reload has run yet."
        self.started_at: float | None = None
        self.completed_at: float | None = None
        self.error: str | None = None
        self.pending = False
        """Set at once by ``begin``, before the driving task runs: one reload at a time."""
        self._plan: Plan | None = None
        self._new: Loaded | None = None
        self._replaced: ModelSpec | None = None  # set when reload_strategy=replace unloaded it
        self._last_state = "idle"
        self._started_mono = 0.0
        self._load_s = 0.0
        self._done: anyio.Event | None = None
        self._state_span: Span | None = None
        self.live: LiveRollout | None = None
        """The running rollout (shadow, canary, blue-green), else None."""
        self._rolled_back: str | None = None  # why, once a rollout decided to roll back
        self.quality: QualityStatus | None = None
        """The quality gate's verdict on the current (or last) reload's new copy."""
        host.bus.subscribe(InferenceFinished, self._observe)
        host.bus.subscribe(InferenceFailed, self._observe)
        host.bus.subscribe(ShadowFinished, self._observe)

    def _observe(self, event: InferenceFinished | InferenceFailed | ShadowFinished) -> None:
        """The member's answers, for a running rollout's window."""
        live = self.live
        if live is None or self.state not in ROLLING_STATES:  # ended: its figures stay as they were
            return
        if isinstance(event, InferenceFinished):
            live.on_finished(event)
        elif isinstance(event, InferenceFailed):
            live.on_failed(event)
        else:
            live.on_shadow(event)

    @property
    def name(self) -> str:
        return self.slot.name

    @property
    def rollout_kind(self) -> str:
        """The current (or last) reload's rollout: switch, canary, shadow or blue_green."""
        return self._plan.rollout.kind if self._plan is not None else "switch"

    def status(self) -> ReloadStatus:
        state = "warming_up" if self.pending and self.state not in RUNNING else self.state
        return ReloadStatus(
            self.name,
            state,
            round(self.progress, 1),
            self.message,
            iso_time(self.started_at),
            iso_time(self.completed_at),
            self.error,
            self.live.status() if self.live is not None else None,
            self.quality,
        )

    def begin(self, plan: Plan) -> None:
        """Accept ``plan`` as the next reload (the caller checked ``pending`` first)."""
        self._plan = plan
        self._done = anyio.Event()
        self.pending = True
        self.started_at, self.completed_at, self.error = time.time(), None, None
        self.progress, self.message = 0.0, "Reload queued"
        self._started_mono = time.monotonic()
        self.live, self._rolled_back, self.quality = None, None, None

    def finish(self) -> None:
        self.pending = False
        if self._done is not None:
            self._done.set()

    async def wait(self) -> None:
        """Until the reload that ``begin`` accepted has ended."""
        if self._done is not None:
            await self._done.wait()

    def _progress(self, percent: float, message: str) -> None:
        self.progress, self.message = percent, message
        self._host.bus.publish(ReloadProgressed(self.name, self.state, percent, message))

    def _entered(self, percent: float, message: str) -> None:
        self.progress, self.message = percent, message
        previous, self._last_state = self._last_state, self.state
        # One span per state, a child of the reload's span (current while the chain runs).
        if self._state_span is not None:
            self._state_span.end()
            self._state_span = None
        if self.state in RUNNING:
            self._state_span = self._host.tracer.start_span(
                f"reload.{self.state}", attributes={"ensemble_ops.model": self.name}
            )
        elapsed = time.monotonic() - self._started_mono
        self._host.bus.publish(
            ReloadStateChanged(self.name, previous, self.state, percent, message, elapsed)
        )

    def _current(self) -> Plan:
        if self._plan is None:
            raise RuntimeError("a reload started without a plan")
        return self._plan

    # -- the states' work ----------------------------------------------------------------------

    async def on_enter_warming_up(self, event: EventData) -> None:
        plan, host = self._current(), self._host
        self._entered(0.0, f"Checking {plan.spec.path.name}")
        try:
            await anyio.to_thread.run_sync(inspect_gguf, plan.spec.path)
        except InvalidModelFileError as err:
            raise ReloadFailedError(err.reason) from err
        await self._make_room(plan.spec)
        self._progress(5.0, f"Loading {plan.spec.path.name}")
        started = time.perf_counter()
        try:
            identity = await anyio.to_thread.run_sync(plan.identify)
            engine = await anyio.to_thread.run_sync(plan.loader, limiter=host.load_limiter)
        except Exception as err:
            raise ReloadFailedError(f"load failed: {err}") from err
        self._new = Loaded(self.name, engine, queue_size=plan.spec.queue_size, identity=identity)
        self._load_s = time.perf_counter() - started
        keeps_capabilities(self.name, self.slot.active, engine, plan.allow_capability_change)
        self._progress(10.0, "Loaded; warming up")
        end = 80.0 if plan.quality is None else 60.0  # the quality gate takes 60 -> 80%
        try:
            await warm_up(
                self._new,
                plan.warmup,
                plan.iterations,
                host.settings.warmup_timeout_s,
                host.runner,
                lambda done, message: self._progress(30.0 + (end - 30.0) * done, message),
            )
        except WarmupFailedError as err:
            raise ReloadFailedError(str(err)) from err
        if plan.quality is not None:
            await self._judge_quality(self._new, plan.quality)
        self._progress(80.0, f"Warm-up passed ({plan.iterations} iterations)")
        await self.warmed()

    async def _judge_quality(self, new: Loaded, plan: QualityPlan) -> None:
        """The golden set on the new copy (and the serving one), before it takes traffic."""
        self.quality = status = await self._host.quality_gate.judge(
            new,
            self.slot.active,
            plan,
            lambda done, message: self._progress(60.0 + 20.0 * done, message),
        )
        if self._state_span is not None:
            record_quality(self._state_span, status)
        if not status.passed:
            raise ReloadFailedError(f"quality gate failed: {status.reason}")

    async def _make_room(self, spec: ModelSpec) -> None:
        """Fail fast without memory for a second copy, or unload first (replace)."""
        host = self._host
        active = self.slot.active
        if active is None:
            return  # nothing loaded: the new copy is the only one
        need = int(
            (spec.path.stat().st_size + active.engine.info.context_bytes)
            * host.settings.memory_headroom
        )
        free, kind = host.available_memory(spec)
        if free >= need:
            return
        shortage = (
            f"not enough {kind} for a second copy: need {need / 2**20:.0f} MiB, "
            f"{free / 2**20:.0f} MiB free"
        )
        if spec.reload_strategy != "replace":
            raise ReloadFailedError(
                shortage + ' (reload_strategy = "replace" would unload the old copy first)'
            )
        self._progress(2.0, f"{shortage}: unloading the old copy first (replace)")
        self._replaced = self.slot.spec
        old = self.slot.unload("reloading")
        if old is not None:
            await host.retire(old, wait=True)

    async def on_enter_ready(self, event: EventData) -> None:
        kind = self._current().rollout.kind
        self._entered(80.0, f"Warm-up passed; rollout {kind}")
        if kind == "switch":
            await self.switch()
            return
        self.live = LiveRollout(self.name, self._current().rollout)
        if kind == "shadow":
            await self.shadow()
        elif kind == "canary":
            await self.canary()
        else:
            await self.await_promotion()

    def _live(self) -> tuple[LiveRollout, Loaded]:
        if self.live is None or self._new is None:
            raise RuntimeError("a rollout state without a rollout")
        return self.live, self._new

    def _offer(self, weight_percent: float, shadow: float, message: str) -> None:
        """Serve the new copy at ``weight_percent`` (and ``shadow`` mirrored), over a new
        window; the status, the metrics and the log say so."""
        live, new = self._live()
        live.weight_percent, live.shadow_percent = weight_percent, shadow
        live.open_window()
        self.slot.offer(new, weight_percent=weight_percent, shadow=shadow)
        self._progress(80.0 + weight_percent / 10, message)
        self._host.bus.publish(RolloutStepped(self.name, live.spec.kind, weight_percent, message))

    async def on_enter_shadowing(self, event: EventData) -> None:
        live, _ = self._live()
        pct = live.spec.shadow_percent
        self._entered(80.0, f"Shadowing: {pct:g}% of requests mirrored to the new copy")
        self._offer(0.0, pct, f"Mirroring {pct:g}% of requests to the new copy")
        outcome = await hold_until_judged(live, self._host.bus.publish)
        if outcome == "pass" and live.spec.after_shadow == "canary":
            await self.canary()
        elif outcome in ("pass", "promote"):
            await self.switch()
        else:
            await self._roll_back(outcome)

    async def on_enter_canary(self, event: EventData) -> None:
        live, _ = self._live()
        steps = live.spec.steps
        self._entered(80.0, f"Canary: {len(steps)} step(s) to 100%")
        for i, weight in enumerate(steps, 1):
            live.step = f"{i}/{len(steps)}"
            self._offer(weight, 0.0, f"Canary step {i}/{len(steps)}: {weight:g}% of requests")
            outcome = await hold_until_judged(live, self._host.bus.publish)
            if outcome == "promote":
                break
            if outcome != "pass":
                await self._roll_back(outcome)
                return
        await self.switch()

    async def on_enter_awaiting_promotion(self, event: EventData) -> None:
        live, new = self._live()
        timeout = live.spec.promote_timeout_s
        self._entered(85.0, f"Both copies serve; waiting up to {timeout:g} s for promote")
        live.awaiting = "promote"
        live.open_window()
        self.slot.offer(new)  # only requests that ask for it (X-Ensemble-Copy: candidate)
        self._host.bus.publish(
            RolloutStepped(self.name, live.spec.kind, 0.0, "New copy ready; awaiting promote")
        )
        decision = await live.wait_decision(timeout)
        live.awaiting = None
        if decision == "promote":
            await self.switch()
        else:
            await self._roll_back("abort" if decision == "abort" else "timeout")

    async def _roll_back(self, why: str) -> None:
        live, _ = self._live()
        reasons = {
            "fail": f"gate failed: {failed_gates(live)}",
            "abort": "aborted by an operator",
            "deadline": f"undecided after the deadline ({live.spec.deadline_s:g} s)",
            "timeout": f"not promoted within {live.spec.promote_timeout_s:g} s",
        }
        self._rolled_back = reasons.get(why, why)
        await self.roll_back()

    async def on_enter_rolled_back(self, event: EventData) -> None:
        self.completed_at = time.time()
        reason = self._rolled_back or "rolled back"
        self.error = reason
        candidate = self.slot.withdraw()  # requests go to the old copy from here
        new, self._new = self._new, None
        if self.live is not None:
            self.live.weight_percent = self.live.shadow_percent = 0.0
        gone = candidate or new
        if gone is not None:  # requests already on it finish there; then it is closed
            await self._host.retire(gone, wait=False)
        self._entered(0.0, f"Rolled back: {reason}")

    async def on_enter_switching(self, event: EventData) -> None:
        plan, new = self._current(), self._new
        if new is None:
            raise RuntimeError("switching without a new copy")
        self._entered(max(self.progress, 80.0), "Switching to the new copy")
        if self.live is not None:
            self.live.weight_percent = self.live.shadow_percent = 0.0
        old = self.slot.swap(new, plan.spec)  # from here new requests use the new copy
        self._new, self._replaced = None, None
        self._host.bus.publish(loaded_event(new, self._load_s))
        if old is None:
            self._progress(100.0, f"Serving generation {new.generation}")
        else:
            self._progress(
                90.0,
                f"Serving generation {new.generation}; draining {old.in_flight} request(s) "
                "on the old copy",
            )
            inside = trace.set_span_in_context(self._state_span) if self._state_span else None
            with self._host.tracer.start_as_current_span("reload.drain", context=inside) as drain:
                drain.set_attribute("ensemble_ops.reload.in_flight", old.in_flight)
                drained = await self._host.retire(old, wait=False)
                drain.set_attribute("ensemble_ops.reload.drained", drained)
            self._progress(
                100.0,
                f"Serving generation {new.generation}; old copy closed"
                if drained
                else f"Serving generation {new.generation}; old copy closes when its "
                f"{old.in_flight} request(s) end",
            )
        await self.complete()

    async def on_enter_completed(self, event: EventData) -> None:
        self.completed_at = time.time()
        self._entered(100.0, self.message)

    async def abandon(self) -> None:
        """Shutdown cancelled the reload: free the new copy now (no task will run later) and
        keep the old one. Called by the reload's driver, shielded, once ``start()`` returns
        mid-chain: transitions runs each callback in an asyncio task of its own, which a
        cancellation reaches through any shield, and returns from a cancelled trigger."""
        if self._state_span is not None:
            self._state_span.end()
            self._state_span = None
        if self.slot.candidate is self._new:
            self.slot.withdraw()  # shutting down mid-rollout: the old copy stays
        if self._new is not None:
            new, self._new = self._new, None
            await new.close()

    async def on_exception(self, event: EventData) -> None:
        """The machine's ``on_exception``: a state's work failed, so the reload fails."""
        err: BaseException | None = event.error
        if isinstance(err, anyio.get_cancelled_exc_class()):
            raise err  # shutdown: whoever drives the reload calls abandon()
        expected = isinstance(err, ReloadFailedError)
        self.error = str(err) if expected else f"{type(err).__name__}: {err}"
        if self._state_span is not None and err is not None:
            self._state_span.record_exception(err)
            self._state_span.set_status(Status(StatusCode.ERROR, self.error))
        if self.state in RUNNING:
            await self.fail()
        else:  # the failure came from a final state's own callback: nothing to roll back
            _log.error("reload.callback_failed", model=self.name, error=self.error)

    async def on_enter_failed(self, event: EventData) -> None:
        self.completed_at = time.time()
        reason = self.error or "unknown error"
        if self._new is not None and self.slot.candidate is self._new:
            self.slot.withdraw()  # a rollout was serving it: requests go to the old copy
        if self._new is not None:  # roll back: the new copy goes, the old one stays
            new, self._new = self._new, None
            self._host.runner.spawn(new.close)
        if self._replaced is not None:  # replace had unloaded the old copy: bring it back
            self._host.runner.spawn(self._host.restore, self.slot, self._replaced)
            self._replaced = None
        self._entered(0.0, f"Reload failed: {reason}")
