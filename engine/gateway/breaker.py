"""Circuit breaker per replica: pure transitions driven by active probes and passive errors.

States: `unknown` (never probed: no traffic yet; a replica starting up is not routable),
`closed` (routable), `open` (ejected). A failed `/health` probe opens the breaker at once —
a refused connection is definitive — while passive request errors open it only after
`threshold` consecutive failures, so one bad request cannot eject a healthy replica. An open
breaker closes again on the first successful probe once `cooldown_s` has passed, which keeps a
flapping replica from bouncing in and out every probe interval.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

State = Literal["unknown", "closed", "open"]


@dataclass(frozen=True, slots=True)
class Breaker:
    state: State = "unknown"
    failures: int = 0  # consecutive passive failures while closed
    opened_at: float = 0.0
    ejections: int = 0  # how many times it opened (for metrics and status)

    @property
    def admits(self) -> bool:
        return self.state == "closed"


def on_request_success(breaker: Breaker) -> Breaker:
    return replace(breaker, failures=0) if breaker.failures else breaker


def on_request_failure(breaker: Breaker, now: float, threshold: int) -> Breaker:
    if breaker.state != "closed":
        return breaker
    failures = breaker.failures + 1
    if failures >= threshold:
        return _open(breaker, now)
    return replace(breaker, failures=failures)


def on_probe(breaker: Breaker, ok: bool, now: float, cooldown_s: float) -> Breaker:
    if not ok:
        # A replica still starting stays "unknown" (status shows it as starting, not ejected).
        return breaker if breaker.state in ("open", "unknown") else _open(breaker, now)
    if breaker.state == "unknown":
        return replace(breaker, state="closed", failures=0)
    if breaker.state == "open" and now - breaker.opened_at >= cooldown_s:
        return replace(breaker, state="closed", failures=0)
    return breaker


def _open(breaker: Breaker, now: float) -> Breaker:
    # A replica that never came up is not "ejected": it was never admitted.
    ejections = breaker.ejections + (1 if breaker.state == "closed" else 0)
    return Breaker(state="open", failures=0, opened_at=now, ejections=ejections)
