"""Per-key limits: requests and tokens per minute as GCRA token buckets, requests in flight.

GCRA (the generic cell rate algorithm) keeps one number per bucket, its theoretical arrival
time (TAT): each unit of use pushes it ``60 / rate`` seconds on, and a request is allowed
while the TAT stays within the bucket's tolerance of now. The bucket refills continuously;
it holds ``BURST_S`` (10 s) worth of the rate, so after an idle spell a key gets a short
burst, never a minute's worth at once: a fixed window lets twice the rate through at its
edge, this lets the rate plus a tenth of it through in any minute. A request larger than
the whole bucket (a long generation on a small ``tpm``) is let through when the bucket is
full, and its cost is owed.

With Redis (``cache.backend = "redis"``) the buckets live there and every replica shares
them: one script checks and updates both of a key's buckets in one round trip, on Redis'
clock. A request's unused tokens go back with the next admission of its key on this
replica (the same round trip), so a request costs one round trip, never two; until then the
limit is a little stricter, never looser. When Redis cannot be reached each replica counts
on its own until it can again (degraded, like the cache): a limit then holds per replica,
never fails a request. Requests in flight (``max_parallel``) are counted on each replica.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from ensemble_ops.access.keys import Caller
from ensemble_ops.config import ApiKeySpec, Settings
from ensemble_ops.events import EventBus, LimitsBackendChanged

if TYPE_CHECKING:  # imports redis: only when a shared backend is configured
    from ensemble_ops.serving.guarded_redis import GuardedRedis

__all__ = ["BURST_S", "Decision", "LimitKind", "Limits", "LimitsHealth", "Quota", "duration"]

BURST_S = 10.0
"""A bucket holds this many seconds' worth of its rate."""
LimitKind = Literal["requests", "tokens", "parallel"]
_MINUTE_S = 60.0

# KEYS: requests bucket, tokens bucket. ARGV: per-unit seconds, tolerance and cost of each
# (0 per-unit: no such limit), the buckets' expiry, and seconds of tokens to give back first
# (the unused part of this replica's earlier requests; negative: owed). Returns: allowed
# (1/0), the refusing limit, seconds until allowed, and each bucket's TAT minus now.
_ADMIT = """
local t = redis.call("TIME")
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local refund = tonumber(ARGV[8])
if refund ~= 0 and tonumber(ARGV[4]) > 0 then
  local back = tonumber(redis.call("GET", KEYS[2]) or "0") - refund
  if back < now then back = now end
  redis.call("SET", KEYS[2], tostring(back), "PX", tonumber(ARGV[7]))
end
local function probe(key, per_unit, tolerance, cost)
  if per_unit == 0 then return true, 0, 0 end
  local tat = tonumber(redis.call("GET", key) or "0")
  if tat < now then tat = now end
  local after = tat + cost * per_unit
  local ok = (after - now <= tolerance) or (tat <= now)
  return ok, after, tat
end
local r_ok, r_after, r_tat = probe(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]))
local k_ok, k_after, k_tat = probe(KEYS[2], tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]))
local ttl = tonumber(ARGV[7])
if r_ok and k_ok then
  if tonumber(ARGV[1]) > 0 then redis.call("SET", KEYS[1], tostring(r_after), "PX", ttl) end
  if tonumber(ARGV[4]) > 0 then redis.call("SET", KEYS[2], tostring(k_after), "PX", ttl) end
  return {1, "", "0", tostring(r_after - now), tostring(k_after - now)}
end
if not r_ok then
  return {0, "requests", tostring(r_after - now - tonumber(ARGV[2])),
          tostring(r_tat - now), tostring(k_tat - now)}
end
return {0, "tokens", tostring(k_after - now - tonumber(ARGV[5])),
        tostring(r_tat - now), tostring(k_tat - now)}
"""


@dataclass(frozen=True)
class Quota:
    """One limit after a decision: what OpenAI's ``x-ratelimit-*`` headers say."""

    limit: int
    remaining: int
    reset_s: float
    """Until the bucket is full again."""


@dataclass(frozen=True)
class Decision:
    """Whether a request may go on; which limit refused it and when to retry if not."""

    allowed: bool
    refused: LimitKind | None = None
    retry_after_s: float = 0.0
    requests: Quota | None = None
    tokens: Quota | None = None
    reserved_tokens: int = 0
    shared: bool = False
    """Decided by the buckets in Redis (the refund goes there), not this replica's."""


@dataclass(frozen=True)
class LimitsHealth:
    """Where the limits are counted, and whether that works: ``redis`` down means each
    replica counts on its own until it answers again."""

    backend: Literal["memory", "redis"]
    up: bool
    reason: str | None = None


