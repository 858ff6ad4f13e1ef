"""What the control core looks at: replicas, service-level signals and per-revision outcomes.

Both appliers build these from their own sources — the local fleet from its processes and the
gateway it embeds, the operator from Deployments, Pods and scraped metrics.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

# pending: no capacity yet (a Pod waiting for a GPU node); starting: loading the model;
# ready: serving; unhealthy: was ready, health now failing while the process lives; exited.
Phase = Literal["pending", "starting", "ready", "unhealthy", "exited"]
# How one attempt on a replica ended, as the gateway saw it. `refused`: the engine answered 4xx to
# a request the gateway had already validated, so the revision, not the client, said no (a
# canary whose context is shorter than the stable's refuses what the stable serves).
# `error`: 5xx, reset or timeout.
Outcome = Literal["ok", "refused", "error"]


@dataclass(frozen=True, slots=True)
class ReplicaObservation:
    id: str
    revision: str
    phase: Phase
    since: float  # when the replica entered `phase` (the loop's clock, seconds)
    restarts: int = 0  # crash restarts not yet forgiven (see failover.restarts_after_ready)
    queue_depth: float = 0.0  # the engine's own waiting requests
    in_flight: float = 0.0  # requests the gateway has sent and not yet finished
    kv_cache_usage: float = 0.0  # 0..1
    pool: int = 0  # index into engine.gpuPools (cluster only)


@dataclass(frozen=True, slots=True)
class SloCounts:
    """Cumulative TTFT SLO counters of one class (the SLA scheduler's, summed over replicas)."""

    met: float = 0.0
    total: float = 0.0


@dataclass(frozen=True, slots=True)
class Signals:
    """Service-level inputs of one tick."""

    gateway_queued: int = 0  # requests held by the gateway's admission queue
    recent_requests: int = 0  # requests the gateway finished in the scale-down window
    ttft_p90_s: float | None = None  # the service's P90 time to first byte, last minute
    slo: Mapping[str, SloCounts] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class WindowStats:
    """Outcomes of one revision's attempts over an analysis window, as the gateway saw them."""

    requests: int = 0
    errors: int = 0
    ttft_p99_s: float | None = None  # over answered (`ok`) attempts after the warm-up only
    refused: int = 0
    # The TTFTs `ttft_p99_s` was taken over, as (seconds, attempts at least that slow): exact
    # values, or from a histogram the lower bound of each bucket (so none is counted slower than
    # it certainly was).
    ttft_floors: tuple[tuple[float, int], ...] = ()

    @property
    def ttft_samples(self) -> int:
        return sum(count for _, count in self.ttft_floors)

    def slower_than(self, seconds: float) -> int:
        """Answered attempts whose TTFT was certainly above `seconds`."""
        return sum(count for floor, count in self.ttft_floors if floor > seconds)

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def refused_rate(self) -> float:
        return self.refused / self.requests if self.requests else 0.0


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default, and vLLM's benchmarks'); q in 0..100."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def window_stats(
    outcomes: Iterable[tuple[Outcome, float | None]],
    after_warmup: Iterable[tuple[Outcome, float | None]] | None = None,
) -> WindowStats:
    """(outcome, ttft seconds or None) per attempt -> counts over `outcomes`, and the TTFT P99
    of the answered ones in `after_warmup` (default: the same attempts). A refusal's fast first
    byte says nothing about how fast the revision serves, so only answers count for TTFT."""
    attempts = list(outcomes)
    requests = len(attempts)
    errors = sum(outcome == "error" for outcome, _ in attempts)
    refused = sum(outcome == "refused" for outcome, _ in attempts)
    answered = attempts if after_warmup is None else after_warmup
    ttfts = [ttft for outcome, ttft in answered if outcome == "ok" and ttft is not None]
    p99 = percentile(ttfts, 99) if ttfts else None
    floors = tuple(sorted(Counter(ttfts).items()))
    return WindowStats(requests, errors, p99, refused, ttft_floors=floors)
