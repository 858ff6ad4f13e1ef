"""The control loop on a cluster: Deployments + metrics → the shared control core → a decision.

`control_tick` is pure. It maps what the operator observed onto the control core's inputs
(`tokenfleet.operator.control`), runs autoscale and rollout, and maps their answer back onto
per-track replica counts (`ControlDecision`). Its state lives in the resource's status, so an
operator restarted mid-rollout resumes at the same step.

Rolling and recreate updates are left to the Deployment controller (same arithmetic, one
Deployment); only canaries, which need two revisions side by side, run through the core.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from tokenfleet.operator.control import (
    ReplicaObservation,
    RolloutState,
    ScaleState,
    Signals,
    WindowStats,
    autoscale,
    begin_rollout,
    failover,
    rollout,
)
from tokenfleet.operator.control.observe import Phase
from tokenfleet.operator.model import ControlDecision, DeploymentView, Observed, RolloutPhase, revision_of
from tokenfleet.operator.workloads import engine_name
from tokenfleet.spec import LLMService, LLMServiceSpec


@dataclass(frozen=True, slots=True)
class Metrics:
    """One scrape: service-level signals and each revision's outcomes for canary analysis."""

    signals: Signals = field(default_factory=Signals)
    per_revision: Mapping[str, WindowStats] = field(default_factory=dict)


# Called once a control tick with the start of the canary's analysis window (the rollout step's
# start on the operator's clock; None outside one): per-revision stats cover that window.
MetricsSource = Callable[[LLMService, float | None], Awaitable[Metrics | None]]


@dataclass(frozen=True, slots=True)
class ControlState:
    """What the loop remembers between ticks (stored under status.control)."""

    rollout: RolloutState
    scale: ScaleState = field(default_factory=ScaleState)
    desired: int | None = None  # the replica count last decided
    gpu_pool: int = 0  # index into engine.gpuPools the engines are placed on
    stable_spec: dict[str, Any] | None = None  # spec of rollout.stable, to keep running it

    def to_status(self) -> dict[str, Any]:
        r = self.rollout
        return {
            "desired": self.desired,
            "gpuPool": self.gpu_pool,
            "stableSpec": self.stable_spec,
            "rollout": {
                "stable": r.stable,
                "target": r.target,
                "strategy": r.strategy,
                "phase": r.phase,
                "step": r.step,
                "stepStartedAt": r.step_started_at,
                "reason": r.reason,
                "rejected": sorted(r.rejected),
            },
            "scaleHistory": [list(item) for item in self.scale.history],
            "scaleMetric": [list(item) for item in self.scale.metric],
        }

    @classmethod
    def from_status(cls, control: Mapping[str, Any] | None, spec: LLMServiceSpec) -> ControlState:
        """The stored state, or a fresh one that serves the current spec."""
        if not control or not control.get("rollout"):
            return cls(
                rollout=RolloutState(stable=revision_of(spec)),
                stable_spec=spec.model_dump(mode="json", by_alias=True),
            )
        r = control["rollout"]
        state = RolloutState(
            stable=str(r["stable"]),
            target=r.get("target"),
            strategy=r.get("strategy", "rolling"),
            phase=r.get("phase", "idle"),
            step=int(r.get("step", 0)),
            step_started_at=r.get("stepStartedAt"),
            reason=str(r.get("reason", "")),
            rejected=frozenset(r.get("rejected", ())),
        )
        history = tuple((float(t), int(n)) for t, n in control.get("scaleHistory", ()))
        metric = tuple((float(t), float(v)) for t, v in control.get("scaleMetric", ()))
        return cls(
            rollout=state,
            scale=ScaleState(history=history, metric=metric),
            desired=control.get("desired"),
            gpu_pool=int(control.get("gpuPool", 0)),
            stable_spec=control.get("stableSpec"),
        )


def replica_observations(
    views: Mapping[str, DeploymentView | None], revisions: Mapping[str, str], now: float
) -> list[ReplicaObservation]:
    """Deployment counts as replicas: the core needs ready vs. starting per revision, not pods."""
    out: list[ReplicaObservation] = []
    for name, view in views.items():
        if view is None or name not in revisions:
            continue
        for index in range(max(view.replicas, view.ready_replicas)):
            phase: Phase = "ready" if index < view.ready_replicas else "starting"
            out.append(ReplicaObservation(f"{name}-{index}", revisions[name], phase, since=now))
    return out


def _phase_of(state: RolloutState) -> RolloutPhase:
    return {"progressing": "Progressing", "rolled_back": "RolledBack", "failed": "Failed"}.get(
        state.phase, "Stable"
    )  # type: ignore[return-value]


