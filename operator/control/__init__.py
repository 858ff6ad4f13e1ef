"""The control core: autoscale, failover and rollout decisions as pure functions over typed data.

No I/O, no clocks, no processes or API objects: every function takes what was observed and the
time, and returns what should be true plus the reason. Two appliers act on the answers — the
local fleet (`tokenfleet.engine.fleet`, processes) and the kopf operator (`tokenfleet.operator`,
Deployments) — so a decision tested here behaves the same in both places.
"""

from tokenfleet.operator.control.autoscale import ScaleDecision, ScaleState, autoscale
from tokenfleet.operator.control.failover import Replacement, failover, restart_delay, restarts_after_ready
from tokenfleet.operator.control.observe import (
    Outcome,
    ReplicaObservation,
    Signals,
    SloCounts,
    WindowStats,
    percentile,
    window_stats,
)
from tokenfleet.operator.control.revision import revision_of
from tokenfleet.operator.control.rollout import RolloutPlan, RolloutState, begin_rollout, rollout, warmup_ends

__all__ = [
    "Outcome",
    "Replacement",
    "ReplicaObservation",
    "RolloutPlan",
    "RolloutState",
    "ScaleDecision",
    "ScaleState",
    "Signals",
    "SloCounts",
    "WindowStats",
    "autoscale",
    "begin_rollout",
    "failover",
    "percentile",
    "restart_delay",
    "restarts_after_ready",
    "revision_of",
    "rollout",
    "warmup_ends",
    "window_stats",
]
