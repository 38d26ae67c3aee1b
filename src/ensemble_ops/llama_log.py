"""Route llama.cpp's own log output into the service's structured log.

By default llama-cpp-python prints llama.cpp's log text straight to stderr, in fragments
that do not end at line boundaries. Here a ctypes callback joins the fragments into lines and
hands each to the standard ``logging`` logger ``llama_cpp``, whose records the structlog
formatter renders as JSON like every other line: llama.cpp never writes into the middle of
a JSON line. Warnings and errors are kept; llama.cpp's chatty info lines are debug records.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from typing import Any

__all__ = ["route_llama_logs"]

_logger = logging.getLogger("llama_cpp")
# ggml_log_level: 0 none, 1 debug, 2 info, 3 warn, 4 error, 5 continuation of the last line.
_LEVELS = {1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR}
_lock = threading.Lock()
_pending: list[str] = []
_pending_level = logging.DEBUG
_installed: Any = None  # keeps the ctypes callback alive for as long as llama.cpp holds it


def _on_log(level: int, text: bytes, _user_data: Any) -> None:
    global _pending_level
    fragment = text.decode("utf-8", errors="replace")
    with _lock:
        if level != 5:
            _pending_level = _LEVELS.get(level, logging.DEBUG)
        _pending.append(fragment)
        if not fragment.endswith("\n"):
            return
        line = "".join(_pending).strip()
        _pending.clear()
        log_level = _pending_level
    if line and _logger.isEnabledFor(log_level):
        _logger.log(log_level, line)


def route_llama_logs() -> None:
    """Install the callback once per process (idempotent)."""
    global _installed
    if _installed is not None:
        return
    import llama_cpp

    _installed = llama_cpp.llama_log_callback(_on_log)
    llama_cpp.llama_log_set(_installed, ctypes.c_void_p(0))
