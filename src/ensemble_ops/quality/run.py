"""Running a golden set on an engine: each case alone, at temperature 0, one at a time."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

from ensemble_ops.config.golden import GoldenCase
from ensemble_ops.errors import EngineError, InvalidRequestError
from ensemble_ops.serving.engine import (
    BACKGROUND_TARGET_S,
    ChatMessage,
    Engine,
    GenerationParams,
    complete,
)

__all__ = ["CaseResult", "QualityRun", "run_case", "run_cases"]


@dataclass(frozen=True)
class CaseResult:
    """One case's answer and verdict (``failure`` None: passed)."""

    case: GoldenCase
    answer: str
    failure: str | None
    seconds: float

    @property
    def passed(self) -> bool:
        return self.failure is None

    def as_dict(self) -> dict[str, object]:
        return {
            "case": self.case.label,
            "input": self.case.input_text,
            "expected": self.case.expected(),
            "got": self.answer,
            "passed": self.passed,
            "why": self.failure,
            "seconds": round(self.seconds, 3),
        }


@dataclass(frozen=True)
class QualityRun:
    """A golden set's results on one copy."""

    results: tuple[CaseResult, ...]

    @property
    def total(self) -> int:
        return len(self.results)

    @property
    def passed(self) -> int:
        return sum(result.passed for result in self.results)

    @property
    def pass_rate(self) -> float:
        return self.passed / self.total if self.total else 0.0

    @property
    def failures(self) -> tuple[CaseResult, ...]:
        return tuple(result for result in self.results if not result.passed)

    @property
    def seconds(self) -> float:
        return sum(result.seconds for result in self.results)


def run_case(engine: Engine, case: GoldenCase) -> CaseResult:
    """Answer ``case`` on ``engine`` (blocking: call it from a worker thread).

    Behind every request for the cores (the background target). The quality gate hands it a
    scratch context (``Engine.scratch``), where it runs alone: batched neighbours could
    shift a greedy answer by rounding. A request error or an engine failure is the case's
    failure, not the run's.
    """
    started = time.perf_counter()
    params = GenerationParams(max_tokens=case.max_tokens, temperature=0.0, top_p=1.0)
    try:
        if case.messages is not None:
            chat = engine.render_chat([ChatMessage(m.role, m.content) for m in case.messages])
            tokens, params = chat.tokens, dataclasses.replace(params, stop=chat.stop)
        else:
            tokens = engine.tokenize(case.prompt or "")
        answer = complete(engine, tokens, params, target_s=BACKGROUND_TARGET_S).text
    except (EngineError, InvalidRequestError) as err:
        return CaseResult(case, "", f"error: {err}", time.perf_counter() - started)
    return CaseResult(case, answer, case.judge(answer), time.perf_counter() - started)


def run_cases(engine: Engine, cases: tuple[GoldenCase, ...]) -> QualityRun:
    """Every case on ``engine`` in turn (blocking)."""
    return QualityRun(tuple(run_case(engine, case) for case in cases))
