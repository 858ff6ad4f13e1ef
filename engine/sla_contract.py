"""What the gateway, the engine launcher and the SLA scheduler agree on (no vLLM, no FastAPI).

- `SPEC_ENV`: the environment variable that carries the `SchedulerSpec` (as JSON) from the
  launcher (`launch.py`) into vLLM's EngineCore process (`sla_scheduler.load_spec`).
- `REJECT_PREFIX`: how the scheduler's admission rejections start (`stop_reason`), so the gateway
  can tell them from other aborts (`gateway/forward.scheduler_rejection`). A stream carries no
  event for a refusal at all (vLLM 0.32 drops an event without a token before the first one), so
  gateway and load client both read a stream with no choice in it as one (`EMPTY_STREAM_REFUSAL`).
- `CLASS_HEADER`: the header a client (the load harness) names its class in for the gateway.
- `decide_class`: the one rule for which SLO class a request runs in. The gateway calls it with
  what a client sent (strict: an unknown class is the client's error, 400); the scheduler with
  what reached vLLM (lenient: it cannot refuse a request for that, so it falls back).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar

SPEC_ENV = "TOKENFLEET_SCHEDULER_SPEC"
REJECT_PREFIX = "tokenfleet:rejected"
EMPTY_STREAM_REFUSAL = "the engine ended the stream before any output"
CLASS_HEADER = "x-tokenfleet-class"  # the SLO class a client asks the gateway for


class ClassLike(Protocol):
    """An SLO class as either side holds it: `spec.SLOClass` (gateway), `ClassPolicy` (scheduler)."""

    @property
    def name(self) -> str: ...

    @property
    def priority(self) -> int: ...


C = TypeVar("C", bound=ClassLike)


class ClassError(ValueError):
    """A strict caller asked for a class (by name or priority) that the spec does not have."""


def _named(classes: Sequence[C], name: str) -> C | None:
    for slo_class in classes:
        if slo_class.name == name:
            return slo_class
    return None


def decide_class(
    classes: Sequence[C],
    default_class: str,
    *,
    name: str | None = None,
    priority: int | None = None,
    tenant_default: str | None = None,
    tenant_max: str | None = None,
    strict: bool = False,
) -> C:
    """The class a request runs in.

    Precedence: the class `name` asked for; else the class whose priority equals `priority`;
    else the tenant's default class; else the service's `default_class`. Finally the tenant's
    `tenant_max` caps it: a request above it (lower number = more important) is moved down to
    it, never refused. `None` means "not asked": callers map their own "absent" to it (the
    scheduler maps vLLM's default priority 0, which says nothing). A name or priority that
    matches no class raises `ClassError` when `strict`, else is ignored like an absent one.
    """
    chosen: C | None = None
    if name is not None:
        chosen = _named(classes, name)
        if chosen is None and strict:
            known = ", ".join(c.name for c in classes)
            raise ClassError(f"unknown class {name!r}; known: {known}")
    if chosen is None and priority is not None:
        chosen = next((c for c in classes if c.priority == priority), None)
        if chosen is None and strict:
            known = ", ".join(f"{c.priority} ({c.name})" for c in classes)
            raise ClassError(f"priority {priority} is not a class priority; known: {known}")
    if chosen is None:
        fallback = tenant_default or default_class
        chosen = _named(classes, fallback)
        if chosen is None:
            raise KeyError(fallback)  # the spec's own references are validated: a bug, not input
    if tenant_max is not None:
        ceiling = _named(classes, tenant_max)
        if ceiling is None:
            raise KeyError(tenant_max)
        if chosen.priority < ceiling.priority:
            return ceiling
    return chosen
