"""The default metrics source on a cluster: each service's gateway `/metrics`, scraped directly.

Two kinds of reading. Service-level signals (requests waiting in the gateway's queues) come from
one scrape. Canary analysis needs each revision's outcomes since the rollout step started: the
gateway counts attempts by revision and outcome and a first-byte histogram by revision
(`tokenfleet_gateway_revision_*`), so the stats of a window are the difference between the
scrape taken when the step started and the latest one (`window_stats`). Everything but the HTTP
GET is pure and tested on fixed text.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

import aiohttp

from tokenfleet.observability import promtext
from tokenfleet.operator.control import Signals, WindowStats
from tokenfleet.operator.control.rollout import TTFT_QUANTILE
from tokenfleet.operator.loop import Metrics
from tokenfleet.operator.model import Conventions
from tokenfleet.spec import LLMService

logger = logging.getLogger(__name__)

ATTEMPTS = "tokenfleet_gateway_revision_attempts_total"
FIRST_BYTE_BUCKET = "tokenfleet_gateway_revision_first_byte_seconds_bucket"


@dataclass(frozen=True, slots=True)
class RevisionTotals:
    """One revision's cumulative counters in one scrape."""

    ok: float = 0.0
    errors: float = 0.0
    first_byte: tuple[tuple[float, float], ...] = ()  # (upper bound, cumulative count), by bound
    refused: float = 0.0

    @property
    def attempts(self) -> float:
        return self.ok + self.errors + self.refused


@dataclass(frozen=True, slots=True)
class Scrape:
    """What one read of a gateway's `/metrics` gave, at `at` on the operator's clock."""

    at: float
    signals: Signals = field(default_factory=Signals)
    totals: Mapping[str, RevisionTotals] = field(default_factory=dict)


def signals_from_text(text: str) -> Signals:
    """Service-level signals from one gateway exposition (pure; tested on fixed text)."""
    return Signals(gateway_queued=int(promtext.value(text, "tokenfleet_gateway_queued")))


def revision_totals_from_text(text: str) -> dict[str, RevisionTotals]:
    """Each revision's attempt counters and first-byte histogram (pure; tested on fixed text)."""
    by_outcome: dict[str, dict[str, float]] = {"ok": {}, "refused": {}, "error": {}}
    buckets: dict[str, dict[float, float]] = {}
    for sample in promtext.samples(text):
        revision = sample.labels.get("revision", "")
        if not revision:
            continue  # replicas of no known revision (a gateway with static replicas)
        if sample.name == ATTEMPTS:
            # An outcome this operator does not know is counted as an error: never as a success.
            into = by_outcome.get(sample.labels.get("outcome", ""), by_outcome["error"])
            into[revision] = into.get(revision, 0.0) + sample.value
        elif sample.name == FIRST_BYTE_BUCKET:
            bound = float(sample.labels["le"])
            buckets.setdefault(revision, {})[bound] = sample.value
    ok, refused, errors = by_outcome["ok"], by_outcome["refused"], by_outcome["error"]
    return {
        revision: RevisionTotals(
            ok=ok.get(revision, 0.0),
            errors=errors.get(revision, 0.0),
            first_byte=tuple(sorted(buckets.get(revision, {}).items())),
            refused=refused.get(revision, 0.0),
        )
        for revision in sorted(set(ok) | set(errors) | set(refused) | set(buckets))
    }


