"""Continuous batching: one thread owns a llama.cpp context and decodes every running
sequence in one ``llama_decode`` per step, over llama-cpp-python's low-level C API.

Between steps the thread admits waiting sequences into free slots (``parallel`` of them, one
KV stream each), earliest deadline first: a sequence's deadline is its arrival plus its
latency target, so ``fast`` requests go first without starving ``creative`` ones. A new
sequence reuses the cells of the longest prompt prefix its member still holds
(``kv_slots.py``) and prefills only the rest. A step carries one token for each decoding
sequence plus prompt chunks of admitted ones, up to ``n_batch`` tokens, so a long prompt is
prefilled over several steps while the others keep generating. Every step asks the
machine's ``ComputeArbiter`` for its threads by the earliest deadline in it. Each sequence
samples with its own sampler chain and stops at end-of-generation, a stop string or exactly
``max_tokens`` (``generation.py``).

A step that llama.cpp refuses is decoded again one sequence at a time, so only the sequence
that makes it fail is failed and its neighbours go on (the engine validates what it admits,
so this is the net under that check, not the check).

Written by hand because llama-cpp-python's high-level API runs one sequence per context;
llama.cpp's own server does the same loop in C++. Output goes to each sequence's sink from
this thread; the scheduler never waits for a consumer.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ensemble_ops.serving.compute import ComputeArbiter
from ensemble_ops.serving.engine import Completion, EngineFailure, SequenceSink
from ensemble_ops.serving.generation import Generation, SequenceSpec, deliver_end
from ensemble_ops.serving.kv_slots import KvSlots
from ensemble_ops.serving.turns import Turns

__all__ = ["Scheduler", "SequenceSpec", "Ticket"]

_CANCELLED = EngineFailure("cancelled", cancelled=True)
_NO_ROOM = 1
"""llama_decode's status when the KV cache has no room for the batch."""


class Ticket:
    """The consumer's hold on one submitted sequence: ``cancel`` it from any thread."""

    def __init__(self) -> None:
        self.cancelled = False  # read by the scheduler thread at each step

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class _Entry:
    """One sequence's share of a step: tokens with their positions, logits on the last."""

    sequence: Generation
    tokens: list[int]
    start: int  # position of the first token
    wants_logits: bool
    fed_after: int | None = None  # prompt entries: the sequence's ``fed`` once decoded


