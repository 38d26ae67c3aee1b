"""Sticky choices: the same session key always lands in the same bucket, on every replica.

A conversation that moves between two copies of a model (or two members of an A/B split)
mid-way would read as one voice changing its mind; hashing the key instead of drawing a
random number keeps it on one side, and the share of keys per side follows the weights.
"""

from __future__ import annotations

import hashlib
import random

__all__ = ["bucket"]


def bucket(key: str | None) -> float:
    """A number in [0, 100): fixed for a key (its SHA-256), random for a request without one."""
    if key is None:
        return random.random() * 100  # a traffic split, not a secret
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * 100
