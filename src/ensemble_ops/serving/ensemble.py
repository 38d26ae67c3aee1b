"""The ensemble: members by name, request routing, fallback, the response cache.

A request names a member, or ``ensemble``: then the mode's preference order picks the first
member that can serve, and the next one answers when that one is overloaded or fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable, Iterator

import anyio
import anyio.abc
import anyio.from_thread
import anyio.to_thread
from opentelemetry.trace import NoOpTracer, Tracer

from ensemble_ops.config import ModelSpec, ModeName, Settings
from ensemble_ops.errors import (
    EngineError,
    ModelNotFoundError,
    ModelUnavailableError,
    NoMemberAvailableError,
    OverloadedError,
    error_code,
)
from ensemble_ops.events import (
    CacheLookedUp,
    Copy,
    EventBus,
    InferenceFailed,
    InferenceFinished,
    ModelLoadFailed,
    ModelUnloaded,
    ShadowFinished,
)
from ensemble_ops.serving.cache import (
    CacheHealth,
    DigestStore,
    ResponseCache,
    cache_key,
    default_digest_file,
    is_deterministic,
    model_identity,
    open_cache,
)
from ensemble_ops.serving.engine import Completion, Engine
from ensemble_ops.serving.inference import (
    ENSEMBLE,
    InferenceRequest,
    InferenceResult,
    TextStream,
    generate,
)
from ensemble_ops.serving.slot import Lease, Loaded, ModelSlot, loaded_event
from ensemble_ops.serving.spans import AttemptSpan
from ensemble_ops.serving.sticky import bucket
from ensemble_ops.tasks import TaskRunner

__all__ = [
    "ENSEMBLE",
    "EngineLoader",
    "Ensemble",
    "InferenceRequest",
    "InferenceResult",
    "TextStream",
]

EngineLoader = Callable[[ModelSpec], Engine]
"""Loads a member's engine from its ModelSpec (blocking; run in a worker thread)."""


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
        self.cache: ResponseCache | None = open_cache(settings.cache, bus)
        self._digests = DigestStore(settings.cache.digest_file or default_digest_file())
        self.loading_done = anyio.Event()
        self._closing = False
        self._inflight: dict[str, asyncio.Future[Completion | None]] = {}
        """Generations of deterministic requests in flight, by cache key (single flight)."""
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

    def identify(self, spec: ModelSpec) -> str | None:
        """What a copy loaded from ``spec`` is cached under; None with the cache off (then
        the file is not hashed). Blocking: run it in a worker thread."""
        if self.cache is None:
            return None
        return model_identity(spec, self._digests.digest(spec.path))

    async def cache_health(self) -> CacheHealth | None:
        """The response cache's backend state; None with the cache off."""
        return await self.cache.health() if self.cache is not None else None

    async def load(self, slot: ModelSlot) -> Loaded | None:
        started = time.perf_counter()

        def load_and_identify() -> tuple[Engine, str | None]:
            try:
                identity = self.identify(slot.spec)  # before loading: the bytes that load
            except OSError:
                identity = None  # unreadable: the loader says why in its own words
            return self._loader(slot.spec), identity

        try:
            engine, identity = await anyio.to_thread.run_sync(
                load_and_identify, limiter=self.load_limiter
            )
        except Exception as err:
            slot.mark_failed(str(err))
            self.bus.publish(ModelLoadFailed(slot.name, str(err)))
            return None
        if self._closing:  # shut down while this member was loading
            await anyio.to_thread.run_sync(engine.close)
            return None
        loaded = slot.install(engine, identity)
        self.bus.publish(loaded_event(loaded, time.perf_counter() - started))
        return loaded

    async def close(self, drain_timeout_s: float) -> None:
        """Stop every member: wait for in-flight work (bounded), then free the models."""
        self._closing = True
        for slot in self.slots.values():
            candidate = slot.withdraw()  # a rollout's new copy: the old one is the member
            if candidate is not None:
                await candidate.wait_idle(drain_timeout_s)
                await candidate.close()
            old = slot.unload("stopped")
            if old is None:
                continue
            await old.wait_idle(drain_timeout_s)
            await old.close()
            self.bus.publish(ModelUnloaded(slot.name, old.generation))
        if self.cache is not None:
            await self.cache.aclose()

    # -- routing -----------------------------------------------------------------------------

    def candidates(self, model: str, mode: ModeName, session: str | None = None) -> list[ModelSlot]:
        """Members to try in order: the named one; for a split, the member its weights give
        ``session`` (fixed per key, random without one), then the others by weight; for
        ``ensemble``, the mode's preference."""
        split = self.settings.splits.get(model)
        if split is not None:
            order = _split_order(split.weights, bucket(session))
        elif model != ENSEMBLE:
            slot = self.slots.get(model)
            if slot is None:
                raise ModelNotFoundError(model, [*self.slots, *self.settings.splits])
            return [slot]
        else:
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
        slots = self.candidates(request.model, request.mode, request.session)
        if len(slots) == 1:
            return slots[0], self._acquire_copy(slots[0], request)
        reasons: dict[str, str] = {}
        for slot in slots:
            try:
                return slot, self._acquire_copy(slot, request)
            except (ModelUnavailableError, OverloadedError) as err:
                reasons[slot.name] = _short(err)
        raise NoMemberAvailableError(reasons)

    @staticmethod
    def _acquire_copy(slot: ModelSlot, request: InferenceRequest) -> Lease:
        """Lease the copy the request goes to; a rollout's new copy that is full or gone
        leaves it to the old one, unless the request asked for the new one."""
        copy = slot.choose(request.session, request.copy)
        try:
            return slot.acquire(copy)
        except (ModelUnavailableError, OverloadedError):
            if copy != "candidate" or request.copy is not None:
                raise
            return slot.acquire("stable")

    # -- inference ---------------------------------------------------------------------------

    async def complete(self, request: InferenceRequest) -> InferenceResult:
        """Answer ``request``, falling back to the next member for ``model: ensemble``."""
        slots = self.candidates(request.model, request.mode, request.session)
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

    @staticmethod
    def _cache_key(loaded: Loaded, request: InferenceRequest) -> str | None:
        """The key of ``request`` answered by ``loaded``; None when it is not cacheable."""
        if loaded.identity is None or not is_deterministic(request.params):
            return None
        return cache_key(loaded.identity, request.prompt, request.messages, request.params)

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
        copy = slot.choose(request.session, request.copy)
        retry = copy == "candidate" and request.copy is None
        try:
            result = await self._attempt_copy(
                slot, request, attempt, copy, fallback=fallback or retry
            )
        except _FALLBACK_ERRORS:
            if not retry:
                raise
            # The new copy failed this request: the old one answers it, the gates count it.
            result = await self._attempt_copy(slot, request, attempt, "stable", fallback=fallback)
        self._mirror(slot, request)
        return result

    async def _attempt_copy(
        self,
        slot: ModelSlot,
        request: InferenceRequest,
        attempt: AttemptSpan,
        copy: Copy,
        *,
        fallback: bool,
    ) -> InferenceResult:
        started = time.perf_counter()
        keyed = slot.serving(copy)
        key = self._deterministic_key(keyed, request)
        leader = self._inflight.get(key) if key is not None else None
        if leader is not None:  # an identical request runs here: share its answer
            hit = await asyncio.shield(leader)  # None when it failed: try ourselves
            self._looked_up(slot, attempt, hit, "coalesced")
            if hit is not None:
                return self._answered_from_cache(slot, request, hit, started, attempt, copy)
        with self._leading(key) as leading:
            claimed = False
            if key is not None and self.cache is not None:
                hit, claimed = await self._shared_lookup(slot, key, attempt)
                if hit is not None:
                    leading.set_result(hit)
                    return self._answered_from_cache(slot, request, hit, started, attempt, copy)
            completion: Completion | None = None
            try:
                async with slot.lease(copy) as lease:
                    loaded = lease.loaded
                    completion = await loaded.run(generate, loaded.engine, request, attempt)
            except Exception as err:
                attempt.fail(err)
                # A failure another member will retry does not end the request.
                final = not (fallback and isinstance(err, _FALLBACK_ERRORS))
                self._failed(slot.name, request, err, started, final=final, copy=copy)
                raise
            finally:
                if key is not None:
                    # Under the key of the copy that answered (a reload may have changed it
                    # meanwhile); bounded by the backend's timeout, and done even when the
                    # request is cancelled, so waiting replicas are never left to time out.
                    stored = None
                    if completion is not None:
                        stored = key if loaded is keyed else self._cache_key(loaded, request)
                    with anyio.CancelScope(shield=True):
                        await self._store(stored, completion, key if claimed else None)
            leading.set_result(completion)
        attempt.done(completion)
        self._finished(
            slot.name, request, completion, started, cached=False, stream=False, copy=copy
        )
        return InferenceResult(slot.name, completion, cached=False)

    def _answered_from_cache(
        self,
        slot: ModelSlot,
        request: InferenceRequest,
        hit: Completion,
        started: float,
        attempt: AttemptSpan,
        copy: Copy,
    ) -> InferenceResult:
        attempt.done(hit)
        self._finished(slot.name, request, hit, started, cached=True, stream=False, copy=copy)
        return InferenceResult(slot.name, hit, cached=True)

    def _deterministic_key(self, loaded: Loaded | None, request: InferenceRequest) -> str | None:
        """The cache and single-flight key of a deterministic request on ``loaded``, else
        None."""
        if self.cache is None or loaded is None:
            return None
        return self._cache_key(loaded, request)

    # -- shadow traffic ----------------------------------------------------------------------

    def _mirror(self, slot: ModelSlot, request: InferenceRequest) -> None:
        """Mirror an answered request to a shadow rollout's new copy, in the background: the
        user's answer never waits for it, and a busy new copy just misses the mirror."""
        if slot.shadow_percent <= 0 or random.random() * 100 >= slot.shadow_percent:
            return
        try:
            lease = slot.acquire("candidate")
        except (ModelUnavailableError, OverloadedError):
            return
        self._runner.spawn(self._run_mirror, slot, request, lease)

    async def _run_mirror(self, slot: ModelSlot, request: InferenceRequest, lease: Lease) -> None:
        """The mirrored generation: not cached, not traced, counted only by the rollout."""
        started = time.perf_counter()
        attempt = AttemptSpan.open(NoOpTracer(), request, slot.name, stream=False)
        try:
            loaded = lease.loaded
            completion = await loaded.run(generate, loaded.engine, request, attempt)
        except Exception as err:
            self.bus.publish(
                ShadowFinished(
                    slot.name, time.perf_counter() - started, None, 0, True, error_code(err)
                )
            )
        else:
            self.bus.publish(
                ShadowFinished(
                    slot.name,
                    time.perf_counter() - started,
                    completion.time_to_first_token_s,
                    completion.completion_tokens,
                    completion.completion_tokens == 0,
                )
            )
        finally:
            lease.release()

    async def _shared_lookup(
        self, slot: ModelSlot, key: str, attempt: AttemptSpan
    ) -> tuple[Completion | None, bool]:
        """(answer, claimed): the cached answer, or another replica's that it was generating
        (single flight across replicas); with no answer, whether this process claimed the
        key (and must free it)."""
        assert self.cache is not None
        hit = await self.cache.get(key)
        claimed = False
        how = "hit"
        if hit is None:
            # Shielded (and bounded by the backend's timeout): a claim taken must be
            # remembered, or it would hold other replicas until it expires.
            with anyio.CancelScope(shield=True):
                claimed = await self.cache.claim(key)
            if not claimed:
                hit = await self.cache.wait_for(key)
                how = "coalesced"
        self._looked_up(slot, attempt, hit, how)
        return hit, claimed

    def _looked_up(
        self, slot: ModelSlot, attempt: AttemptSpan, hit: Completion | None, how: str
    ) -> None:
        self.bus.publish(CacheLookedUp(slot.name, hit is not None))
        attempt.cache(how if hit is not None else "miss")

    async def _store(
        self, key: str | None, completion: Completion | None, claimed: str | None
    ) -> None:
        """Cache an answer, then free the claim on its key (waiting replicas then read it)."""
        assert self.cache is not None
        if key is not None and completion is not None:
            await self.cache.put(key, completion)
        if claimed is not None:
            await self.cache.release(claimed)

    @contextlib.contextmanager
    def _leading(self, key: str | None) -> Iterator[asyncio.Future[Completion | None]]:
        """Register a generation identical requests may wait for; it always resolves (None
        when it failed or was cancelled), so no follower hangs."""
        future: asyncio.Future[Completion | None] = asyncio.get_running_loop().create_future()
        if key is not None:
            self._inflight[key] = future
        try:
            yield future
        finally:
            if key is not None and self._inflight.get(key) is future:
                del self._inflight[key]
            if not future.done():
                future.set_result(None)

    def start_stream(self, request: InferenceRequest) -> TextStream:
        """Start a streaming generation on the first member that can take it.

        Raises before anything is sent when no member can (so the client gets a 4xx/503).
        A deterministic stream identical to a request in flight is answered from that one's
        generation (single flight). Streams do not fall back once started.
        """
        follower = self._follow(request)
        if follower is not None:
            return follower
        try:
            slot, lease = self._acquire_first(request)
        except (ModelUnavailableError, OverloadedError, NoMemberAvailableError) as err:
            self._failed(request.model, request, err, time.perf_counter(), final=True)
            raise
        stream = TextStream(slot.name, request)
        attempt = self._attempt(request, slot.name, stream=True)
        self._runner.spawn(self._run_stream, slot, lease, stream, attempt)
        return stream

    def _follow(self, request: InferenceRequest) -> TextStream | None:
        """A stream fed by an identical deterministic request in flight, if there is one."""
        for slot in self.candidates(request.model, request.mode, request.session):
            key = self._deterministic_key(slot.active, request)
            leader = self._inflight.get(key) if key is not None else None
            if leader is not None:
                stream = TextStream(slot.name, request)
                self._runner.spawn(self._run_follower, slot, stream, leader)
                return stream
        return None

    async def _run_follower(
        self, slot: ModelSlot, stream: TextStream, leader: asyncio.Future[Completion | None]
    ) -> None:
        started = time.perf_counter()
        attempt = self._attempt(stream.request, slot.name, stream=True)
        with attempt.current():
            completion = await asyncio.shield(leader)
            self._looked_up(slot, attempt, completion, "coalesced")
            if completion is None:  # the leader failed: say so, the client may retry
                error = EngineError(slot.name, "the identical request this one joined failed")
                attempt.fail(error)
                self._failed(slot.name, stream.request, error, started)
                stream.end(None, error)
                return
            attempt.done(completion)
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                if completion.text:
                    stream.deliver(completion.text)
            self._finished(slot.name, stream.request, completion, started, cached=True, stream=True)
            stream.end(completion, None)

    async def _run_stream(
        self, slot: ModelSlot, lease: Lease, stream: TextStream, attempt: AttemptSpan
    ) -> None:
        key = self._deterministic_key(lease.loaded, stream.request)
        with attempt.current(), self._leading(key) as leader:
            await self._stream_on(slot, lease, stream, attempt)
            if stream.result is not None:
                leader.set_result(stream.result)

    async def _stream_on(
        self, slot: ModelSlot, lease: Lease, stream: TextStream, attempt: AttemptSpan
    ) -> None:
        result: Completion | None = None
        error: Exception | None = None
        try:
            result, error = await self._stream_copy(slot, lease, stream, attempt)
            if error is not None and self._stable_retries(lease, stream, error):
                # The new copy failed before any text: the old copy answers the stream.
                lease.release()
                try:
                    lease = slot.acquire("stable")
                except (ModelUnavailableError, OverloadedError) as busy:
                    error = busy
                    self._failed(slot.name, stream.request, busy, time.perf_counter())
                else:
                    result, error = await self._stream_copy(slot, lease, stream, attempt)
        finally:
            lease.release()
            stream.end(result, error)

    @staticmethod
    def _stable_retries(lease: Lease, stream: TextStream, error: Exception) -> bool:
        """Whether a stream the new copy failed is tried again on the old one."""
        return (
            lease.copy == "candidate"
            and stream.request.copy is None
            and stream.produced == 0
            and isinstance(error, _FALLBACK_ERRORS)
        )

    async def _stream_copy(
        self, slot: ModelSlot, lease: Lease, stream: TextStream, attempt: AttemptSpan
    ) -> tuple[Completion | None, Exception | None]:
        """Generate ``stream`` on the leased copy: (the completion, or the error)."""
        started = time.perf_counter()
        first_piece: list[float] = []
        request = stream.request

        def on_text(piece: str) -> None:  # in the worker thread
            if not first_piece:
                first_piece.append(time.perf_counter() - started)
                attempt.first_token()
            anyio.from_thread.run_sync(stream.deliver, piece)

        try:
            loaded = lease.loaded
            result = await loaded.run(generate, loaded.engine, request, attempt, on_text)
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
                    copy=lease.copy,
                )
            )
            return None, None
        except Exception as err:
            retried = self._stable_retries(lease, stream, err)
            if not retried:
                attempt.fail(err)
            self._failed(slot.name, request, err, started, final=not retried, copy=lease.copy)
            return None, err
        attempt.done(result)
        ttft = first_piece[0] if first_piece else None
        self._finished(
            slot.name,
            request,
            result,
            started,
            cached=False,
            stream=True,
            ttft=ttft,
            copy=lease.copy,
        )
        return result, None

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
        copy: Copy = "stable",
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
                time_to_first_token_s=(
                    ttft if ttft is not None or cached else completion.time_to_first_token_s
                ),
                engine_s=0.0 if cached else completion.engine_s,
                queue_wait_s=None if cached else completion.queue_wait_s,
                time_per_output_token_s=None if cached else completion.time_per_output_token_s,
                copy=copy,
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
        copy: Copy = "stable",
    ) -> None:
        self.bus.publish(
            InferenceFailed(
                member,
                request.mode,
                error_code(err),
                str(err),
                time.perf_counter() - started,
                final=final,
                copy=copy,
            )
        )


_FALLBACK_ERRORS = (ModelUnavailableError, OverloadedError, EngineError)


def _split_order(weights: dict[str, float], point: float) -> list[str]:
    """A split's members in the order to try them: the one whose slice of [0, 100) holds
    ``point`` (slices in config order, each as wide as its share of the weights), then the
    others, heaviest first (config order among equals)."""
    total = sum(weights.values())
    edge = 0.0
    chosen = list(weights)[-1]  # a point that rounding puts past the last edge
    for name, weight in weights.items():
        edge += weight / total * 100
        if point < edge:
            chosen = name
            break
    others = sorted((name for name in weights if name != chosen), key=lambda n: -weights[n])
    return [chosen, *others]


def _short(err: Exception) -> str:
    if isinstance(err, ModelUnavailableError):
        return err.reason
    if isinstance(err, OverloadedError):
        return "overloaded"
    return str(err)
