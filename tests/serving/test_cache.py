"""The response cache: bounded, expiring, keyed by generation."""

from __future__ import annotations

from ensemble_ops.serving.cache import ResponseCache, is_deterministic
from ensemble_ops.serving.engine import Completion, GenerationParams

PARAMS = GenerationParams(max_tokens=4, temperature=0.0, top_p=1.0)
ANSWER = Completion("hi", "length", 1, 4)


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class TestResponseCache:
    def test_deterministic_requests(self) -> None:
        """Temperature 0 or a seed makes a request cacheable; sampling does not."""
        assert is_deterministic(PARAMS)
        assert is_deterministic(GenerationParams(4, 0.8, 1.0, seed=3))
        assert not is_deterministic(GenerationParams(4, 0.8, 1.0))

    def test_entries_expire(self) -> None:
        """An entry is gone after ttl_s."""
        clock = _Clock()
        cache = ResponseCache(10, ttl_s=5.0, timer=clock)
        key = cache.key("m", 1, "p", PARAMS)
        cache.put(key, ANSWER)
        clock.now = 4.9
        assert cache.get(key) == ANSWER
        clock.now = 5.1
        assert cache.get(key) is None

    def test_bounded_lru(self) -> None:
        """Past max_entries the least recently used entry goes."""
        cache = ResponseCache(2, ttl_s=60.0)
        a, b, c = (cache.key("m", 1, p, PARAMS) for p in "abc")
        cache.put(a, ANSWER)
        cache.put(b, ANSWER)
        cache.get(a)
        cache.put(c, ANSWER)
        assert (cache.get(a), cache.get(b), cache.get(c)) == (ANSWER, None, ANSWER)
        assert len(cache) == 2

    def test_key_holds_generation_and_every_parameter(self) -> None:
        """A new generation (a reload) or any other parameter is a different key."""
        base = ResponseCache.key("m", 1, "p", PARAMS)
        assert base == ResponseCache.key("m", 1, "p", PARAMS)
        assert base != ResponseCache.key("m", 2, "p", PARAMS)
        assert base != ResponseCache.key("n", 1, "p", PARAMS)
        assert base != ResponseCache.key("m", 1, "p", GenerationParams(5, 0.0, 1.0))
        assert base != ResponseCache.key("m", 1, "p", GenerationParams(4, 0.0, 1.0, stop=("x",)))
