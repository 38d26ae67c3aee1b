"""Answering from what is known: the response cache and identical requests in flight.

A deterministic request (temperature 0, or a fixed seed) has a key: the identity of the copy
that would answer it (its weights' digest and settings) and the request itself. Under that
key it may already have an answer (a cache hit), or one may be on its way: from an identical
request running in this process (single flight), or from another replica that claimed the
key in a shared cache. Otherwise this request *leads*: it generates, and identical ones that
arrive meanwhile wait for its answer instead of generating again. Streamed and non-streamed
requests share keys, entries and leaders alike.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio

from ensemble_ops.serving.accounting import CacheHow
from ensemble_ops.serving.cache import ResponseCache, cache_key, is_deterministic
from ensemble_ops.serving.engine import Completion
from ensemble_ops.serving.inference import InferenceRequest
from ensemble_ops.serving.slot import Loaded

__all__ = ["Known", "KnownAnswers"]


@dataclass
class Known:
    """What a lookup found: an ``answer`` (a hit or a coalesced one), or a miss that the
    request answers itself and hands back with :meth:`keep`."""

    answer: Completion | None
    how: CacheHow
    kept: Completion | None = None
    kept_key: str | None = None

    def keep(self, completion: Completion, key: str | None) -> None:
        """The answer this request generated, to cache under ``key`` (the key of the copy
        that answered: a reload or a retry may have changed it) and to hand to followers."""
        self.kept, self.kept_key = completion, key


class KnownAnswers:
    """The response cache plus single flight, in front of the members."""

    def __init__(self, cache: ResponseCache | None) -> None:
        """``cache`` None: caching is off, and so is single flight (no key to share)."""
        self._cache = cache
        self._inflight: dict[str, asyncio.Future[Completion | None]] = {}

    def key(self, loaded: Loaded | None, request: InferenceRequest) -> str | None:
        """The key of ``request`` answered by ``loaded``; None when it has none (caching
        off, not deterministic, or a copy whose answers are not cached)."""
        if self._cache is None or loaded is None or loaded.identity is None:
            return None
        if not is_deterministic(request.params):
            return None
        return cache_key(loaded.identity, request.prompt, request.messages, request.params)

    @asynccontextmanager
    async def lookup(self, key: str | None) -> AsyncIterator[Known]:
        """Look ``key`` up; on a miss this request leads until the block ends, and what it
        :meth:`~Known.keep`\\ s is handed to waiting requests and cached. A leader that fails
        or is cancelled hands over nothing: its followers then try themselves."""
        if key is None:
            yield Known(None, "miss")
            return
        while (leader := self._inflight.get(key)) is not None:
            answer = await asyncio.shield(leader)
            if answer is not None:
                yield Known(answer, "coalesced")
                return
        future: asyncio.Future[Completion | None] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        known = Known(None, "miss")
        claimed = False
        try:
            if self._cache is not None:
                known, claimed = await self._shared(key)
            yield known
        finally:
            if self._inflight.get(key) is future:
                del self._inflight[key]
            future.set_result(known.answer if known.answer is not None else known.kept)
            # Shielded and bounded by the backend's timeout: done even when the request is
            # cancelled, so replicas waiting on the claim are never left to time out.
            with anyio.CancelScope(shield=True):
                await self._store(known, key if claimed else None)

    async def _shared(self, key: str) -> tuple[Known, bool]:
        """The cache's answer, or another replica's that it was generating (single flight
        across replicas); with none, whether this process claimed the key."""
        assert self._cache is not None
        answer = await self._cache.get(key)
        if answer is not None:
            return Known(answer, "hit"), False
        # Shielded: a claim taken must be remembered, or it would hold the other replicas
        # until it expires.
        with anyio.CancelScope(shield=True):
            claimed = await self._cache.claim(key)
        if claimed:
            return Known(None, "miss"), True
        answer = await self._cache.wait_for(key)
        return Known(answer, "coalesced" if answer is not None else "miss"), False

    async def _store(self, known: Known, claimed: str | None) -> None:
        """Cache the kept answer, then free the claim (waiting replicas then read it)."""
        if self._cache is None:
            return
        if known.kept is not None and known.kept_key is not None:
            await self._cache.put(known.kept_key, known.kept)
        if claimed is not None:
            await self._cache.release(claimed)
