"""How a new revision replaces the serving one: rolling, canary with analysis, or recreate.

`rollout` maps (state, desired replica count, what runs, what the gateway saw) to the replica
count wanted per revision, the traffic weights, and the next state. Revisions absent from
`counts` are drained and stopped by the applier. A canary is judged against the stable revision
over the same window on the same traffic mix (the gateway splits requests at random by weight):
it is rolled back the moment it is worse beyond the spec's thresholds, and promoted a step only
after `stepDurationS` with at least `minRequests` of its own requests. Its TTFT is compared only
after the step's first `warmupS` seconds (`warmup_ends`): a fresh engine's first answers are slow,
and a window that starts cold would roll back a canary that is as fast as the stable once warm.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from tokenfleet.operator.control.observe import ReplicaObservation, WindowStats
from tokenfleet.spec import RolloutSpec

Phase = Literal["idle", "progressing", "complete", "rolled_back", "failed"]
Strategy = Literal["rolling", "canary", "recreate"]
# A new revision whose replicas crashed this often is not going to come up: give up on it.
MAX_TARGET_RESTARTS = 3
# The canary's TTFT is compared at this quantile, and judged slower only when the evidence would
# be this unlikely from a revision that is not.
TTFT_QUANTILE = 0.99
TTFT_SIGNIFICANCE = 0.01


@dataclass(frozen=True, slots=True)
class RolloutState:
    stable: str  # the revision that serves when no rollout runs
    target: str | None = None  # the revision being rolled out
    strategy: Strategy = "rolling"
    phase: Phase = "idle"
    step: int = 0  # canary: index into canarySteps
    step_started_at: float | None = None  # canary: when the current step's replicas were all ready
    reason: str = ""
    rejected: frozenset[str] = frozenset()  # rolled back; applying them again starts a new rollout

    @property
    def in_progress(self) -> bool:
        return self.phase == "progressing" and self.target is not None


@dataclass(frozen=True, slots=True)
class RolloutPlan:
    counts: dict[str, int]  # replicas wanted per revision
    weights: dict[str, int] | None  # traffic percent per revision; None: spread over all replicas
    state: RolloutState
    events: tuple[str, ...] = field(default_factory=tuple)  # decisions taken this tick, with reasons


def begin_rollout(state: RolloutState, revision: str, strategy: Strategy, now: float) -> RolloutState:
    """A new spec was applied. Re-applying the serving revision cancels a rollout in progress."""
    if revision == state.stable:
        if state.target is None:
            return state
        return RolloutState(state.stable, phase="rolled_back", reason=f"{revision} applied again: cancelled")
    if revision == state.target and state.in_progress:
        return state
    return RolloutState(
        stable=state.stable,
        target=revision,
        strategy=strategy,
        phase="progressing",
        reason=f"{strategy} rollout of {revision} started",
        rejected=state.rejected - {revision},
    )


def warmup_ends(spec: RolloutSpec, state: RolloutState) -> float | None:
    """From when the current canary step's TTFT is analysed; None outside a step's window."""
    return None if state.step_started_at is None else state.step_started_at + spec.warmup_s


def _count(replicas: Sequence[ReplicaObservation], revision: str, *, ready: bool = False) -> int:
    return sum(1 for r in replicas if r.revision == revision and (not ready or r.phase == "ready"))


def _crashed(replicas: Sequence[ReplicaObservation], revision: str) -> bool:
    return any(r.revision == revision and r.restarts >= MAX_TARGET_RESTARTS for r in replicas)


def rolling_counts(
    desired: int, old_total: int, new_total: int, new_ready: int, max_surge: int, max_unavailable: int
) -> tuple[int, int]:
    """(old, new) replica counts for one step of a rolling update (Kubernetes' arithmetic):
    never more than desired + maxSurge replicas, never fewer than desired - maxUnavailable ready."""
    new = min(desired, max(new_total, desired + max_surge - old_total))
    old = min(old_total, max(0, desired - max_unavailable - new_ready))
    return old, new


def _finish(state: RolloutState, target: str, desired: int, why: str) -> RolloutPlan:
    done = RolloutState(stable=target, phase="complete", reason=why, rejected=state.rejected)
    return RolloutPlan({target: desired}, None, done, (why,))


def _roll_back(state: RolloutState, desired: int, why: str, phase: Phase = "rolled_back") -> RolloutPlan:
    assert state.target is not None
    back = RolloutState(
        stable=state.stable, phase=phase, reason=why, rejected=state.rejected | {state.target}
    )
    return RolloutPlan({state.stable: desired}, {state.stable: 100}, back, (why,))


def rollout(
    spec: RolloutSpec,
    state: RolloutState,
    desired: int,
    replicas: Sequence[ReplicaObservation],
    stats: Mapping[str, WindowStats],
    now: float,
) -> RolloutPlan:
    """One tick. `stats` holds each revision's outcomes since `state.step_started_at`."""
    if not state.in_progress or state.target is None:
        return RolloutPlan({state.stable: desired}, None, state)
    old, new = state.stable, state.target
    if _crashed(replicas, new):
        why = f"{new} replicas crashed {MAX_TARGET_RESTARTS} times: rollout failed, back to {old}"
        return _roll_back(state, desired, why, phase="failed")
    old_total, new_total = _count(replicas, old), _count(replicas, new)
    new_ready = _count(replicas, new, ready=True)
    if state.strategy == "recreate":
        if old_total > 0:
            return RolloutPlan({}, None, replace(state, reason=f"stopping {old_total} {old} replica(s)"))
        if new_ready >= desired:
            return _finish(state, new, desired, f"recreate: {new_ready} {new} replica(s) ready")
        return RolloutPlan({new: desired}, None, replace(state, reason=f"{new_ready}/{desired} ready"))
    if state.strategy == "rolling":
        if new_ready >= desired and old_total == 0:
            return _finish(state, new, desired, f"rolling: {new_ready} {new} replica(s) ready, {old} drained")
        old_count, new_count = rolling_counts(
            desired, old_total, new_total, new_ready, spec.max_surge, spec.max_unavailable
        )
        reason = f"rolling: {new_ready}/{desired} {new} ready, {old_count} {old} kept"
        return RolloutPlan({old: old_count, new: new_count}, None, replace(state, reason=reason))
    return _canary(spec, state, desired, new_ready, stats, now)


def _canary(
    spec: RolloutSpec,
    state: RolloutState,
    desired: int,
    new_ready: int,
    stats: Mapping[str, WindowStats],
    now: float,
) -> RolloutPlan:
    assert state.target is not None
    old, new = state.stable, state.target
    steps = spec.canary_steps
    weight = steps[min(state.step, len(steps) - 1)]
    wanted = desired if weight == 100 else max(1, math.ceil(desired * weight / 100))
    counts = {old: desired, new: wanted}
    canary, stable = stats.get(new, WindowStats()), stats.get(old, WindowStats())
    # Judge what the window saw before anything else: a canary that fails its requests may be
    # ejected by the gateway and drop out of ready, and restarting the window then would forget
    # the very failures that took it out.
    verdict = judge(spec, canary, stable) if state.step_started_at is not None else None
    if verdict is not None:
        return _roll_back(state, desired, f"canary rolled back at {weight}%: {verdict}")
    if new_ready < wanted:
        reason = f"step {state.step + 1}: {new_ready}/{wanted} canary replica(s) ready"
        waiting = replace(state, step_started_at=None, reason=reason)
        # Traffic already on the canary stays there: taking it away would reset the analysis.
        weights = {old: 100 - weight, new: weight} if new_ready and state.step else {old: 100}
        return RolloutPlan(counts, weights, waiting)
    if weight == 100:
        return _finish(state, new, desired, f"canary promoted: all {desired} replica(s) on {new}")
    weights = {old: 100 - weight, new: weight}
    if state.step_started_at is None:
        started = replace(state, step_started_at=now, reason=f"step {state.step + 1}: {weight}% to {new}")
        return RolloutPlan(counts, weights, started, (started.reason,))
    elapsed = now - state.step_started_at
    enough = min(canary.requests, canary.ttft_samples) >= spec.min_requests
    if not enough or elapsed < spec.step_duration_s:
        reason = (
            f"step {state.step + 1} ({weight}%): {canary.requests}/{spec.min_requests} requests "
            f"({canary.ttft_samples} answered after the {spec.warmup_s:g}s warm-up), "
            f"{elapsed:.0f}/{spec.step_duration_s:g}s"
        )
        return RolloutPlan(counts, weights, replace(state, reason=reason))
    why = f"step {state.step + 1} ({weight}%) passed: {summary(canary, stable)}"
    advanced = replace(state, step=state.step + 1, step_started_at=None, reason=why)
    return RolloutPlan(counts, weights, advanced, (why,))


def summary(canary: WindowStats, stable: WindowStats) -> str:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value * 1000:.0f} ms"

    return (
        f"errors {canary.error_rate:.1%} vs {stable.error_rate:.1%}, refused {canary.refused_rate:.1%}"
        f" vs {stable.refused_rate:.1%}, TTFT p99 {ms(canary.ttft_p99_s)}"
        f" vs {ms(stable.ttft_p99_s)} over {canary.requests} canary requests"
    )


