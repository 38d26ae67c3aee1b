"""What clients send: validated strictly where the service uses a field, ignored where
it does not (OpenAI clients send many), so ``"max_tokens": "16"`` is a clear 400.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal, TypeAlias, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)
from pydantic.json_schema import SkipJsonSchema

from ensemble_ops.config import ModeName, Settings
from ensemble_ops.errors import InvalidRequestError
from ensemble_ops.serving.engine import ChatMessage, GenerationParams
from ensemble_ops.serving.ensemble import ENSEMBLE, InferenceRequest

__all__ = [
    "ChatCompletionBody",
    "CompletionBody",
    "EnsembleHealthQuery",
    "InferenceBody",
    "ModelHealthQuery",
    "ReloadBody",
    "parse_body",
    "parse_query",
]

T = TypeVar("T")
B = TypeVar("B", bound="InferenceBody")
Q = TypeVar("Q", bound=BaseModel)


class _StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


class InferenceBody(BaseModel):
    """What the two inference bodies share: the member or mode, and generation settings."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str = ENSEMBLE
    mode: ModeName | None = None
    max_tokens: Annotated[int, Field(gt=0)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    seed: int | None = None
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    stream: bool = False
    stream_options: _StreamOptions | None = None
    n: Annotated[int, Field(ge=1, le=1)] = 1

    def params(self, settings: Settings, max_tokens: int | None) -> GenerationParams:
        preset = settings.modes[self.mode or settings.default_mode]
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return GenerationParams(
            max_tokens=max_tokens or preset.max_tokens,
            temperature=preset.temperature if self.temperature is None else self.temperature,
            top_p=preset.top_p if self.top_p is None else self.top_p,
            seed=self.seed,
            stop=tuple(s for s in stop if s),
        )

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def to_request(self, settings: Settings, response_id: str = "") -> InferenceRequest:
        """The core request this body asks for; ``response_id`` is the id its answer will
        carry (traces record it)."""
        raise NotImplementedError


class CompletionBody(InferenceBody):
    """``POST /v1/completions``."""

    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]

    def to_request(self, settings: Settings, response_id: str = "") -> InferenceRequest:
        prompt = self.prompt if isinstance(self.prompt, str) else self.prompt[0]
        return InferenceRequest(
            model=self.model,
            mode=self.mode or settings.default_mode,
            params=self.params(settings, self.max_tokens),
            prompt=prompt,
            response_id=response_id,
        )


class _TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: str


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[_TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionBody(InferenceBody):
    """``POST /v1/chat/completions``."""

    messages: Annotated[list[_Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(gt=0)] | None = None

    def to_request(self, settings: Settings, response_id: str = "") -> InferenceRequest:
        return InferenceRequest(
            model=self.model,
            mode=self.mode or settings.default_mode,
            params=self.params(settings, self.max_completion_tokens or self.max_tokens),
            messages=tuple(ChatMessage(m.role, m.text()) for m in self.messages),
            response_id=response_id,
        )


def parse_body(model: type[B], data: Any) -> B:
    """Validate a decoded JSON body; raise :class:`InvalidRequestError` naming the field."""
    if not isinstance(data, dict):
        raise InvalidRequestError("The request body must be a JSON object.")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        problem = err.errors()[0]
        loc = problem["loc"]
        param = str(loc[0]) if loc else None
        message = str(problem["msg"])
        if len(loc) > 1:
            message += f" (at {'.'.join(str(p) for p in loc)})"
        if param == "n":
            message = "Only n=1 is supported."
        elif param and param.startswith("mode"):
            message = "mode must be one of 'fast', 'balanced', 'creative'."
        raise InvalidRequestError(
            f"Invalid value for '{param}': {message}" if param else message, param=param
        ) from err


def _no_default(schema: dict[str, Any]) -> None:
    schema.pop("default", None)


class ReloadBody(BaseModel):
    """``POST /admin/models/{model}/reload``: both fields optional, nothing else allowed."""

    model_config = ConfigDict(extra="forbid", strict=True)

    # Left out means the member's own setting; null is not a value (a 400, like any other).
    path: Annotated[str, Field(min_length=1)] | SkipJsonSchema[None] = Field(
        default=None,
        description="A GGUF file inside the model directory (default: the member's).",
        json_schema_extra=_no_default,
    )
    warmup_iterations: Annotated[int, Field(ge=1, le=100)] | SkipJsonSchema[None] = Field(
        default=None, json_schema_extra=_no_default
    )

    _PROBLEMS: ClassVar[dict[str, str]] = {
        "path": "path must be a non-empty string.",
        "warmup_iterations": "warmup_iterations must be an integer from 1 to 100.",
    }

    @field_validator("path", "warmup_iterations", mode="before")
    @classmethod
    def reject_null(cls, value: object) -> object:
        if value is None:
            raise ValueError("null is not a value; leave the field out")
        return value

    @classmethod
    def parse(cls, data: Any) -> ReloadBody:
        """Validate a decoded JSON body; raise :class:`InvalidRequestError` naming the field."""
        general = InvalidRequestError(
            'The body may hold only "path" (a GGUF file inside the model directory) and '
            '"warmup_iterations" (1-100).'
        )
        if not isinstance(data, dict):
            raise general
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            problems = err.errors()
            if any(p["type"] == "extra_forbidden" for p in problems):
                raise general from err
            param = str(problems[0]["loc"][0])
            raise InvalidRequestError(cls._PROBLEMS[param], param=param) from err


RunInference: TypeAlias = Annotated[
    Literal["true", "false"],
    Field(description="Run a one-token inference probe (cached; skipped while busy)."),
]


class _Query(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class ModelHealthQuery(_Query):
    """The query of ``GET /health/llm``."""

    model: Annotated[str, Field(min_length=1, description="The member.")]
    run_inference: RunInference = "false"


class EnsembleHealthQuery(_Query):
    """The query of ``GET /health/llm/all``."""

    run_inference: RunInference = "false"


def parse_query(model: type[Q], params: Mapping[str, str]) -> Q:
    """Validate a query string; raise :class:`InvalidRequestError` naming the parameter."""
    try:
        return model.model_validate(dict(params))
    except ValidationError as err:
        problem = err.errors()[0]
        param = str(problem["loc"][0])
        if problem["type"] in ("missing", "string_too_short"):
            message = f"The query parameter {param!r} is required."
        elif problem["type"] == "literal_error":
            choices = str(problem.get("ctx", {}).get("expected", "")).replace("'", "")
            message = f"{param} must be {choices}, not {params.get(param)!r}."
        else:
            message = f"Invalid value for {param!r}: {problem['msg']}"
        raise InvalidRequestError(message, param=param) from err
