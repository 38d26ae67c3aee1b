"""OpenTelemetry traces: the span tree of requests and reloads, propagation, log links."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import structlog
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from starlette.applications import Starlette

from ensemble_ops.config import Settings
from ensemble_ops.http.app import create_app
from ensemble_ops.observability.logs import configure_logging
from ensemble_ops.serving.engine import Engine
from ensemble_ops.serving.llama_engine import LlamaEngine

from ..conftest import FlakyEngine, SettingsFactory, serving

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture(name="traced")
async def _traced(
    settings: Settings, provider: TracerProvider
) -> AsyncIterator[tuple[Starlette, httpx.AsyncClient]]:
    app = create_app(settings, tracer_provider=provider)
    async with serving(app) as client:
        yield app, client


def _children(spans: list[ReadableSpan], parent: ReadableSpan) -> list[ReadableSpan]:
    return [s for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id]


def _request_tree(
    exporter: InMemorySpanExporter, name: str
) -> tuple[ReadableSpan, list[ReadableSpan]]:
    """The one server span called ``name`` and its children, in start order."""
    spans = list(exporter.get_finished_spans())
    (server,) = [s for s in spans if s.name == name and s.kind == SpanKind.SERVER]
    children = sorted(_children(spans, server), key=lambda s: s.start_time or 0)
    return server, children


def _attributes(span: ReadableSpan) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in (span.attributes or {}).items()}


class TestRequestSpans:
    async def test_a_completion(
        self, traced: tuple[Starlette, httpx.AsyncClient], exporter: InMemorySpanExporter
    ) -> None:
        """POST /v1/completions: a SERVER span with one INTERNAL attempt span, GenAI
        attributes as the conventions name them, usage equal to the response's."""
        _, client = traced
        response = await client.post(
            "/v1/completions",
            json={"model": "demo-tiny", "prompt": "Hello", "max_tokens": 5, "temperature": 0.5},
        )
        body = response.json()
        server, (attempt,) = _request_tree(exporter, "POST /v1/completions")
        assert _attributes(server) | {} == {
            "http.request.method": "POST",
            "url.path": "/v1/completions",
            "http.route": "/v1/completions",
            "http.response.status_code": 200,
        }
        assert attempt.name == "text_completion demo-tiny"
        assert attempt.kind == SpanKind.INTERNAL
        assert _attributes(attempt) == {
            "gen_ai.operation.name": "text_completion",
            "gen_ai.provider.name": "llama.cpp",
            "gen_ai.request.model": "demo-tiny",
            "gen_ai.response.model": "demo-tiny",
            "gen_ai.response.id": body["id"],
            "gen_ai.request.max_tokens": 5,
            "gen_ai.request.temperature": 0.5,
            "gen_ai.request.top_p": 0.95,
            "gen_ai.request.stream": False,
            "ensemble_ops.mode": "balanced",
            "gen_ai.usage.input_tokens": body["usage"]["prompt_tokens"],
            "gen_ai.usage.output_tokens": 5,
            "gen_ai.response.finish_reasons": ["length"],
        }
        assert [e.name for e in attempt.events] == ["ensemble_ops.started"]
        assert attempt.status.status_code == StatusCode.UNSET

    async def test_a_streamed_chat(
        self, traced: tuple[Starlette, httpx.AsyncClient], exporter: InMemorySpanExporter
    ) -> None:
        """A streamed chat's attempt span covers the stream: first token event, usage, end."""
        _, client = traced
        response = await client.post(
            "/v1/chat/completions",
            json={
                "model": "ensemble",
                "mode": "fast",
                "stream": True,
                "max_tokens": 6,
                "messages": [{"role": "user", "content": "Hi"}],
            },
        )
        assert response.status_code == 200
        _, (attempt,) = _request_tree(exporter, "POST /v1/chat/completions")
        attributes = _attributes(attempt)
        assert attempt.name == "chat ensemble"
        assert attributes["gen_ai.operation.name"] == "chat"
        assert attributes["gen_ai.request.model"] == "ensemble"
        assert attributes["gen_ai.response.model"] == "demo-tiny"
        assert attributes["gen_ai.request.stream"] is True
        assert attributes["gen_ai.usage.output_tokens"] == 6
        assert attributes["gen_ai.response.finish_reasons"] == ["length"]
        assert [e.name for e in attempt.events] == [
            "ensemble_ops.started",
            "ensemble_ops.first_token",
        ]
        assert "gen_ai.input.messages" not in attributes  # no content unless opted in

    async def test_content_is_on_the_span_when_the_config_opts_in(
        self,
        make_settings: SettingsFactory,
        provider: TracerProvider,
        exporter: InMemorySpanExporter,
    ) -> None:
        """tracing.capture_content = true: the attempt span carries the chat's messages and
        the answer, as the GenAI conventions shape them."""
        app = create_app(make_settings(tracing={"capture_content": True}), tracer_provider=provider)
        async with serving(app) as client:
            response = await client.post(
                "/v1/chat/completions",
                json={
                    "model": "demo-tiny",
                    "max_tokens": 4,
                    "messages": [{"role": "user", "content": "Hi"}],
                },
            )
        answer = response.json()["choices"][0]["message"]["content"]
        _, (attempt,) = _request_tree(exporter, "POST /v1/chat/completions")
        attributes = _attributes(attempt)
        asked = [{"role": "user", "parts": [{"type": "text", "content": "Hi"}]}]
        assert json.loads(attributes["gen_ai.input.messages"]) == asked
        (said,) = json.loads(attributes["gen_ai.output.messages"])
        assert (said["role"], said["parts"]) == ("assistant", [{"type": "text", "content": answer}])

    async def test_a_cache_hit(
        self, traced: tuple[Starlette, httpx.AsyncClient], exporter: InMemorySpanExporter
    ) -> None:
        """A deterministic request is a miss, then a hit; both attempts say which."""
        _, client = traced
        request = {"model": "demo-small", "prompt": "Same", "max_tokens": 4, "temperature": 0}
        for _ in range(2):
            await client.post("/v1/completions", json=request)
        attempts = [
            s for s in exporter.get_finished_spans() if s.name == "text_completion demo-small"
        ]
        assert [_attributes(s)["ensemble_ops.cache"] for s in attempts] == ["miss", "hit"]
        assert [len(s.events) for s in attempts] == [1, 0]  # a hit runs no worker
        assert _attributes(attempts[1])["gen_ai.usage.output_tokens"] == 4

    async def test_a_fallback_makes_sibling_attempts(
        self, settings: Settings, provider: TracerProvider, exporter: InMemorySpanExporter
    ) -> None:
        """The preferred member fails, the next answers: two attempts under one request."""

        def loader(spec: Any) -> Engine:
            engine = LlamaEngine.load(spec)
            return FlakyEngine(engine) if spec.name == "demo-small" else engine

        app = create_app(settings, loader=loader, tracer_provider=provider)
        async with serving(app) as client:
            response = await client.post(
                "/v1/completions", json={"prompt": "x", "max_tokens": 2, "mode": "balanced"}
            )
        assert response.json()["model"] == "demo-base"
        _, (failed, answered) = _request_tree(exporter, "POST /v1/completions")
        assert (failed.name, answered.name) == (
            "text_completion ensemble",
            "text_completion ensemble",
        )
        assert _attributes(failed)["gen_ai.response.model"] == "demo-small"
        assert _attributes(failed)["error.type"] == "engine_error"
        assert failed.status.status_code == StatusCode.ERROR
        assert [e.name for e in failed.events] == ["ensemble_ops.started", "exception"]
        assert _attributes(answered)["gen_ai.response.model"] == "demo-base"
        assert answered.status.status_code == StatusCode.UNSET

    async def test_a_request_that_fails(
        self, traced: tuple[Starlette, httpx.AsyncClient], exporter: InMemorySpanExporter
    ) -> None:
        """A prompt over the context: the attempt says error.type context_length_exceeded,
        the server span the 400."""
        _, client = traced
        response = await client.post(
            "/v1/completions", json={"model": "demo-tiny", "prompt": "x", "max_tokens": 4000}
        )
        assert response.status_code == 400
        server, (attempt,) = _request_tree(exporter, "POST /v1/completions")
        assert _attributes(attempt)["error.type"] == "context_length_exceeded"
        assert attempt.status.status_code == StatusCode.ERROR
        assert _attributes(server)["http.response.status_code"] == 400


