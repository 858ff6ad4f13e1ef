"""Structured logs: one JSON object per line, carrying the active trace and span ids.

A log line and a trace then join on `trace_id` (Grafana's Loki-to-Tempo link, or a plain grep),
which is how a slow request found on the dashboard is explained from logs. Used by the gateway,
the control loop and the CLI through `setup_logging(component)`.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import IO, Any

from opentelemetry import trace

# Attributes every LogRecord has; anything else was passed via `extra=` and is logged as a field.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


def trace_fields() -> dict[str, str]:
    """Ids of the span current in this context, or nothing outside a span."""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return {}
    return {"trace_id": format(ctx.trace_id, "032x"), "span_id": format(ctx.span_id, "016x")}


class JsonFormatter(logging.Formatter):
    def __init__(self, component: str) -> None:
        super().__init__()
        self.component = component

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "component": self.component,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(trace_fields())
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, separators=(",", ":"))


def setup_logging(
    component: str, level: int | str = logging.INFO, stream: IO[str] | None = None
) -> logging.Handler:
    """Route the root logger to JSON lines on `stream` (stderr); returns the handler installed.

    Replaces handlers previously installed by this function only, so calling it twice (tests,
    reloads) does not duplicate lines, and handlers others installed are left alone.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_tokenfleet", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter(component))
    handler._tokenfleet = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    return handler
