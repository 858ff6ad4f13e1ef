"""Where traces go: the OTLP endpoint from the environment and its `/v1/traces` URL.

Plain string functions with no OpenTelemetry import, so the operator (whose image has no
OpenTelemetry SDK) renders engine and gateway pods with the same endpoint rules the local fleet
and the gateway use (`tokenfleet.observability.tracing` re-exports them).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

ENDPOINT_ENV = "TOKENFLEET_OTLP_ENDPOINT"
STANDARD_ENDPOINT_ENVS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


def otlp_traces_url(endpoint: str) -> str:
    """OTLP/HTTP wants the full `/v1/traces` path; accept a collector base URL too."""
    endpoint = endpoint.rstrip("/")
    return endpoint if endpoint.endswith("/v1/traces") else f"{endpoint}/v1/traces"


def trace_service_name(role: Literal["gateway", "engine"], service: str) -> str:
    """`service.name` in traces of a service's gateway or engines, on the fleet and in a cluster."""
    return f"tokenfleet-{role}-{service}"


@dataclass(frozen=True, slots=True)
class TraceExport:
    """Where an engine exports its spans (vLLM: one `llm_request` per request), and as whom."""

    url: str  # OTLP/HTTP, ending in /v1/traces
    service_name: str

    @classmethod
    def of_engines(cls, endpoint: str, service: str) -> TraceExport:
        return cls(otlp_traces_url(endpoint), trace_service_name("engine", service))


def endpoint_from_env(environ: Mapping[str, str] = os.environ) -> str | None:
    for name in (ENDPOINT_ENV, *STANDARD_ENDPOINT_ENVS):
        if environ.get(name):
            return environ[name]
    return None