def duration(seconds: float) -> str:
    """OpenAI's reset format: ``1s``, ``6m0s``, ``120ms``."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    whole = math.ceil(seconds)
    minutes, rest = divmod(whole, 60)
    return f"{minutes}m{rest}s" if minutes else f"{rest}s"


@dataclass
class _Buckets:
    """One key's buckets on this replica: TATs on the monotonic clock, requests in flight."""

    requests_tat: float = 0.0
    tokens_tat: float = 0.0
    in_flight: int = 0


@dataclass(frozen=True)
class _Rates:
    """A key's per-unit seconds and tolerance for each limit (0 per-unit: none)."""

    request_s: float
    request_tolerance_s: float
    token_s: float
    token_tolerance_s: float

    @classmethod
    def of(cls, key: ApiKeySpec) -> _Rates:
        request_s = _MINUTE_S / key.rpm if key.rpm else 0.0
        token_s = _MINUTE_S / key.tpm if key.tpm else 0.0
        return cls(
            request_s,
            _tolerance(key.rpm, request_s),
            token_s,
            _tolerance(key.tpm, token_s),
        )


def _tolerance(rate: int | None, per_unit_s: float) -> float:
    """A bucket of BURST_S worth of ``rate`` (at least one unit)."""
    if not rate:
        return 0.0
    return max(per_unit_s, rate * BURST_S / _MINUTE_S * per_unit_s)


def _probe(
    tat: float, now: float, per_unit_s: float, tolerance_s: float, cost: float
) -> tuple[bool, float, float]:
    """(allowed, the TAT after it, the TAT before it)."""
    if per_unit_s == 0:
        return True, now, now
    tat = max(tat, now)
    after = tat + cost * per_unit_s
    return after - now <= tolerance_s or tat <= now, after, tat


