"""Every body of the HTTP API, one pydantic model per shape: what clients send, what they get.

Request models validate: fields the service does not use are ignored (OpenAI clients send
many), fields it does use are type-checked strictly, so ``"max_tokens": "16"`` is a clear
400, not a silent guess. Response models build every JSON answer; the core's own records
(:class:`ModelHealth`, :class:`ReloadStatus`) are serialised as they are. The OpenAPI
document is generated from these models and the routes (``http/openapi.py``), so what is
documented, validated and sent cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Generic, Literal, Self, TypeAlias, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    TypeAdapter,
    ValidationError,
    field_validator,
)
from pydantic.json_schema import SkipJsonSchema

from ensemble_ops.config import ModeName, Settings
from ensemble_ops.errors import InvalidRequestError
from ensemble_ops.health.status import HealthStatus, ModelHealth
from ensemble_ops.reload.status import ReloadStatus
from ensemble_ops.serving import engine
from ensemble_ops.serving.engine import ChatMessage, FinishReason, GenerationParams
from ensemble_ops.serving.ensemble import ENSEMBLE, InferenceRequest
from ensemble_ops.serving.slot import SlotState

__all__ = [
    "AssistantMessage",
    "ChatChoice",
    "ChatChunkChoice",
    "ChatCompletion",
    "ChatCompletionBody",
    "ChatCompletionChunk",
    "ChatDelta",
    "Chunk",
    "Completion",
    "CompletionBody",
    "CompletionChoice",
    "CompletionChunk",
    "CompletionChunkChoice",
    "EnsembleHealth",
    "EnsembleHealthQuery",
    "EnsembleMeta",
    "ErrorDetail",
    "ErrorResponse",
    "InferenceBody",
    "KubeProbe",
    "Liveness",
    "Member",
    "MemberList",
    "MemberMeta",
    "ModelCard",
    "ModelHealthQuery",
    "ModelList",
    "Readiness",
    "ReloadBody",
    "Reply",
    "StreamError",
    "StreamErrorDetail",
    "Usage",
    "dump_model_health",
    "dump_reload_status",
    "parse_body",
    "parse_query",
]

T = TypeVar("T")
B = TypeVar("B", bound="InferenceBody")
Q = TypeVar("Q", bound=BaseModel)
ChoiceT = TypeVar("ChoiceT", bound=BaseModel)


# --- Requests -------------------------------------------------------------------------------


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


# --- Responses ------------------------------------------------------------------------------


def _is_none(value: object) -> bool:
    return value is None


Omittable: TypeAlias = Annotated[
    T | SkipJsonSchema[None], Field(exclude_if=_is_none, json_schema_extra=_no_default)
]
"""A response field left out of the JSON when None (declare it ``= None``): optional and
never null in the schema. Every other response field is always sent, null included, and
required in the schema."""


class _Response(BaseModel):
    model_config = ConfigDict(json_schema_serialization_defaults_required=True)


class Usage(_Response):
    """Exact token counts of one answer."""

    prompt_tokens: NonNegativeInt
    completion_tokens: NonNegativeInt
    total_tokens: NonNegativeInt

    @classmethod
    def of(cls, completion: engine.Completion) -> Usage:
        return cls(
            prompt_tokens=completion.prompt_tokens,
            completion_tokens=completion.completion_tokens,
            total_tokens=completion.prompt_tokens + completion.completion_tokens,
        )


class _Envelope(_Response, Generic[ChoiceT]):
    """OpenAI's envelope of every answer and chunk."""

    id: str
    object: str = ""  # each answer and chunk declares its constant
    created: int = Field(description="Unix seconds.")
    model: str = Field(description="The member that answered.")
    choices: list[ChoiceT]

    @classmethod
    def new_id(cls) -> str:
        """A new id, ``chatcmpl-...`` for chat objects and ``cmpl-...`` for the others."""
        chat = str(cls.model_fields["object"].default).startswith("chat")
        return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"


class Reply(_Envelope[ChoiceT]):
    """A whole answer (``stream: false``)."""

    usage: Usage
    system_fingerprint: None = None

    @classmethod
    def choice(cls, completion: engine.Completion) -> ChoiceT:
        raise NotImplementedError

    @classmethod
    def of(cls, answer_id: str, member: str, completion: engine.Completion) -> Self:
        """The answer ``answer_id`` of ``member`` with ``completion``."""
        return cls(
            id=answer_id,
            created=int(time.time()),
            model=member,
            choices=[cls.choice(completion)],
            usage=Usage.of(completion),
        )


class Chunk(_Envelope[ChoiceT]):
    """One event of a stream (``stream: true``): a piece of text, the ``finish_reason``,
    then, with ``include_usage``, one with ``usage`` and no choices."""

    usage: Omittable[Usage] = None

    @classmethod
    def opening(cls) -> list[ChoiceT]:
        """The choices of the event before the first piece, if any."""
        return []

    @classmethod
    def piece(cls, text: str | None, finish_reason: FinishReason | None = None) -> ChoiceT:
        """The choice carrying ``text`` (None on the last event, with ``finish_reason``)."""
        raise NotImplementedError


class _Choice(_Response):
    index: int = 0


class CompletionChoice(_Choice):
    text: str
    logprobs: None = None
    finish_reason: FinishReason


class _ChunkChoice(_Choice):
    finish_reason: FinishReason | None
    logprobs: None = None


class AssistantMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(_Choice):
    message: AssistantMessage
    logprobs: None = None
    finish_reason: FinishReason


class CompletionChunkChoice(_ChunkChoice):
    text: str