def judge(spec: RolloutSpec, canary: WindowStats, stable: WindowStats) -> str | None:
    """Why the canary is worse than the stable revision, or None: errors, refusals beyond the
    stable's, or TTFT. Needs minRequests of evidence, except that errors beyond what minRequests
    could ever excuse fail it at once."""
    allowed_errors = spec.max_error_rate * spec.min_requests
    if canary.errors > allowed_errors or (
        canary.requests >= spec.min_requests and canary.error_rate > spec.max_error_rate
    ):
        return f"error rate {canary.error_rate:.1%} > {spec.max_error_rate:.1%} ({summary(canary, stable)})"
    if canary.requests < spec.min_requests:
        return None
    # Both revisions see the same traffic mix, so clients' own bad requests are refused equally
    # often by both: only the canary's excess over the stable's refusals is the revision's doing.
    if canary.refused_rate - stable.refused_rate > spec.max_error_rate:
        return (
            f"refused {canary.refused_rate:.1%} of requests vs stable {stable.refused_rate:.1%}, "
            f"more than {spec.max_error_rate:.1%} above it ({summary(canary, stable)})"
        )
    # A P99 needs as much evidence as a promotion does.
    if canary.ttft_samples < spec.min_requests or stable.ttft_p99_s is None:
        return None
    limit = stable.ttft_p99_s * spec.max_ttft_p99_ratio + spec.ttft_p99_slack_ms / 1000
    slow, answered = canary.slower_than(limit), canary.ttft_samples
    # Over a few dozen answers the sample's p99 is its slowest answer, and one hiccup of the host
    # would roll back a canary as fast as the stable: its p99 is above the limit only when more
    # of its answers are slower than a revision whose p99 is the limit would give by chance.
    chance = chance_of_at_least(slow, answered, 1 - TTFT_QUANTILE)
    if chance < TTFT_SIGNIFICANCE:
        return (
            f"TTFT p99 > {spec.max_ttft_p99_ratio:g}x stable {stable.ttft_p99_s * 1000:.0f} ms"
            f" + {spec.ttft_p99_slack_ms:g} ms: {slow} of {answered} answers slower than"
            f" {limit * 1000:.0f} ms, p = {chance:.1g} ({summary(canary, stable)})"
        )
    return None


def chance_of_at_least(count: int, trials: int, share: float) -> float:
    """P(X >= count) for X ~ Binomial(trials, share)."""

    # In logs: the binomial coefficients of a long window overflow a float.
    def log_term(k: int) -> float:
        ways = math.lgamma(trials + 1) - math.lgamma(k + 1) - math.lgamma(trials - k + 1)
        return ways + k * math.log(share) + (trials - k) * math.log1p(-share)

    below = sum(math.exp(log_term(k)) for k in range(min(count, trials + 1)))
    return max(0.0, 1.0 - below)
