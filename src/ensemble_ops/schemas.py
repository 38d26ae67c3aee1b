"""Request bodies of the OpenAI-compatible API, validated, and turned into core requests.

Fields the service does not use are ignored (OpenAI clients send many); fields it does use
are type-checked strictly, so ``"max_tokens": "16"`` is a clear 400, not a silent guess.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .config import ModeName, Settings
from .engine import ChatMessage, GenerationParams
from .ensemble import ENSEMBLE, InferenceRequest
from .errors import InvalidRequestError

__all__ = ["ChatCompletionBody", "CompletionBody", "parse_body"]

B = TypeVar("B", bound="_Body")


class _StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


class _Body(BaseModel):
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


class CompletionBody(_Body):
    """``POST /v1/completions``."""

    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]

    def to_request(self, settings: Settings) -> InferenceRequest:
        prompt = self.prompt if isinstance(self.prompt, str) else self.prompt[0]
        return InferenceRequest(
            model=self.model,
            mode=self.mode or settings.default_mode,
            params=self.params(settings, self.max_tokens),
            prompt=prompt,
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


class ChatCompletionBody(_Body):
    """``POST /v1/chat/completions``."""

    messages: Annotated[list[_Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(gt=0)] | None = None

    def to_request(self, settings: Settings) -> InferenceRequest:
        return InferenceRequest(
            model=self.model,
            mode=self.mode or settings.default_mode,
            params=self.params(settings, self.max_completion_tokens or self.max_tokens),
            messages=tuple(ChatMessage(m.role, m.text()) for m in self.messages),
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
