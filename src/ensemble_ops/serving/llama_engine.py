"""``LlamaEngine``: a GGUF model served by the continuous-batching scheduler.

The weights and one context of ``parallel`` KV streams (``n_ctx`` tokens each: the
per-request limit users know) are loaded through llama-cpp-python's low-level API; a
vocabulary-only ``Llama`` object tokenizes and renders chat templates. ``submit`` checks what
a sequence carries (the scheduler thread must never meet a batch llama.cpp refuses) and
queues it; the scheduler decodes every running sequence in the same ``llama_decode``.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ensemble_ops.errors import ContextLengthExceededError, EngineError, InvalidRequestError
from ensemble_ops.serving.compute import ComputeArbiter, available_cores
from ensemble_ops.serving.engine import (
    CHAT,
    COMPLETION,
    PLAIN_TRANSCRIPT_STOP,
    ChatMessage,
    ChatPrompt,
    Completion,
    EngineInfo,
    GenerationParams,
    OnText,
    SequenceHandle,
    SequenceSink,
    complete,
    fold_system_messages,
    plain_transcript,
)
from ensemble_ops.serving.generation import SequenceSpec
from ensemble_ops.serving.gguf_check import inspect_gguf
from ensemble_ops.serving.llama_log import route_llama_logs
from ensemble_ops.serving.scheduler import Scheduler

if TYPE_CHECKING:
    from ensemble_ops.config import ModelSpec

__all__ = ["LlamaEngine"]


def _quiet_llama(path: str, **kwargs: Any) -> Any:
    """A ``llama_cpp.Llama`` opened without llama-cpp-python's prints on stderr.

    verbose=False would redirect file descriptors 1 and 2 to /dev/null for the whole process
    while loading (llama-cpp-python #1874), losing every other thread's logs; verbose=True
    keeps them, and its Python-level chatter goes to a buffer instead.
    """
    import llama_cpp

    with contextlib.redirect_stderr(io.StringIO()):
        llm = llama_cpp.Llama(model_path=path, verbose=True, **kwargs)
    llm.verbose = False
    return llm


class LlamaEngine:
    """A GGUF model behind a continuous-batching scheduler."""

    def __init__(
        self,
        name: str,
        vocab: Any,
        model: Any,
        *,
        parallel: int,
        n_ctx: int,
        n_batch: int,
        n_threads: int | None,
        n_gpu_layers: int,
        owns_model: bool,
        chat_template: str | None = None,
        compute: ComputeArbiter | None = None,
    ) -> None:
        """``vocab`` is a ``llama_cpp.Llama`` for tokens and templates; ``model`` the weights
        (a ``llama_model`` pointer), freed on close only when ``owns_model``;
        ``chat_template`` replaces the GGUF's own template (or gives a file without one).
        ``compute`` is the machine's arbiter every member's steps share (default: one of its
        own over the cores this process may use); ``n_threads`` caps this member's grants."""
        import llama_cpp

        self._name = name
        self._vocab = vocab
        self._model = model
        self._owns_model = owns_model
        self._settings = (n_batch, n_threads, n_gpu_layers)  # what a scratch context reuses
        compute = compute or ComputeArbiter(available_cores())
        self._compute = compute
        threads = min(n_threads or compute.threads, compute.threads)  # each step sets its own
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx * parallel
        params.n_batch = n_batch
        params.n_ubatch = n_batch
        params.n_seq_max = parallel
        params.n_threads = threads
        params.n_threads_batch = threads
        # One cache of n_ctx x parallel cells shared by the sequences (each stays within
        # n_ctx: requests over it are refused before they start). Chosen by measurement on
        # demo-base, 2 cores: 945 tokens/s at 8 sequences against 6 with a stream per
        # sequence (kv_unified = false, llama-server's choice), which was slower even alone.
        params.kv_unified = True
        params.no_perf = True
        ctx = llama_cpp.llama_init_from_model(model, params)
        if not ctx:
            raise EngineError(name, "cannot create a llama.cpp context")
        self._ctx = ctx
        model_vocab = llama_cpp.llama_model_get_vocab(model)
        self._n_vocab = int(llama_cpp.llama_vocab_n_tokens(model_vocab))
        bos = int(llama_cpp.llama_vocab_bos(model_vocab))
        self._bos = bos if 0 <= bos < self._n_vocab else None
        # llama.cpp's context defaults to a full-size sliding-window cache (swa_full), whose
        # cells are all kept: prefixes then reuse as in any other model.
        n_swa = 0 if params.swa_full else int(llama_cpp.llama_model_n_swa(model))
        self._scheduler = Scheduler(
            llama_cpp,
            ctx,
            model_vocab,
            name=name,
            parallel=parallel,
            n_batch=n_batch,
            n_ctx=n_ctx,
            n_swa=n_swa,
            compute=compute,
            max_threads=n_threads,
        )
        metadata = {str(k): str(v) for k, v in vocab.metadata.items()}
        self._template = chat_template or metadata.get("tokenizer.chat_template") or None
        self._info = _info(vocab, model, n_ctx, parallel, n_gpu_layers, self._template)
        self._formatter: Any = None
        self._closed = False

    @classmethod
    def load(cls, spec: ModelSpec, compute: ComputeArbiter | None = None) -> LlamaEngine:
        """Check and load ``spec``'s GGUF file (slow: run it in a worker thread); its steps
        take their threads from ``compute``."""
        import llama_cpp

        inspect_gguf(spec.path)
        route_llama_logs()
        try:
            vocab = _quiet_llama(str(spec.path), vocab_only=True)
        except Exception as err:  # llama-cpp-python raises ValueError on a failed load
            raise EngineError(spec.name, f"cannot load {spec.path}: {err}") from err
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = spec.n_gpu_layers
        model = llama_cpp.llama_model_load_from_file(str(spec.path).encode(), params)
        if not model:
            vocab.close()
            raise EngineError(spec.name, f"cannot load {spec.path}")
        try:
            return cls(
                spec.name,
                vocab,
                model,
                parallel=spec.parallel,
                n_ctx=spec.n_ctx,
                n_batch=spec.n_batch,
                n_threads=spec.n_threads,
                n_gpu_layers=spec.n_gpu_layers,
                owns_model=True,
                chat_template=spec.chat_template,
                compute=compute,
            )
        except BaseException:
            vocab.close()
            llama_cpp.llama_model_free(model)
            raise

    @classmethod
    def from_llama(cls, name: str, llm: Any, *, parallel: int = 1) -> LlamaEngine:
        """Serve an already loaded ``llama_cpp.Llama``: its weights get a batching context of
        their own (the caller keeps the ``Llama`` and frees it)."""
        return cls(
            name,
            llm,
            llm.model,
            parallel=parallel,
            n_ctx=llm.n_ctx(),
            n_batch=min(512, llm.n_ctx()),
            n_threads=llm.n_threads,
            n_gpu_layers=int(llm.model_params.n_gpu_layers),
            owns_model=False,
        )

    @property
    def name(self) -> str:
        """The member this engine serves (named in its errors)."""
        return self._name

    @property
    def info(self) -> EngineInfo:
        return self._info

    @property
    def free_slots(self) -> int:
        """Sequences that could start now without waiting."""
        return self._scheduler.free_slots

    @property
    def step_started(self) -> float | None:
        """monotonic() when the running decode step began (None between steps)."""
        return self._scheduler.step_started

    @property
    def kv_usage(self) -> float:
        return self._scheduler.kv_usage

    @property
    def kv_retained(self) -> float:
        """Share of the KV cache idle slots keep for the prompts to come."""
        return self._scheduler.kv_retained

    def expected_wait_s(self, target_s: float) -> float:
        """How long a sequence submitted now with ``target_s`` would wait for a slot."""
        return self._scheduler.expected_wait_s(target_s)

    def drain_batch_sizes(self) -> list[int]:
        """Tokens per decode step since the last call (for llm_batch_size)."""
        sizes = self._scheduler.batch_sizes
        return [sizes.popleft() for _ in range(len(sizes))]

    def tokenize(self, text: str) -> list[int]:
        self._open()
        tokens: list[int] = self._vocab.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        if not tokens and self._bos is not None:
            # An empty prompt (or one of nothing the vocabulary keeps) starts from BOS, as
            # llama-server does; without a BOS token ``submit`` refuses it.
            return [self._bos]
        return tokens

    def detokenize(self, tokens: list[int]) -> str:
        """The text of ``tokens``, control tokens included (what the model is shown)."""
        text: bytes = self._vocab.detokenize(tokens, special=True)
        return text.decode("utf-8", errors="replace")

    def render_chat(self, messages: Sequence[ChatMessage]) -> ChatPrompt:
        """Render ``messages`` with the model's own template, adding nothing of ours.

        A model without a template gets the plain transcript (``plain_transcript``). A
        template that refuses system messages (Gemma's, Mistral's) gets them folded into the
        first user turn; a conversation the template still refuses is the client's to fix.
        """
        self._open()
        template = self._template
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
        llm = self._vocab
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
        """Check the sequence and queue it (see ``Engine.submit``); the scheduler's thread
        feeds ``sink``."""
        return self.submit_many(
            [(tokens, params, sink)], target_s, incremental, caller=caller, weight=weight
        )[0]

    def submit_many(
        self,
        sequences: list[tuple[list[int], GenerationParams, SequenceSink]],
        target_s: float = 0.0,
        incremental: bool = True,
        *,
        caller: str = "",
        weight: float = 1.0,
    ) -> list[SequenceHandle]:
        """Check several sequences, then queue them at once: they start in the same step as
        far as free slots allow. One that fails its check queues none."""
        self._open()
        for tokens, params, _ in sequences:
            self._check(tokens, params)
        specs = [
            (
                SequenceSpec(
                    tokens=tokens,
                    max_tokens=params.max_tokens,
                    temperature=params.temperature,
                    top_p=params.top_p,
                    seed=params.seed,
                    stop=tuple(stop for stop in params.stop if stop),  # "" would stop at once
                    target_s=target_s,
                    incremental=incremental,
                    caller=caller,
                    weight=weight,
                ),
                sink,
            )
            for tokens, params, sink in sequences
        ]
        return list(self._scheduler.submit_many(specs))

    def _open(self) -> None:
        if self._closed:
            raise EngineError(self._name, "the engine is closed")

    def _check(self, tokens: list[int], params: GenerationParams) -> None:
        """Refuse what would make llama.cpp fail a whole step (or abort the process): this
        request's mistakes are its own, never its neighbours' or the member's."""
        if not tokens:
            raise InvalidRequestError(
                f"The prompt is empty and model {self._name!r} has no BOS token to start "
                "from; send some text.",
                param="prompt",
            )
        if params.max_tokens < 1:
            raise InvalidRequestError("max_tokens must be at least 1.", param="max_tokens")
        if not all(0 <= token < self._n_vocab for token in tokens):
            bad = next(t for t in tokens if not 0 <= t < self._n_vocab)
            raise InvalidRequestError(
                f"Token {bad} is outside the vocabulary of model {self._name!r} "
                f"(0 to {self._n_vocab - 1}).",
                param="prompt",
            )
        n_ctx = self._info.n_ctx
        if len(tokens) + params.max_tokens > n_ctx:
            raise ContextLengthExceededError(self._name, len(tokens), params.max_tokens, n_ctx)

    def complete(
        self,
        tokens: list[int],
        params: GenerationParams,
        on_text: OnText | None = None,
        *,
        target_s: float = 0.0,
    ) -> Completion:
        """Generate and wait for the end (blocking; from a worker thread): see
        ``engine.complete``."""
        return complete(self, tokens, params, on_text, target_s=target_s)

    def scratch(self) -> LlamaEngine:
        """A one-sequence context over these weights (see ``Engine.scratch``); closing it
        frees its context only."""
        self._open()
        n_batch, n_threads, n_gpu_layers = self._settings
        return LlamaEngine(
            self._name,
            self._vocab,
            self._model,
            parallel=1,
            n_ctx=self._info.n_ctx,
            n_batch=n_batch,
            n_threads=n_threads,
            n_gpu_layers=n_gpu_layers,
            owns_model=False,
            chat_template=self._template,
            compute=self._compute,
        )

    def close(self) -> None:
        """Stop the scheduler (failing what still runs) and free the context and weights;
        afterwards every call raises ``EngineError`` (llama.cpp would touch freed memory)."""
        import llama_cpp

        if self._closed:
            return
        self._closed = True
        self._scheduler.close()
        llama_cpp.llama_free(self._ctx)
        if self._owns_model:
            llama_cpp.llama_model_free(self._model)
            self._vocab.close()


def _info(
    vocab: Any, model: Any, n_ctx: int, parallel: int, n_gpu_layers: int, template: str | None
) -> EngineInfo:
    """llama.cpp's own sizes (the weights, and the KV cache of every stream), and what the
    copy can do: chat needs a template."""
    import llama_cpp

    n_layer = llama_cpp.llama_model_n_layer(model)
    n_head = max(llama_cpp.llama_model_n_head(model), 1)
    n_head_kv = llama_cpp.llama_model_n_head_kv(model)
    n_embd = llama_cpp.llama_model_n_embd(model)
    # K and V caches in f16 (llama.cpp's default type): 2 bytes per value.
    kv_bytes = 2 * 2 * n_ctx * parallel * n_layer * (n_embd // n_head) * n_head_kv
    metadata = {str(k): str(v) for k, v in vocab.metadata.items()}
    weights = int(llama_cpp.llama_model_size(model))
    offload = bool(llama_cpp.llama_supports_gpu_offload()) and n_gpu_layers != 0
    gpu_layers = n_layer if n_gpu_layers < 0 else min(n_gpu_layers, n_layer)
    return EngineInfo(
        n_ctx=n_ctx,
        weights_bytes=weights,
        context_bytes=kv_bytes,
        architecture=metadata.get("general.architecture", "unknown"),
        gpu_offload=offload,
        gpu_bytes=(weights + kv_bytes) * gpu_layers // max(n_layer, 1) if offload else 0,
        metadata=metadata,
        parallel=parallel,
        capabilities=frozenset({COMPLETION, CHAT}) if template else frozenset({COMPLETION}),
    )
