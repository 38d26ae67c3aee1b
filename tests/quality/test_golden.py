"""Golden sets: each line checked with a one-line error, each expectation judged."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ensemble_ops.config import (
    GoldenCase,
    GoldenSetError,
    QualityThresholds,
    load_golden_set,
    shipped_golden_set,
)
from ensemble_ops.quality.gate import QualityPlan, judge
from ensemble_ops.quality.run import CaseResult, QualityRun

CHAT = {"messages": [{"role": "user", "content": "What is the capital of France?"}]}


def _write(tmp_path: Path, *cases: Any) -> Path:
    path = tmp_path / "golden.jsonl"
    lines = [case if isinstance(case, str) else json.dumps(case) for case in cases]
    path.write_text("\n".join(lines) + "\n")
    return path


def _case(**fields: Any) -> GoldenCase:
    return GoldenCase.model_validate({**CHAT, **fields})


class TestLoading:
    def test_a_valid_set_keeps_each_cases_line(self, tmp_path: Path) -> None:
        path = _write(
            tmp_path,
            "# a comment",
            {**CHAT, "contains": ["Paris"]},
            "",
            {"prompt": "The capital of France is", "max_tokens": 8, "any_of": ["Paris"]},
        )
        golden = load_golden_set(path)
        assert [case.line for case in golden.cases] == [2, 4]
        assert [case.is_chat for case in golden.cases] == [True, False]
        assert golden.cases[0].max_tokens == 64
        assert golden.cases[1].label == "line 4"

    @pytest.mark.parametrize(
        ("line", "error"),
        [
            ("{not json", "2: not JSON"),
            ("[1, 2]", "2: a case is a JSON object"),
            (json.dumps({**CHAT, "contains": "Paris"}), "2: contains: Input should be a valid"),
            (json.dumps({**CHAT, "contains": []}), "2: contains: "),
            (json.dumps({**CHAT, "regex": "("}), "2: regex: not a regular expression"),
            (
                json.dumps({**CHAT, "json_schema": {"type": "nonsense"}}),
                "2: json_schema: not a JSON schema",
            ),
            (json.dumps({**CHAT, "max_tokens": 0, "exact": "x"}), "2: max_tokens: "),
            (json.dumps({**CHAT, "contain": ["x"]}), "2: contain: unknown field"),
            (json.dumps({**CHAT, "line": 3, "exact": "x"}), "2: line: unknown field"),
            (json.dumps(CHAT), "2: case: a case needs an expectation"),
            (
                json.dumps({**CHAT, "prompt": "Hi", "exact": "x"}),
                "2: case: a case needs either messages (a chat) or prompt",
            ),
            (
                json.dumps({"messages": [{"role": "robot", "content": "x"}], "exact": "x"}),
                "2: messages.0.role: ",
            ),
        ],
    )
    def test_a_bad_line_names_the_file_the_line_and_the_field(
        self, tmp_path: Path, line: str, error: str
    ) -> None:
        path = _write(tmp_path, {**CHAT, "contains": ["Paris"]}, line)
        with pytest.raises(GoldenSetError) as raised:
            load_golden_set(path)
        assert str(raised.value).startswith(f"{path}:{error}"), raised.value
        assert "\n" not in str(raised.value)

    def test_a_missing_or_empty_file_is_named(self, tmp_path: Path) -> None:
        with pytest.raises(GoldenSetError, match="golden set not found"):
            load_golden_set(tmp_path / "absent.jsonl")
        with pytest.raises(GoldenSetError, match="no cases"):
            load_golden_set(_write(tmp_path, "# only a comment"))

    @pytest.mark.parametrize("kind", ["chat", "completion"])
    def test_the_shipped_sets_load(self, kind: str) -> None:
        golden = load_golden_set(shipped_golden_set(kind))  # type: ignore[arg-type]
        assert len(golden.cases) == 20
        assert all(case.is_chat == (kind == "chat") for case in golden.cases)


class TestExpectations:
    @pytest.mark.parametrize(
        ("expectation", "answer", "why"),
        [
            ({"contains": ["paris", "FRANCE"]}, "Paris is in France.", None),
            ({"contains": ["Paris", "Lyon"]}, "Paris is in France.", "missing 'Lyon'"),
            ({"any_of": ["Lyon", "paris"]}, "Paris.", None),
            ({"any_of": ["Lyon", "Nice"]}, "Paris.", "none of 'Lyon', 'Nice'"),
            ({"not_contains": ["berlin"]}, "Paris.", None),
            ({"not_contains": ["berlin"]}, "Berlin.", "contains 'berlin'"),
            ({"regex": r"\b4\b"}, "2 + 2 = 4", None),
            ({"regex": r"\b4\b"}, "2 + 2 = 44", r"no match for /\b4\b/"),
            ({"exact": "Paris"}, "  Paris\n", None),
            ({"exact": "Paris"}, "Paris.", "not exactly 'Paris'"),
            ({"json_schema": {"type": "object", "required": ["city"]}}, '{"city": "Paris"}', None),
            (
                {"json_schema": {"type": "object", "required": ["city"]}},
                '```json\n{"city": "Paris"}\n```',
                None,
            ),
            ({"json_schema": {"type": "object"}}, "Paris", "not JSON: Expecting value"),
            (
                {"json_schema": {"type": "object", "required": ["city"]}},
                "{}",
                "does not match the schema: 'city' is a required property",
            ),
            (
                {"contains": ["Paris"], "not_contains": ["Lyon"]},
                "Paris, not Lyon",
                "contains 'Lyon'",
            ),
        ],
    )
    def test_every_expectation_must_hold(
        self, expectation: dict[str, Any], answer: str, why: str | None
    ) -> None:
        assert _case(**expectation).judge(answer) == why

    def test_the_expected_text_names_every_expectation(self) -> None:
        case = _case(contains=["Paris"], regex="P.*")
        assert case.expected() == 'contains ["Paris"]; regex "P.*"'


def _run(passed: int, total: int) -> QualityRun:
    case = _case(exact="x")
    return QualityRun(
        tuple(
            CaseResult(case, "x" if i < passed else "y", None if i < passed else "no", 0.1)
            for i in range(total)
        )
    )


class TestVerdict:
    def _plan(self, tmp_path: Path, cases: int, *levels: QualityThresholds | None) -> QualityPlan:
        path = _write(tmp_path, *[{**CHAT, "exact": "x"}] * cases)
        return QualityPlan.of(load_golden_set(path), *levels)

    def test_the_default_max_drop_is_one_case_or_ten_percent(self, tmp_path: Path) -> None:
        assert self._plan(tmp_path, 5).max_drop == pytest.approx(0.2)
        assert self._plan(tmp_path, 20).max_drop == pytest.approx(0.1)
        assert self._plan(tmp_path, 20).min_pass_rate == 0.8

    def test_the_first_level_that_sets_a_threshold_wins(self, tmp_path: Path) -> None:
        request = QualityThresholds(min_pass_rate=0.5)
        member = QualityThresholds(min_pass_rate=0.7, max_drop=0.3)
        top = QualityThresholds(min_pass_rate=0.9, max_drop=0.0)
        plan = self._plan(tmp_path, 10, request, member, top)
        assert (plan.min_pass_rate, plan.max_drop) == (0.5, 0.3)
        plan = self._plan(tmp_path, 10, None, None, top)
        assert (plan.min_pass_rate, plan.max_drop) == (0.9, 0.0)

    def test_below_the_floor_fails_at_the_floor_passes(self, tmp_path: Path) -> None:
        plan = self._plan(tmp_path, 10, QualityThresholds(min_pass_rate=0.8))
        assert judge(_run(8, 10), None, plan, 1.0).passed
        failed = judge(_run(7, 10), None, plan, 1.0)
        assert not failed.passed
        assert failed.reason == "passed 7/10 (70%); needs 80% (min_pass_rate 80%)"
        assert [f.got for f in failed.failures] == ["y", "y", "y"]

    def test_a_drop_from_the_serving_copy_fails_even_above_the_floor(self, tmp_path: Path) -> None:
        """The serving copy passes 10/10: 8/10 is above the floor of 50% but two cases
        below it, more than the default drop of one case (10%)."""
        plan = self._plan(tmp_path, 10, QualityThresholds(min_pass_rate=0.5))
        status = judge(_run(8, 10), _run(10, 10), plan, 1.0)
        assert not status.passed
        assert status.required_pass_rate == pytest.approx(0.9)
        assert status.stable_pass_rate == 1.0
        assert judge(_run(9, 10), _run(10, 10), plan, 1.0).passed
        # A serving copy that does worse than the floor never lowers it.
        assert not judge(_run(4, 10), _run(3, 10), plan, 1.0).passed
