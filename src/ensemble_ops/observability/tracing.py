"""OpenTelemetry tracing: the SDK's provider with an OTLP/HTTP exporter, when tracing is on.

When ``[tracing]`` is not active nothing here imports the SDK: components get the API's
``NoOpTracer``, whose spans cost a few attribute look-ups. When it is, spans go through a
``BatchSpanProcessor`` (the SDK's defaults, overridable with the standard
``OTEL_BSP_*`` variables: queue 2048 spans, batches of 512, every 5 s) to the OTLP endpoint.
The provider is the app's own, not the process-global one, so two apps never mix traces.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from opentelemetry.trace import NoOpTracer, Tracer

from ensemble_ops._version import __version__
from ensemble_ops.config import TracingSettings
from ensemble_ops.errors import ConfigError
from ensemble_ops.serving.spans import SEMCONV_VERSION

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

__all__ = ["TRACER_NAME", "build_tracer_provider", "tracer_of"]

TRACER_NAME = "ensemble_ops"


def build_tracer_provider(settings: TracingSettings) -> TracerProvider | None:
    """The SDK provider exporting to ``settings.endpoint``, or None when tracing is off."""
    if not settings.active:
        return None
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as err:
        raise ConfigError(
            "tracing: on, but the OpenTelemetry SDK is not installed "
            "(pip install 'ensemble-ops[tracing]')"
        ) from err
    attributes = {"service.version": __version__}
    if not os.environ.get("OTEL_SERVICE_NAME"):  # the standard variable wins
        attributes["service.name"] = "ensemble-ops"
    provider = TracerProvider(resource=Resource.create(attributes))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=settings.endpoint)))
    return provider


def tracer_of(provider: TracerProvider | None) -> Tracer:
    """The package's tracer from ``provider``, or a no-op one without a provider."""
    if provider is None:
        return NoOpTracer()
    return provider.get_tracer(
        TRACER_NAME,
        __version__,
        schema_url=f"https://opentelemetry.io/schemas/{SEMCONV_VERSION}",
    )
