"""The inference engine seam: the ``Engine`` protocol and the records it works with.

Every method is synchronous and may take long: callers run them in worker threads. The
implementation over llama.cpp is ``ensemble_ops.serving.llama_engine.LlamaEngine``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, TypeAlias

__all__ = [
    "ChatMessage",
    "ChatPrompt",
    "Completion",
    "Engine",
    "GenerationParams",
    "OnText",
    "plain_transcript",
]

OnText: TypeAlias = Callable[[str], None]
"""Receives each piece of generated text while streaming; raising from it stops generation."""

FinishReason: TypeAlias = Literal["stop", "length"]


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True)
class ChatPrompt:
    """A chat rendered to tokens by the model's own template, with its stop strings."""

    tokens: list[int]
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class GenerationParams:
    """Sampling parameters after mode presets were applied."""

    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    engine_s: float = 0.0
    """Time the engine spent on it (set by the caller that timed it)."""
    queue_wait_s: float = 0.0
    """Waiting for a free sequence slot of the batching engine."""
    time_to_first_token_s: float | None = None
    decode_s: float = 0.0
    """From the first token to the last."""

    @property
    def time_per_output_token_s(self) -> float | None:
        """Decode time per token after the first (None with fewer than two tokens)."""
        if self.completion_tokens < 2:
            return None
        return self.decode_s / (self.completion_tokens - 1)


@dataclass(frozen=True)
class EngineInfo:
    """Static facts about a loaded model, for /v1/models and health."""

    n_ctx: int
    weights_bytes: int
    context_bytes: int
    architecture: str
    gpu_offload: bool
    gpu_bytes: int = 0
    """The share of weights and context on the GPU (by offloaded layers); 0 on CPU."""
    metadata: dict[str, str] = field(default_factory=dict)
    parallel: int = 1
    """Sequences decoded together (KV streams of n_ctx tokens each)."""


class Engine(Protocol):
    """What the service needs from an inference engine."""

    @property
    def info(self) -> EngineInfo: ...

    def tokenize(self, text: str) -> list[int]:
        """Tokens of a completion prompt, with the model's BOS token where it wants one."""
        ...

    def render_chat(self, messages: Sequence[ChatMessage]) -> ChatPrompt: ...

    @property
    def free_slots(self) -> int:
        """Sequences that could start now without waiting for another to end."""
        ...

    @property
    def step_started(self) -> float | None:
        """monotonic() when the running decode step began; None between steps (watchdog)."""
        ...

    @property
    def kv_usage(self) -> float:
        """Share of the KV cache held by running sequences (0..1)."""
        ...

    def drain_batch_sizes(self) -> list[int]:
        """Tokens decoded per step since the last call (llm_batch_size)."""
        ...

    def complete(
        self,
        tokens: list[int],
        params: GenerationParams,
        on_text: OnText | None = None,
        *,
        head_start_s: float = 0.0,
    ) -> Completion:
        """Generate at most ``params.max_tokens`` tokens after ``tokens``. Called from worker
        threads, many at once; ``head_start_s`` moves the request ahead in the admission
        order (its priority)."""
        ...

    def close(self) -> None: ...


PLAIN_TRANSCRIPT_STOP = ("\nuser:", "\nsystem:")
"""Where a model without a chat template stops: when it starts writing the next turn."""


def plain_transcript(messages: Sequence[ChatMessage]) -> str:
    """The chat format of a model whose GGUF has no template: one ``role: content`` line per
    message, then ``assistant:`` for the model to continue. A base model continues such a
    transcript naturally, and nothing model-specific is assumed."""
    return "".join(f"{m.role}: {m.content}\n" for m in messages) + "assistant:"


def fold_system_messages(messages: Sequence[ChatMessage]) -> list[ChatMessage]:
    """System messages moved into the first user turn, for templates without a system role."""
    system = [m.content for m in messages if m.role == "system"]
    rest = [m for m in messages if m.role != "system"]
    if not system:
        return list(messages)
    for i, message in enumerate(rest):
        if message.role == "user":
            rest[i] = ChatMessage("user", "\n\n".join([*system, message.content]))
            return rest
    return [ChatMessage("user", "\n\n".join(system)), *rest]