def bucket_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """PromQL's histogram_quantile on cumulative (bound, count) pairs: linear within a bucket;
    in the +Inf bucket, the largest finite bound."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return lower_bound


def bucket_floors(buckets: Sequence[tuple[float, float]]) -> tuple[tuple[float, int], ...]:
    """Cumulative (bound, count) pairs -> (lower bound, observations) per non-empty bucket: the
    least each observation certainly took."""
    floors: list[tuple[float, int]] = []
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if (observations := round(count - lower_count)) > 0:
            floors.append((lower_bound, observations))
        lower_bound, lower_count = bound, count
    return tuple(floors)


def _delta(after: float, before: float) -> float:
    # A counter that went down was reset (the gateway restarted): all of `after` is new.
    return after - before if after >= before else after


def window_stats(
    before: Mapping[str, RevisionTotals],
    after: Mapping[str, RevisionTotals],
    warm: Mapping[str, RevisionTotals] | None = None,
) -> dict[str, WindowStats]:
    """Per revision, the attempts, errors and refusals between two scrapes of one gateway, and
    the TTFT p99 between `warm` (the scrape at the end of the warm-up; default `before`) and `after`."""
    out: dict[str, WindowStats] = {}
    for revision, now in after.items():
        base = _base(before.get(revision, RevisionTotals()), now)
        warm_base = base if warm is None else _base(warm.get(revision, RevisionTotals()), now)
        earlier = dict(warm_base.first_byte)
        buckets = tuple((bound, _delta(count, earlier.get(bound, 0.0))) for bound, count in now.first_byte)
        out[revision] = WindowStats(
            requests=round(_delta(now.attempts, base.attempts)),
            errors=round(_delta(now.errors, base.errors)),
            ttft_p99_s=bucket_quantile(TTFT_QUANTILE, buckets),
            refused=round(_delta(now.refused, base.refused)),
            ttft_floors=bucket_floors(buckets),
        )
    return out


def _base(then: RevisionTotals, now: RevisionTotals) -> RevisionTotals:
    # Counters that went down were reset (the gateway restarted): count from zero.
    return RevisionTotals() if now.attempts < then.attempts else then


def baseline(history: Sequence[Scrape], start: float) -> Scrape | None:
    """The scrape a window starting at `start` is measured from: the latest one taken at or
    before it, else (an operator that started mid-window) the earliest one there is."""
    before = [s for s in history if s.at <= start]
    if before:
        return before[-1]
    return history[0] if history else None


def keep(history: Sequence[Scrape], start: float | None) -> list[Scrape]:
    """What to remember for the next tick: the window's baseline and everything after it."""
    if not history:
        return []
    if start is None:
        return [history[-1]]
    base = baseline(history, start)
    return [s for s in history if base is None or s.at >= base.at]


def metrics_of(history: Sequence[Scrape], start: float | None, warmup_s: float = 0.0) -> Metrics:
    """Signals of the latest scrape; per-revision stats since `start` (none outside a window),
    their TTFT since `start + warmup_s`."""
    latest = history[-1]
    if start is None:
        return Metrics(signals=latest.signals, per_revision={})
    base, warm = baseline(history, start), baseline(history, start + warmup_s)
    per_revision = (
        window_stats(base.totals, latest.totals, warm.totals if warm is not None else None)
        if base is not None
        else {}
    )
    return Metrics(signals=latest.signals, per_revision=per_revision)


Fetch = Callable[[str], Awaitable[str | None]]


class GatewayScraper:
    """A `MetricsSource` that reads `http://<service>.<namespace>.svc:<port>/metrics` and keeps,
    per service, the scrapes the current analysis window needs."""

    def __init__(
        self,
        conventions: Conventions,
        timeout_s: float = 3.0,
        clock: Callable[[], float] = time.time,
        fetch: Fetch | None = None,
    ) -> None:
        self._conventions = conventions
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._clock = clock
        self._fetch = fetch or self._get
        self._history: dict[tuple[str, str], list[Scrape]] = {}

    def url(self, service: LLMService) -> str:
        meta = service.metadata
        host = f"{meta.name}.{meta.namespace}.svc.{self._conventions.cluster_domain}"
        return f"http://{host}:{service.spec.gateway.port}/metrics"

    async def _get(self, url: str) -> str | None:
        try:
            async with (
                aiohttp.ClientSession(timeout=self._timeout) as session,
                session.get(url) as resp,
            ):
                return await resp.text() if resp.status == 200 else None
        except (aiohttp.ClientError, TimeoutError) as exc:
            logger.info("metrics at %s unavailable: %s", url, exc)
            return None

    async def __call__(self, service: LLMService, window_start: float | None) -> Metrics | None:
        text = await self._fetch(self.url(service))
        if text is None:
            return None  # no metrics this tick: the autoscaler holds rather than guessing
        scrape = Scrape(self._clock(), signals_from_text(text), revision_totals_from_text(text))
        key = (service.metadata.namespace, service.metadata.name)
        history = [*self._history.get(key, []), scrape]
        self._history[key] = keep(history, window_start)
        return metrics_of(history, window_start, service.spec.rollout.warmup_s)

    def forget(self, namespace: str, name: str) -> None:
        self._history.pop((namespace, name), None)