class TestReloadSpans:
    async def test_a_completed_reload(
        self, traced: tuple[Starlette, httpx.AsyncClient], exporter: InMemorySpanExporter
    ) -> None:
        """A reload is its own trace: a root span and one child per state, drain included."""
        app, _ = traced
        status = await app.state.reload.reload_model("demo-tiny")
        assert status.state == "completed"
        spans = list(exporter.get_finished_spans())
        (root,) = [s for s in spans if s.name == "reload demo-tiny"]
        assert root.parent is None
        assert _attributes(root)["ensemble_ops.reload.outcome"] == "completed"
        states = sorted(_children(spans, root), key=lambda s: s.start_time or 0)
        assert [s.name for s in states] == ["reload.warming_up", "reload.ready", "reload.switching"]
        (drain,) = [s for s in spans if s.name == "reload.drain"]
        assert drain.parent is not None
        assert drain.parent.span_id == states[2].context.span_id  # inside switching
        assert _attributes(drain)["ensemble_ops.reload.drained"] is True

    async def test_a_failed_reload(
        self,
        settings: Settings,
        provider: TracerProvider,
        exporter: InMemorySpanExporter,
    ) -> None:
        """A failed reload's root and warming_up spans are errors carrying the reason."""
        app = create_app(settings, tracer_provider=provider)
        async with serving(app):
            slot = app.state.ensemble.slots["demo-small"]
            status = await app.state.reload.reload_model(
                "demo-small", loader_func=lambda: FlakyEngine(LlamaEngine.load(slot.spec))
            )
        assert status.state == "failed"
        spans = list(exporter.get_finished_spans())
        (root,) = [s for s in spans if s.name == "reload demo-small"]
        (warming,) = [s for s in spans if s.name == "reload.warming_up"]
        assert root.status.status_code == StatusCode.ERROR
        assert root.status.description == status.error
        assert warming.status.status_code == StatusCode.ERROR
        assert [e.name for e in warming.events] == ["exception"]
        assert not [s for s in spans if s.name == "reload.switching"]


