"""Continuous batching: one thread owns a llama.cpp context and decodes every running
sequence in one ``llama_decode`` per step, over llama-cpp-python's low-level C API.

Between steps the thread admits waiting sequences into free slots (``parallel`` of them, one
KV stream each), earliest deadline first: a sequence's deadline is its arrival plus a head
start per priority, so ``fast`` requests go first without starving ``creative`` ones. A step
carries one token for each decoding sequence plus prompt chunks of admitted ones, up to
``n_batch`` tokens, so a long prompt is prefilled over several steps while the others keep
generating. Each sequence samples with its own sampler chain, stops at end-of-generation, a
stop string or exactly ``max_tokens``, and frees its KV cells the moment it ends or its
consumer cancels it (noticed at the next step).

A step that llama.cpp refuses is decoded again one sequence at a time, so only the sequence
that makes it fail is failed and its neighbours go on (the engine validates what it admits,
so this is the net under that check, not the check).

Written by hand because llama-cpp-python's high-level API runs one sequence per context;
llama.cpp's own server does the same loop in C++. Output goes to each sequence's sink from
this thread; the scheduler never waits for a consumer.
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ensemble_ops.serving.engine import Completion, EngineFailure, SequenceSink

__all__ = ["Scheduler", "SequenceSpec", "Ticket"]

_PIECE_BYTES = 256
_CANCELLED = EngineFailure("cancelled", cancelled=True)


@dataclass(frozen=True)
class SequenceSpec:
    """What one sequence asks for (the sampling of ``GenerationParams``, flattened)."""

    tokens: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    head_start_s: float = 0.0
    """Subtracted from the arrival time to order admission (higher priority, larger)."""
    top_k: int = 40
    min_p: float = 0.05
    incremental: bool = True
    """Hand over pieces as they come; False sends only the end (no consumer wakes per token,
    which on a busy batch costs more than the decode's own Python work)."""


class Ticket:
    """The consumer's hold on one submitted sequence: ``cancel`` it from any thread."""

    def __init__(self) -> None:
        self.cancelled = False  # read by the scheduler thread at each step

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class _Sequence:
    spec: SequenceSpec
    sink: SequenceSink
    ticket: Ticket
    deadline: float
    submitted: float
    seq_id: int = -1
    sampler: Any = None
    fed: int = 0  # prompt tokens already in the KV cache
    n_past: int = 0
    next_token: int | None = None  # sampled, to be decoded in the next step
    logits_index: int = -1
    generated: int = 0
    admitted: float = 0.0
    first_token: float | None = None
    text: list[str] = field(default_factory=list)
    sent: int = 0  # characters of "".join(text) handed to the consumer
    decoder: Any = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))


@dataclass
class _Entry:
    """One sequence's share of a step: tokens with their positions, logits on the last."""

    sequence: _Sequence
    tokens: list[int]
    start: int  # position of the first token
    wants_logits: bool
    fed_after: int | None = None  # prompt entries: the sequence's ``fed`` once decoded


