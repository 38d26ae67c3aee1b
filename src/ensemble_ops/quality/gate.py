"""The quality gate: a new copy answers the golden set before it takes traffic.

It fails when the new copy's pass rate is below ``min_pass_rate``, or more than ``max_drop``
below the serving copy's on the same set: a copy that answers fluently and wrongly (a broken
quantisation, a base model where an instruct one was meant, a wrong chat template) passes
every latency and error gate, but not this one. Both copies are scored the same way: each
case alone, at temperature 0, one at a time behind every request (``run.py``). The serving
copy's score is remembered per generation and golden-set content, so it runs once.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
import anyio.to_thread
from opentelemetry.trace import Span

from ensemble_ops.config import DEFAULT_MIN_PASS_RATE, GoldenSet, QualityThresholds
from ensemble_ops.events import Copy, EventBus, GateJudged, QualityJudged
from ensemble_ops.quality.run import CaseResult, QualityRun, run_case
from ensemble_ops.serving.slot import Loaded

__all__ = ["CaseFailure", "QualityGate", "QualityPlan", "QualityStatus", "judge", "record_quality"]

DROP_SHARE = 0.10
"""Without ``max_drop``: the new copy may pass one case or 10% fewer, whichever is more."""
_SHOWN_FAILURES = 20
_SHOWN_ANSWER = 300


@dataclass(frozen=True)
class QualityPlan:
    """What one reload's gate runs, and the thresholds it applies."""

    golden: GoldenSet
    min_pass_rate: float
    max_drop: float

    @classmethod
    def of(cls, golden: GoldenSet, *levels: QualityThresholds | None) -> QualityPlan:
        """The thresholds of the first level that sets each (the reload request, the member,
        ``[quality]``), with the defaults below them."""
        given = [level for level in levels if level is not None]
        min_pass = next((t.min_pass_rate for t in given if t.min_pass_rate is not None), None)
        drop = next((t.max_drop for t in given if t.max_drop is not None), None)
        cases = len(golden.cases)
        return cls(
            golden,
            DEFAULT_MIN_PASS_RATE if min_pass is None else min_pass,
            max(1 / cases, DROP_SHARE) if drop is None else drop,
        )


@dataclass(frozen=True)
class CaseFailure:
    """A case the new copy failed: what it was asked, what was expected, what it said."""

    case: str
    input: str
    expected: str
    got: str
    why: str

    @classmethod
    def of(cls, result: CaseResult) -> CaseFailure:
        got = result.answer
        if len(got) > _SHOWN_ANSWER:
            got = got[:_SHOWN_ANSWER] + "..."
        case = result.case
        return cls(case.label, case.input_text, case.expected(), got, result.failure or "")


@dataclass(frozen=True)
class QualityStatus:
    """The gate's verdict, as the reload status shows it."""

    verdict: str
    """``pass`` or ``fail``."""
    golden_set: str
    """The set's file name."""
    cases: int
    pass_rate: float
    stable_pass_rate: float | None
    """The serving copy's, on the same set (None when none was serving)."""
    min_pass_rate: float
    max_drop: float
    required_pass_rate: float
    """What the new copy needed: min_pass_rate, or the serving copy's less max_drop."""
    seconds: float
    """The time the gate took (both copies' runs)."""
    reason: str
    failures: list[CaseFailure] = field(default_factory=list)
    """The new copy's failed cases (the first 20)."""

    @property
    def passed(self) -> bool:
        return self.verdict == "pass"


def judge(
    new: QualityRun, old: QualityRun | None, plan: QualityPlan, seconds: float
) -> QualityStatus:
    """The verdict on ``new`` against ``plan``'s floor and the serving copy's ``old``."""
    rate = new.pass_rate
    floor, why = plan.min_pass_rate, f"min_pass_rate {plan.min_pass_rate:.0%}"
    if old is not None and old.pass_rate - plan.max_drop > floor:
        floor = old.pass_rate - plan.max_drop
        why = f"the serving copy's {old.pass_rate:.0%} less max_drop {plan.max_drop:.0%}"
    # A hair of tolerance: 16/20 against a floor of 0.8 computed as 0.7999... passes.
    passed = rate >= floor - 1e-9
    return QualityStatus(
        "pass" if passed else "fail",
        plan.golden.path.name,
        new.total,
        round(rate, 4),
        None if old is None else round(old.pass_rate, 4),
        plan.min_pass_rate,
        round(plan.max_drop, 4),
        round(floor, 4),
        round(seconds, 3),
        f"passed {new.passed}/{new.total} ({rate:.0%}); needs {floor:.0%} ({why})",
        _shown_failures(new),
    )


