"""Which replicas to replace, and why: crashed, hung at start-up, unhealthy while alive, or stuck
without capacity (then moved to the next GPU pool the spec lists)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from tokenfleet.operator.control.observe import ReplicaObservation
from tokenfleet.spec import FailoverSpec

BACKOFF_BASE_S = 1.0
BACKOFF_CAP_S = 30.0

Kind = Literal["restart", "replace", "fallback"]


@dataclass(frozen=True, slots=True)
class Replacement:
    replica: str
    kind: Kind  # restart: the process exited; replace: kill a live one; fallback: next GPU pool
    reason: str
    pool: int = 0  # the pool the replacement goes to


def restart_delay(restarts: int) -> float:
    """Exponential back-off so a replica that crashes at start-up does not spin the CPU."""
    return float(min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** min(restarts, 16)))


def restarts_after_ready(restarts: int, ready_for_s: float, spec: FailoverSpec) -> int:
    """A replica that served long enough is forgiven its earlier crashes: back-off starts over."""
    return 0 if ready_for_s >= spec.backoff_reset_after_s else restarts


def failover(
    spec: FailoverSpec, replicas: Sequence[ReplicaObservation], now: float, *, pools: int = 0
) -> list[Replacement]:
    """One decision at most per replica, each with its reason."""
    decisions: list[Replacement] = []
    for r in replicas:
        age = now - r.since
        if r.phase == "exited":
            delay = restart_delay(r.restarts)
            if age >= delay:
                reason = f"process exited (restart {r.restarts + 1}, after {delay:.0f}s back-off)"
                decisions.append(Replacement(r.id, "restart", reason, r.pool))
        elif r.phase == "unhealthy" and age >= spec.unhealthy_after_s:
            limit = spec.unhealthy_after_s
            reason = f"health failing for {age:.0f}s while the process lives (limit {limit:g}s)"
            decisions.append(Replacement(r.id, "replace", reason, r.pool))
        elif r.phase == "starting" and age >= spec.startup_timeout_s:
            reason = f"not ready {age:.0f}s after start (limit {spec.startup_timeout_s:g}s)"
            decisions.append(Replacement(r.id, "replace", reason, r.pool))
        elif r.phase == "pending" and age >= spec.pending_timeout_s and r.pool + 1 < pools:
            reason = (
                f"pending {age:.0f}s without capacity in pool {r.pool} (limit {spec.pending_timeout_s:g}s):"
                f" falling back to pool {r.pool + 1}"
            )
            decisions.append(Replacement(r.id, "fallback", reason, r.pool + 1))
    return decisions
