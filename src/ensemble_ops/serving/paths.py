"""Where ensemble-ops keeps files of its own: demo and fetched models, model digests."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_home"]


def cache_home() -> Path:
    """``$XDG_CACHE_HOME/ensemble-ops``, or ``~/.cache/ensemble-ops`` without it."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ensemble-ops"