def control_tick(
    service: LLMService,
    observed: Observed,
    state: ControlState,
    metrics: Metrics | None,
    now: float,
) -> tuple[ControlDecision, ControlState, list[str]]:
    """One tick: the decision to apply, the state to store, and one message per decision taken."""
    spec = service.spec
    revision = revision_of(spec)
    events: list[str] = []
    rollout_state = state.rollout
    stable_spec = state.stable_spec
    # A rolled-back revision stays rejected while the spec names it (each tick sees the same spec;
    # the local fleet starts rollouts per apply instead): the stable track keeps serving.
    rejected = revision in rollout_state.rejected and rollout_state.target is None
    if revision != rollout_state.stable and revision != rollout_state.target and not rejected:
        if spec.rollout.strategy == "canary":
            rollout_state = begin_rollout(rollout_state, revision, "canary", now)
            events.append(rollout_state.reason)
        else:
            # The Deployment controller rolls (or recreates) the stable track by itself.
            why = f"{spec.rollout.strategy} update to {revision}"
            rollout_state = RolloutState(stable=revision, phase="complete", reason=why)
            stable_spec = spec.model_dump(mode="json", by_alias=True)
            events.append(why)
    elif revision == rollout_state.stable and rollout_state.target is not None:
        rollout_state = begin_rollout(rollout_state, revision, spec.rollout.strategy, now)
        events.append(rollout_state.reason)
    elif revision == rollout_state.stable and rollout_state.phase in ("rolled_back", "failed"):
        # The spec names the serving revision again after a rollback: nothing is degraded any more.
        rollout_state = replace(rollout_state, phase="complete", reason=f"spec back on {revision}")
        events.append(rollout_state.reason)

    stable_name, canary_name = engine_name(service, "stable"), engine_name(service, "canary")
    views = {name: observed.deployments.get(name) for name in (stable_name, canary_name)}
    revisions = {stable_name: rollout_state.stable}
    if rollout_state.target is not None:
        revisions[canary_name] = rollout_state.target
    replicas = replica_observations(views, revisions, now)
    metrics = metrics or Metrics()

    # Without autoscaling the chosen count is replicas.min (where `kubectl scale` writes);
    # with it, the count the autoscaler last decided.
    autoscaled = spec.autoscaling.enabled and state.desired is not None
    current = state.desired if autoscaled and state.desired is not None else spec.replicas.min
    scale = autoscale(
        spec.autoscaling,
        spec.replicas,
        current,
        replicas,
        metrics.signals,
        state.scale,
        now,
        rollout_in_progress=rollout_state.in_progress,
    )
    if scale.desired != current:
        events.append(f"scale {current} -> {scale.desired}: {scale.reason}")

    pool = _pool_after_failover(service, observed, state.gpu_pool, now, events)
    plan = rollout(spec.rollout, rollout_state, scale.desired, replicas, metrics.per_revision, now)
    events.extend(plan.events)
    new_rollout = plan.state
    if new_rollout.stable != rollout_state.stable:
        # Promoted: the stable track now runs the spec that was the canary's.
        stable_spec = spec.model_dump(mode="json", by_alias=True)
    target = new_rollout.target if new_rollout.in_progress else None
    canary_count = plan.counts.get(target, 0) if target else 0
    weights = plan.weights or {}
    decision = ControlDecision(
        stable_replicas=plan.counts.get(new_rollout.stable, 0),
        canary_replicas=canary_count,
        canary_weight_percent=weights.get(target, 0) if target else 0,
        phase=_phase_of(new_rollout),
        gpu_pool=pool,
        reasons=tuple(r for r in (scale.reason, new_rollout.reason) if r),
    )
    new_state = replace(
        state,
        rollout=new_rollout,
        scale=scale.state,
        desired=scale.desired,
        stable_spec=stable_spec,
        gpu_pool=pool,
    )
    return decision, new_state, events


def _pool_after_failover(
    service: LLMService, observed: Observed, pool: int, now: float, events: list[str]
) -> int:
    """The core's failover on unscheduled pods: Pending past pendingTimeoutS moves to the next pool."""
    pools = len(service.spec.engine.gpu_pools)
    pending = [
        ReplicaObservation(p.name, "", "pending", since=p.pending_since, pool=p.pool)
        for p in observed.pending_pods
        if p.pool == pool
    ]
    moves = [r for r in failover(service.spec.failover, pending, now, pools=pools) if r.kind == "fallback"]
    if not moves:
        return pool
    events.append(moves[0].reason)
    return max(r.pool for r in moves)


def stable_spec_of(state: ControlState, current: LLMServiceSpec) -> LLMServiceSpec | None:
    """The spec the stable track runs, when it differs from the current one."""
    if state.stable_spec is None or state.rollout.stable == revision_of(current):
        return None
    return LLMServiceSpec.model_validate(state.stable_spec)
