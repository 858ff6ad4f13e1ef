"""Open-loop arrivals: inter-arrival gaps from Poisson, gamma (burstiness) or constant processes.

Gaps follow vLLM `bench serve`: Gamma(shape=b, scale=1/(rate·b)), so the mean gap is 1/rate and
the coefficient of variation is 1/√b (b=1 is Poisson; b<1 burstier; b→∞ constant). Each Locust
worker process owns one `Pacer` at `share = 1/workers` of the rate: the superposition of the
workers' Poisson streams is again Poisson at the full rate.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np

Process = Literal["poisson", "gamma", "constant"]
RateFn = Callable[[float], float | None]
# While the rate is zero (an "off" phase) the pacer looks ahead in steps this long.
IDLE_STEP_S = 0.05


def gap(rng: np.random.Generator, rate: float, process: Process, burstiness: float = 1.0) -> float:
    if rate <= 0:
        raise ValueError(f"rate must be positive, got {rate}")
    if process == "constant":
        return 1.0 / rate
    shape = 1.0 if process == "poisson" else burstiness
    return float(rng.gamma(shape=shape, scale=1.0 / (rate * shape)))


class Pacer:
    """Absolute send times on a shared schedule. Free users `claim()` the next slot and sleep until
    it; if no user is free the slot is sent late and the record's `queue_s` shows by how much.

    Times are seconds since the run's start. The rate is sampled at the previous arrival, which is
    exact for piecewise-constant shapes and close for slowly varying ones.
    """

    def __init__(
        self,
        rate_fn: RateFn,
        *,
        process: Process = "poisson",
        burstiness: float = 1.0,
        share: float = 1.0,
        seed: int | None = None,
    ) -> None:
        self._rate_fn = rate_fn
        self._process: Process = process
        self._burstiness = burstiness
        self._share = share
        self._rng = np.random.default_rng(seed)
        self._next: float | None = self._advance(0.0)

    def _advance(self, t: float) -> float | None:
        while True:
            rate = self._rate_fn(t)
            if rate is None:
                return None
            rate *= self._share
            if rate > 0:
                # The first arrival also waits a gap: otherwise every worker fires at t=0 together.
                candidate = t + gap(self._rng, rate, self._process, self._burstiness)
                if self._rate_fn(candidate) != 0:
                    return candidate
                # The gap ran into an off phase: nothing may arrive there; start afresh after it
                # (memoryless for Poisson, so the on-phase rate is kept exactly).
                t = candidate
            t += IDLE_STEP_S

    def claim(self) -> float | None:
        """The next send time, or None once the shape has ended."""
        slot = self._next
        if slot is not None:
            self._next = self._advance(slot)
            # A slot past the end of the shape is not sent.
            if self._rate_fn(slot) is None:
                return None
        return slot

    def arrivals(self, limit: int) -> list[float]:
        """Up to `limit` slots (for tests and previews)."""
        out: list[float] = []
        while len(out) < limit:
            slot = self.claim()
            if slot is None:
                break
            out.append(slot)
        return out
