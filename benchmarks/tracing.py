"""Tracing benchmark: what OpenTelemetry costs per request, on against off, in-process.

The app runs in this process (httpx's ASGI transport, lifespan entered) on the smallest demo
member; each round sends the same 16-token completions with tracing off (the API's no-op
tracer, no SDK) and on (the SDK with the production ``BatchSpanProcessor`` at its default
settings: queue 2048, batches of 512, every 5 s, and an exporter that drops the batches, so
the figure is the service's own cost, not a collector's network). Rounds alternate; the
medians give the cost per request. Writes ``benchmarks/results/tracing.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import httpx
from asgi_lifespan import LifespanManager
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import NoOpTracer, SpanKind, Tracer

from benchmarks.harness import RESULTS_DIR, machine, median, save
from ensemble_ops.http.app import create_app
from ensemble_ops.observability.logs import configure_logging
from ensemble_ops.serving.builtin import demo_settings
from ensemble_ops.serving.engine import Completion, GenerationParams
from ensemble_ops.serving.ensemble import InferenceRequest
from ensemble_ops.serving.spans import AttemptSpan

RESULTS = RESULTS_DIR / "tracing.json"


class _Discard(SpanExporter):
    """Takes each batch and drops it: the SDK's work without a collector's."""

    def __init__(self) -> None:
        self.spans = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.spans += len(spans)
        return SpanExportResult.SUCCESS


async def _round(models: Path, requests: int, traced: bool) -> tuple[float, int]:
    """Seconds per request, and the spans exported."""
    settings = demo_settings(models, environ={})
    settings = settings.model_copy(
        update={"models": tuple(m for m in settings.models if m.name == "demo-tiny")}
    )
    exporter = _Discard()
    provider = None
    if traced:
        provider = TracerProvider()
        provider.add_span_processor(BatchSpanProcessor(exporter))
    app = create_app(settings, tracer_provider=provider)
    body = {"model": "demo-tiny", "prompt": "Trace me", "max_tokens": 16, "temperature": 0.8}
    async with LifespanManager(app) as manager:
        await app.state.ensemble.loading_done.wait()
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
            for _ in range(20):  # warm up
                await client.post("/v1/completions", json=body)
            started = time.perf_counter()
            for _ in range(requests):
                answer = await client.post("/v1/completions", json=body)
                answer.raise_for_status()
            elapsed = time.perf_counter() - started
    if provider is not None:
        provider.shutdown()  # flushes the last batch
    return elapsed / requests, exporter.spans


def span_cost_us(tracer: Tracer, samples: int) -> float:
    """Microseconds one request's spans take: the server span and one attempt span with its
    attributes, events and usage, as the middleware and the ensemble make them."""
    request = InferenceRequest(
        model="demo-tiny",
        mode="balanced",
        params=GenerationParams(max_tokens=16, temperature=0.8, top_p=0.95),
        prompt="Trace me",
        response_id="cmpl-bench",
    )
    completion = Completion("text", "length", 4, 16)
    started = time.perf_counter()
    for _ in range(samples):
        server = tracer.start_span("POST /v1/completions", kind=SpanKind.SERVER)
        with trace.use_span(server, end_on_exit=True):
            attempt = AttemptSpan.open(tracer, request, "demo-tiny", stream=False)
            with attempt.current():
                attempt.cache("miss")
                attempt.running()
                attempt.done(completion)
            server.set_attribute("http.response.status_code", 200)
    return (time.perf_counter() - started) / samples * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=400, help="per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--output", type=Path, default=RESULTS, help="results JSON file")
    args = parser.parse_args()
    # Production logging (JSON lines), kept to warnings: the request lines would otherwise
    # go to the terminal and weigh more than what is measured.
    configure_logging("json", "warning", stream=io.StringIO())
    on: list[float] = []
    off: list[float] = []
    spans = 0
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp)
        for _ in range(args.rounds):
            off.append(asyncio.run(_round(models, args.requests, traced=False))[0])
            seconds, exported = asyncio.run(_round(models, args.requests, traced=True))
            on.append(seconds)
            spans += exported
    median_on, median_off = median(on), median(off)
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(_Discard()))
    spans_on_us = span_cost_us(provider.get_tracer("bench"), 20000)
    spans_off_us = span_cost_us(NoOpTracer(), 20000)
    provider.shutdown()
    result = {
        "span_us_per_request_on": spans_on_us,
        "span_us_per_request_off": spans_off_us,
        "span_share_of_request": (spans_on_us - spans_off_us) / (median_off * 1e6),
        "request_ms_on": [round(s * 1000, 4) for s in on],
        "request_ms_off": [round(s * 1000, 4) for s in off],
        "median_ms_on": median_on * 1000,
        "median_ms_off": median_off * 1000,
        "cost_us_per_request": (median_on - median_off) * 1e6,
        "cost_share_of_request": median_on / median_off - 1,
        "spans_per_request": spans / (args.rounds * (args.requests + 20)),
        "batch_settings": {"max_queue_size": 2048, "max_export_batch_size": 512, "delay_ms": 5000},
        "machine": machine(),
    }
    print(
        f"demo-tiny, 16-token completions in-process: off {median_off * 1000:.3f} ms, "
        f"on {median_on * 1000:.3f} ms per request (medians of {args.rounds} rounds of "
        f"{args.requests}); tracing costs {result['cost_us_per_request']:.0f} us = "
        f"{result['cost_share_of_request']:.2%} of a request "
        f"({result['spans_per_request']:.1f} spans each)"
    )
    print(
        f"spans per request in-process: on {spans_on_us:.1f} us, off (no-op tracer) "
        f"{spans_off_us:.1f} us: {result['span_share_of_request']:.2%} of a "
        f"{median_off * 1000:.2f} ms request"
    )
    save(args.output, result)


if __name__ == "__main__":
    main()
