"""The operator's default metrics source: per-revision gateway counters → window stats (pure)."""

from __future__ import annotations

import asyncio
import math

import pytest
from prometheus_client import generate_latest

from tokenfleet.engine.gateway.metrics import GatewayMetrics
from tokenfleet.operator.control import WindowStats
from tokenfleet.operator.metrics import (
    GatewayScraper,
    RevisionTotals,
    Scrape,
    baseline,
    bucket_floors,
    bucket_quantile,
    keep,
    revision_totals_from_text,
    window_stats,
)
from tokenfleet.operator.model import Conventions
from tokenfleet.spec import LLMService, default_service

# What a gateway serves (prometheus_client's text format), trimmed to the series read here.
BEFORE = """\
# HELP tokenfleet_gateway_revision_attempts_total Attempts sent to a replica of each revision.
# TYPE tokenfleet_gateway_revision_attempts_total counter
tokenfleet_gateway_revision_attempts_total{outcome="ok",revision="aaa"} 100.0
tokenfleet_gateway_revision_attempts_total{outcome="error",revision="aaa"} 2.0
tokenfleet_gateway_revision_attempts_total{outcome="ok",revision=""} 7.0
# HELP tokenfleet_gateway_revision_first_byte_seconds Time to first byte.
# TYPE tokenfleet_gateway_revision_first_byte_seconds histogram
tokenfleet_gateway_revision_first_byte_seconds_bucket{le="0.1",revision="aaa"} 90.0
tokenfleet_gateway_revision_first_byte_seconds_bucket{le="0.5",revision="aaa"} 100.0
tokenfleet_gateway_revision_first_byte_seconds_bucket{le="+Inf",revision="aaa"} 100.0
tokenfleet_gateway_revision_first_byte_seconds_count{revision="aaa"} 100.0
tokenfleet_gateway_revision_first_byte_seconds_sum{revision="aaa"} 6.0
"""

AFTER = """\
# TYPE tokenfleet_gateway_revision_attempts_total counter
tokenfleet_gateway_revision_attempts_total{outcome="ok",revision="aaa"} 200.0
tokenfleet_gateway_revision_attempts_total{outcome="error",revision="aaa"} 2.0
tokenfleet_gateway_revision_attempts_total{outcome="ok",revision="bbb"} 45.0
tokenfleet_gateway_revision_attempts_total{outcome="error",revision="bbb"} 5.0
tokenfleet_gateway_revision_attempts_total{outcome="refused",revision="bbb"} 10.0
# TYPE tokenfleet_gateway_revision_first_byte_seconds histogram
tokenfleet_gateway_revision_first_byte_seconds_bucket{le="0.1",revision="aaa"} 190.0
tokenfleet_gateway_revision_first_byte_seconds_bucket{le="0.5",revision="aaa"} 200.0
tokenfleet_gateway_revision_first_byte_seconds_bucket{le="+Inf",revision="aaa"} 200.0
tokenfleet_gateway_revision_first_byte_seconds_bucket{le="0.1",revision="bbb"} 0.0
tokenfleet_gateway_revision_first_byte_seconds_bucket{le="0.5",revision="bbb"} 0.0
tokenfleet_gateway_revision_first_byte_seconds_bucket{le="+Inf",revision="bbb"} 45.0
"""


def test_revision_totals_parsed_from_fixed_text() -> None:
    totals = revision_totals_from_text(BEFORE)
    assert set(totals) == {"aaa"}, "no revision label: a static-replica gateway, not analysed"
    aaa = totals["aaa"]
    assert (aaa.ok, aaa.errors, aaa.attempts) == (100.0, 2.0, 102.0)
    assert aaa.first_byte == ((0.1, 90.0), (0.5, 100.0), (math.inf, 100.0))


def test_two_scrapes_become_window_stats_per_revision() -> None:
    stats = window_stats(revision_totals_from_text(BEFORE), revision_totals_from_text(AFTER))
    # aaa: 100 more attempts, no new error, all under 100 ms → p99 within the first bucket
    assert stats["aaa"].requests == 100
    assert stats["aaa"].errors == 0
    assert stats["aaa"].ttft_p99_s == pytest.approx(0.099)
    # bbb appeared after the window started: all of it counts; its TTFTs are past the last bound
    bbb = WindowStats(requests=60, errors=5, ttft_p99_s=0.5, refused=10, ttft_floors=((0.5, 45),))
    assert stats["bbb"] == bbb


def test_a_histogram_counts_an_answer_slower_only_past_its_buckets_lower_bound() -> None:
    floors = bucket_floors(revision_totals_from_text(BEFORE)["aaa"].first_byte)
    assert floors == ((0.0, 90), (0.1, 10)), "90 answers took at least 0 s, 10 at least 0.1 s"
    stats = WindowStats(100, 0, 0.1, ttft_floors=floors)
    assert stats.ttft_samples == 100
    assert stats.slower_than(0.05) == 10, "the 0.1-0.5 s bucket is certainly slower than 50 ms"
    assert stats.slower_than(0.1) == 0, "nor is any certainly slower than its own lower bound"


