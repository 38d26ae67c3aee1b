"""Structured logging: structlog and the standard library into one JSON-lines stream.

structlog's own events, hypercorn's access and error logs and llama.cpp's output (see
``llama_log``) all become records of the root ``logging`` logger, rendered by one
``ProcessorFormatter``: one JSON object per line on stdout, or in a file to tail.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Literal, TextIO

import structlog
from opentelemetry import trace

__all__ = ["add_trace_ids", "configure_logging"]


def add_trace_ids(
    logger: Any, method: str, event: structlog.types.EventDict
) -> structlog.types.EventDict:
    """``trace_id`` and ``span_id`` of the span current where the line is written, so a log
    line leads to its trace (nothing is added outside a recording span, or tracing off)."""
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        event.setdefault("trace_id", format(context.trace_id, "032x"))
        event.setdefault("span_id", format(context.span_id, "016x"))
    return event


_shared_processors: list[structlog.types.Processor] = [
    structlog.contextvars.merge_contextvars,
    add_trace_ids,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.stdlib.ExtraAdder(),
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


def configure_logging(
    fmt: Literal["json", "console"] = "json",
    level: str = "info",
    file: Path | None = None,
    stream: TextIO | None = None,
) -> None:
    """Send every log record to ``file`` (appended) or ``stream`` (stdout by default)."""
    renderer: structlog.types.Processor
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_shared_processors,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler: logging.Handler
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(file, encoding="utf-8")
    else:
        handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # transitions logs every exception a state callback raises at error level, as text. The
    # reload machine handles them all (on_exception) and the log view reports each failed
    # reload with its reason as one structured line, so these would only be noise.
    logging.getLogger("transitions").setLevel(logging.CRITICAL)
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *_shared_processors,
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Not cached: structlog.testing.capture_logs must keep working in tests.
        cache_logger_on_first_use=False,
    )
