"""The ensemble: members by name, request routing, fallback, the response cache.

A request names a member, or ``ensemble``: then the mode's preference order picks the first
member that can serve, and the next one answers when that one is overloaded or fails.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Literal

import anyio
import anyio.abc
import anyio.from_thread
import anyio.to_thread
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from opentelemetry.trace import NoOpTracer, Tracer

from ensemble_ops.config import ModelSpec, ModeName, Settings
from ensemble_ops.errors import (
    ContextLengthExceededError,
    EngineError,
    ModelNotFoundError,
    ModelUnavailableError,
    NoMemberAvailableError,
    OverloadedError,
    error_code,
)
from ensemble_ops.events import (
    CacheLookedUp,
    EventBus,
    InferenceFailed,
    InferenceFinished,
    ModelLoadFailed,
    ModelUnloaded,
)
from ensemble_ops.serving.cache import ResponseCache, is_deterministic
from ensemble_ops.serving.engine import ChatMessage, Completion, Engine, GenerationParams, OnText
from ensemble_ops.serving.slot import Lease, Loaded, ModelSlot, loaded_event
from ensemble_ops.serving.spans import AttemptSpan
from ensemble_ops.tasks import TaskRunner

__all__ = ["EngineLoader", "Ensemble", "InferenceRequest", "InferenceResult", "TextStream"]

ENSEMBLE = "ensemble"
EngineLoader = Callable[[ModelSpec], Engine]
"""Loads a member's engine from its ModelSpec (blocking; run in a worker thread)."""


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

    @property
    def kind(self) -> Literal["completion", "chat"]:
        return "completion" if self.prompt is not None else "chat"


@dataclass(frozen=True)
class InferenceResult:
    member: str
    completion: Completion
    cached: bool