class QualityGate:
    """Runs golden sets on copies and judges new ones; remembers serving copies' scores."""

    def __init__(self, bus: EventBus) -> None:
        self._bus = bus
        self._scores: dict[tuple[str, int, str], QualityRun] = {}
        """(member, generation, golden-set digest) -> that copy's score."""

    async def judge(
        self,
        new: Loaded,
        old: Loaded | None,
        plan: QualityPlan,
        progress: Callable[[float, str], None],
    ) -> QualityStatus:
        """Score ``new``, and ``old`` unless its score on this set is known; ``progress``
        goes from 0 to 1 over the cases run. A new copy's score is remembered for the
        generation it is, so once it serves it is not scored again."""
        golden, digest = plan.golden, _digest(plan.golden)
        known = None if old is None else self._scores.get((old.name, old.generation, digest))
        total = len(golden.cases) * (1 if old is None or known is not None else 2)
        done = 0

        def step(which: Copy, label: str) -> None:
            nonlocal done
            progress(done / total, f"Quality gate: {which} copy, {label}")
            done += 1

        started = time.perf_counter()
        new_run = await self._score(new, "candidate", golden, step)
        self._remember(new, old, digest, new_run)
        old_run = known
        if old is not None and old_run is None:
            old_run = await self._score(old, "stable", golden, step)
            self._scores[(old.name, old.generation, digest)] = old_run
        status = judge(new_run, old_run, plan, time.perf_counter() - started)
        self._bus.publish(
            GateJudged(
                new.name,
                "quality",
                "pass" if status.passed else "fail",
                status.pass_rate,
                status.stable_pass_rate,
                status.required_pass_rate,
                status.reason,
            )
        )
        return status

    async def _score(
        self,
        copy: Loaded,
        which: Copy,
        golden: GoldenSet,
        step: Callable[[Copy, str], None],
    ) -> QualityRun:
        """Every case on a scratch context of ``copy``: alone by construction, never in the
        member's batch nor holding its slots, and the same way for both copies."""
        scratch = await copy.run(copy.engine.scratch)
        try:
            results = []
            for case in golden.cases:
                step(which, case.label)
                results.append(await copy.run(run_case, scratch, case))
        finally:
            with anyio.CancelScope(shield=True):  # a shutdown still frees the context
                await anyio.to_thread.run_sync(scratch.close)
        run = QualityRun(tuple(results))
        self._publish(copy.name, which, golden, run)
        return run

    def _remember(self, new: Loaded, old: Loaded | None, digest: str, run: QualityRun) -> None:
        """Keep the scores of the member's copies that may serve next, and no others."""
        keep = {new.generation, old.generation if old is not None else None}
        for key in [k for k in self._scores if k[0] == new.name and k[1] not in keep]:
            del self._scores[key]
        self._scores[(new.name, new.generation, digest)] = run

    def _publish(self, name: str, which: Copy, golden: GoldenSet, run: QualityRun) -> None:
        failures = tuple((f.case, f.input, f.expected, f.got) for f in _shown_failures(run))
        self._bus.publish(
            QualityJudged(
                name, which, golden.path.name, run.total, run.passed, run.seconds, failures
            )
        )


def _shown_failures(run: QualityRun) -> list[CaseFailure]:
    """The failed cases a status or an event shows: the first 20, answers cut short."""
    return [CaseFailure.of(result) for result in run.failures[:_SHOWN_FAILURES]]


def record_quality(span: Span, status: QualityStatus) -> None:
    """The verdict on a reload's span, with an event for each failed case."""
    span.set_attribute("ensemble_ops.quality.verdict", status.verdict)
    span.set_attribute("ensemble_ops.quality.pass_rate", status.pass_rate)
    span.set_attribute("ensemble_ops.quality.required_pass_rate", status.required_pass_rate)
    for failure in status.failures:
        span.add_event(
            "quality.case_failed",
            {
                "case": failure.case,
                "input": failure.input,
                "expected": failure.expected,
                "got": failure.got,
            },
        )


def _digest(golden: GoldenSet) -> str:
    """The set's content, so an edited file is scored again on the serving copy."""
    text = "\n".join(case.model_dump_json() for case in golden.cases)
    return hashlib.sha256(text.encode()).hexdigest()
