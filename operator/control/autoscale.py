"""How many replicas: an HPA-style recommendation on an LLM metric, plus per-class SLO attainment.

A recommendation is `ceil(ready * value / target)` outside a tolerance band. Each tick's
recommendation is kept for the longer of the two stabilisation windows; the service scales up
to the *lowest* recommendation of the up window (the need held throughout it) and down to the
*highest* of the down window (the slack held throughout it): fast up, slow down, no flapping.
Replicas that are still loading the model are capacity on its way, so no further scale-up is
stacked on them. During a rollout the loop never scales down (the surge would read as slack).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

from tokenfleet.operator.control.observe import ReplicaObservation, Signals, SloCounts
from tokenfleet.spec import AutoscalingSpec, ReplicasSpec

SLO_WINDOW_S = 60.0
# The metric is averaged over this long before it is compared with the target: an instantaneous
# in-flight or queue count is mostly noise (at 5 req/s of 0.25 s requests a third of the samples
# read 0), and the windows below take the minimum or maximum of the recommendations.
METRIC_AVERAGE_S = 15.0
# Fewer requests than this in the window say nothing about a class's attainment.
SLO_MIN_REQUESTS = 10

Direction = Literal["up", "down", "hold"]


@dataclass(frozen=True, slots=True)
class ScaleState:
    """What the autoscaler remembers between ticks (serialisable: the operator keeps it in status)."""

    history: tuple[tuple[float, int], ...] = ()  # (time, recommendation)
    metric: tuple[tuple[float, float], ...] = ()  # (time, instantaneous metric value)
    slo_samples: tuple[tuple[float, tuple[tuple[str, float, float], ...]], ...] = ()


@dataclass(frozen=True, slots=True)
class ScaleDecision:
    desired: int
    direction: Direction
    reason: str
    state: ScaleState
    metric_value: float | None = None


def _metric(spec: AutoscalingSpec, ready: Sequence[ReplicaObservation], signals: Signals) -> float | None:
    if spec.metric == "ttft_p90_ms":
        return None if signals.ttft_p90_s is None else signals.ttft_p90_s * 1000
    if not ready:
        return None
    if spec.metric == "queue_depth":
        return (sum(r.queue_depth for r in ready) + signals.gateway_queued) / len(ready)
    if spec.metric == "in_flight":
        return sum(r.in_flight for r in ready) / len(ready)
    return sum(r.kv_cache_usage for r in ready) / len(ready)


def slo_attainment(
    samples: Sequence[tuple[float, tuple[tuple[str, float, float], ...]]],
) -> dict[str, tuple[float, float]]:
    """Per class: (attainment, requests) between the oldest and newest cumulative sample."""
    if len(samples) < 2:
        return {}
    oldest = {name: (met, total) for name, met, total in samples[0][1]}
    result: dict[str, tuple[float, float]] = {}
    for name, met, total in samples[-1][1]:
        met0, total0 = oldest.get(name, (0.0, 0.0))
        requests = total - total0
        if requests < 0:  # a counter reset (a replica restarted): skip this window
            continue
        if requests > 0:
            result[name] = ((met - met0) / requests, requests)
    return result


def _slo_sample(slo: Mapping[str, SloCounts]) -> tuple[tuple[str, float, float], ...]:
    return tuple(sorted((name, c.met, c.total) for name, c in slo.items()))


def _window(history: Sequence[tuple[float, int]], now: float, window_s: float, current: int) -> list[int]:
    """Recommendations inside the window; `current` stands in while history is shorter than it."""
    inside = [n for t, n in history if t >= now - window_s]
    if not history or history[0][0] > now - window_s:
        inside.append(current)
    return inside


def _prune(
    history: Sequence[tuple[float, int]], now: float, horizon_s: float
) -> tuple[tuple[float, int], ...]:
    """Entries within the horizon, plus the newest one before it: the proof that the history
    covers the whole window (without it, a window as long as the horizon never looks covered)."""
    older = [h for h in history if h[0] < now - horizon_s]
    return tuple(older[-1:]) + tuple(h for h in history if h[0] >= now - horizon_s)


def autoscale(
    spec: AutoscalingSpec,
    bounds: ReplicasSpec,
    current: int,
    replicas: Sequence[ReplicaObservation],
    signals: Signals,
    state: ScaleState,
    now: float,
    *,
    rollout_in_progress: bool = False,
) -> ScaleDecision:
    """The replica count to run now, given `current` (the count last decided)."""
    if not spec.enabled:
        # The count someone chose (replicas.min, `tokenfleet up --replicas`, `kubectl scale`) stands.
        return ScaleDecision(current, "hold", "autoscaling disabled", state)
    # Zero only by the idle rule below: a quiet metric alone must not stop the last replica.
    floor = max(1, bounds.min)
    ready = [r for r in replicas if r.phase == "ready"]
    starting = [r for r in replicas if r.phase in ("pending", "starting")]
    samples = (*state.slo_samples, (now, _slo_sample(signals.slo)))
    samples = tuple(s for s in samples if s[0] >= now - SLO_WINDOW_S)
    instant = _metric(spec, ready, signals)
    metric = state.metric if instant is None else (*state.metric, (now, instant))
    metric = tuple(m for m in metric if m[0] >= now - METRIC_AVERAGE_S)
    value = sum(v for _, v in metric) / len(metric) if instant is not None and metric else None

    # Scale from zero: a request is waiting and nothing serves it. No window: someone is waiting.
    if current == 0:
        new_state = replace(state, slo_samples=samples, history=(), metric=())
        if signals.gateway_queued > 0:
            desired = max(1, bounds.min)
            reason = f"activation: {signals.gateway_queued} request(s) waiting with no replica"
            return ScaleDecision(desired, "up", reason, new_state, value)
        return ScaleDecision(0, "hold", "scaled to zero, no requests waiting", new_state, value)

    reasons: list[str] = []
    if value is None:
        recommendation = current
        reasons.append(f"no {spec.metric} to measure yet")
    else:
        ratio = value / spec.target
        base = max(1, len(ready))
        recommendation = current if abs(ratio - 1) <= spec.tolerance else math.ceil(base * ratio)
        reasons.append(f"{spec.metric} {value:.2f}/replica vs target {spec.target:g}")
    if spec.min_slo_attainment is not None:
        for name, (attained, requests) in sorted(slo_attainment(samples).items()):
            if requests >= SLO_MIN_REQUESTS and attained < spec.min_slo_attainment:
                recommendation = max(recommendation, current + 1)
                reasons.append(
                    f"class {name} TTFT attainment {attained:.0%} < {spec.min_slo_attainment:.0%}"
                    f" over {requests:.0f} requests"
                )
    idle = (
        spec.scale_to_zero
        and signals.recent_requests == 0
        and signals.gateway_queued == 0
        and all(r.in_flight == 0 and r.queue_depth == 0 for r in replicas)
    )
    recommendation = min(max(recommendation, floor), bounds.max)
    if idle:
        recommendation = 0
        reasons.append("idle: no requests in the scale-down window")
    horizon = max(spec.scale_up_stabilization_s, spec.scale_down_stabilization_s)
    history = (*_prune(state.history, now, horizon), (now, recommendation))
    new_state = ScaleState(history=history, slo_samples=samples, metric=metric)
    why = "; ".join(reasons)

    up_to = min([*_window(history[:-1], now, spec.scale_up_stabilization_s, current), recommendation])
    down_to = max([*_window(history[:-1], now, spec.scale_down_stabilization_s, current), recommendation])
    if up_to > current:
        if starting:
            return ScaleDecision(
                current, "hold", f"{why}; {len(starting)} replica(s) still starting", new_state, value
            )
        desired = min(up_to, current + spec.max_step_up)
        return ScaleDecision(desired, "up", f"{why}: {current} -> {desired}", new_state, value)
    if down_to < current:
        if rollout_in_progress:
            return ScaleDecision(current, "hold", f"{why}; no scale-down during a rollout", new_state, value)
        desired = max(down_to, current - spec.max_step_down)
        return ScaleDecision(desired, "down", f"{why}: {current} -> {desired}", new_state, value)
    return ScaleDecision(current, "hold", why, new_state, value)
