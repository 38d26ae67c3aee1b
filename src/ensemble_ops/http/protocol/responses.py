"""What clients get: one model per JSON answer; the core's own records (ModelHealth,
ReloadStatus) serialised as they are, through TypeAdapter.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from typing import Annotated, Any, ClassVar, Generic, Literal, Self, TypeAlias, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    TypeAdapter,
)
from pydantic.json_schema import SkipJsonSchema

from ensemble_ops.health.status import HealthStatus, ModelHealth
from ensemble_ops.reload.status import ReloadStatus
from ensemble_ops.serving import engine
from ensemble_ops.serving.engine import FinishReason
from ensemble_ops.serving.slot import SlotState

__all__ = [
    "AssistantMessage",
    "CacheState",
    "ChatChoice",
    "ChatChunkChoice",
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatDelta",
    "Chunk",
    "Completion",
    "CompletionChoice",
    "CompletionChunk",
    "CompletionChunkChoice",
    "EnsembleHealth",
    "EnsembleMeta",
    "ErrorDetail",
    "ErrorResponse",
    "KubeProbe",
    "LimitsState",
    "Liveness",
    "Member",
    "MemberList",
    "MemberMeta",
    "ModelCard",
    "ModelList",
    "Readiness",
    "Reply",
    "SplitMeta",
    "StreamError",
    "StreamErrorDetail",
    "Usage",
    "dump_model_health",
    "dump_reload_status",
]

T = TypeVar("T")
ChoiceT = TypeVar("ChoiceT", bound=BaseModel)


def no_default(schema: dict[str, Any]) -> None:
    """``json_schema_extra`` for a field whose default (None: left out) is no value."""
    schema.pop("default", None)


def _is_none(value: object) -> bool:
    return value is None


Omittable: TypeAlias = Annotated[
    T | SkipJsonSchema[None], Field(exclude_if=_is_none, json_schema_extra=no_default)
]
"""A response field left out of the JSON when None (declare it ``= None``): optional and
never null in the schema. Every other response field is always sent, null included, and
required in the schema."""


class _Response(BaseModel):
    model_config = ConfigDict(json_schema_serialization_defaults_required=True)


class PromptTokensDetails(_Response):
    """OpenAI's breakdown of the prompt tokens."""

    cached_tokens: NonNegativeInt = Field(
        description="Prompt tokens not evaluated again: their KV cells were reused from an "
        "earlier prompt (prefix reuse), or the whole answer came from the response cache."
    )


class Usage(_Response):
    """Exact token counts of one answer."""

    prompt_tokens: NonNegativeInt
    completion_tokens: NonNegativeInt
    total_tokens: NonNegativeInt
    prompt_tokens_details: PromptTokensDetails

    @classmethod
    def of(cls, completion: engine.Completion, *, cached: bool = False) -> Usage:
        """The usage of ``completion``; ``cached``: it came from the response cache, so no
        prompt token was evaluated for it."""
        reused = completion.prompt_tokens if cached else completion.cached_tokens
        return cls(
            prompt_tokens=completion.prompt_tokens,
            completion_tokens=completion.completion_tokens,
            total_tokens=completion.prompt_tokens + completion.completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=reused),
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
    def of(
        cls, answer_id: str, member: str, completion: engine.Completion, *, cached: bool = False
    ) -> Self:
        """The answer ``answer_id`` of ``member`` with ``completion`` (``cached``: from the
        response cache)."""
        return cls(
            id=answer_id,
            created=int(time.time()),
            model=member,
            choices=[cls.choice(completion)],
            usage=Usage.of(completion, cached=cached),
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


class SplitMeta(_Response):
    """A split (A/B): each session goes to one member, in proportion to the weights."""

    kind: Literal["split"] = "split"
    description: str
    weights: dict[str, float] = Field(description="Member -> its relative share, as configured.")


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
    capabilities: Omittable[list[Literal["chat", "completion"]]] = Field(
        default=None,
        description="What the loaded copy can do: completion always, chat with a chat "
        "template (its GGUF's, or the member's chat_template). Routing to ensemble sends "
        "chats only to members that can chat.",
    )


class ModelCard(_Response):
    """A routing entry (``ensemble`` or a split) or a member."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(description="Unix seconds the loaded copy loaded at; 0 if none.")
    owned_by: Literal["ensemble-ops"] = "ensemble-ops"
    meta: EnsembleMeta | SplitMeta | MemberMeta


class ModelList(_Response):
    """``GET /v1/models``: the routing entries first (``ensemble``, then each split), then
    every member."""

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


class CacheState(_Response):
    """The response cache's backend. A degraded cache fails no request (the engine answers
    instead), so it never changes the ensemble's status or code."""

    backend: Literal["memory", "redis"]
    status: Literal["healthy", "degraded"]
    reason: Omittable[str] = None
    """Why it is degraded."""


class LimitsState(_Response):
    """Where the API keys' limits are counted. Redis down degrades them to counting on each
    replica (a limit then holds per replica); no request fails for it, so it never changes
    the ensemble's status or code."""

    backend: Literal["memory", "redis"]
    status: Literal["healthy", "degraded"]
    reason: Omittable[str] = None
    """Why it is degraded."""


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
    cache: Omittable[CacheState] = None
    """The response cache; absent with the cache off."""
    limits: Omittable[LimitsState] = None
    """The API keys' limits; absent when no key has rpm or tpm."""
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