class ChatDelta(_Response):
    role: Omittable[Literal["assistant"]] = None
    content: Omittable[str] = None


class ChatChunkChoice(_ChunkChoice):
    delta: ChatDelta


class Completion(Reply[CompletionChoice]):
    """``POST /v1/completions``: OpenAI's ``text_completion``."""

    object: Literal["text_completion"] = "text_completion"

    @classmethod
    def choice(cls, completion: engine.Completion) -> CompletionChoice:
        return CompletionChoice(text=completion.text, finish_reason=completion.finish_reason)


class ChatCompletion(Reply[ChatChoice]):
    """``POST /v1/chat/completions``: OpenAI's ``chat.completion``."""

    object: Literal["chat.completion"] = "chat.completion"

    @classmethod
    def choice(cls, completion: engine.Completion) -> ChatChoice:
        message = AssistantMessage(content=completion.text)
        return ChatChoice(message=message, finish_reason=completion.finish_reason)


class CompletionChunk(Chunk[CompletionChunkChoice]):
    """A ``POST /v1/completions`` event: OpenAI's ``text_completion`` chunk."""

    object: Literal["text_completion"] = "text_completion"

    @classmethod
    def piece(
        cls, text: str | None, finish_reason: FinishReason | None = None
    ) -> CompletionChunkChoice:
        return CompletionChunkChoice(text=text or "", finish_reason=finish_reason)


class ChatCompletionChunk(Chunk[ChatChunkChoice]):
    """A ``POST /v1/chat/completions`` event: the first delta is the role, then text."""

    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"

    @classmethod
    def opening(cls) -> list[ChatChunkChoice]:
        return [ChatChunkChoice(delta=ChatDelta(role="assistant"), finish_reason=None)]

    @classmethod
    def piece(cls, text: str | None, finish_reason: FinishReason | None = None) -> ChatChunkChoice:
        return ChatChunkChoice(delta=ChatDelta(content=text), finish_reason=finish_reason)


class StreamErrorDetail(_Response):
    message: str
    type: Literal["server_error"] = "server_error"
    code: None = None


class StreamError(_Response):
    """The event that ends a stream when the engine fails after text was sent."""

    error: StreamErrorDetail


class EnsembleMeta(_Response):
    description: str
    members: list[str]


class MemberMeta(_Response):
    """A member's spec; the loaded copy's figures only while one is loaded."""

    state: SlotState
    description: str
    n_ctx: int
    n_gpu_layers: int
    generation: Omittable[int] = None
    architecture: Omittable[str] = None
    weights_bytes: Omittable[int] = None
    gpu_offload: Omittable[bool] = None


class ModelCard(_Response):
    """The routing entry (``ensemble``) or a member."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(description="Unix seconds the loaded copy loaded at; 0 if none.")
    owned_by: Literal["ensemble-ops"] = "ensemble-ops"
    meta: EnsembleMeta | MemberMeta


class ModelList(_Response):
    """``GET /v1/models``: the routing entry first, then every member."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(_Response):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(_Response):
    """Every error, in OpenAI's shape; a reload's 409 adds the running reload's status."""

    error: ErrorDetail
    status: Omittable[ReloadStatus] = None


class EnsembleHealth(_Response):
    """``GET /health/llm/all``: the ensemble's status (never unknown) and every member's."""

    status: HealthStatus
    healthy_count: NonNegativeInt
    degraded_count: NonNegativeInt
    unhealthy_count: NonNegativeInt = Field(description="Includes members still loading.")
    total_models: NonNegativeInt
    models: dict[str, HealthStatus]
    memory_mb: float
    gpu_available: bool
    gpu_memory_mb: float | None
    checked_at: str


class KubeProbe(_Response):
    """A Kubernetes probe's answer: ``status``, and ``reason`` when it fails."""

    up: ClassVar[str]
    down: ClassVar[str]

    status: str
    reason: Omittable[str] = None

    @classmethod
    def of(cls, ok: bool, reason: str | None) -> Self:
        return cls(status=cls.up) if ok else cls(status=cls.down, reason=reason)


class Readiness(KubeProbe):
    """``GET /health/ready``."""

    up, down = "ready", "not_ready"
    status: Literal["ready", "not_ready"]


class Liveness(KubeProbe):
    """``GET /health/live``."""

    up, down = "alive", "dead"
    status: Literal["alive", "dead"]


class Member(_Response):
    """A member as the admin sees it: files, load and reload."""

    name: str
    state: SlotState
    path: str
    n_ctx: int
    n_gpu_layers: int
    reload_strategy: str
    generation: int | None
    in_flight: NonNegativeInt
    reload: ReloadStatus


class MemberList(_Response):
    """``GET /admin/models``."""

    models: list[Member]


_MODEL_HEALTH = TypeAdapter(ModelHealth)
_RELOAD_STATUS = TypeAdapter(ReloadStatus)


def dump_model_health(health: ModelHealth) -> dict[str, Any]:
    """``health`` as JSON; ``probe`` and ``reload`` (its fields with a default) only when set."""
    # Only the top level: exclude_defaults would also drop a probe's "error": null.
    unset = {
        field.name
        for field in dataclasses.fields(health)
        if field.default is not dataclasses.MISSING and getattr(health, field.name) == field.default
    }
    body: dict[str, Any] = _MODEL_HEALTH.dump_python(health, mode="json", exclude=unset)
    return body


def dump_reload_status(status: ReloadStatus) -> dict[str, Any]:
    """``status`` as JSON, every field."""
    body: dict[str, Any] = _RELOAD_STATUS.dump_python(status, mode="json")
    return body
