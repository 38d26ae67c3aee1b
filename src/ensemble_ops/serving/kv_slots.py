"""Prompt prefix reuse: the sequence slots of one context and the KV cells they keep.

Each of a context's ``parallel`` slots (one llama.cpp sequence id each) remembers the tokens
whose cells it holds, in position order. A slot that finishes keeps them (llama-server's
``cache_prompt``): a new sequence takes the free slot holding the longest common prefix
with its prompt, the divergent rest is dropped with ``llama_memory_seq_rm`` and only the
rest of the prompt is prefilled. In a unified KV cache a running sequence's prefix can be
shared too: ``llama_memory_seq_cp`` gives the new slot the same cells without copying them.
When no slot shares a tenth of the prompt, the least recently used free slot is cleared for
it (so one token in common never evicts a useful prefix).

The budget holds by construction: a slot never holds more than ``n_ctx`` cells (each
sequence is checked against it) and there are ``parallel`` slots, so running and retained
cells together never exceed the context's ``n_ctx x parallel``; shared cells count once.
If llama.cpp still finds no room for a batch (fragmentation), ``evict_idle`` frees the
least recently used retained prefix.

Sliding-window models (Gemma 3) drop cells outside their window: a retained prefix is used
only when the window's cells for the next position are still there (llama-server's test),
and never shared across slots.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["KvSlot", "KvSlots", "Reuse"]

_SIMILARITY = 0.1
"""The share of a prompt a retained prefix must cover to choose that slot for it."""


@dataclass
class KvSlot:
    seq_id: int
    tokens: list[int] = field(default_factory=list)
    """The tokens whose cells the slot holds, position by position."""
    running: bool = False
    used_at: float = 0.0


@dataclass(frozen=True)
class Reuse:
    """Where a new sequence goes and how much of its prompt is already in the cache."""

    slot: KvSlot
    cached: int
    """Prompt tokens whose cells are reused: prefill starts after them."""


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class KvSlots:
    """The slots of one context; used by its scheduler thread only."""

    def __init__(
        self, llama_cpp: Any, memory: Any, parallel: int, *, n_swa: int, reuse: bool = True
    ) -> None:
        self._ll = llama_cpp
        self._memory = memory
        self._n_swa = n_swa
        self._reuse = reuse
        self.slots = [KvSlot(seq_id) for seq_id in range(parallel)]

    @property
    def free(self) -> int:
        return sum(not slot.running for slot in self.slots)

    def cells(self, *, running: bool) -> int:
        """Cells held by running slots, or retained by idle ones (shared cells counted in each
        slot that holds them: an upper bound)."""
        return sum(len(slot.tokens) for slot in self.slots if slot.running is running)

    def take(self, prompt: list[int]) -> Reuse:
        """A free slot for ``prompt`` (the caller checked there is one), with its reusable
        prefix in place and the rest of its cells dropped. At least one prompt token is
        always left to decode: its logits are the first sample's."""
        free = [slot for slot in self.slots if not slot.running]
        best, length = max(
            ((slot, _common_prefix(slot.tokens, prompt)) for slot in free),
            key=lambda pair: (pair[1], -pair[0].used_at),
        )
        # A prefix this short is not worth another prompt's slot (llama-server's
        # --slot-prompt-similarity, 0.1): the least recently used one goes instead.
        if not self._reuse or length <= _SIMILARITY * len(prompt):
            best, length = min(free, key=lambda slot: slot.used_at), 0
        length = min(length, len(prompt) - 1)
        source, shared = self._shared_prefix(prompt)
        if source is not None and shared > length:
            best = min(free, key=lambda slot: (slot.tokens != [], slot.used_at))
            self._drop(best, 0)
            self._ll.llama_memory_seq_cp(self._memory, source.seq_id, best.seq_id, 0, shared)
            best.tokens = source.tokens[:shared]
            length = shared
        else:
            length = self._keep(best, length)
        best.running = True
        best.used_at = time.monotonic()
        return Reuse(best, length)

    def _shared_prefix(self, prompt: list[int]) -> tuple[KvSlot | None, int]:
        """The running slot sharing the longest prefix with ``prompt`` (none for a sliding
        window model, whose cells may not all be there)."""
        if not self._reuse or self._n_swa > 0:
            return None, 0
        running = [slot for slot in self.slots if slot.running]
        if not running:
            return None, 0
        source = max(running, key=lambda slot: _common_prefix(slot.tokens, prompt))
        shared = min(_common_prefix(source.tokens, prompt), len(prompt) - 1)
        return source, shared

    def _keep(self, slot: KvSlot, length: int) -> int:
        """Keep ``slot``'s first ``length`` cells (fewer when they cannot be kept); returns
        how many were kept."""
        if length > 0 and self._n_swa > 0:
            pos_min = self._ll.llama_memory_seq_pos_min(self._memory, slot.seq_id)
            if pos_min > 0 and pos_min >= max(0, length - self._n_swa):
                length = 0  # the window's cells before the next position are gone
        self._drop(slot, length)
        return len(slot.tokens)

    def _drop(self, slot: KvSlot, keep: int) -> None:
        """Remove the cells from position ``keep`` on (all of them when the model cannot
        drop a suffix alone)."""
        if keep >= len(slot.tokens):
            return
        if keep == 0 or not self._ll.llama_memory_seq_rm(self._memory, slot.seq_id, keep, -1):
            self._ll.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)
            keep = 0
        del slot.tokens[keep:]

    def release(self, slot: KvSlot, *, keep: bool) -> None:
        """The slot's sequence ended: keep its cells for the next prompt, or drop them (a
        failed step may have left them half written)."""
        slot.running = False
        slot.used_at = time.monotonic()
        if not keep:
            self._drop(slot, 0)

    def evict_idle(self) -> bool:
        """Free the least recently used retained prefix; False when none is left."""
        idle = [slot for slot in self.slots if not slot.running and slot.tokens]
        if not idle:
            return False
        self._drop(min(idle, key=lambda slot: slot.used_at), 0)
        return True
