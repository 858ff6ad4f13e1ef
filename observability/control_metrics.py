"""The control loop's Prometheus metrics, built from the catalogue so names cannot drift.

The operator (on a cluster) and the local loop in `tokenfleet up` both record through this one
class: the same dashboards and alerts then work in both places.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from tokenfleet.observability.catalogue import BY_NAME

ROLLOUT_STATES = ("idle", "progressing", "paused", "complete", "failed", "rolled_back")
# The label values the control loop records decisions and replacements with (engine/fleet.py).
SCALE_DIRECTIONS = ("up", "down")
SCALE_REASONS = ("metric", "slo", "activation", "idle")
REPLACEMENT_REASONS = ("crashed", "unhealthy", "unready")
LOOP_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


def _help(name: str) -> str:
    return BY_NAME[name].help


def _labels(name: str) -> list[str]:
    return list(BY_NAME[name].labels)


class ControlLoopMetrics:
    def __init__(
        self, registry: CollectorRegistry | None = None, clock: Callable[[], float] = time.time
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.clock = clock
        r = self.registry

        def gauge(name: str) -> Gauge:
            return Gauge(name, _help(name), _labels(name), registry=r)

        def counter(name: str) -> Counter:
            return Counter(BY_NAME[name].family, _help(name), _labels(name), registry=r)

        self.desired = gauge("tokenfleet_control_desired_replicas")
        self.ready = gauge("tokenfleet_control_ready_replicas")
        self.decisions = counter("tokenfleet_control_scale_decisions_total")
        self.replacements = counter("tokenfleet_control_replacements_total")
        self.iterations = counter("tokenfleet_control_loop_iterations_total")
        self.duration = Histogram(
            "tokenfleet_control_loop_duration_seconds",
            _help("tokenfleet_control_loop_duration_seconds"),
            _labels("tokenfleet_control_loop_duration_seconds"),
            buckets=LOOP_BUCKETS,
            registry=r,
        )
        self.last_success = gauge("tokenfleet_control_loop_last_success_timestamp_seconds")
        self.rollout_state = gauge("tokenfleet_control_rollout_state")
        self.rollout_step = gauge("tokenfleet_control_rollout_step")
        self.rollout_progress = gauge("tokenfleet_control_rollout_last_progress_timestamp_seconds")
        self._steps: dict[str, int] = {}

    def init_service(self, service: str) -> None:
        """Create every child at its idle value so alerts and panels see series before events."""
        for outcome in ("ok", "error"):
            self.iterations.labels(service, outcome)
        for direction in SCALE_DIRECTIONS:
            for reason in SCALE_REASONS:
                self.decisions.labels(service, direction, reason)
        for reason in REPLACEMENT_REASONS:
            self.replacements.labels(service, reason)
        self.set_rollout(service, "idle", 0)
        self.last_success.labels(service).set(self.clock())

    def iteration(self, service: str, ok: bool, duration_s: float) -> None:
        self.iterations.labels(service, "ok" if ok else "error").inc()
        self.duration.labels(service).observe(duration_s)
        if ok:
            self.last_success.labels(service).set(self.clock())

    def replicas(self, service: str, desired: int, ready: int) -> None:
        self.desired.labels(service).set(desired)
        self.ready.labels(service).set(ready)

    def decision(self, service: str, direction: str, reason: str) -> None:
        if direction not in ("up", "down", "hold"):
            raise ValueError(f"direction must be up, down or hold, not {direction!r}")
        self.decisions.labels(service, direction, reason).inc()

    def replaced(self, service: str, reason: str) -> None:
        self.replacements.labels(service, reason).inc()

    def set_rollout(self, service: str, state: str, step: int) -> None:
        if state not in ROLLOUT_STATES:
            raise ValueError(f"unknown rollout state {state!r}; one of {ROLLOUT_STATES}")
        previous = self._steps.get(service)
        self._steps[service] = step
        for s in ROLLOUT_STATES:
            self.rollout_state.labels(service, s).set(1 if s == state else 0)
        self.rollout_step.labels(service).set(step)
        if step != previous or state != "progressing":
            # Progress means a step moved (or the rollout is not running): `rollout stuck` is
            # "progressing and no step change for too long".
            self.rollout_progress.labels(service).set(self.clock())
