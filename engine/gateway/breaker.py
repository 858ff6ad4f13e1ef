"""Circuit breaker per replica: pure transitions driven by active probes and passive errors.

States: `unknown` (never probed: no traffic yet; a replica starting up is not routable),
`closed` (routable), `open` (ejected). A failed `/health` probe opens the breaker at once —
a refused connection is definitive — while passive request errors open it only after
`threshold` consecutive failures, so one bad request cannot eject a healthy replica. An open
breaker closes again on the first successful probe once `cooldown_s` has passed, which keeps a
flapping replica from bouncing in and out every probe interval.

Under CPU starvation a probe can time out on a replica that is still producing tokens: a probe
*timeout* does not eject a replica that answered a request or streamed a chunk recently
(`busy`). And, as Envoy's panic threshold: when fewer than `PANIC_THRESHOLD` of the started
replicas are closed, the ones ejected softly (timeouts, 5xx — not a refused connection) are
routed to as well, so a fleet-wide slowdown degrades service rather than turning every request
into a 503.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

PANIC_THRESHOLD = 0.5  # Envoy's default healthy_panic_threshold

State = Literal["unknown", "closed", "open"]


@dataclass(frozen=True, slots=True)
class Breaker:
    state: State = "unknown"
    failures: int = 0  # consecutive passive failures while closed
    opened_at: float = 0.0
    ejections: int = 0  # how many times it opened (for metrics and status)
    definitive: bool = True  # opened by a refused/reset probe (the process is gone), not a timeout

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
        return _open(breaker, now, definitive=False)
    return replace(breaker, failures=failures)


def on_probe(
    breaker: Breaker,
    ok: bool,
    now: float,
    cooldown_s: float,
    *,
    timed_out: bool = False,
    busy: bool = False,
) -> Breaker:
    """`timed_out`: the probe got no answer in time (rather than a refusal or a bad status);
    `busy`: the replica completed a request recently, so it is alive, only slow to answer."""
    if not ok:
        if timed_out and busy:
            return breaker
        # A replica still starting stays "unknown" (status shows it as starting, not ejected).
        if breaker.state in ("open", "unknown"):
            return breaker
        return _open(breaker, now, definitive=not timed_out)
    if breaker.state == "unknown":
        return replace(breaker, state="closed", failures=0)
    if breaker.state == "open" and now - breaker.opened_at >= cooldown_s:
        return replace(breaker, state="closed", failures=0)
    return breaker


def _open(breaker: Breaker, now: float, *, definitive: bool) -> Breaker:
    # A replica that never came up is not "ejected": it was never admitted.
    ejections = breaker.ejections + (1 if breaker.state == "closed" else 0)
    return Breaker(state="open", failures=0, opened_at=now, ejections=ejections, definitive=definitive)


def routable(breakers: Sequence[Breaker], threshold: float = PANIC_THRESHOLD) -> list[int]:
    """Indices of the breakers to route to: the closed ones, or in panic (fewer than `threshold`
    of the started replicas closed) the closed and the softly opened ones."""
    closed = [i for i, b in enumerate(breakers) if b.state == "closed"]
    started = sum(1 for b in breakers if b.state != "unknown")
    if not started or len(closed) >= threshold * started:
        return closed
    return [
        i for i, b in enumerate(breakers) if b.state == "closed" or (b.state == "open" and not b.definitive)
    ]
