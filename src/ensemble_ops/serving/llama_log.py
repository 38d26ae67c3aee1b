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

__all__ = ["LineJoiner", "route_llama_logs"]

# ggml_log_level: 0 none, 1 debug, 2 info, 3 warn, 4 error, 5 continuation of the last line.
_LEVELS = {1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR}


class LineJoiner:
    """Joins llama.cpp's log fragments into whole lines for a ``logging`` logger."""

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger
        self._lock = threading.Lock()  # llama.cpp logs from any thread
        self._pending: list[str] = []
        self._level = logging.DEBUG

    def feed(self, level: int, text: bytes) -> None:
        """One fragment as llama.cpp hands it over (level 5 continues the last one)."""
        fragment = text.decode("utf-8", errors="replace")
        with self._lock:
            if level != 5:
                self._level = _LEVELS.get(level, logging.DEBUG)
            self._pending.append(fragment)
            if not fragment.endswith("\n"):
                return
            line = "".join(self._pending).strip()
            self._pending.clear()
            log_level = self._level
        if line and self._logger.isEnabledFor(log_level):
            self._logger.log(log_level, line)


# llama.cpp has one log callback per process, so this state is process-wide by nature.
_joiner = LineJoiner(logging.getLogger("llama_cpp"))
_installed: Any = None  # keeps the ctypes callback alive for as long as llama.cpp holds it


def _on_log(level: int, text: bytes, _user_data: Any) -> None:
    _joiner.feed(level, text)


def route_llama_logs() -> None:
    """Install the callback once per process (idempotent)."""
    global _installed
    if _installed is not None:
        return
    import llama_cpp

    _installed = llama_cpp.llama_log_callback(_on_log)
    llama_cpp.llama_log_set(_installed, ctypes.c_void_p(0))
