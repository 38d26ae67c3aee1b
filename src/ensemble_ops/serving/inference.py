"""One inference: the validated request, its result, the work done in the worker thread,
and the stream a streaming answer flows through."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ensemble_ops.config import ModeName
from ensemble_ops.errors import ContextLengthExceededError
from ensemble_ops.events import Copy
from ensemble_ops.serving.engine import ChatMessage, Completion, Engine, GenerationParams, OnText
from ensemble_ops.serving.spans import AttemptSpan

__all__ = [
    "ENSEMBLE",
    "HEAD_START_S",
    "InferenceRequest",
    "InferenceResult",
    "TextStream",
    "generate",
]

ENSEMBLE = "ensemble"
HEAD_START_S: dict[str, float] = {"fast": 2.0, "balanced": 1.0, "creative": 0.0}
"""How far ahead of its arrival a request of each mode is admitted into a member's batch:
a fast request overtakes balanced ones that arrived up to 1 s before it, creative ones up to
2 s, and nothing waits more than 2 s behind later arrivals (no starvation)."""


@dataclass(frozen=True)
class InferenceRequest:
    """A validated request: either a prompt or chat messages, with final parameters."""

    model: str
    mode: ModeName
    params: GenerationParams
    prompt: str | None = None
    messages: tuple[ChatMessage, ...] = ()
    response_id: str = ""
    """The id the answer will carry (``chatcmpl-...``), for traces; empty when none."""
    session: str | None = None
    """Keeps a conversation on one side of a split (the ``user`` field or ``X-Session-ID``)."""
    copy: Copy | None = None
    """Asks for one copy of the member by name (``X-Ensemble-Copy``: blue-green testing)."""

    @property
    def kind(self) -> Literal["completion", "chat"]:
        return "completion" if self.prompt is not None else "chat"


@dataclass(frozen=True)
class InferenceResult:
    member: str
    completion: Completion
    cached: bool


def generate(
    engine: Engine,
    request: InferenceRequest,
    attempt: AttemptSpan,
    on_text: OnText | None = None,
) -> Completion:
    """The work of one request, in the worker thread that holds the instance."""
    attempt.running()
    params = request.params
    if request.prompt is not None:
        tokens = engine.tokenize(request.prompt)
    else:
        chat = engine.render_chat(request.messages)
        tokens = chat.tokens
        params = GenerationParams(
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            seed=params.seed,
            stop=params.stop + tuple(s for s in chat.stop if s not in params.stop),
        )
    n_ctx = engine.info.n_ctx
    if len(tokens) + params.max_tokens > n_ctx:
        raise ContextLengthExceededError(request.model, len(tokens), params.max_tokens, n_ctx)
    started = time.perf_counter()
    completion = engine.complete(
        tokens, params, on_text, head_start_s=HEAD_START_S.get(request.mode, 0.0)
    )
    return dataclasses.replace(completion, engine_s=time.perf_counter() - started)


class TextStream:
    """A streaming completion running on one member.

    ``await first()`` waits for the first piece (or the end), so errors found before any
    text (context too long, engine failure) can still become a proper HTTP error; then
    iterate ``pieces()``; ``result`` holds the completion once it ends. The generation runs
    in a task of the ensemble's task group, which holds the lease until the worker thread has
    really stopped. ``close()`` (idempotent) says the client is gone: the worker's next piece
    fails to send and generation stops within one token.
    """

    def __init__(self, member: str, request: InferenceRequest) -> None:
        self.member = member
        self.request = request
        self.result: Completion | None = None
        self.error: Exception | None = None
        self.produced = 0
        self._first = anyio.Event()
        # Unbounded (max_tokens bounds it): a slow reader never holds the model.
        send, receive = anyio.create_memory_object_stream[str](math.inf)
        self._send: MemoryObjectSendStream[str] = send
        self._receive: MemoryObjectReceiveStream[str] = receive

    async def first(self) -> None:
        """Wait for the first piece or the end; raise the error if it ended with no text."""
        await self._first.wait()
        if self.error is not None and self.produced == 0:
            raise self.error

    async def pieces(self) -> AsyncIterator[str]:
        async with self._receive:
            async for piece in self._receive:
                yield piece
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        """The consumer's side: the client is gone (idempotent)."""
        self._receive.close()

    def deliver(self, piece: str) -> None:
        """The producer's side: one more piece. Raises ``BrokenResourceError`` once the client
        is gone, which is how the generation learns to stop."""
        self._send.send_nowait(piece)
        self.produced += 1
        self._first.set()

    def end(self, result: Completion | None, error: Exception | None) -> None:
        """The producer's side: no more pieces; how the generation ended (both None when the
        client left first)."""
        self.result, self.error = result, error
        self._send.close()
        self._first.set()