class Scheduler:
    """The batching loop over one context; thread-safe ``submit``, ``close``."""

    def __init__(
        self, llama_cpp: Any, ctx: Any, vocab: Any, *, parallel: int, n_batch: int, n_ctx: int
    ) -> None:
        self._ll = llama_cpp
        self._ctx = ctx
        self._vocab = vocab
        self._memory = llama_cpp.llama_get_memory(ctx)
        self.parallel = parallel
        self._n_batch = n_batch
        self._n_ctx = n_ctx
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self._piece = ctypes.create_string_buffer(_PIECE_BYTES)
        self._lock = threading.Condition()
        self._waiting: list[_Sequence] = []
        self._running: dict[int, _Sequence] = {}
        self._free = deque(range(parallel))
        self._closing = False
        self.step_started: float | None = None
        """monotonic() when the running step began; None between steps (watchdog)."""
        self.batch_sizes: deque[int] = deque(maxlen=4096)
        """Tokens decoded per step, for the metrics (drained at scrape time)."""
        self._thread = threading.Thread(target=self._loop, name="llama-scheduler", daemon=True)
        self._thread.start()

    # -- the consumer's side (any thread) ----------------------------------------------------

    def submit(self, spec: SequenceSpec, sink: SequenceSink) -> Ticket:
        """Queue a sequence (checked by the caller: tokens in the vocabulary, within n_ctx)."""
        return self.submit_many([(spec, sink)])[0]

    def submit_many(self, items: list[tuple[SequenceSpec, SequenceSink]]) -> list[Ticket]:
        """Queue several sequences at once: the next admission sees them all, so they start
        in the same step as far as free slots allow."""
        now = time.monotonic()
        sequences = [
            _Sequence(spec, sink, Ticket(), now - spec.head_start_s, now) for spec, sink in items
        ]
        with self._lock:
            if not self._closing:
                self._waiting.extend(sequences)
                self._lock.notify()
                return [sequence.ticket for sequence in sequences]
        for sequence in sequences:
            _deliver_end(sequence.sink, EngineFailure("the engine is closed"))
        return [sequence.ticket for sequence in sequences]

    @property
    def free_slots(self) -> int:
        with self._lock:
            return len(self._free) - len(self._waiting)

    @property
    def kv_usage(self) -> float:
        """Share of the KV cache the running sequences hold (cells / n_ctx x parallel)."""
        with self._lock:
            used = sum(s.n_past for s in self._running.values())
        return used / (self._n_ctx * self.parallel)

    def close(self) -> None:
        """Fail what is left, stop the thread and free the batch (the context is the
        caller's to free afterwards)."""
        with self._lock:
            self._closing = True
            self._lock.notify()
        self._thread.join()
        self._ll.llama_batch_free(self._batch)

    # -- the loop (the scheduler thread) -----------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self._running or self._waiting or self._closing):
                    self._lock.wait()
                if self._closing:
                    leftovers = [*self._running.values(), *self._waiting]
                    self._waiting.clear()
                    break
                self._admit()
            self._drop_cancelled()
            if self._running:
                self._step()
        for sequence in leftovers:
            self._end(sequence, EngineFailure("the engine closed"))

    def _admit(self) -> None:
        """Waiting sequences into free slots, earliest deadline first (under the lock)."""
        if not self._free or not self._waiting:
            return
        self._waiting.sort(key=lambda s: s.deadline)
        while self._free and self._waiting:
            sequence = self._waiting.pop(0)
            if sequence.ticket.cancelled:
                _deliver_end(sequence.sink, _CANCELLED)
                continue
            if not sequence.spec.tokens:  # nothing to decode: it would never end
                _deliver_end(sequence.sink, EngineFailure("a sequence needs at least one token"))
                continue
            sequence.seq_id = self._free.popleft()
            sequence.sampler = self._sampler(sequence.spec)
            sequence.admitted = time.monotonic()
            self._running[sequence.seq_id] = sequence

    def _sampler(self, spec: SequenceSpec) -> Any:
        ll = self._ll
        chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
        if spec.temperature <= 0:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_greedy())
            return chain
        # top_k first: it shrinks the vocabulary before top_p has to sort it.
        ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_k(spec.top_k))
        ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_p(spec.top_p, 1))
        ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_min_p(spec.min_p, 1))
        ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_temp(spec.temperature))
        seed = ll.LLAMA_DEFAULT_SEED if spec.seed is None else spec.seed & 0xFFFFFFFF
        ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_dist(seed))
        return chain

    def _drop_cancelled(self) -> None:
        for sequence in [s for s in self._running.values() if s.ticket.cancelled]:
            self._end(sequence, _CANCELLED)

    def _plan(self) -> list[_Entry]:
        """This step's entries: one token for each generating sequence, then prompt chunks
        of admitted ones while the batch has room."""
        entries: list[_Entry] = []
        room = self._n_batch
        for sequence in self._running.values():
            if sequence.next_token is not None:
                entries.append(_Entry(sequence, [sequence.next_token], sequence.n_past, True))
                room -= 1
        for sequence in self._running.values():
            prompt = sequence.spec.tokens
            if sequence.fed >= len(prompt) or room <= 0:
                continue
            chunk = prompt[sequence.fed : sequence.fed + room]
            fed_after = sequence.fed + len(chunk)
            entries.append(
                _Entry(sequence, chunk, sequence.n_past, fed_after == len(prompt), fed_after)
            )
            room -= len(chunk)
        return entries

    def _step(self) -> None:
        entries = self._plan()
        status = self._decode(entries)
        if status == 0:
            self._advance(entries)
            return
        if len(entries) == 1:
            self._end(entries[0].sequence, EngineFailure(f"llama_decode returned {status}"))
            return
        # Tell the culprit from its neighbours: each entry alone. llama.cpp drops the cells
        # of a failed batch, so the ones that pass alone go on as if nothing happened.
        for entry in entries:
            status = self._decode([entry])
            if status == 0:
                self._advance([entry])
            else:
                self._end(entry.sequence, EngineFailure(f"llama_decode returned {status}"))

    def _decode(self, entries: Iterable[_Entry]) -> int:
        batch, n = self._batch, 0
        for entry in entries:
            sequence = entry.sequence
            last = len(entry.tokens) - 1
            for i, token in enumerate(entry.tokens):
                batch.token[n] = token
                batch.pos[n] = entry.start + i
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = sequence.seq_id
                batch.logits[n] = entry.wants_logits and i == last
                n += 1
            sequence.logits_index = n - 1 if entry.wants_logits else -1
        batch.n_tokens = n
        self.step_started = time.monotonic()
        try:
            status: int = self._ll.llama_decode(self._ctx, batch)
        finally:
            self.step_started = None
        self.batch_sizes.append(n)
        return status

    def _advance(self, entries: list[_Entry]) -> None:
        """The entries were decoded: move each sequence on, sampling where it has logits."""
        for entry in entries:
            sequence = entry.sequence
            sequence.n_past = entry.start + len(entry.tokens)
            if entry.fed_after is not None:
                sequence.fed = entry.fed_after
            if entry.wants_logits:
                self._sampled(sequence)

    def _sampled(self, sequence: _Sequence) -> None:
        ll = self._ll
        token = ll.llama_sampler_sample(sequence.sampler, self._ctx, sequence.logits_index)
        now = time.monotonic()
        if sequence.first_token is None:
            sequence.first_token = now
        sequence.next_token = None
        if ll.llama_vocab_is_eog(self._vocab, token):
            self._finish(sequence, "stop")
            return
        sequence.generated += 1
        size = ll.llama_token_to_piece(self._vocab, token, self._piece, _PIECE_BYTES, 0, False)
        sequence.text.append(sequence.decoder.decode(self._piece.raw[: max(size, 0)]))
        if self._emit(sequence, final=False):
            self._finish(sequence, "stop", at_stop=True)
        elif sequence.generated >= sequence.spec.max_tokens:
            self._finish(sequence, "length")
        else:
            sequence.next_token = token

    def _emit(self, sequence: _Sequence, *, final: bool) -> bool:
        """Hand the consumer the text that cannot start a stop string; True at a stop."""
        text = "".join(sequence.text)
        stops = sequence.spec.stop
        for stop in stops:
            at = text.find(stop, sequence.sent)
            if at >= 0:
                sequence.text = [text[:at]]
                self._send(sequence, text[sequence.sent : at])
                sequence.sent = at
                return True
        safe = len(text)
        if not final:  # hold back a tail that may be the beginning of a stop string
            for stop in stops:
                for size in range(min(len(stop) - 1, len(text) - sequence.sent), 0, -1):
                    if text.endswith(stop[:size]):
                        safe = min(safe, len(text) - size)
                        break
        if safe > sequence.sent:
            self._send(sequence, text[sequence.sent : safe])
            sequence.sent = safe
        return False

    def _send(self, sequence: _Sequence, text: str) -> None:
        if not text or not sequence.spec.incremental:
            return
        try:
            sequence.sink.piece(text)
        except Exception:  # a consumer that cannot take more has gone: stop generating
            sequence.ticket.cancel()

    def _finish(self, sequence: _Sequence, reason: str, *, at_stop: bool = False) -> None:
        if not at_stop:  # what the decoder still holds, and any held-back tail, goes out
            sequence.text.append(sequence.decoder.decode(b"", final=True))
            self._emit(sequence, final=True)
        now = time.monotonic()
        first = sequence.first_token
        self._end(
            sequence,
            Completion(
                text="".join(sequence.text),
                finish_reason="length" if reason == "length" else "stop",
                prompt_tokens=len(sequence.spec.tokens),
                completion_tokens=sequence.generated,
                engine_s=now - sequence.submitted,
                queue_wait_s=sequence.admitted - sequence.submitted,
                time_to_first_token_s=None if first is None else first - sequence.submitted,
                decode_s=0.0 if first is None else now - first,
            ),
        )

    def _end(self, sequence: _Sequence, outcome: Completion | EngineFailure) -> None:
        """Free the sequence's slot, KV cells and sampler; hand over how it ended."""
        if sequence.seq_id >= 0:
            self._ll.llama_memory_seq_rm(self._memory, sequence.seq_id, -1, -1)
            self._ll.llama_sampler_free(sequence.sampler)
            with self._lock:
                self._running.pop(sequence.seq_id, None)
                self._free.append(sequence.seq_id)
            sequence.seq_id = -1
        _deliver_end(sequence.sink, outcome)


def _deliver_end(sink: SequenceSink, outcome: Completion | EngineFailure) -> None:
    """Tell ``sink`` how its sequence ended; a consumer that is gone cannot stop the loop."""
    with contextlib.suppress(Exception):  # the consumer's failure is its own: the batch goes on
        sink.end(outcome)