class TestPropagation:
    async def test_traceparent_in_and_traceresponse_out(
        self, traced: tuple[Starlette, httpx.AsyncClient], exporter: InMemorySpanExporter
    ) -> None:
        """An incoming traceparent makes the request part of that trace; the response's
        traceresponse names the server span."""
        _, client = traced
        response = await client.get("/v1/models", headers={"traceparent": TRACEPARENT})
        server, _ = _request_tree(exporter, "GET /v1/models")
        assert server.context.trace_id == int("0af7651916cd43dd8448eb211c80319c", 16)
        assert server.parent is not None
        assert server.parent.span_id == int("b7ad6b7169203331", 16)
        assert response.headers["traceresponse"] == (
            f"00-{server.context.trace_id:032x}-{server.context.span_id:016x}-01"
        )

    async def test_log_lines_carry_the_ids(
        self, traced: tuple[Starlette, httpx.AsyncClient], exporter: InMemorySpanExporter
    ) -> None:
        """The request's log line names its trace and span."""
        _, client = traced
        stream = io.StringIO()
        configure_logging("json", "debug", stream=stream)
        try:
            await client.post("/v1/completions", json={"model": "demo-tiny", "prompt": "x"})
        finally:
            logging.getLogger().handlers.clear()
            structlog.reset_defaults()
        server, (attempt,) = _request_tree(exporter, "POST /v1/completions")
        lines = [json.loads(line) for line in stream.getvalue().splitlines()]
        (request_line,) = [line for line in lines if line["event"] == "request"]
        assert request_line["trace_id"] == f"{server.context.trace_id:032x}"
        assert request_line["span_id"] == f"{server.context.span_id:016x}"
        finished = [line for line in lines if line["event"] == "inference.finished"]
        assert finished
        assert finished[0]["span_id"] in (
            f"{attempt.context.span_id:016x}",
            f"{server.context.span_id:016x}",
        )


class TestOff:
    def test_tracing_off_imports_no_sdk(self, make_settings: SettingsFactory) -> None:
        """Without [tracing] or OTEL_* endpoints, building and serving imports no SDK."""
        code = (
            "import sys\n"
            "from ensemble_ops.http.app import create_app\n"
            "from ensemble_ops.serving.builtin import demo_settings\n"
            "create_app(demo_settings(environ={}))\n"
            "print(sorted(m for m in sys.modules if m.startswith('opentelemetry.sdk')))\n"
        )
        run = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
        )
        assert run.returncode == 0, run.stderr
        assert run.stdout.strip() == "[]"

    def test_standard_variables_turn_it_on_and_off(self, make_settings: SettingsFactory) -> None:
        """OTEL_EXPORTER_OTLP_ENDPOINT turns tracing on (with /v1/traces appended);
        OTEL_SDK_DISABLED=true turns it off again."""
        base = make_settings().model_dump(mode="python")
        base["tracing"] = {}
        for spec in base["models"]:
            spec["path"] = str(spec["path"])
        on = Settings.from_mapping(
            base, environ={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/"}
        )
        off = Settings.from_mapping(
            base,
            environ={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"},
        )
        traces = Settings.from_mapping(
            base, environ={"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t:4318/x"}
        )
        assert on.tracing.active
        assert on.tracing.endpoint == "http://collector:4318/v1/traces"
        assert not off.tracing.active
        assert traces.tracing.endpoint == "http://t:4318/x"
        assert not make_settings().tracing.active
