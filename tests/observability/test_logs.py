"""Logging: one JSON stream for structlog, the standard library and llama.cpp."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from ensemble_ops.observability.logs import configure_logging
from ensemble_ops.serving import llama_log


@pytest.fixture(name="stream")
def _stream() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    configure_logging("json", "info", stream=stream)
    yield stream
    logging.getLogger().handlers.clear()
    structlog.reset_defaults()


def _lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


class TestJsonLogs:
    def test_structlog_event_with_context(self, stream: io.StringIO) -> None:
        """Events are JSON objects with level, logger, timestamp and bound context."""
        with structlog.contextvars.bound_contextvars(request_id="r1"):
            structlog.get_logger("ensemble_ops.test").info("thing.happened", size=3)
        (line,) = _lines(stream)
        assert line["event"] == "thing.happened"
        assert line["size"] == 3
        assert line["request_id"] == "r1"
        assert line["level"] == "info"
        assert str(line["timestamp"]).endswith("Z")

    def test_standard_library_records_join_the_stream(self, stream: io.StringIO) -> None:
        """hypercorn's loggers come out as the same JSON."""
        logging.getLogger("hypercorn.error").warning("Something %s", "odd")
        (line,) = _lines(stream)
        assert line == line | {"event": "Something odd", "logger": "hypercorn.error"}

    def test_llama_cpp_fragments_become_one_line(self, stream: io.StringIO) -> None:
        """llama.cpp's log fragments are joined into whole lines; its chatter is debug."""
        joiner = llama_log.LineJoiner(logging.getLogger("llama_cpp"))
        joiner.feed(3, b"llama_context: n_ctx ")
        joiner.feed(5, b"too small\n")
        joiner.feed(2, b"info noise\n")
        (line,) = _lines(stream)
        assert line["event"] == "llama_context: n_ctx too small"
        assert line["logger"] == "llama_cpp"
        assert line["level"] == "warning"

    def test_console_format(self) -> None:
        """--log-format console renders for humans, not JSON."""
        stream = io.StringIO()
        configure_logging("console", "info", stream=stream)
        try:
            structlog.get_logger("x").info("hello", a=1)
        finally:
            logging.getLogger().handlers.clear()
            structlog.reset_defaults()
        assert "hello" in stream.getvalue()
        assert not stream.getvalue().startswith("{")
