"""How load changes over time: pure curves `level(t)`, one per shape kind.

A level is an arrival rate (req/s) in open loop or a concurrency (users) in closed loop; which one
is the workload's choice and the report says so. Curves are pure functions of the elapsed time, so
every Locust worker evaluates the same curve on its own clock and no rate has to be broadcast; the
LoadTestShape in the locustfile only adapts them to Locust's `tick()`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Constant:
    value: float

    def level(self, t: float) -> float | None:
        return self.value


@dataclass(frozen=True, slots=True)
class Steps:
    """Piecewise constant: (value, seconds) pairs in order; ends after the last step."""

    steps: tuple[tuple[float, float], ...]

    def level(self, t: float) -> float | None:
        edge = 0.0
        for value, duration in self.steps:
            edge += duration
            if t < edge:
                return value
        return None


@dataclass(frozen=True, slots=True)
class Ramp:
    """Linear from `start` to `end` over `duration_s`, then holds `end`."""

    start: float
    end: float
    duration_s: float

    def level(self, t: float) -> float | None:
        frac = min(1.0, max(0.0, t / self.duration_s))
        return self.start + (self.end - self.start) * frac


@dataclass(frozen=True, slots=True)
class Burst:
    """On/off: `high` for `on_s`, then `low` for `off_s`, repeated (starts with a burst)."""

    low: float
    high: float
    on_s: float
    off_s: float

    def level(self, t: float) -> float | None:
        phase = t % (self.on_s + self.off_s)
        return self.high if phase < self.on_s else self.low


@dataclass(frozen=True, slots=True)
class Diurnal:
    """A day compressed into `period_s`: mean + amplitude·sin(2πt/period), floored at zero."""

    mean: float
    amplitude: float
    period_s: float

    def level(self, t: float) -> float | None:
        return max(0.0, self.mean + self.amplitude * math.sin(2 * math.pi * t / self.period_s))


@dataclass(frozen=True, slots=True)
class Sweep:
    """One step per rate, `step_s` each; the run stops early once a step saturates the server."""

    rates: tuple[float, ...]
    step_s: float
    min_achieved_ratio: float = 0.9

    def level(self, t: float) -> float | None:
        index = self.step_index(t)
        return self.rates[index] if index < len(self.rates) else None

    def step_index(self, t: float) -> int:
        return int(t // self.step_s)


Shape = Constant | Steps | Ramp | Burst | Diurnal | Sweep


def bounded(shape: Shape, t: float, duration_s: float | None) -> float | None:
    """The shape's level, or None (stop) past the run's duration."""
    if duration_s is not None and t >= duration_s:
        return None
    return shape.level(t)


def saturated(offered_rate: float, achieved_rate: float, min_ratio: float) -> bool:
    """A sweep step saturates when completions fall behind arrivals: the queue is growing, so any
    higher rate only measures queueing (GuideLLM and inference-perf stop on the same symptom)."""
    return offered_rate > 0 and achieved_rate < min_ratio * offered_rate