def test_a_counter_reset_counts_from_zero() -> None:
    before = {"aaa": RevisionTotals(ok=500, errors=10, first_byte=((0.1, 500.0), (math.inf, 500.0)))}
    after = {"aaa": RevisionTotals(ok=30, errors=1, first_byte=((0.1, 30.0), (math.inf, 30.0)))}
    stats = window_stats(before, after)["aaa"]
    assert (stats.requests, stats.errors) == (31, 1)
    assert stats.ttft_p99_s == pytest.approx(0.099)


def test_bucket_quantile_is_promql_histogram_quantile() -> None:
    assert bucket_quantile(0.99, ()) is None
    assert bucket_quantile(0.99, ((0.1, 0.0), (math.inf, 0.0))) is None
    assert bucket_quantile(0.5, ((0.1, 50.0), (0.2, 100.0), (math.inf, 100.0))) == pytest.approx(0.1)
    assert bucket_quantile(0.75, ((0.1, 50.0), (0.2, 100.0), (math.inf, 100.0))) == pytest.approx(0.15)


def test_window_baseline_is_the_scrape_at_the_step_start() -> None:
    history = [Scrape(at) for at in (10.0, 25.0, 40.0)]
    assert baseline(history, 30.0) == history[1]
    assert baseline(history, 25.0) == history[1]
    assert baseline(history, 5.0) == history[0], "operator started mid-window: from its first scrape"
    assert baseline([], 5.0) is None
    assert keep(history, 30.0) == history[1:]
    assert keep(history, None) == history[-1:]


def warming_up_for(seconds: float) -> LLMService:
    base = default_service()
    rollout = base.spec.rollout.model_copy(update={"warmup_s": seconds})
    return base.model_copy(update={"spec": base.spec.model_copy(update={"rollout": rollout})})


def test_scraper_measures_each_window_from_its_start_through_the_gateway_metrics() -> None:
    """The gateway's own counters (GatewayMetrics.count_outcome) read back by the scraper."""
    gateway = GatewayMetrics()
    now = [0.0]
    urls: list[str] = []

    async def fetch(url: str) -> str | None:
        urls.append(url)
        return generate_latest(gateway.registry).decode()

    scraper = GatewayScraper(Conventions(), clock=lambda: now[0], fetch=fetch)
    service = warming_up_for(0)

    async def scrape(at: float, start: float | None) -> dict[str, WindowStats]:
        now[0] = at
        metrics = await scraper(service, start)
        assert metrics is not None
        return dict(metrics.per_revision)

    for _ in range(30):
        gateway.count_outcome("old", "ok", 0.05)
    assert asyncio.run(scrape(0.0, None)) == {}, "no window, no per-revision stats"
    # the step starts at t=5 (after the t=0 scrape); traffic then splits over two revisions
    for _ in range(10):
        gateway.count_outcome("old", "ok", 0.05)
        gateway.count_outcome("new", "ok", 0.3)
    gateway.count_outcome("new", "error", None)
    stats = asyncio.run(scrape(15.0, 5.0))
    assert stats["old"].requests == 10
    assert (stats["new"].requests, stats["new"].errors) == (11, 1)
    assert stats["new"].ttft_p99_s == pytest.approx(0.49, abs=0.01)
    stats = asyncio.run(scrape(30.0, 5.0))
    assert stats["old"].requests == 10, "still measured from the same baseline"
    assert urls[0] == "http://tiny-code.default.svc.cluster.local:8000/metrics"


def test_the_scraper_compares_ttft_only_after_the_warm_up() -> None:
    gateway = GatewayMetrics()
    now = [0.0]

    async def fetch(url: str) -> str | None:
        return generate_latest(gateway.registry).decode()

    scraper = GatewayScraper(Conventions(), clock=lambda: now[0], fetch=fetch)
    service = warming_up_for(20)

    async def scrape(at: float) -> WindowStats:
        now[0] = at
        metrics = await scraper(service, 5.0)
        assert metrics is not None
        return metrics.per_revision["new"]

    gateway.count_outcome("new", "ok", 0.0)  # before the step: not in the window
    assert (asyncio.run(scrape(0.0)).requests, asyncio.run(scrape(4.0)).requests) == (0, 0)
    for _ in range(10):
        gateway.count_outcome("new", "ok", 2.0)  # a cold engine's first answers
    cold = asyncio.run(scrape(20.0))
    assert (cold.requests, cold.ttft_samples, cold.ttft_p99_s) == (10, 0, None), "still warming up"
    for _ in range(10):
        gateway.count_outcome("new", "ok", 0.05)
    warm = asyncio.run(scrape(40.0))
    assert (warm.requests, warm.ttft_samples) == (20, 10)
    assert warm.ttft_p99_s is not None
    assert warm.ttft_p99_s <= 0.1, "the cold answers before the warm-up's end are not in the P99"
