"""OpenTelemetry: one server span per request, its W3C traceparent passed on to the engine.

By default spans go to an in-memory exporter (inspectable in tests and via the admin endpoint,
no collector needed on a laptop); with OTEL_EXPORTER_OTLP_ENDPOINT set they go to OTLP/HTTP.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Mapping, Sequence

from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.trace import Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

PROPAGATOR = TraceContextTextMapPropagator()


class RingExporter(SpanExporter):
    """Keeps the last `capacity` finished spans: an in-memory exporter whose memory is bounded."""

    def __init__(self, capacity: int = 2048) -> None:
        self.spans: deque[ReadableSpan] = deque(maxlen=capacity)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.spans.extend(spans)
        return SpanExportResult.SUCCESS

    def get_finished_spans(self) -> list[ReadableSpan]:
        return list(self.spans)


class Tracing:
    def __init__(self, service_name: str, environ: Mapping[str, str] = os.environ) -> None:
        self.provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        self.memory = RingExporter()
        if environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):  # pragma: no cover - needs a collector
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        else:
            self.provider.add_span_processor(SimpleSpanProcessor(self.memory))
        # A provider of our own (not the global one): two gateways in one process stay apart.
        self.tracer: Tracer = self.provider.get_tracer("tokenfleet.gateway")

    @staticmethod
    def extract(headers: Mapping[str, str]) -> Context:
        return PROPAGATOR.extract(carrier=dict(headers))

    @staticmethod
    def inject(carrier: dict[str, str]) -> dict[str, str]:
        PROPAGATOR.inject(carrier)
        return carrier

    def shutdown(self) -> None:
        self.provider.shutdown()
