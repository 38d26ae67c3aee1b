"""Golden sets: JSON lines of inputs with what their answers must satisfy.

One case per line::

    {"messages": [{"role": "user", "content": "What is 2 + 2? Answer with a number."}],
     "contains": ["4"]}
    {"prompt": "The capital of France is", "max_tokens": 8, "any_of": ["Paris"]}

A case has ``messages`` (a chat) or ``prompt`` (a completion), an optional ``max_tokens``
(default 64) and ``name``, and at least one expectation; every expectation it has must hold:
``contains`` (all of them) and ``not_contains`` (none), ``any_of`` (at least one), all three
case-insensitive; ``regex`` (found anywhere); ``exact`` (the whole answer, trimmed);
``json_schema`` (the answer, without a Markdown code fence around it, parses as JSON and
validates). Cases run at temperature 0, so an answer is the model's, never chance's.

Anything wrong raises :class:`GoldenSetError` with one line naming the file, the line
number and the field, before anything is run.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Self

import jsonschema
import jsonschema.exceptions
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = ["GoldenCase", "GoldenSet", "GoldenSetError", "load_golden_set", "shipped_golden_set"]

_FENCE = re.compile(r"^```[A-Za-z]*\n(?P<body>.*)\n```$", re.DOTALL)


class GoldenSetError(ValueError):
    """A golden set that cannot be used: ``file:line: field: reason``."""


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "user", "assistant"]
    content: str


class GoldenCase(BaseModel):
    """One line of a golden set: an input and what its answer must satisfy."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    line: Annotated[int, Field(exclude=True)] = 0
    """Where it is in its file (set by the loader; not a field of the line)."""
    name: str | None = None
    messages: Annotated[tuple[_Message, ...], Field(min_length=1, strict=False)] | None = None
    prompt: Annotated[str, Field(min_length=1)] | None = None
    max_tokens: Annotated[int, Field(ge=1, le=4096)] = 64
    contains: Annotated[tuple[str, ...], Field(min_length=1, strict=False)] | None = None
    any_of: Annotated[tuple[str, ...], Field(min_length=1, strict=False)] | None = None
    not_contains: Annotated[tuple[str, ...], Field(min_length=1, strict=False)] | None = None
    regex: str | None = None
    exact: str | None = None
    json_schema: dict[str, Any] | None = None

    @field_validator("regex")
    @classmethod
    def _compiles(cls, regex: str | None) -> str | None:
        if regex is not None:
            try:
                re.compile(regex)
            except re.error as err:
                raise ValueError(f"not a regular expression: {err}") from None
        return regex

    @field_validator("json_schema")
    @classmethod
    def _is_a_schema(cls, schema: dict[str, Any] | None) -> dict[str, Any] | None:
        if schema is not None:
            try:
                jsonschema.validators.validator_for(schema).check_schema(schema)
            except jsonschema.exceptions.SchemaError as err:
                raise ValueError(f"not a JSON schema: {err.message}") from None
        return schema

    @model_validator(mode="after")
    def _complete(self) -> Self:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("a case needs either messages (a chat) or prompt, not both")
        if not any(getattr(self, name) is not None for name in _EXPECTATIONS):
            raise ValueError(f"a case needs an expectation: one of {', '.join(_EXPECTATIONS)}")
        return self

    @property
    def label(self) -> str:
        return self.name or f"line {self.line}"

    @property
    def is_chat(self) -> bool:
        return self.messages is not None

    @property
    def input_text(self) -> str:
        """The input as one line of text, for tables and reload status."""
        if self.messages is not None:
            return " / ".join(f"{m.role}: {m.content}" for m in self.messages)
        return self.prompt or ""

    def expected(self) -> str:
        """What the answer must satisfy, in words."""
        parts = []
        for name in _EXPECTATIONS:
            value = getattr(self, name)
            if value is not None:
                shown = json.dumps(list(value) if isinstance(value, tuple) else value)
                parts.append(f"{name} {shown}")
        return "; ".join(parts)

    def judge(self, answer: str) -> str | None:
        """Why ``answer`` fails this case, or None when it passes."""
        folded = answer.casefold()
        if self.contains is not None:
            missing = [text for text in self.contains if text.casefold() not in folded]
            if missing:
                return f"missing {', '.join(map(repr, missing))}"
        if self.any_of is not None and not any(t.casefold() in folded for t in self.any_of):
            return f"none of {', '.join(map(repr, self.any_of))}"
        if self.not_contains is not None:
            found = [text for text in self.not_contains if text.casefold() in folded]
            if found:
                return f"contains {', '.join(map(repr, found))}"
        if self.regex is not None and re.search(self.regex, answer) is None:
            return f"no match for /{self.regex}/"
        if self.exact is not None and answer.strip() != self.exact.strip():
            return f"not exactly {self.exact!r}"
        if self.json_schema is not None:
            return _json_problem(answer, self.json_schema)
        return None


_EXPECTATIONS = ("contains", "any_of", "not_contains", "regex", "exact", "json_schema")


def _json_problem(answer: str, schema: dict[str, Any]) -> str | None:
    text = answer.strip()
    fenced = _FENCE.match(text)
    if fenced is not None:  # models often wrap JSON in a Markdown fence; the JSON is judged
        text = fenced["body"].strip()
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        return f"not JSON: {err.msg}"
    try:
        jsonschema.validate(value, schema)
    except jsonschema.exceptions.ValidationError as err:
        return f"does not match the schema: {err.message}"
    return None


@dataclass(frozen=True)
class GoldenSet:
    """A parsed golden set and where it came from."""

    path: Path
    cases: tuple[GoldenCase, ...]

    @property
    def chat_only(self) -> bool:
        return all(case.is_chat for case in self.cases)


def shipped_golden_set(kind: Literal["chat", "completion"]) -> Path:
    """The golden set the package ships for members of ``kind``: ``chat`` for members that
    chat (facts, arithmetic, a format instruction, a refusal to invent), ``completion`` for
    base models that continue text. Phrased the way small models can answer ("Answer in one
    sentence."): a bigger model passes them easily, which suits a regression gate."""
    return Path(__file__).with_name("golden_sets") / f"{kind}.jsonl"


def load_golden_set(path: Path) -> GoldenSet:
    """Read and check every line of ``path`` (blank lines and ``#`` comments are skipped)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise GoldenSetError(f"{path}: golden set not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise GoldenSetError(f"{path}: cannot be read: {err}") from None
    cases = []
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as err:
            raise GoldenSetError(f"{path}:{number}: not JSON: {err.msg}") from None
        if not isinstance(data, dict):
            raise GoldenSetError(f"{path}:{number}: a case is a JSON object")
        if "line" in data:
            raise GoldenSetError(f"{path}:{number}: line: unknown field")
        try:
            cases.append(GoldenCase.model_validate({**data, "line": number}))
        except ValidationError as err:
            raise GoldenSetError(f"{path}:{number}: {_problem(err)}") from None
    if not cases:
        raise GoldenSetError(f"{path}: no cases")
    return GoldenSet(path, tuple(cases))


def _problem(err: ValidationError) -> str:
    """``field: reason`` of the first problem (``case`` for a rule across fields)."""
    problem = err.errors()[0]
    loc = ".".join(str(part) for part in problem["loc"])
    reason = str(problem["msg"]).removeprefix("Value error, ")
    if problem["type"] == "extra_forbidden":
        reason = "unknown field"
    return f"{loc or 'case'}: {reason}"
