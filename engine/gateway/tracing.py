"""OpenTelemetry: one server span per request, its W3C traceparent passed on to the engine.

One span, not a SERVER span plus a CLIENT span per upstream attempt: the OpenTelemetry SDK costs
~30-40 us of CPU per span here, a measurable share of the gateway's added latency
(docs/results/gateway.md), and a retry is rare enough to be an event on the request's span.

By default spans go to an in-memory exporter (inspectable in tests and via the admin endpoint,
no collector needed on a laptop); with OTEL_EXPORTER_OTLP_ENDPOINT set they go to OTLP/HTTP.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Mapping

from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Span, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

PROPAGATOR = TraceContextTextMapPropagator()


class RingProcessor(SpanProcessor):
    """Keeps the last `capacity` finished spans in memory (bounded).

    A processor rather than an exporter behind SimpleSpanProcessor: that one wraps every span
    in a context attach/detach and an export call, a measurable share of the gateway's
    per-request CPU for what is a deque append.
    """

    def __init__(self, capacity: int = 2048) -> None:
        self.spans: deque[ReadableSpan] = deque(maxlen=capacity)

    def on_end(self, span: ReadableSpan) -> None:
        self.spans.append(span)

    def get_finished_spans(self) -> list[ReadableSpan]:
        return list(self.spans)


class Tracing:
    def __init__(self, service_name: str, environ: Mapping[str, str] = os.environ) -> None:
        self.provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        self.memory = RingProcessor()
        if environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):  # pragma: no cover - needs a collector
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        else:
            self.provider.add_span_processor(self.memory)
        # A provider of our own (not the global one): two gateways in one process stay apart.
        self.tracer: Tracer = self.provider.get_tracer("tokenfleet.gateway")

    @staticmethod
    def extract(headers: Mapping[str, str]) -> Context:
        if "traceparent" not in headers:
            return Context()  # what the propagator returns then, without copying the headers
        return PROPAGATOR.extract(carrier=headers)

    @staticmethod
    def context_headers(span: Span) -> dict[str, str]:
        """`traceparent` (and `tracestate`) naming `span` as the parent, as the W3C propagator
        writes them, without building a Context for it on every request."""
        context = span.get_span_context()
        if not context.is_valid:
            return {}
        headers = {
            "traceparent": f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"
        }
        if context.trace_state:
            headers["tracestate"] = context.trace_state.to_header()
        return headers

    def shutdown(self) -> None:
        self.provider.shutdown()
