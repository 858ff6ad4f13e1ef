"""One client request as it moves through the gateway, and the error answers it may get.

Shared by the routes (`app.py`), which open and close a `Call`, and the forwarding
(`forward.py`), which attempts it on the replicas.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.trace import Span


@dataclass
class Call:
    """One client request as it moves through the gateway (for metrics, span and limits)."""

    route: str
    span: Span
    headers: dict[str, str]  # the client's, names lower-case (ASGI), read once per request
    method: str = "POST"
    started: float = field(default_factory=time.perf_counter)
    cls: str = "none"
    tenant: str = "none"
    estimate: int = 0
    done: bool = False
    replica: str | None = None  # the replica of the latest attempt
    holds_tenant_slot: bool = False  # counted in the tenant's concurrency until finished
    client_gone: bool = False  # the client's connection closed before its answer


def error_body(status: int, message: str, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "code": status}}


def sse_error(message: str) -> bytes:
    payload = json.dumps(error_body(502, message, "upstream_error"))
    return f"data: {payload}\n\n".encode()


def request_id(call: Call) -> str:
    """The client's x-request-id, else a fresh one: what an error answer and its log line share."""
    return call.headers.get("x-request-id", "")[:128] or uuid.uuid4().hex
