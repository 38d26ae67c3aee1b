"""Cache keys: the model's identity, the prompt and every parameter that shapes the answer.

A key never names a process, a member or a generation counter: replicas that serve the same
weights with the same settings share entries, and a copy loaded from other weights or with
other settings has another identity, so it never sees the old copy's answers.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

from ensemble_ops._version import __version__
from ensemble_ops.config import ModelSpec
from ensemble_ops.serving.engine import ChatMessage, GenerationParams

__all__ = ["cache_key", "is_deterministic", "model_identity"]

KEY_VERSION = 1
"""Bumped when what a key covers changes, so old entries are never read with a new meaning."""


def is_deterministic(params: GenerationParams) -> bool:
    """Whether the same request always produces the same text."""
    return params.temperature == 0 or params.seed is not None


def model_identity(spec: ModelSpec, content_sha256: str) -> str:
    """What makes two loaded copies answer alike: the GGUF's bytes (weights, tokenizer and
    chat template), the member settings that change output, and this release (its sampler).
    """
    material = {
        "sha256": content_sha256,
        "n_ctx": spec.n_ctx,
        "release": __version__,
    }
    return _digest(material)


def cache_key(
    identity: str,
    prompt: str | None,
    messages: Sequence[ChatMessage],
    params: GenerationParams,
) -> str:
    """A hex digest naming one answer: the same on every replica for the same request."""
    material = {
        "v": KEY_VERSION,
        "model": identity,
        "prompt": prompt,
        "messages": [[m.role, m.content] for m in messages],
        "params": [params.max_tokens, params.temperature, params.top_p, params.seed],
        "stop": list(params.stop),
    }
    return _digest(material)


def _digest(material: object) -> str:
    canonical = json.dumps(material, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()
