"""The response cache: keys that name the model's content, and the memory or Redis backend."""

from ensemble_ops.serving.cache.backend import CacheHealth, ResponseCache, open_cache
from ensemble_ops.serving.cache.digests import DigestStore, default_digest_file
from ensemble_ops.serving.cache.keys import cache_key, is_deterministic, model_identity
from ensemble_ops.serving.cache.memory import MemoryCache

__all__ = [
    "CacheHealth",
    "DigestStore",
    "MemoryCache",
    "ResponseCache",
    "cache_key",
    "default_digest_file",
    "is_deterministic",
    "model_identity",
    "open_cache",
]
