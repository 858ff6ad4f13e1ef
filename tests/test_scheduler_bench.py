"""The scheduler benchmark's pure parts: workload generation, metrics, report. No engine."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tokenfleet.load import scheduler_bench as sb
from tokenfleet.load.scheduler_bench import Arrival, Outcome
from tokenfleet.spec import parse_service


def test_rate_profiles() -> None:
    assert sb.rate_multiplier("0.8x", 5, 30) == 0.8
    assert [sb.rate_multiplier("burst", t, 30) for t in (0, 9.9, 10.1, 19.9, 20.1, 30)] == [
        0.7,
        0.7,
        1.5,
        1.5,
        0.5,
        0.5,
    ]
    assert sb.peak_multiplier("burst") == 1.5
    assert sb.peak_multiplier("1.2x") == 1.2
    with pytest.raises(ValueError, match="unknown profile"):
        sb.rate_multiplier("fast", 0, 1)


def test_generate_matches_rates_shares_and_lengths() -> None:
    arrivals = sb.generate("1.0x", lam=10.0, duration_s=200.0, seed=7)
    assert arrivals == sb.generate("1.0x", lam=10.0, duration_s=200.0, seed=7)  # seeded
    assert [a.at for a in arrivals] == sorted(a.at for a in arrivals)
    assert 0.9 * 2000 < len(arrivals) < 1.1 * 2000
    by_class = {c.name: [a for a in arrivals if a.slo_class == c.name] for c in sb.DEFAULT_CLASSES}
    for cls in sb.DEFAULT_CLASSES:
        share = len(by_class[cls.name]) / len(arrivals)
        assert abs(share - cls.share) < 0.05, (cls.name, share)
        assert all(cls.prompt[0] <= a.prompt_tokens <= cls.prompt[1] for a in by_class[cls.name])
        assert all(cls.output[0] <= a.max_tokens <= cls.output[1] for a in by_class[cls.name])
    rest = [a for a in arrivals if a.slo_class != "interactive"]
    for tenant, tenant_share in sb.TENANT_SHARES.items():
        mine = [a for a in rest if a.tenant == tenant]
        assert abs(len(mine) / len(rest) - tenant_share) < 0.04, tenant
    noisy = [a for a in rest if a.tenant == sb.NOISY]
    assert all((a.at % sb.NOISY_PERIOD_S) < sb.NOISY_PERIOD_S / 2 for a in noisy)  # bursts only
    assert {a.tenant for a in by_class["interactive"]} == set(sb.TENANTS)


def test_burst_profile_has_three_phases() -> None:
    arrivals = sb.generate("burst", lam=10.0, duration_s=300.0, seed=3)
    counts = [sum(1 for a in arrivals if k * 100 <= a.at < (k + 1) * 100) for k in range(3)]
    assert counts[1] > 1.7 * counts[0] > 1.7 * counts[2] * 0.7 / 0.5 * 0.5


def test_percentile_and_jain() -> None:
    assert sb.percentile([], 50) is None
    assert sb.percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert sb.percentile([0.0, 10.0], 99) == pytest.approx(9.9)
    assert sb.jain([]) is None
    assert sb.jain([0.0, 0.0]) == 1.0
    assert sb.jain([5.0, 5.0, 5.0]) == pytest.approx(1.0)
    assert sb.jain([1.0, 0.0, 0.0, 0.0]) == pytest.approx(0.25)


@given(st.lists(st.floats(0, 1e6), min_size=1, max_size=20))
def test_jain_is_between_one_over_n_and_one(values: list[float]) -> None:
    j = sb.jain(values)
    assert j is not None
    assert 1 / len(values) - 1e-9 <= j <= 1 + 1e-9


def outcome(
    cls: str, tenant: str, sent: float, first: float | None, done: float | None, tokens: int
) -> Outcome:
    o = Outcome(
        arrival=Arrival(sent, cls, tenant, 10, tokens), sent=sent, first_token=first, done=done, tokens=tokens
    )
    if first is not None and done is not None:
        o.chunks = [first + (done - first) * k / max(1, tokens - 1) for k in range(tokens)]
    return o


def test_class_report_counts_rejections_and_unfinished_as_misses() -> None:
    interactive = sb.DEFAULT_CLASSES[0]  # TTFT 1 s, TPOT 0.25 s
    outcomes = [
        outcome("interactive", "t2", 0.0, 0.5, 1.5, 5),  # met
        outcome("interactive", "t2", 1.0, 2.5, 3.0, 3),  # TTFT 1.5 s: missed
        outcome("interactive", "t3", 2.0, 2.2, 6.2, 5),  # TPOT 1 s: missed
        outcome("interactive", "t3", 3.0, None, None, 0),  # unfinished
        outcome("batch", "t3", 0.0, 0.1, 1.0, 4),  # other class: ignored
    ]
    outcomes[3].error = "unfinished"
    rejected = outcome("interactive", "t4", 4.0, None, 4.1, 0)
    rejected.rejected = True
    outcomes.append(rejected)
    report = sb.class_report(outcomes, interactive, end_s=10.0)
    assert report["requests"] == 5
    assert report["served"] == 3
    assert report["rejected"] == 1
    assert report["unfinished"] == 1
    assert report["slo_attainment"] == pytest.approx(1 / 5)
    assert report["ttft_p50"] == pytest.approx(0.5)
    assert report["max_wait"] == pytest.approx(7.0)  # the unfinished one, until end_s
    empty = sb.class_report([], interactive, end_s=1.0)
    assert empty["slo_attainment"] is None
    assert empty["max_wait"] is None


def test_fairness_counts_only_tenants_backlogged_throughout_a_window() -> None:
    # t2 and t3 each wait from 0 to 5 s (backlogged in window [0, 5)), then stream 8 tokens.
    equal = [outcome("batch", t, 0.0, 5.0, 9.0, 9) for t in ("t2", "t3")]
    # Two more t2 requests waiting until 5 s and served in the same window as the others: t2
    # gets three times t3's service in [5, 10), but only [0, 5) had two backlogged tenants.
    assert sb.fairness(equal, end_s=10.0, window_s=5.0) == pytest.approx(1.0)  # nobody served in [0, 5)
    served_early = [
        outcome("batch", "t2", 0.0, 1.0, 4.0, 4),
        outcome("batch", "t2", 0.0, 6.0, 7.0, 2),  # keeps t2 backlogged through [0, 5)
        outcome("batch", "t3", 0.0, 6.0, 7.0, 2),  # t3 backlogged through [0, 5), nothing served
    ]
    assert sb.fairness(served_early, end_s=10.0, window_s=5.0) == pytest.approx(0.5)
    # A tenant with a gap in its waiting is not backlogged throughout the window.
    gap = [
        outcome("batch", "t2", 0.0, 2.0, 3.0, 2),
        outcome("batch", "t2", 3.0, 6.0, 7.0, 2),
        outcome("batch", "t3", 0.0, 6.0, 7.0, 2),
    ]
    assert sb.fairness(gap, end_s=10.0, window_s=5.0) is None
    rejected = outcome("batch", "t4", 0.0, None, None, 0)
    rejected.rejected = True  # a rejected request never waits
    assert sb.fairness([*gap, rejected], end_s=10.0, window_s=5.0) is None
    # Per class: t2 backlogged in batch and t3 in standard are not two tenants of one class.
    split = [outcome("batch", "t2", 0.0, 6.0, 7.0, 2), outcome("standard", "t3", 0.0, 6.0, 7.0, 2)]
    assert sb.fairness(split, end_s=10.0, window_s=5.0) is None
    # Service in another class does not count against a tenant's share in this one.
    other_class = [*served_early, outcome("interactive", "t3", 0.0, 0.5, 4.5, 5)]
    assert sb.fairness(other_class, end_s=10.0, window_s=5.0) == pytest.approx(0.5)


def test_waiting_intervals_merge_and_cover() -> None:
    outcomes = [
        outcome("batch", "t2", 0.0, 2.0, 3.0, 2),
        outcome("batch", "t2", 1.0, 4.0, 5.0, 2),
        outcome("batch", "t2", 6.0, None, None, 0),
    ]
    spans = sb.waiting_intervals(outcomes, end_s=10.0)
    assert spans == {"t2": [(0.0, 4.0), (6.0, 10.0)]}
    assert sb.covers(spans["t2"], 0.0, 4.0)
    assert not sb.covers(spans["t2"], 3.0, 7.0)


def test_throughput() -> None:
    equal = [outcome("batch", t, 0.0, 1.0, 9.0, 9) for t in ("t2", "t3")]
    tp = sb.throughput(equal, duration_s=10.0)
    assert tp == {"output_tok_per_s": pytest.approx(1.8), "req_per_s": pytest.approx(0.2)}


METRICS_BEFORE = """# HELP x
vllm:num_preemptions_total{engine="0"} 2.0
tokenfleet_scheduler_schedule_seconds_bucket{le="0.0005"} 10.0
tokenfleet_scheduler_schedule_seconds_bucket{le="0.001"} 10.0
tokenfleet_scheduler_schedule_seconds_bucket{le="+Inf"} 10.0
tokenfleet_scheduler_schedule_seconds_sum 0.002
tokenfleet_scheduler_schedule_seconds_count 10.0
vllm:num_preemptions_created{engine="0"} 17.0
"""
METRICS_AFTER = """vllm:num_preemptions_total{engine="0"} 7.0
tokenfleet_scheduler_schedule_seconds_bucket{le="0.0005"} 900.0
tokenfleet_scheduler_schedule_seconds_bucket{le="0.001"} 1009.0
tokenfleet_scheduler_schedule_seconds_bucket{le="+Inf"} 1010.0
tokenfleet_scheduler_schedule_seconds_sum 0.302
tokenfleet_scheduler_schedule_seconds_count 1010.0
"""


def test_metrics_parsing_deltas_and_schedule_p99() -> None:
    before, after = sb.parse_metrics(METRICS_BEFORE), sb.parse_metrics(METRICS_AFTER)
    assert sb.metric_delta(before, after, "vllm:num_preemptions_total") == 5.0
    assert sb.schedule_p99_upper_s(before, after) == 0.001  # 999 of 1000 within 1 ms
    assert sb.schedule_p99_upper_s({}, {}) is None
    assert sb.histogram_mean(before, after, sb.SCHEDULE_METRIC) == pytest.approx(0.0003)
    assert sb.histogram_mean({}, {}, sb.SCHEDULE_METRIC) is None


def fake_run(policy: str, profile: str, seed: int, ttft: float, tokens: float) -> dict[str, Any]:
    cls = {
        "requests": 10,
        "served": 9,
        "rejected": 1,
        "unfinished": 0,
        "slo_attainment": 0.9,
        "ttft_p50": ttft / 2,
        "ttft_p99": ttft,
        "tpot_p50": 0.01,
        "tpot_p99": 0.02,
        "max_wait": ttft * seed,
    }
    return {
        "policy": policy,
        "profile": profile,
        "seed": seed,
        "classes": {c.name: dict(cls) for c in sb.DEFAULT_CLASSES},
        "jain": 0.97,
        "output_tok_per_s": tokens,
        "req_per_s": 1.0,
        "preemptions": 0.0,
        "schedule_p99_le_s": 0.001 if policy == "sla" else None,
        "requests": 30,
    }


def test_aggregate_and_markdown() -> None:
    runs = [
        fake_run(p, pr, s, 1.0 + s, 100.0 + s)
        for p in ("fcfs", "sla")
        for pr in ("1.2x", "burst")
        for s in (1, 2, 3)
    ]
    agg = sb.aggregate(runs, "sla", "1.2x")
    assert agg["seeds"] == 3
    mean, half = agg["output_tok_per_s"]
    assert mean == pytest.approx(102.0)
    assert half == pytest.approx(4.303 * 1.0 / 3**0.5)  # t(0.975, df=2)
    assert agg["batch.max_wait"] == pytest.approx(12.0)  # max over seeds
    assert agg["interactive.rejected"] == 3
    text = sb.render_markdown({"runs": runs})
    assert "### 1.2x λ_sat" in text
    assert "### burst" in text
    assert "| figure | fcfs | sla |" in text
    assert "| schedule() p99 (bucket bound, max over seeds) | n/a | 1.00 ms |" in text
    assert sb._mean_ci([]) is None
    assert sb._mean_ci([2.0]) == (2.0, 0.0)


def test_targets_are_checked_against_the_baseline() -> None:
    def run(policy: str, profile: str, seed: int, p99: float, att: float, tokens: float) -> dict[str, Any]:
        r = fake_run(policy, profile, seed, p99, tokens)
        r["classes"]["interactive"]["slo_attainment"] = att
        r["wait_bounds"] = {"batch": 50.0}
        return r

    runs = [run("fcfs", "1.2x", s, 5.0, 0.5, 100.0) for s in (1, 2)]
    runs += [run("sla", "1.2x", s, 1.0, 1.0, 100.0) for s in (1, 2)]
    runs += [run("fcfs", "0.8x", s, 1.0, 1.0, 100.0) for s in (1, 2)]
    runs += [run("sla", "0.8x", s, 1.0, 1.0, 96.0) for s in (1, 2)]
    checks = {c.target.split(":")[0]: c for c in sb.check_targets({"runs": runs})}
    assert checks["1.2× λ_sat"].met  # attainment 100 % (the first 1.2x check)
    p99 = next(c for c in sb.check_targets({"runs": runs}) if "P99" in c.target)
    assert p99.met
    assert "80 % lower" in p99.measured
    assert not checks["0.8× λ_sat"].met
    assert "96.0 %" in checks["0.8× λ_sat"].measured
    assert checks["1.2x"].met  # Jain 0.97
    bound = next(c for c in sb.check_targets({"runs": runs}) if "bound" in c.target)
    assert bound.met
    assert bound.measured == "2.0 s ≤ 50.0 s"
    schedule = next(c for c in sb.check_targets({"runs": runs}) if "schedule" in c.target)
    assert schedule.met
    text = sb.render_targets(sb.check_targets({"runs": runs}))
    assert text.startswith("| target | measured | met? |")
    assert "| no |" in text
    no_jain = [dict(r, jain=None) for r in runs]
    jain = next(c for c in sb.check_targets({"runs": no_jain}) if "Jain" in c.target)
    assert jain.met is None
    assert "| n/a |" in sb.render_targets([jain])


def test_service_spec_is_a_valid_llmservice_per_policy() -> None:
    for policy in ("fcfs", "priority", "sla"):
        spec = sb.service_spec(policy, sb.BenchConfig(model_source="builtin://tiny-random"))
        service = parse_service(
            {
                "apiVersion": "tokenfleet.dev/v1alpha1",
                "kind": "LLMService",
                "metadata": {"name": "b"},
                "spec": spec,
            }
        )
        assert service.spec.scheduler.policy == policy
        assert service.spec.engine.max_num_seqs == 8
        assert service.spec.scheduler.class_named("batch").queue_limit == 32


# -- the driver against a fake streaming server (httpx MockTransport, no sockets) ---------------


def _stream(chunks: list[dict[str, Any]]) -> Iterator[bytes]:
    for chunk in chunks:
        yield f"data: {json.dumps(chunk)}\n\n".encode()
    yield b"data: [DONE]\n\n"


def fake_engine(request: httpx.Request) -> httpx.Response:
    body = json.loads(request.content)
    xargs = body["vllm_xargs"]
    assert body["stream"] is True
    assert all(isinstance(t, int) for t in body["prompt"])  # token ids: exact prompt lengths
    if xargs["slo_class"] == "batch" and xargs["tenant"] == "t4":
        chunks = [
            {"choices": [{"text": "", "finish_reason": "abort", "stop_reason": "tokenfleet:rejected: full"}]}
        ]
        return httpx.Response(200, content=b"".join(_stream(chunks)))
    if xargs["tenant"] == "t3":
        return httpx.Response(503, json={"error": "busy"})
    n = body["max_tokens"]
    chunks = [{"choices": [{"text": "x", "finish_reason": None}]} for _ in range(n)]
    chunks.append({"choices": [], "usage": {"completion_tokens": n}})
    return httpx.Response(200, content=b"".join(_stream(chunks)))


def test_driver_records_tokens_rejections_and_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    real_client = httpx.AsyncClient

    def client(**kwargs: Any) -> httpx.AsyncClient:
        kwargs.pop("limits", None)
        return real_client(transport=httpx.MockTransport(fake_engine), **kwargs)

    monkeypatch.setattr(sb.httpx, "AsyncClient", client)
    arrivals = [
        Arrival(0.0, "interactive", "t2", 10, 4),
        Arrival(0.01, "batch", "t4", 10, 4),
        Arrival(0.02, "standard", "t3", 10, 4),
    ]
    outcomes, cutoff = asyncio.run(sb.drive("http://fake", "m", arrivals, drain_s=0.5))
    ok, rejected, busy = outcomes
    assert ok.served
    assert ok.tokens == 4
    assert len(ok.chunks) == 4
    assert ok.ttft is not None
    assert ok.tpot is not None
    assert rejected.rejected
    assert not rejected.served
    assert busy.rejected
    assert busy.error == "HTTP 503"
    assert cutoff >= 0.0
    rate = asyncio.run(sb.saturate("http://fake", "m", concurrency=1, seconds=0.2, seed=1))
    assert rate > 0


def test_histogram_bound_filters_labels() -> None:
    before = sb.parse_metrics('tokenfleet_scheduler_wait_seconds_bucket{le="1.0",slo_class="batch"} 1.0\n')
    after = sb.parse_metrics(
        'tokenfleet_scheduler_wait_seconds_bucket{le="1.0",slo_class="batch"} 3.0\n'
        'tokenfleet_scheduler_wait_seconds_bucket{le="5.0",slo_class="batch"} 4.0\n'
        'tokenfleet_scheduler_wait_seconds_bucket{le="+Inf",slo_class="batch"} 4.0\n'
        'tokenfleet_scheduler_wait_seconds_bucket{le="+Inf",slo_class="interactive"} 9.0\n'
    )
    assert sb.histogram_quantile_upper(before, after, sb.WAIT_METRIC, 1.0, 'slo_class="batch"') == 5.0
    assert sb.histogram_quantile_upper(before, after, sb.WAIT_METRIC, 0.5, 'slo_class="batch"') == 1.0
    assert sb.histogram_quantile_upper(before, after, sb.WAIT_METRIC, 1.0, 'slo_class="standard"') is None


def test_baselines_run_vllms_scheduler_timed() -> None:
    from tokenfleet.engine.launch import TIMED_SCHEDULER_CLS, EngineCommand

    command = EngineCommand(argv=["vllm", "--scheduling-policy", "priority"], env={})
    timed = sb.timed_baseline("priority", command)
    assert timed.argv[-2:] == ["--scheduler-cls", TIMED_SCHEDULER_CLS]
    assert timed.argv[:3] == command.argv
    assert sb.timed_baseline("sla", command) is command


def test_stated_wait_bounds_follow_the_adr() -> None:
    served = outcome("batch", "t2", 0.0, 1.0, 4.0, 4)
    unfinished = outcome("batch", "t2", 0.0, 1.0, None, 0)
    assert sb.longest_service_s([served, unfinished]) == pytest.approx(3.0)
    assert sb.longest_service_s([unfinished]) is None
    bounds = sb.stated_wait_bounds(sb.DEFAULT_CLASSES, slots=8, t_max_s=3.0)
    assert bounds is not None
    q = sum(c.queue_limit or 0 for c in sb.DEFAULT_CLASSES) - 1
    batch = next(c for c in sb.DEFAULT_CLASSES if c.name == "batch")
    assert bounds["batch"] == pytest.approx(batch.max_wait_s + -(-(q + 1) // 8) * 3.0)
    unlimited = [sb.ClassLoad("x", 0, 1.0, (1, 1), (1, 1), None, None, 5.0, None)]
    assert sb.stated_wait_bounds(unlimited, slots=8, t_max_s=3.0) is None


def test_driver_lag_is_the_latest_send() -> None:
    on_time = outcome("batch", "t2", 1.0, 2.0, 3.0, 2)
    late = outcome("batch", "t2", 5.0, 6.0, 7.0, 2)
    late.arrival = Arrival(2.0, "batch", "t2", 10, 2)
    assert sb.driver_lag_s([on_time, late]) == pytest.approx(3.0)
    assert sb.driver_lag_s([]) == 0.0


def test_raw_logs_round_trip_and_fairness_is_rescored(tmp_path: Any) -> None:
    import dataclasses

    outcomes = [outcome("batch", t, 0.0, 12.0, 14.0, 3) for t in ("t2", "t3")]
    (tmp_path / "raw").mkdir()
    raw = tmp_path / "raw" / "sla-1.2x-1.jsonl"
    raw.write_text("".join(json.dumps(dataclasses.asdict(o)) + "\n" for o in outcomes))
    assert sb.load_outcomes(raw) == outcomes
    results = {
        "config": {"duration_s": 10.0},
        "runs": [
            {"policy": "sla", "profile": "1.2x", "seed": 1, "jain": None},
            {"policy": "x", "profile": "y", "seed": 2},
        ],
    }
    sb.rescore_fairness(results, tmp_path)
    assert results["runs"][0]["jain"] == pytest.approx(1.0)  # both backlogged through [0, 10), nothing served
    assert results["runs"][0]["jain_short"] == pytest.approx(1.0)
    assert "jain" not in results["runs"][1]  # no raw log: left alone