class Scheduler:
    """The batching loop over one context; thread-safe ``submit``, ``close``."""

    def __init__(
        self,
        llama_cpp: Any,
        ctx: Any,
        vocab: Any,
        *,
        name: str,
        parallel: int,
        n_batch: int,
        n_ctx: int,
        n_swa: int = 0,
        compute: ComputeArbiter,
        max_threads: int | None = None,
    ) -> None:
        """``compute`` grants each step its threads (up to ``max_threads``, the member's
        ``n_threads``)."""
        self._ll = llama_cpp
        self._ctx = ctx
        self._vocab = vocab
        self._name = name
        self.parallel = parallel
        self._n_batch = n_batch
        self._n_ctx = n_ctx
        self._compute = compute
        self._max_threads = max_threads
        self._threads = 0  # what the context was last set to
        self._slots = KvSlots(llama_cpp, llama_cpp.llama_get_memory(ctx), parallel, n_swa=n_swa)
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self._lock = threading.Condition()
        self._waiting: list[Generation] = []
        self._running: list[Generation] = []
        self._held_s: deque[float] = deque(maxlen=32)  # how long recent sequences held a slot
        self._turns = Turns()  # callers take turns within a mode
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

    def submit_many(self, items: Sequence[tuple[SequenceSpec, SequenceSink]]) -> list[Ticket]:
        """Queue several sequences at once: the next admission sees them all, so they start
        in the same step as far as free slots allow."""
        now = time.monotonic()
        with self._lock:
            sequences = [
                Generation(spec, sink, Ticket(), self._vocab, self._ll, now) for spec, sink in items
            ]
            if not self._closing:
                self._waiting.extend(sequences)
                self._lock.notify()
                return [sequence.ticket for sequence in sequences]
        for sequence in sequences:
            deliver_end(sequence.sink, EngineFailure("the engine is closed"))
        return [sequence.ticket for sequence in sequences]

    @property
    def free_slots(self) -> int:
        with self._lock:
            return self._slots.free - len(self._waiting)

    def expected_wait_s(self, target_s: float) -> float:
        """How long a sequence submitted now with ``target_s`` would wait for a slot: the
        sequences it cannot overtake that find no free slot, at the rate full slots free
        up (``parallel`` over the mean time recent sequences held one; 0 until known)."""
        deadline = time.monotonic() + target_s
        with self._lock:
            ahead = sum(1 for s in self._waiting if s.deadline <= deadline)
            short = ahead + 1 - self._slots.free
            held = list(self._held_s)
        if short <= 0 or not held:
            return 0.0
        # Slots free at parallel / mean hold time while all are taken: measured on the
        # sequences' own time in a slot, so an idle spell never reads as a slow member.
        return short * (sum(held) / len(held)) / self.parallel

    @property
    def kv_usage(self) -> float:
        """Share of the KV cache running sequences hold (cells / n_ctx x parallel)."""
        with self._lock:
            return self._slots.cells(running=True) / (self._n_ctx * self.parallel)

    @property
    def kv_retained(self) -> float:
        """Share of the KV cache idle slots keep for prompts to come (an upper bound)."""
        with self._lock:
            return self._slots.cells(running=False) / (self._n_ctx * self.parallel)

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
                    leftovers = [*self._running, *self._waiting]
                    self._waiting.clear()
                    break
                self._admit()
            for sequence in [s for s in self._running if s.ticket.cancelled]:
                self._end(sequence, _CANCELLED)
            if self._running:
                self._step()
        for sequence in leftovers:
            self._end(sequence, EngineFailure("the engine closed"))

    def _admit(self) -> None:
        """Waiting sequences into free slots, earliest deadline first, callers taking turns
        within a mode (under the lock)."""
        if not self._waiting or not self._slots.free:
            return
        self._waiting.sort(key=lambda s: s.deadline)
        while self._waiting and self._slots.free:
            sequence = self._waiting.pop(self._turns.pick(self._waiting))
            if sequence.ticket.cancelled:
                deliver_end(sequence.sink, _CANCELLED)
                continue
            if not sequence.spec.tokens:  # nothing to decode: it would never end
                deliver_end(sequence.sink, EngineFailure("a sequence needs at least one token"))
                continue
            reuse = self._slots.take(sequence.spec.tokens)
            self._turns.took(sequence.spec)
            sequence.admit(reuse.slot, reuse.cached)
            self._running.append(sequence)

    def _plan(self) -> list[_Entry]:
        """This step's entries: one token for each generating sequence, then prompt chunks
        of admitted ones while the batch has room."""
        entries: list[_Entry] = []
        room = self._n_batch
        for sequence in self._running:
            if sequence.next_token is not None:
                entries.append(_Entry(sequence, [sequence.next_token], sequence.n_past, True))
                room -= 1
        for sequence in self._running:
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

    def _decode(self, entries: list[_Entry]) -> int:
        batch, n = self._batch, 0
        deadline = float("inf")
        for entry in entries:
            sequence = entry.sequence
            deadline = min(deadline, sequence.deadline)
            last = len(entry.tokens) - 1
            seq_id = sequence.seq_id
            for i, token in enumerate(entry.tokens):
                batch.token[n] = token
                batch.pos[n] = entry.start + i
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = seq_id
                batch.logits[n] = entry.wants_logits and i == last
                n += 1
            sequence.logits_index = n - 1 if entry.wants_logits else -1
        batch.n_tokens = n
        asked = time.monotonic()
        with self._compute.grant(self._name, deadline, self._max_threads) as threads:
            waited = time.monotonic() - asked
            for entry in entries:  # the copies' own time leaves out the others' steps
                entry.sequence.waited_s += waited
            if threads != self._threads:
                self._ll.llama_set_n_threads(self._ctx, threads, threads)
                self._threads = threads
            self.step_started = time.monotonic()
            try:
                status: int = self._ll.llama_decode(self._ctx, batch)
                while status == _NO_ROOM and self._slots.evict_idle():
                    status = self._ll.llama_decode(self._ctx, batch)
            finally:
                self.step_started = None
        self.batch_sizes.append(n)
        return status

    def _advance(self, entries: list[_Entry]) -> None:
        """The entries were decoded: move each sequence on, sampling where it has logits."""
        for entry in entries:
            sequence = entry.sequence
            sequence.decoded(entry.tokens, entry.start, entry.fed_after)
            if entry.wants_logits:
                outcome = sequence.sample(self._ctx)
                if outcome is not None:
                    self._end(sequence, outcome)

    def _end(self, sequence: Generation, outcome: Completion | EngineFailure) -> None:
        """Free the sequence's slot (keeping its cells for a prompt to come, unless it
        failed) and sampler; hand over how it ended."""
        slot = sequence.release()
        if slot is not None:
            # A sequence cancelled or done leaves correct cells; a failed step may not.
            failed = isinstance(outcome, EngineFailure) and not outcome.cancelled
            self._slots.release(slot, keep=not failed)
            with self._lock:
                self._running.remove(sequence)
                if isinstance(outcome, Completion):
                    self._held_s.append(time.monotonic() - sequence.admitted)
        deliver_end(sequence.sink, outcome)
