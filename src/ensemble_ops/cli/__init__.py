"""Command line: ``serve``, ``reload``, ``models`` and ``demo-models``."""

from ensemble_ops.cli.main import main

__all__ = ["main"]
