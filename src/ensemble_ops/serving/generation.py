"""One sequence in a scheduler: what it asked for, where it is, and the text it makes.

Each sequence samples with its own sampler chain (greedy at temperature 0; else top_k 40 ->
top_p -> min_p 0.05 -> temperature -> seeded dist: top_k first keeps top_p from sorting
the whole vocabulary), decodes its pieces as UTF-8 incrementally (a character split across
tokens comes out whole, and ``max_tokens`` stays exact), holds back text that may begin a
stop string until it cannot, and ends at end-of-generation, a stop string or exactly
``max_tokens``. Only the scheduler's thread touches it.
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ensemble_ops.serving.engine import Completion, EngineFailure, SequenceSink

if TYPE_CHECKING:
    from ensemble_ops.serving.kv_slots import KvSlot
    from ensemble_ops.serving.scheduler import Ticket

__all__ = ["Generation", "SequenceSpec", "deliver_end"]

_PIECE_BYTES = 256


@dataclass(frozen=True)
class SequenceSpec:
    """What one sequence asks for (the sampling of ``GenerationParams``, flattened)."""

    tokens: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    target_s: float = 0.0
    """Its latency target: admitted and given threads by the deadline arrival + target."""
    top_k: int = 40
    min_p: float = 0.05
    incremental: bool = True
    """Hand over pieces as they come; False sends only the end (no consumer wakes per token,
    which on a busy batch costs more than the decode's own Python work)."""
    caller: str = ""
    """Whose sequence it is: callers take turns for the slots within a mode (none: no
    turns, deadline order)."""
    weight: float = 1.0
    """The caller's share of those turns."""


def deliver_end(sink: SequenceSink, outcome: Completion | EngineFailure) -> None:
    """Tell ``sink`` how its sequence ended; a consumer that is gone cannot stop the loop."""
    with contextlib.suppress(Exception):  # the consumer's failure is its own: the batch goes on
        sink.end(outcome)


class Generation:
    """A sequence from its submission to its end."""

    def __init__(
        self,
        spec: SequenceSpec,
        sink: SequenceSink,
        ticket: Ticket,
        vocab: Any,
        llama_cpp: Any,
        submitted: float,
    ) -> None:
        self.spec = spec
        self.sink = sink
        self.ticket = ticket
        self.submitted = submitted
        self.deadline = submitted + spec.target_s
        self._vocab = vocab
        self._ll = llama_cpp
        self.slot: KvSlot | None = None
        self.sampler: Any = None
        self.cached = 0  # prompt tokens whose cells were reused
        self.fed = 0  # prompt tokens in the KV cache
        self.n_past = 0
        self.next_token: int | None = None  # sampled, to be decoded in the next step
        self.logits_index = -1
        self.generated = 0
        self.admitted = 0.0
        self.first_token: float | None = None
        self.waited_s = 0.0  # for the cores, held by other members' steps
        self._waited_first_s = 0.0
        self._text: list[str] = []
        self._sent = 0  # characters of the text handed to the consumer
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._piece = ctypes.create_string_buffer(_PIECE_BYTES)

    @property
    def seq_id(self) -> int:
        assert self.slot is not None
        return self.slot.seq_id

    def admit(self, slot: KvSlot, cached: int) -> None:
        """It runs in ``slot``, whose first ``cached`` prompt tokens' cells are reused."""
        self.slot = slot
        self.cached = self.fed = self.n_past = cached
        self.sampler = _sampler(self._ll, self.spec)
        self.admitted = time.monotonic()

    def decoded(self, tokens: list[int], start: int, fed_after: int | None) -> None:
        """``tokens`` from position ``start`` have their cells now."""
        assert self.slot is not None
        self.slot.tokens.extend(tokens)
        self.n_past = start + len(tokens)
        if fed_after is not None:
            self.fed = fed_after

    def sample(self, ctx: Any) -> Completion | None:
        """Sample the next token from this step's logits: the completion when the sequence
        ends here, else None (the token is decoded in the next step)."""
        ll = self._ll
        token = ll.llama_sampler_sample(self.sampler, ctx, self.logits_index)
        if self.first_token is None:
            self.first_token = time.monotonic()
            self._waited_first_s = self.waited_s
        self.next_token = None
        if ll.llama_vocab_is_eog(self._vocab, token):
            return self._finish("stop")
        self.generated += 1
        size = ll.llama_token_to_piece(self._vocab, token, self._piece, _PIECE_BYTES, 0, False)
        self._text.append(self._decoder.decode(self._piece.raw[: max(size, 0)]))
        if self._emit(final=False):
            return self._finish("stop", at_stop=True)
        if self.generated >= self.spec.max_tokens:
            return self._finish("length")
        self.next_token = token
        return None

    def release(self) -> KvSlot | None:
        """Free the sampler; the slot it ran in (None when it never ran)."""
        slot, self.slot = self.slot, None
        if self.sampler is not None:
            self._ll.llama_sampler_free(self.sampler)
            self.sampler = None
        return slot

    def _emit(self, *, final: bool) -> bool:
        """Hand the consumer the text that cannot start a stop string; True at a stop."""
        text = "".join(self._text)
        stops = self.spec.stop
        for stop in stops:
            at = text.find(stop, self._sent)
            if at >= 0:
                self._text = [text[:at]]
                self._send(text[self._sent : at])
                self._sent = at
                return True
        safe = len(text)
        if not final:  # hold back a tail that may be the beginning of a stop string
            for stop in stops:
                for size in range(min(len(stop) - 1, len(text) - self._sent), 0, -1):
                    if text.endswith(stop[:size]):
                        safe = min(safe, len(text) - size)
                        break
        if safe > self._sent:
            self._send(text[self._sent : safe])
            self._sent = safe
        return False

    def _send(self, text: str) -> None:
        if not text or not self.spec.incremental:
            return
        try:
            self.sink.piece(text)
        except Exception:  # a consumer that cannot take more has gone: stop generating
            self.ticket.cancel()

    def _finish(self, reason: str, *, at_stop: bool = False) -> Completion:
        if not at_stop:  # what the decoder still holds, and any held-back tail, goes out
            self._text.append(self._decoder.decode(b"", final=True))
            self._emit(final=True)
        now = time.monotonic()
        first = self.first_token
        return Completion(
            text="".join(self._text),
            finish_reason="length" if reason == "length" else "stop",
            prompt_tokens=len(self.spec.tokens),
            completion_tokens=self.generated,
            engine_s=now - self.submitted,
            queue_wait_s=self.admitted - self.submitted,
            time_to_first_token_s=None if first is None else first - self.submitted,
            decode_s=0.0 if first is None else now - first,
            cached_tokens=self.cached,
            compute_wait_s=self.waited_s,
            first_token_compute_wait_s=self._waited_first_s,
        )


def _sampler(ll: Any, spec: SequenceSpec) -> Any:
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
