"""OpenTelemetry set-up shared by the gateway, the control loop and the CLI.

`setup_tracing` always keeps the most recent spans in a bounded in-memory store (the built-in
/dashboard shows the latest traces from it, no collector needed), and also exports them over
OTLP/HTTP when an endpoint is configured (the cluster's OpenTelemetry collector). The provider is
returned, not installed globally, so several gateways in one test process stay apart; pass
`install_global=True` in a real server process so library instrumentation finds it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.trace import StatusCode, Tracer

# The endpoint rules live in a module without OpenTelemetry (the operator renders pods with them).
from tokenfleet.observability.otlp_endpoint import endpoint_from_env as endpoint_from_env
from tokenfleet.observability.otlp_endpoint import otlp_traces_url as otlp_traces_url


@dataclass(frozen=True, slots=True)
class SpanSummary:
    name: str
    service: str
    span_id: str
    parent_id: str | None
    start_ns: int
    end_ns: int
    error: bool
    attributes: dict[str, Any]


@dataclass(slots=True)
class TraceSummary:
    trace_id: str
    spans: list[SpanSummary] = field(default_factory=list)

    @property
    def root(self) -> SpanSummary:
        ids = {s.span_id for s in self.spans}
        roots = [s for s in self.spans if s.parent_id is None or s.parent_id not in ids]
        return min(roots or self.spans, key=lambda s: s.start_ns)

    def as_dict(self) -> dict[str, Any]:
        root = self.root
        start = min(s.start_ns for s in self.spans)
        end = max(s.end_ns for s in self.spans)
        return {
            "trace_id": self.trace_id,
            "name": root.name,
            "start_unix_s": start / 1e9,
            "duration_ms": round((end - start) / 1e6, 3),
            "spans": len(self.spans),
            "services": sorted({s.service for s in self.spans}),
            "error": any(s.error for s in self.spans),
            "attributes": {
                k: v for k, v in root.attributes.items() if k.startswith(("tokenfleet.", "http."))
            },
        }


def summarize(span: ReadableSpan) -> SpanSummary:
    ctx = span.get_span_context()
    parent = span.parent
    return SpanSummary(
        name=span.name,
        service=str(span.resource.attributes.get("service.name", "")),
        span_id=format(ctx.span_id if ctx else 0, "016x"),
        parent_id=format(parent.span_id, "016x") if parent is not None else None,
        start_ns=span.start_time or 0,
        end_ns=span.end_time or span.start_time or 0,
        error=span.status.status_code == StatusCode.ERROR,
        attributes=dict(span.attributes or {}),
    )


class TraceStore(SpanExporter):
    """Bounded in-memory span store grouped by trace: the last `max_traces` traces are kept.

    Memory is bounded twice: by trace count and by spans per trace (a runaway trace cannot
    grow without limit).
    """

    def __init__(self, max_traces: int = 256, max_spans_per_trace: int = 64) -> None:
        self.max_traces = max_traces
        self.max_spans_per_trace = max_spans_per_trace
        self._traces: OrderedDict[str, TraceSummary] = OrderedDict()
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with self._lock:
            for span in spans:
                ctx = span.get_span_context()
                if ctx is None:
                    continue
                trace_id = format(ctx.trace_id, "032x")
                entry = self._traces.get(trace_id)
                if entry is None:
                    entry = self._traces[trace_id] = TraceSummary(trace_id)
                self._traces.move_to_end(trace_id)
                # The root ends last, after its children filled the cap: always keep it, the
                # dashboard names a trace by its root.
                if len(entry.spans) < self.max_spans_per_trace or span.parent is None:
                    entry.spans.append(summarize(span))
            while len(self._traces) > self.max_traces:
                self._traces.popitem(last=False)
        return SpanExportResult.SUCCESS

    def recent(self, limit: int = 20) -> list[dict[str, Any]]:
        """Newest first, as plain dicts (the dashboard sends them as JSON)."""
        with self._lock:
            traces = list(self._traces.values())[-limit:]
        return [t.as_dict() for t in reversed(traces)]

    def get(self, trace_id: str) -> TraceSummary | None:
        with self._lock:
            return self._traces.get(trace_id)

    def __len__(self) -> int:
        return len(self._traces)


@dataclass(frozen=True, slots=True)
class Tracing:
    provider: TracerProvider
    tracer: Tracer
    store: TraceStore
    otlp_endpoint: str | None

    def shutdown(self) -> None:
        self.provider.shutdown()

    def flush(self, timeout_ms: int = 5000) -> bool:
        return self.provider.force_flush(timeout_ms)


def setup_tracing(
    service_name: str,
    otlp_endpoint: str | None = None,
    *,
    store: TraceStore | None = None,
    install_global: bool = False,
    exporter: SpanExporter | None = None,
) -> Tracing:
    """A tracer provider for `service_name`: in-memory always, OTLP/HTTP when `otlp_endpoint`.

    `exporter` overrides the OTLP exporter (tests); the in-memory store is exported to
    synchronously (cheap, and the dashboard then sees a span the moment it ends), the network
    exporter in batches off the request path.
    """
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    store = store if store is not None else TraceStore()
    provider.add_span_processor(SimpleSpanProcessor(store))
    if exporter is None and otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=otlp_traces_url(otlp_endpoint))
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=500))
    if install_global:
        trace.set_tracer_provider(provider)
    return Tracing(
        provider=provider,
        tracer=provider.get_tracer("tokenfleet"),
        store=store,
        otlp_endpoint=otlp_traces_url(otlp_endpoint) if otlp_endpoint else None,
    )