class Limits:
    """Every key's limits on this replica, with its buckets in Redis when given one."""

    def __init__(self, redis: GuardedRedis | None = None, namespace: str = "ensemble-ops"):
        """``redis``: shared by the replicas (None: this replica counts alone)."""
        self.redis = redis
        self._namespace = namespace
        self._buckets: dict[str, _Buckets] = {}
        self._scripts: dict[str, Any] = {}
        self._refunds: dict[str, float] = {}  # seconds of tokens owed back to Redis, by key

    @classmethod
    def for_settings(cls, settings: Settings, bus: EventBus) -> Limits:
        """The keys' limits: in Redis when the cache is there and some key has a rate (every
        replica then enforces one limit), else counted by this replica. Redis coming and
        going is published as ``LimitsBackendChanged``."""
        rated = any(key.rpm or key.tpm for key in settings.auth.keys)
        cache = settings.cache
        if not (rated and cache.enabled and cache.backend == "redis" and cache.url is not None):
            return cls()
        from ensemble_ops.serving.guarded_redis import GuardedRedis  # imports redis

        redis = GuardedRedis(
            cache.url.get_secret_value(),
            cache.timeout_s,
            on_failed=lambda operation, why: None,  # the change of state is what is reported
            on_changed=lambda up, why: bus.publish(LimitsBackendChanged(up, why)),
        )
        return cls(redis, cache.namespace)

    async def health(self) -> LimitsHealth:
        """The backend's state, asking Redis when it is not known to answer."""
        if self.redis is None:
            return LimitsHealth("memory", up=True)
        if not self.redis.up:
            await self.redis.ping()
        return LimitsHealth("redis", bool(self.redis.up), self.redis.reason)

    async def admit(self, caller: Caller, tokens: int) -> Decision:
        """Check and take what ``caller``'s request needs: one request, ``tokens`` tokens
        (its prompt and ``max_tokens``), one place in flight. A refused request takes
        nothing. Callers without a key have no limits."""
        key = caller.key
        if key is None:
            return Decision(True)
        buckets = self._buckets.setdefault(key.name, _Buckets())
        if key.max_parallel is not None and buckets.in_flight >= key.max_parallel:
            return Decision(False, "parallel", 1.0, *self._quotas(key, buckets))
        rates = _Rates.of(key)
        if rates.request_s or rates.token_s:
            decision = await self._shared(key, rates, tokens)
            if decision is None:
                decision = self._local(key, rates, buckets, tokens)
            if not decision.allowed:
                return decision
        else:
            decision = Decision(True, reserved_tokens=tokens)
        buckets.in_flight += 1
        return decision

    async def finish(
        self, caller: Caller, reserved: int, used: int, *, shared: bool = False
    ) -> None:
        """The request ended: its place in flight is free, and the tokens it reserved but
        did not use go back (more than reserved: the rest is charged), to Redis with the
        key's next admission when ``shared`` (Redis decided it), here at once otherwise."""
        key = caller.key
        if key is None:
            return
        buckets = self._buckets.setdefault(key.name, _Buckets())
        buckets.in_flight = max(0, buckets.in_flight - 1)
        if not key.tpm or reserved == used:
            return
        back_s = (reserved - used) * _MINUTE_S / key.tpm
        if shared:
            self._refunds[key.name] = self._refunds.get(key.name, 0.0) + back_s
            return
        buckets.tokens_tat = max(buckets.tokens_tat - back_s, time.monotonic())

    # -- the buckets -------------------------------------------------------------------------

    def _local(self, key: ApiKeySpec, rates: _Rates, buckets: _Buckets, tokens: int) -> Decision:
        now = time.monotonic()
        r_ok, r_after, r_tat = _probe(
            buckets.requests_tat, now, rates.request_s, rates.request_tolerance_s, 1
        )
        k_ok, k_after, k_tat = _probe(
            buckets.tokens_tat, now, rates.token_s, rates.token_tolerance_s, tokens
        )
        if r_ok and k_ok:
            buckets.requests_tat, buckets.tokens_tat = r_after, k_after
            return _decision(key, rates, True, None, 0.0, r_after - now, k_after - now, tokens)
        refused: LimitKind = "requests" if not r_ok else "tokens"
        retry = (
            r_after - now - rates.request_tolerance_s
            if not r_ok
            else k_after - now - rates.token_tolerance_s
        )
        return _decision(key, rates, False, refused, retry, r_tat - now, k_tat - now, 0)

    async def _shared(self, key: ApiKeySpec, rates: _Rates, tokens: int) -> Decision | None:
        """The decision of the buckets in Redis; None when Redis could not be asked."""
        if self.redis is None:
            return None
        script = self._script("admit", _ADMIT)
        keys = [self._key(key, "requests"), self._key(key, "tokens")]
        refund = self._refunds.get(key.name, 0.0)
        args = [
            rates.request_s,
            rates.request_tolerance_s,
            1,
            rates.token_s,
            rates.token_tolerance_s,
            tokens,
            _TTL_MS,
            refund,
        ]
        answer = await self.redis.call("admit", lambda: script(keys=keys, args=args), None)
        if answer is None:
            return None  # the refund waits for Redis to answer again
        self._refunds[key.name] = self._refunds.get(key.name, 0.0) - refund
        allowed, refused, retry, requests_s, tokens_s = answer
        kind: LimitKind | None = None
        if not int(allowed):
            kind = "requests" if _text(refused) == "requests" else "tokens"
        return _decision(
            key,
            rates,
            bool(int(allowed)),
            kind,
            float(retry),
            float(requests_s),
            float(tokens_s),
            tokens if int(allowed) else 0,
            shared=True,
        )

    def _quotas(self, key: ApiKeySpec, buckets: _Buckets) -> tuple[Quota | None, Quota | None]:
        now = time.monotonic()
        rates = _Rates.of(key)
        return (
            _quota(key.rpm, rates.request_s, rates.request_tolerance_s, buckets.requests_tat - now),
            _quota(key.tpm, rates.token_s, rates.token_tolerance_s, buckets.tokens_tat - now),
        )

    def _key(self, key: ApiKeySpec, kind: str) -> str:
        # The hash prefix, never the key: two keys with one name in two configs stay apart.
        return f"{self._namespace}:limit:{key.name}:{key.key_sha256[:16]}:{kind}"

    def _script(self, name: str, source: str) -> Any:
        assert self.redis is not None
        if name not in self._scripts:
            self._scripts[name] = self.redis.client.register_script(source)
        return self._scripts[name]


_TTL_MS = int((_MINUTE_S + BURST_S) * 1000 * 2)
"""Buckets left untouched this long are full again: Redis may forget them."""


def _decision(
    key: ApiKeySpec,
    rates: _Rates,
    allowed: bool,
    refused: LimitKind | None,
    retry_after_s: float,
    requests_ahead_s: float,
    tokens_ahead_s: float,
    reserved: int,
    *,
    shared: bool = False,
) -> Decision:
    return Decision(
        allowed,
        refused,
        max(retry_after_s, 0.0),
        _quota(key.rpm, rates.request_s, rates.request_tolerance_s, requests_ahead_s),
        _quota(key.tpm, rates.token_s, rates.token_tolerance_s, tokens_ahead_s),
        reserved,
        shared,
    )


def _quota(rate: int | None, per_unit_s: float, tolerance_s: float, ahead_s: float) -> Quota | None:
    """The headers' view of a bucket whose TAT is ``ahead_s`` past now."""
    if not rate:
        return None
    ahead_s = max(ahead_s, 0.0)
    remaining = max(0, math.floor((tolerance_s - ahead_s) / per_unit_s))
    return Quota(rate, remaining, ahead_s)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