def _generate(
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
    completion = engine.complete(tokens, params, on_text)
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


class Ensemble:
    """Members by name; loads them, routes requests and publishes what happens."""

    def __init__(
        self,
        settings: Settings,
        bus: EventBus,
        loader: EngineLoader,
        runner: TaskRunner,
        *,
        can_serve: Callable[[str], bool] = lambda name: True,
        tracer: Tracer | None = None,
    ) -> None:
        """``runner`` runs streaming generations; ``can_serve`` tells routing whether a member
        is fit to serve (the health view's verdict), so unfit ones are tried last; ``tracer``
        makes a span of each attempt (a no-op one when tracing is off)."""
        self._tracer = tracer or NoOpTracer()
        self.settings = settings
        self.bus = bus
        self._loader = loader
        self._runner = runner
        self._can_serve = can_serve
        self.slots = {spec.name: ModelSlot(spec) for spec in settings.models}
        self.cache = (
            ResponseCache(settings.cache.max_entries, settings.cache.ttl_s)
            if settings.cache.enabled
            else None
        )
        self.loading_done = anyio.Event()
        self._closing = False
        # Loads are memory-heavy: few at a time, shared with reloads.
        self.load_limiter = anyio.CapacityLimiter(settings.reload.max_concurrent_loads)

    # -- lifecycle -------------------------------------------------------------------------

    async def load_all(self) -> None:
        """Load every member (one at a time); a member that fails is marked, not fatal."""
        try:
            for slot in self.slots.values():
                await self.load(slot)
        finally:
            self.loading_done.set()

    async def load(self, slot: ModelSlot) -> Loaded | None:
        started = time.perf_counter()
        try:
            engine = await anyio.to_thread.run_sync(
                self._loader, slot.spec, limiter=self.load_limiter
            )
        except Exception as err:
            slot.mark_failed(str(err))
            self.bus.publish(ModelLoadFailed(slot.name, str(err)))
            return None
        if self._closing:  # shut down while this member was loading
            await anyio.to_thread.run_sync(engine.close)
            return None
        loaded = slot.install(engine)
        self.bus.publish(loaded_event(loaded, time.perf_counter() - started))
        return loaded

    async def close(self, drain_timeout_s: float) -> None:
        """Stop every member: wait for in-flight work (bounded), then free the models."""
        self._closing = True
        for slot in self.slots.values():
            old = slot.unload("stopped")
            if old is None:
                continue
            await old.wait_idle(drain_timeout_s)
            await old.close()
            self.bus.publish(ModelUnloaded(slot.name, old.generation))

    # -- routing -----------------------------------------------------------------------------

    def candidates(self, model: str, mode: ModeName) -> list[ModelSlot]:
        """Members to try in order: the named one, or the mode's preference for ``ensemble``."""
        if model != ENSEMBLE:
            slot = self.slots.get(model)
            if slot is None:
                raise ModelNotFoundError(model, list(self.slots))
            return [slot]
        preferred = self.settings.modes[mode].prefer
        order = [*preferred, *(name for name in self.slots if name not in preferred)]
        # Unhealthy members go last, not away: when all are unhealthy one must still be
        # tried, and a success is how a member recovers.
        order.sort(key=lambda name: not self._can_serve(name))
        return [self.slots[name] for name in order]

    def instances(self) -> list[Loaded]:
        """Every loaded instance (for the watchdog)."""
        return [slot.active for slot in self.slots.values() if slot.active is not None]

    def _acquire_first(self, request: InferenceRequest) -> tuple[ModelSlot, Lease]:
        """Lease the first candidate that is loaded and not overloaded."""
        slots = self.candidates(request.model, request.mode)
        if len(slots) == 1:
            return slots[0], slots[0].acquire()
        reasons: dict[str, str] = {}
        for slot in slots:
            try:
                return slot, slot.acquire()
            except (ModelUnavailableError, OverloadedError) as err:
                reasons[slot.name] = _short(err)
        raise NoMemberAvailableError(reasons)

    # -- inference ---------------------------------------------------------------------------

    async def complete(self, request: InferenceRequest) -> InferenceResult:
        """Answer ``request``, falling back to the next member for ``model: ensemble``."""
        slots = self.candidates(request.model, request.mode)
        if len(slots) == 1:
            return await self._complete_on(slots[0], request, fallback=False)
        started = time.perf_counter()
        reasons: dict[str, str] = {}
        for slot in slots:
            try:
                return await self._complete_on(slot, request, fallback=True)
            except _FALLBACK_ERRORS as err:
                reasons[slot.name] = _short(err)
        failure = NoMemberAvailableError(reasons)
        self._failed(ENSEMBLE, request, failure, started, final=True)
        raise failure

    def _cache_key(self, slot: ModelSlot, loaded: Loaded, request: InferenceRequest) -> object:
        prompt = request.prompt if request.prompt is not None else request.messages
        return ResponseCache.key(slot.name, loaded.generation, prompt, request.params)

    def _attempt(self, request: InferenceRequest, member: str, *, stream: bool) -> AttemptSpan:
        return AttemptSpan.open(
            self._tracer,
            request,
            member,
            stream=stream,
            capture_content=self.settings.tracing.capture_content,
        )

    async def _complete_on(
        self, slot: ModelSlot, request: InferenceRequest, *, fallback: bool
    ) -> InferenceResult:
        with self._attempt(request, slot.name, stream=False).current() as attempt:
            return await self._attempt_on(slot, request, attempt, fallback=fallback)

    async def _attempt_on(
        self, slot: ModelSlot, request: InferenceRequest, attempt: AttemptSpan, *, fallback: bool
    ) -> InferenceResult:
        started = time.perf_counter()
        cache = self.cache if is_deterministic(request.params) else None
        active = slot.active
        if cache is not None and active is not None:
            hit = cache.get(self._cache_key(slot, active, request))
            self.bus.publish(CacheLookedUp(slot.name, hit is not None))
            attempt.cache(hit is not None)
            if hit is not None:
                attempt.done(hit)
                self._finished(slot.name, request, hit, started, cached=True, stream=False)
                return InferenceResult(slot.name, hit, cached=True)
        try:
            async with slot.lease() as loaded:
                completion = await loaded.run(_generate, loaded.engine, request, attempt)
        except Exception as err:
            attempt.fail(err)
            # A failure another member will retry does not end the request.
            final = not (fallback and isinstance(err, _FALLBACK_ERRORS))
            self._failed(slot.name, request, err, started, final=final)
            raise
        attempt.done(completion)
        if cache is not None:
            cache.put(self._cache_key(slot, loaded, request), completion)
        self._finished(slot.name, request, completion, started, cached=False, stream=False)
        return InferenceResult(slot.name, completion, cached=False)

    def start_stream(self, request: InferenceRequest) -> TextStream:
        """Start a streaming generation on the first member that can take it.

        Raises before anything is sent when no member can (so the client gets a 4xx/503).
        Streams are not cached and do not fall back once started.
        """
        try:
            slot, lease = self._acquire_first(request)
        except (ModelUnavailableError, OverloadedError, NoMemberAvailableError) as err:
            self._failed(request.model, request, err, time.perf_counter(), final=True)
            raise
        stream = TextStream(slot.name, request)
        attempt = self._attempt(request, slot.name, stream=True)
        self._runner.spawn(self._run_stream, slot, lease, stream, attempt)
        return stream

    async def _run_stream(
        self, slot: ModelSlot, lease: Lease, stream: TextStream, attempt: AttemptSpan
    ) -> None:
        with attempt.current():
            await self._stream_on(slot, lease, stream, attempt)

    async def _stream_on(
        self, slot: ModelSlot, lease: Lease, stream: TextStream, attempt: AttemptSpan
    ) -> None:
        started = time.perf_counter()
        first_piece: list[float] = []
        request = stream.request

        def on_text(piece: str) -> None:  # in the worker thread
            if not first_piece:
                first_piece.append(time.perf_counter() - started)
                attempt.first_token()
            anyio.from_thread.run_sync(stream.deliver, piece)

        result: Completion | None = None
        error: Exception | None = None
        try:
            loaded = lease.loaded
            result = await loaded.run(_generate, loaded.engine, request, attempt, on_text)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            self.bus.publish(
                InferenceFinished(
                    slot.name,
                    request.mode,
                    time.perf_counter() - started,
                    0,
                    stream.produced,
                    cached=False,
                    stream=True,
                    outcome="cancelled",
                )
            )
        except Exception as err:
            error = err
            attempt.fail(err)
            self._failed(slot.name, request, err, started)
        else:
            attempt.done(result)
            ttft = first_piece[0] if first_piece else None
            self._finished(
                slot.name, request, result, started, cached=False, stream=True, ttft=ttft
            )
        finally:
            lease.release()
            stream.end(result, error)

    # -- events ------------------------------------------------------------------------------

    def _finished(
        self,
        member: str,
        request: InferenceRequest,
        completion: Completion,
        started: float,
        *,
        cached: bool,
        stream: bool,
        ttft: float | None = None,
    ) -> None:
        self.bus.publish(
            InferenceFinished(
                member,
                request.mode,
                time.perf_counter() - started,
                completion.prompt_tokens,
                completion.completion_tokens,
                cached=cached,
                stream=stream,
                time_to_first_token_s=ttft,
                engine_s=0.0 if cached else completion.engine_s,
            )
        )

    def _failed(
        self,
        member: str,
        request: InferenceRequest,
        err: Exception,
        started: float,
        *,
        final: bool = True,
    ) -> None:
        self.bus.publish(
            InferenceFailed(
                member,
                request.mode,
                error_code(err),
                str(err),
                time.perf_counter() - started,
                final=final,
            )
        )


_FALLBACK_ERRORS = (ModelUnavailableError, OverloadedError, EngineError)


def _short(err: Exception) -> str:
    if isinstance(err, ModelUnavailableError):
        return err.reason
    if isinstance(err, OverloadedError):
        return "overloaded"
    return str(err)
