"""The inference engine seam: the ``Engine`` protocol and the records it works with.

An engine takes *sequences*: ``submit`` hands it a prompt's tokens and a ``SequenceSink``,
returns at once, and the engine's own thread feeds the sink (its pieces, then one end). No
caller thread waits on the engine, so a member running many requests costs no thread per
request. ``complete`` is the blocking convenience for code that runs in a worker thread
(warm-ups, tests). The implementation over llama.cpp is
``ensemble_ops.serving.llama_engine.LlamaEngine``.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, TypeAlias

from ensemble_ops.errors import EngineError

__all__ = [
    "BACKGROUND_TARGET_S",
    "CHAT",
    "COMPLETION",
    "PROBE_TARGET_S",
    "ChatMessage",
    "ChatPrompt",
    "Completion",
    "Engine",
    "EngineFailure",
    "EngineInfo",
    "GenerationParams",
    "OnText",
    "SequenceHandle",
    "SequenceSink",
    "complete",
    "plain_transcript",
]

PROBE_TARGET_S = -3600.0
"""A health probe's target: ahead of every request (it takes one token)."""
BACKGROUND_TARGET_S = 60.0
"""Warm-ups and quality runs: behind the requests (whose targets are seconds), never starved."""

OnText: TypeAlias = Callable[[str], None]
"""Receives each piece of generated text while streaming; raising from it stops generation."""

FinishReason: TypeAlias = Literal["stop", "length"]
Capability: TypeAlias = Literal["chat", "completion"]
CHAT: Capability = "chat"
COMPLETION: Capability = "completion"


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
    cached_tokens: int = 0
    """Prompt tokens whose KV cells were reused from an earlier prompt (prefix reuse)."""
    compute_wait_s: float = 0.0
    """Time its steps waited for the machine's cores (held by other members' steps)."""
    first_token_compute_wait_s: float = 0.0
    """The part of that wait before its first token."""

    @property
    def time_per_output_token_s(self) -> float | None:
        """Decode time per token after the first (None with fewer than two tokens)."""
        if self.completion_tokens < 2:
            return None
        return self.decode_s / (self.completion_tokens - 1)


@dataclass(frozen=True)
class EngineFailure:
    """How a sequence ended when the engine failed it (or it was cancelled)."""

    message: str
    cancelled: bool = False


@dataclass(frozen=True)
class EngineInfo:
    """Static facts about a loaded model, for /v1/models, health and routing."""

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
    capabilities: frozenset[Capability] = frozenset({COMPLETION})
    """What the copy can do: ``completion`` always, ``chat`` with a chat template."""

    @property
    def can_chat(self) -> bool:
        return CHAT in self.capabilities


class SequenceSink(Protocol):
    """Where an engine sends one sequence's output, from the engine's own thread."""

    def piece(self, text: str) -> None:
        """More text (only for sequences submitted with ``incremental=True``)."""

    def end(self, outcome: Completion | EngineFailure) -> None:
        """The sequence ended; called exactly once, after every piece."""


class SequenceHandle(Protocol):
    def cancel(self) -> None:
        """Stop the sequence (any thread); its sink then gets a cancelled failure."""


class Engine(Protocol):
    """What the service needs from an inference engine."""

    @property
    def info(self) -> EngineInfo: ...

    def tokenize(self, text: str) -> list[int]:
        """Tokens of a completion prompt, with the model's BOS token where it wants one (an
        empty prompt is the BOS token alone, where the model has one)."""
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

    @property
    def kv_retained(self) -> float:
        """Share of the KV cache kept by idle slots for prompts to come (prefix reuse)."""
        ...

    def expected_wait_s(self, target_s: float) -> float:
        """How long a sequence submitted now with ``target_s`` would wait to start (0 when
        a slot is free or the rate is not known yet)."""
        ...

    def drain_batch_sizes(self) -> list[int]:
        """Tokens decoded per step since the last call (llm_batch_size)."""
        ...

    def submit(
        self,
        tokens: list[int],
        params: GenerationParams,
        sink: SequenceSink,
        *,
        target_s: float = 0.0,
        incremental: bool = True,
        caller: str = "",
        weight: float = 1.0,
    ) -> SequenceHandle:
        """Start generating at most ``params.max_tokens`` tokens after ``tokens``; return at
        once. Raises ``InvalidRequestError`` (a ``ContextLengthExceededError`` among them) for
        what the engine must never be handed: no token, a token outside the vocabulary, more
        than the context holds. ``target_s`` is the sequence's latency target: admission and
        the cores go earliest deadline (arrival + target) first; ``incremental=False`` sends
        no pieces, only the end (whose text is the whole answer). ``caller`` and ``weight``:
        while the slots are full, waiting sequences of different callers take turns, in
        proportion to their weights (within the targets' order)."""
        ...

    def scratch(self) -> Engine:
        """A context of its own over the same weights, one sequence at a time (blocking:
        call it from a worker thread, and close it before this engine): work that must
        neither join the member's batch nor hold its slots, such as scoring a serving copy
        on a golden set. Its steps share the machine's cores like the member's."""
        ...

    def close(self) -> None: ...


class _Collector:
    """A sink that a worker thread waits on (``complete``)."""

    def __init__(self) -> None:
        self.items: queue.SimpleQueue[str | Completion | EngineFailure] = queue.SimpleQueue()

    def piece(self, text: str) -> None:
        self.items.put(text)

    def end(self, outcome: Completion | EngineFailure) -> None:
        self.items.put(outcome)


def complete(
    engine: Engine,
    tokens: list[int],
    params: GenerationParams,
    on_text: OnText | None = None,
    *,
    target_s: float = 0.0,
) -> Completion:
    """Generate and wait for the end (blocks: call it from a worker thread). ``on_text`` gets
    each piece; raising from it cancels the sequence. Raises ``EngineError`` when the engine
    failed the sequence."""
    sink = _Collector()
    handle = engine.submit(tokens, params, sink, target_s=target_s, incremental=on_text is not None)
    try:
        while True:
            item = sink.items.get()
            if isinstance(item, Completion):
                return item
            if isinstance(item, EngineFailure):
                raise EngineError(_name(engine), item.message)
            if on_text is not None:
                on_text(item)
    except BaseException:
        handle.cancel()
        raise


def _name(engine: Engine) -> str:
    """The member name for an engine's errors: its ``name`` attribute, where it has one."""
    return str(getattr(engine, "name", "engine"))


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
