"""The gate of the inference API: a caller's model list and limits, checked before any work,
settled after it, and reported (429s as events, quotas as OpenAI's headers)."""

from __future__ import annotations

import math
from collections.abc import Mapping

from ensemble_ops.access.keys import Caller
from ensemble_ops.access.limits import Decision, Limits, Quota, duration
from ensemble_ops.errors import (
    ModelNotAllowedError,
    ParallelLimitError,
    RequestsLimitError,
    TokensLimitError,
)
from ensemble_ops.events import EventBus, RateLimited

__all__ = ["CHARS_PER_TOKEN", "Gate", "Pass"]

CHARS_PER_TOKEN = 4
"""How prompt tokens are estimated before the member has tokenized the prompt; the
estimate is settled with the real count at the end."""


class Pass:
    """A request let through: what it reserved, and the quotas to report."""

    def __init__(self, caller: Caller, decision: Decision) -> None:
        self.caller = caller
        self.decision = decision
        self.settled = False

    @property
    def headers(self) -> dict[str, str]:
        """OpenAI's ``x-ratelimit-*`` headers for the caller's limits (none without)."""
        out: dict[str, str] = {}
        for kind, quota in (("requests", self.decision.requests), ("tokens", self.decision.tokens)):
            if quota is not None:
                out |= _headers(kind, quota)
        return out


class Gate:
    """Checks and settles each request of a caller against its key."""

    def __init__(self, limits: Limits, bus: EventBus) -> None:
        self._limits = limits
        self._bus = bus

    async def admit(self, caller: Caller, model: str, prompt_chars: int, max_tokens: int) -> Pass:
        """Let the request through, or raise: ``ModelNotAllowedError`` (403) for a model the
        key may not use, a ``RateLimitError`` (429) when a limit refuses it."""
        key = caller.key
        if key is not None and key.models is not None and model not in key.models:
            raise ModelNotAllowedError(key.name, model, key.models)
        estimate = math.ceil(prompt_chars / CHARS_PER_TOKEN) + max_tokens
        decision = await self._limits.admit(caller, estimate)
        if decision.allowed:
            return Pass(caller, decision)
        assert key is not None  # only keys have limits
        assert decision.refused is not None
        self._bus.publish(RateLimited(key.name, decision.refused))
        quotas = Pass(caller, decision).headers
        retry = decision.retry_after_s
        if decision.refused == "parallel":
            raise ParallelLimitError(key.name, key.max_parallel or 0, quotas)
        if decision.refused == "requests":
            raise RequestsLimitError(key.name, key.rpm or 0, retry, quotas)
        raise TokensLimitError(key.name, key.tpm or 0, retry, quotas)

    async def settle(self, admitted: Pass, used_tokens: int) -> None:
        """The request ended (answered, failed or abandoned): free its place in flight and
        give back the tokens it reserved and did not use. Idempotent."""
        if admitted.settled:
            return
        admitted.settled = True
        decision = admitted.decision
        await self._limits.finish(
            admitted.caller, decision.reserved_tokens, used_tokens, shared=decision.shared
        )


def _headers(kind: str, quota: Quota) -> Mapping[str, str]:
    return {
        f"x-ratelimit-limit-{kind}": str(quota.limit),
        f"x-ratelimit-remaining-{kind}": str(quota.remaining),
        f"x-ratelimit-reset-{kind}": duration(quota.reset_s),
    }
