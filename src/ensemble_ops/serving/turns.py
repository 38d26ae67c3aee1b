"""Callers' turns for a member's sequence slots: stride scheduling, written here because it
is a dozen lines over the scheduler's own queue.

The scheduler's order is earliest deadline first (arrival + the mode's latency target), so
`fast` goes first and nothing starves. When the next slot goes to a mode, the waiting
sequences of that mode take turns by caller: each caller has a pass that every admission
moves on by 1 / its weight, and the caller furthest behind goes next. A caller that was
idle starts at the pass of the last admission, never with credit saved up, so a key that
sends one request at a time gets the next free slot while another key's backlog waits, and
a key of weight 2 gets two turns for each of a key of weight 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from ensemble_ops.serving.generation import SequenceSpec

__all__ = ["Turns"]


class _Waiting(Protocol):
    @property
    def spec(self) -> SequenceSpec: ...


class Turns:
    """The callers' passes of one scheduler (its lock held by every call)."""

    def __init__(self) -> None:
        self._passes: dict[str, float] = {}
        self._last = 0.0  # the pass of the last admission: where an idle caller starts

    def pick(self, waiting: Sequence[_Waiting]) -> int:
        """The index in ``waiting`` (in deadline order) of the sequence to admit next: the
        first one's mode, and within it the caller furthest behind (ties: by deadline).
        Sequences without a caller (probes, warm-ups, requests without keys) go in
        deadline order."""
        first = waiting[0].spec
        if not first.caller:
            return 0
        best, best_pass = 0, self._pass(first.caller)
        for index, item in enumerate(waiting[1:], start=1):
            spec = item.spec
            if spec.caller and spec.target_s == first.target_s:
                candidate = self._pass(spec.caller)
                if candidate < best_pass:
                    best, best_pass = index, candidate
        return best

    def took(self, spec: SequenceSpec) -> None:
        """``spec``'s sequence was admitted: its caller's turn is used."""
        if spec.caller:
            current = self._pass(spec.caller)
            self._last = current
            self._passes[spec.caller] = current + 1.0 / spec.weight

    def _pass(self, caller: str) -> float:
        return max(self._passes.get(caller, 0.0), self._last)
