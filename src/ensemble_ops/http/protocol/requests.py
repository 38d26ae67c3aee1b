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
)
from pydantic.json_schema import SkipJsonSchema

from ensemble_ops.access.keys import ANONYMOUS, Caller
from ensemble_ops.config import ModeName, Settings
from ensemble_ops.errors import InvalidRequestError
from ensemble_ops.events import Copy
from ensemble_ops.http.protocol.responses import no_default
from ensemble_ops.serving.engine import ChatMessage, GenerationParams
from ensemble_ops.serving.ensemble import ENSEMBLE, InferenceRequest

__all__ = [
    "ChatCompletionBody",
    "CompletionBody",
    "EnsembleHealthQuery",
    "InferenceBody",
    "InferenceHeaders",
    "ModelHealthQuery",
    "parse_body",
    "parse_query",
]

T = TypeVar("T")
B = TypeVar("B", bound="InferenceBody")
Q = TypeVar("Q", bound=BaseModel)

MAX_SESSION_CHARS = 256
"""The longest session key (``user`` or ``X-Session-ID``): a key, not a payload."""
# X-Ensemble-Copy in any case, spelt out: JSON Schema patterns take no flags.
_COPY_PATTERN = r"^([Ss][Tt][Aa][Bb][Ll][Ee]|[Cc][Aa][Nn][Dd][Ii][Dd][Aa][Tt][Ee])$"


class InferenceHeaders(BaseModel):
    """The headers the inference routes read; the others are ignored."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    session_id: Annotated[str, Field(max_length=MAX_SESSION_CHARS)] | SkipJsonSchema[None] = Field(
        default=None,
        alias="X-Session-ID",
        description="The session key of a conversation, kept on one side of a split; "
        "wins over the body's user field. Empty: no key.",
        json_schema_extra=no_default,
    )
    ensemble_copy: Annotated[str, Field(pattern=_COPY_PATTERN)] | SkipJsonSchema[None] = Field(
        default=None,
        alias="X-Ensemble-Copy",
        description="stable or candidate (any case): which copy of the member answers "
        "while a blue-green rollout holds both.",
        json_schema_extra=no_default,
    )

    _PROBLEMS: ClassVar[dict[str, str]] = {
        "session_id": "The header {name} is {length} characters long; at most "
        f"{MAX_SESSION_CHARS} are allowed.",
        "ensemble_copy": "The header {name} must be 'stable' or 'candidate' (any case), "
        "not {value!r}.",
    }

    @classmethod
    def parse(cls, headers: Mapping[str, str]) -> InferenceHeaders:
        """Validate the headers this model reads (looked up in ``headers``: Starlette's are
        case-insensitive); raise :class:`InvalidRequestError` naming the header."""
        names = [field.alias for field in cls.model_fields.values() if field.alias is not None]
        present = {name: headers[name] for name in names if name in headers}
        try:
            return cls.model_validate(present)
        except ValidationError as err:
            name = str(err.errors()[0]["loc"][0])
            field = next(f for f, info in cls.model_fields.items() if info.alias == name)
            value = present[name]
            message = cls._PROBLEMS[field].format(name=name, length=len(value), value=value[:40])
            raise InvalidRequestError(message, param=name) from err

    def session(self, user: str | None) -> str | None:
        """The request's session key: this header's, else the body's ``user``; empty is none."""
        return self.session_id or user or None

    @property
    def copy_asked(self) -> Copy | None:
        """``X-Ensemble-Copy`` as a copy's name, None when absent."""
        if self.ensemble_copy is None:
            return None
        return "stable" if self.ensemble_copy.lower() == "stable" else "candidate"


_NO_HEADERS = InferenceHeaders()


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
    user: Annotated[str, Field(max_length=MAX_SESSION_CHARS)] | None = Field(
        default=None,
        description="The session key: keeps a conversation on one side of a split "
        "(X-Session-ID wins over it). Empty: no key.",
    )

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

    @property
    def prompt_chars(self) -> int:
        """The prompt's length in characters (a token estimate before tokenizing)."""
        raise NotImplementedError

    def to_request(
        self,
        settings: Settings,
        response_id: str = "",
        headers: InferenceHeaders = _NO_HEADERS,
        caller: Caller = ANONYMOUS,
    ) -> InferenceRequest:
        """The core request this body asks for with these ``headers`` from ``caller``;
        ``response_id`` is the id its answer will carry (traces record it)."""
        raise NotImplementedError


class CompletionBody(InferenceBody):
    """``POST /v1/completions``."""

    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]

    @property
    def prompt_chars(self) -> int:
        return len(self.prompt if isinstance(self.prompt, str) else self.prompt[0])

    def to_request(
        self,
        settings: Settings,
        response_id: str = "",
        headers: InferenceHeaders = _NO_HEADERS,
        caller: Caller = ANONYMOUS,
    ) -> InferenceRequest:
        prompt = self.prompt if isinstance(self.prompt, str) else self.prompt[0]
        return InferenceRequest(
            model=self.model,
            mode=self.mode or settings.default_mode,
            params=self.params(settings, self.max_tokens),
            prompt=prompt,
            response_id=response_id,
            session=headers.session(self.user),
            copy=headers.copy_asked,
            caller=caller.name,
            weight=None if caller is ANONYMOUS else caller.weight,
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

    @property
    def prompt_chars(self) -> int:
        # A few characters per message for the template's turn markers.
        return sum(len(m.text()) + 16 for m in self.messages)

    def to_request(
        self,
        settings: Settings,
        response_id: str = "",
        headers: InferenceHeaders = _NO_HEADERS,
        caller: Caller = ANONYMOUS,
    ) -> InferenceRequest:
        return InferenceRequest(
            model=self.model,
            mode=self.mode or settings.default_mode,
            params=self.params(settings, self.max_completion_tokens or self.max_tokens),
            messages=tuple(ChatMessage(m.role, m.text()) for m in self.messages),
            response_id=response_id,
            session=headers.session(self.user),
            copy=headers.copy_asked,
            caller=caller.name,
            weight=None if caller is ANONYMOUS else caller.weight,
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
