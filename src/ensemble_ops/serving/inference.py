"""One inference: the validated request, its answer as a stream, and how a member turns the
request into the tokens and parameters its engine is given."""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Literal

import anyio

from ensemble_ops.config import ModeName
from ensemble_ops.events import Copy
from ensemble_ops.serving.engine import (
    CHAT,
    COMPLETION,
    Capability,
    ChatMessage,
    Completion,
    Engine,
    GenerationParams,
)

__all__ = [
    "ENSEMBLE",
    "ClientGoneError",
    "InferenceRequest",
    "InferenceResult",
    "Prepared",
    "TextStream",
    "prepare",
]

ENSEMBLE = "ensemble"


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
    caller: str = "anonymous"
    """The caller's key name: metrics and logs name it."""
    weight: float | None = None
    """The caller's share when a member is saturated: waiting requests of different callers
    take turns in proportion (keyed callers and operators); None: no turns (without keys,
    there is one caller)."""

    @property
    def kind(self) -> Literal["completion", "chat"]:
        return "completion" if self.prompt is not None else "chat"

    @property
    def needs(self) -> Capability:
        """What a member must be able to do to answer it well."""
        return COMPLETION if self.prompt is not None else CHAT


@dataclass(frozen=True)
class InferenceResult:
    member: str
    completion: Completion
    cached: bool


@dataclass(frozen=True)
class Prepared:
    """A request in the terms of one member's engine."""

    tokens: list[int]
    params: GenerationParams


def prepare(engine: Engine, request: InferenceRequest) -> Prepared:
    """The tokens and parameters ``engine`` is given for ``request``: the prompt tokenized,
    or the chat rendered with the model's template (whose stop strings join the request's).
    Blocking (tokenizing a long prompt takes a while): run it in a worker thread."""
    if request.prompt is not None:
        return Prepared(engine.tokenize(request.prompt), request.params)
    chat = engine.render_chat(request.messages)
    params = request.params
    extra = tuple(s for s in chat.stop if s not in params.stop)
    return Prepared(chat.tokens, replace(params, stop=params.stop + extra))


class ClientGoneError(Exception):
    """The client stopped waiting for the answer; its generation was cancelled."""


class TextStream:
    """One request's answer as it is produced: pieces of text, then one end.

    Every answer is a stream; a non-streamed one (``incremental=False``) has no pieces, only
    the end, whose completion holds the whole text. ``await first()`` waits for the first
    piece or the end and raises the error of an answer that failed before any text, so it can
    still become a proper HTTP error; ``member`` and ``cached`` are final from then on. Then
    iterate ``pieces()``, or ``await wait()`` for the completion. ``close()`` (idempotent) says
    the client is gone: whatever generates the answer is cancelled through ``when_closed``.
    """

    def __init__(self, request: InferenceRequest, *, incremental: bool) -> None:
        self.request = request
        self.incremental = incremental
        self.member: str | None = None
        self.cached = False
        self.result: Completion | None = None
        self.error: Exception | None = None
        self.produced = 0
        self.closed = False
        self._first = anyio.Event()
        self._ended = anyio.Event()
        self._on_close: list[Callable[[], None]] = []
        # Unbounded (max_tokens bounds it): a slow reader never holds the model.
        self._queue: deque[str] = deque()
        self._more = anyio.Event()

    # -- the consumer's side -----------------------------------------------------------------

    async def first(self) -> None:
        """Wait for the first piece or the end; raise the error if it ended with no text."""
        await self._first.wait()
        if self.error is not None and self.produced == 0:
            raise self.error

    async def pieces(self) -> AsyncIterator[str]:
        """The pieces as they come; raises the error of an answer that failed mid-way."""
        while True:
            while self._queue:
                yield self._queue.popleft()
            if self._ended.is_set() or self.closed:
                break
            await self._more.wait()
            self._more = anyio.Event()
        if self.error is not None:
            raise self.error

    async def wait(self) -> Completion:
        """The completion once the answer has ended; raises its error if it failed."""
        await self._ended.wait()
        if self.error is not None:
            raise self.error
        if self.result is None:
            raise ClientGoneError("the answer was cancelled")
        return self.result

    @property
    def ended(self) -> bool:
        """The answer has ended (a completion, an error, or nothing once the client left)."""
        return self._ended.is_set()

    def close(self) -> None:
        """The client is gone (idempotent): cancel what still generates the answer."""
        if self.closed:
            return
        self.closed = True
        self._queue.clear()
        self._more.set()
        for cancel in self._on_close:
            cancel()

    # -- the producer's side (the request's walk) --------------------------------------------

    def when_closed(self, cancel: Callable[[], None]) -> Callable[[], None]:
        """Call ``cancel`` if the client leaves (at once if it has); returns a function that
        forgets it again."""
        if self.closed:
            cancel()
        self._on_close.append(cancel)
        return lambda: self._on_close.remove(cancel)

    def answering(self, member: str, *, cached: bool) -> None:
        """Who answers, and whether from what was known; set before the first piece."""
        self.member, self.cached = member, cached

    def deliver(self, piece: str) -> None:
        """One more piece (dropped once the client is gone)."""
        if self.closed:
            return
        self._queue.append(piece)
        self.produced += 1
        self._more.set()
        self._first.set()

    def end(self, result: Completion | None, error: Exception | None = None) -> None:
        """No more pieces: the completion, or the error (both None: the client left)."""
        self.result, self.error = result, error
        self._first.set()
        self._ended.set()
        self._more.set()
