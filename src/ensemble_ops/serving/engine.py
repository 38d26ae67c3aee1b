"""The inference engine seam: a Protocol, and ``LlamaEngine`` over llama-cpp-python.

Every method here is synchronous and may take long: callers run them in a worker thread,
one at a time per engine (a llama.cpp context is not thread-safe).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeAlias

from ensemble_ops.errors import EngineError, InvalidRequestError
from ensemble_ops.serving.gguf_check import inspect_gguf
from ensemble_ops.serving.llama_log import route_llama_logs

if TYPE_CHECKING:
    from ensemble_ops.config import ModelSpec

__all__ = [
    "ChatMessage",
    "ChatPrompt",
    "Completion",
    "Engine",
    "GenerationParams",
    "LlamaEngine",
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

    def complete(
        self, tokens: list[int], params: GenerationParams, on_text: OnText | None = None
    ) -> Completion:
        """Generate at most ``params.max_tokens`` tokens after ``tokens``."""
        ...

    def close(self) -> None: ...


class _TokenBudget:
    """llama.cpp stopping criterion that makes ``max_tokens`` a hard limit.

    llama-cpp-python checks ``max_tokens`` after a branch that skips incomplete multi-byte
    characters, so multi-byte output overshoots it (NOTES: 86 tokens for 16). A stopping
    criterion runs before every token, whatever the text. It also counts the tokens of a
    stream, which llama-cpp-python does not report.
    """

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self.prompt_len: int | None = None
        self.generated = 0
        self.exhausted = False

    def __call__(self, input_ids: Any, logits: Any) -> bool:
        if self.prompt_len is None:  # the first call sees exactly the prompt
            self.prompt_len = len(input_ids)
        self.generated = len(input_ids) - self.prompt_len
        self.exhausted = self.exhausted or self.generated >= self.max_tokens
        return self.exhausted


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


class LlamaEngine:
    """A GGUF model loaded by llama-cpp-python."""

    def __init__(self, name: str, llm: Any, info: EngineInfo, chat_template: str | None) -> None:
        self._name = name
        self._llm = llm
        self._info = info
        self._chat_template = chat_template
        self._formatter: Any = None

    @classmethod
    def load(cls, spec: ModelSpec) -> LlamaEngine:
        """Check and load ``spec``'s GGUF file (slow: run it in a worker thread)."""
        import llama_cpp

        inspect_gguf(spec.path)
        route_llama_logs()
        # verbose=False would redirect file descriptors 1 and 2 to /dev/null for the whole
        # process while loading (llama-cpp-python #1874), losing every other thread's logs.
        # verbose=True keeps them; its Python-level chatter goes to a buffer instead.
        with contextlib.redirect_stderr(io.StringIO()):
            try:
                llm = llama_cpp.Llama(
                    model_path=str(spec.path),
                    n_ctx=spec.n_ctx,
                    n_gpu_layers=spec.n_gpu_layers,
                    n_threads=spec.n_threads,
                    n_threads_batch=spec.n_threads,
                    n_batch=min(spec.n_batch, spec.n_ctx),
                    verbose=True,
                )
            except Exception as err:  # llama-cpp-python raises ValueError on a failed load
                raise EngineError(spec.name, f"cannot load {spec.path}: {err}") from err
        llm.verbose = False  # no per-request prints on stderr from here on
        return cls.from_llama(spec.name, llm)

    @classmethod
    def from_llama(cls, name: str, llm: Any) -> LlamaEngine:
        """Wrap an already loaded ``llama_cpp.Llama``."""
        import llama_cpp

        model = llm.model
        n_layer = llama_cpp.llama_model_n_layer(model)
        n_head = max(llama_cpp.llama_model_n_head(model), 1)
        n_head_kv = llama_cpp.llama_model_n_head_kv(model)
        n_embd = llama_cpp.llama_model_n_embd(model)
        # K and V caches in f16 (llama.cpp's default type): 2 bytes per value.
        kv_bytes = 2 * 2 * llm.n_ctx() * n_layer * (n_embd // n_head) * n_head_kv
        metadata = {str(k): str(v) for k, v in llm.metadata.items()}
        weights = int(llama_cpp.llama_model_size(model))
        n_gpu_layers = int(llm.model_params.n_gpu_layers)
        offload = bool(llama_cpp.llama_supports_gpu_offload()) and n_gpu_layers != 0
        on_gpu = n_layer if n_gpu_layers < 0 else min(n_gpu_layers, n_layer)
        info = EngineInfo(
            n_ctx=llm.n_ctx(),
            weights_bytes=weights,
            context_bytes=kv_bytes,
            architecture=metadata.get("general.architecture", "unknown"),
            gpu_offload=offload,
            gpu_bytes=(weights + kv_bytes) * on_gpu // max(n_layer, 1) if offload else 0,
            metadata=metadata,
        )
        return cls(name, llm, info, metadata.get("tokenizer.chat_template"))

    @property
    def info(self) -> EngineInfo:
        return self._info

    def tokenize(self, text: str) -> list[int]:
        tokens: list[int] = self._llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        return tokens

    def detokenize(self, tokens: list[int]) -> str:
        """The text of ``tokens``, control tokens included (what the model is shown)."""
        text: bytes = self._llm.detokenize(tokens, special=True)
        return text.decode("utf-8", errors="replace")

    def render_chat(self, messages: Sequence[ChatMessage]) -> ChatPrompt:
        """Render ``messages`` with the model's own template, adding nothing of ours.

        A model without a template gets the plain transcript (``plain_transcript``). A
        template that refuses system messages (Gemma's, Mistral's) gets them folded into the
        first user turn; a conversation the template still refuses is the client's to fix.
        """
        template = self._chat_template
        if template is None:
            return ChatPrompt(self.tokenize(plain_transcript(messages)), PLAIN_TRANSCRIPT_STOP)
        try:
            return self._render_template(template, messages)
        except Exception as err:  # jinja2's errors, or the template's own raise_exception
            folded = fold_system_messages(messages)
            if folded != list(messages):
                with contextlib.suppress(Exception):
                    return self._render_template(template, folded)
            raise InvalidRequestError(
                f"The chat template of model {self._name!r} refuses these messages: {err}",
                param="messages",
            ) from err

    def _render_template(self, template: str, messages: Sequence[ChatMessage]) -> ChatPrompt:
        llm = self._llm
        if self._formatter is None:  # compiled once: Jinja parsing costs more than rendering
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            self._formatter = Jinja2ChatFormatter(
                template=template,
                eos_token=llm.detokenize([llm.token_eos()]).decode("utf-8", errors="ignore"),
                bos_token=llm.detokenize([llm.token_bos()]).decode("utf-8", errors="ignore"),
            )
        rendered = self._formatter(
            messages=[{"role": m.role, "content": m.content} for m in messages]
        )
        tokens: list[int] = llm.tokenize(
            rendered.prompt.encode("utf-8"), add_bos=not rendered.added_special, special=True
        )
        stop = rendered.stop
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        # A control token's text can be empty, and "" would match before any output.
        return ChatPrompt(tokens, tuple(s for s in stops if s))

    def complete(
        self, tokens: list[int], params: GenerationParams, on_text: OnText | None = None
    ) -> Completion:
        import llama_cpp

        budget = _TokenBudget(params.max_tokens)
        kwargs: dict[str, Any] = {
            # The library stops at max_tokens without decoding the last token; the budget
            # only steps in when the library's check is skipped (multi-byte output).
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "seed": params.seed,
            "stop": list(params.stop),
            "stopping_criteria": llama_cpp.StoppingCriteriaList([budget]),
        }
        if on_text is not None:
            return self._stream(tokens, kwargs, budget, on_text)
        try:
            result = self._llm.create_completion(tokens, **kwargs)
        except Exception as err:
            raise EngineError(self._name, str(err)) from err
        choice = result["choices"][0]
        return Completion(
            text=choice["text"],
            finish_reason="length" if budget.exhausted else _finish(choice),
            prompt_tokens=result["usage"]["prompt_tokens"],
            completion_tokens=result["usage"]["completion_tokens"],
        )

    def _stream(
        self, tokens: list[int], kwargs: dict[str, Any], budget: _TokenBudget, on_text: OnText
    ) -> Completion:
        pieces: list[str] = []
        finish: FinishReason = "length"
        chunks = self._llm.create_completion(tokens, stream=True, **kwargs)
        # closing() ends llama-cpp-python's generator, and frees the context for the next
        # request, also when on_text raises because the client went away.
        with contextlib.closing(chunks):
            while True:
                try:
                    chunk = next(chunks)
                except StopIteration:
                    break
                except Exception as err:
                    raise EngineError(self._name, str(err)) from err
                choice = chunk["choices"][0]
                if choice["text"]:
                    pieces.append(choice["text"])
                    on_text(choice["text"])  # its exceptions propagate as they are
                if choice.get("finish_reason"):
                    finish = _finish(choice)
        # The budget saw every token that was evaluated; llama-cpp-python also emits the last
        # sampled one when its own length check (near n_ctx) ends generation.
        generated = budget.generated
        if budget.exhausted:
            finish = "length"
        elif finish == "length":
            generated += 1
        return Completion("".join(pieces), finish, len(tokens), generated)

    def close(self) -> None:
        self._llm.close()


def _finish(choice: dict[str, Any]) -> FinishReason:
    return "stop" if choice.get("finish_reason") == "stop" else "length"
