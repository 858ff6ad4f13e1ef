"""The scheduler benchmark's pure parts: its workloads, metrics over the harness's records, the
engine's histograms, targets and report. No engine, no Locust."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tokenfleet.load import scheduler_bench as sb
from tokenfleet.load import scheduler_report as sr
from tokenfleet.load.client import UNFINISHED
from tokenfleet.load.pacer import Pacer
from tokenfleet.load.record import RequestRecord
from tokenfleet.load.traffic import RequestFactory, offered_level, rate_factor
from tokenfleet.load.workload import ConstantShape, StepShape, Workload, shape_of
from tokenfleet.spec import parse_service

T0 = 1_000_000.0  # the run's start (Unix seconds); records are placed relative to it
RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results" / "scheduler"


def test_profiles_become_shapes() -> None:
    constant = sb.profile_shape("0.8x", lam=5.0, duration_s=30.0)
    assert isinstance(constant, ConstantShape)
    assert constant.value == pytest.approx(4.0)
    burst = sb.profile_shape("burst", lam=10.0, duration_s=30.0)
    assert isinstance(burst, StepShape)
    level = sb.bench_workload(burst, seed=1).model_copy()
    assert [shape_of(level).level(t) for t in (0, 9.9, 10.1, 19.9, 20.1, 29.9)] == pytest.approx(
        [7.0, 7.0, 15.0, 15.0, 5.0, 5.0]
    )
    with pytest.raises(ValueError, match="unknown profile"):
        sb.profile_shape("fast", 1.0, 1.0)


def open_loop(workload: Workload, duration_s: float) -> list[tuple[float, Any]]:
    """The requests the harness's open loop sends: pacer slots at the offered rate, each request
    drawn at its slot (as the locustfile does)."""
    pacer = Pacer(offered_level(workload), seed=workload.seed)
    factory = RequestFactory(workload)
    return [(t, factory.next(t)) for t in pacer.arrivals(100_000) if t < duration_s]


def test_bench_workload_sends_the_class_and_tenant_mix() -> None:
    workload = sb.bench_workload(ConstantShape(kind="constant", value=10.0), seed=7)
    # What run_workload hands Locust survives the trip through JSON.
    assert Workload.model_validate(workload.model_dump(mode="json", by_alias=True)) == workload
    sent = open_loop(workload, 400.0)
    assert 0.93 * 4000 < len(sent) < 1.07 * 4000  # the noisy tenant's bursts keep the mean rate
    by_class = {c.name: [r for _, r in sent if r.cls == c.name] for c in sb.DEFAULT_CLASSES}
    for cls in sb.DEFAULT_CLASSES:
        mine = by_class[cls.name]
        assert len(mine) / len(sent) == pytest.approx(cls.share, abs=0.03), cls.name
        # Token-id prompts: exact lengths in the class's range; outputs in the class's range.
        assert {len(r.prompt) for r in mine} <= set(range(cls.prompt[0], cls.prompt[1] + 1))
        assert {r.max_tokens for r in mine} <= set(range(cls.output[0], cls.output[1] + 1))
        assert {r.priority for r in mine} == {cls.priority}
    background = [(t, r) for t, r in sent if r.cls != "interactive"]
    tenants = Counter(r.tenant for _, r in background)
    for tenant, share in sb.TENANT_SHARES.items():
        assert tenants[tenant] / len(background) == pytest.approx(share, abs=0.04), tenant
    noisy = [t for t, r in background if r.tenant == sb.NOISY]
    assert all(t % sb.NOISY_PERIOD_S < sb.NOISY_PERIOD_S / 2 for t in noisy)  # in bursts only
    assert {r.tenant for r in by_class["interactive"]} == set(sb.TENANTS) - {sb.NOISY}
    # While the noisy tenant is on, it adds its load: 0.3 + 0.7 × (0.6 + 2 × 0.4) of the mean.
    assert rate_factor(workload, 1.0) == pytest.approx(1.28)
    assert rate_factor(workload, 11.0) == pytest.approx(0.72)
    # Same seed, same requests at the same times.
    assert open_loop(workload, 20.0) == sent[: len(open_loop(workload, 20.0))]


def test_calibration_is_a_closed_loop_of_users() -> None:
    workload = sb.bench_workload(ConstantShape(kind="constant", value=16), seed=0, closed=True)
    assert workload.arrival.mode == "closed"
    assert offered_level(workload)(3.0) == 16  # users, whatever the tenants' bursts


def test_jain() -> None:
    assert sb.jain([]) is None
    assert sb.jain([0.0, 0.0]) == 1.0
    assert sb.jain([5.0, 5.0, 5.0]) == pytest.approx(1.0)
    assert sb.jain([1.0, 0.0, 0.0, 0.0]) == pytest.approx(0.25)


@given(st.lists(st.floats(0, 1e6), min_size=1, max_size=20))
def test_jain_is_between_one_over_n_and_one(values: list[float]) -> None:
    j = sb.jain(values)
    assert j is not None
    assert 1 / len(values) - 1e-9 <= j <= 1 + 1e-9


def record(
    cls: str,
    tenant: str,
    sent: float,
    first: float | None,
    done: float,
    tokens: int,
    *,
    rejected: bool = False,
    error: str | None = None,
    prompt: int = 10,
    scheduled: float | None = None,
) -> RequestRecord:
    """A request sent at `sent` (seconds since T0), first token at `first`, ended at `done`, its
    `tokens` streamed one per chunk, evenly between the two."""
    chunks = (
        []
        if first is None
        else [first - sent + (done - first) * k / max(1, tokens - 1) for k in range(tokens)]
    )
    ok = error is None and not rejected
    return RequestRecord(
        id=f"{tenant}-{sent}",
        cls=cls,
        tenant=tenant,
        api="completions",
        stream=True,
        send=T0 + sent,
        scheduled=None if scheduled is None else T0 + scheduled,
        ttft_s=None if first is None else first - sent,
        first_chunk_s=None if first is None else first - sent,
        chunk_s=chunks,
        e2e_s=done - sent,
        prompt_tokens=prompt,
        output_tokens=tokens if ok else None,
        ok=ok,
        rejected=rejected,
        error="rejected" if rejected else error,
    )


def test_class_report_counts_rejections_and_unfinished_as_misses() -> None:
    interactive = sb.class_mix(sb.DEFAULT_CLASSES[0])  # TTFT 1 s, TPOT 0.25 s
    records = [
        record("interactive", "t2", 0.0, 0.5, 1.5, 5),  # met
        record("interactive", "t2", 1.0, 2.5, 3.0, 3),  # TTFT 1.5 s: missed
        record("interactive", "t3", 2.0, 2.2, 6.2, 5),  # TPOT 1 s: missed
        record("interactive", "t3", 3.0, None, 10.0, 0, error=UNFINISHED),  # cut off at 10 s
        record("interactive", "t4", 4.0, None, 4.1, 0, rejected=True),
        record("batch", "t3", 0.0, 0.1, 1.0, 4),  # other class: ignored
    ]
    report = sb.class_report(records, interactive)
    assert report["requests"] == 5
    assert report["served"] == 3
    assert report["rejected"] == 1
    assert report["unfinished"] == 1
    assert report["slo_attainment"] == pytest.approx(1 / 5)
    assert report["ttft_p50"] == pytest.approx(0.5)
    assert report["ttft_p99"] == pytest.approx(1.5 - 0.02 * (1.5 - 0.5))  # linear, as numpy
    assert report["max_wait"] == pytest.approx(7.0)  # the unfinished one, until it was cut off
    empty = sb.class_report([], interactive)
    assert empty["slo_attainment"] is None
    assert empty["max_wait"] is None


def test_fairness_counts_only_tenants_backlogged_throughout_a_window() -> None:
    def fair(records: list[RequestRecord]) -> float | None:
        return sb.fairness(records, T0, end_s=10.0, window_s=5.0)

    # t2 and t3 both wait through [0, 5) and nobody is served in it: equal.
    assert fair([record("batch", t, 0.0, 5.0, 9.0, 9) for t in ("t2", "t3")]) == pytest.approx(1.0)
    served_early = [
        record("batch", "t2", 0.0, 1.0, 4.0, 4),
        record("batch", "t2", 0.0, 6.0, 7.0, 2),  # keeps t2 backlogged through [0, 5)
        record("batch", "t3", 0.0, 6.0, 7.0, 2),  # t3 backlogged through [0, 5), nothing served
    ]
    assert fair(served_early) == pytest.approx(0.5)
    # A tenant with a gap in its waiting is not backlogged throughout the window.
    gap = [
        record("batch", "t2", 0.0, 2.0, 3.0, 2),
        record("batch", "t2", 3.0, 6.0, 7.0, 2),
        record("batch", "t3", 0.0, 6.0, 7.0, 2),
    ]
    assert fair(gap) is None
    assert fair([*gap, record("batch", "t4", 0.0, None, 0.1, 0, rejected=True)]) is None  # never waits
    # Per class: t2 backlogged in batch and t3 in standard are not two tenants of one class.
    assert fair([record("batch", "t2", 0.0, 6.0, 7.0, 2), record("standard", "t3", 0.0, 6.0, 7.0, 2)]) is None
    # Service in another class does not count against a tenant's share in this one.
    assert fair([*served_early, record("interactive", "t3", 0.0, 0.5, 4.5, 5)]) == pytest.approx(0.5)


def test_service_spreads_a_chunks_tokens() -> None:
    # Four tokens in two chunks (at 1 s and 3 s): two tokens each.
    r = record("batch", "t2", 0.0, 1.0, 3.0, 2)
    r.output_tokens = 4
    assert sb.output_tokens_between(r, T0, 0.0, 2.0) == 2.0
    assert sb.output_tokens_between(r, T0, 0.0, 5.0) == 4.0
    assert sb.output_tokens_between(record("batch", "t2", 0.0, None, 1.0, 0, error="x"), T0, 0, 5) == 0.0


def test_waiting_intervals_merge_and_cover() -> None:
    records = [
        record("batch", "t2", 0.0, 2.0, 3.0, 2),
        record("batch", "t2", 1.0, 4.0, 5.0, 2),
        record("batch", "t2", 6.0, None, 10.0, 0, error=UNFINISHED),
    ]
    spans = sb.waiting_intervals(records, T0)
    assert spans == {"t2": [(0.0, 4.0), (6.0, 10.0)]}
    assert sb.covers(spans["t2"], 0.0, 4.0)
    assert not sb.covers(spans["t2"], 3.0, 7.0)


def test_throughput_runs_until_the_last_token() -> None:
    equal = [record("batch", t, 0.0, 1.0, 9.0, 9) for t in ("t2", "t3")]
    assert sb.throughput(equal, T0, duration_s=10.0) == {
        "output_tok_per_s": pytest.approx(1.8),
        "req_per_s": pytest.approx(0.2),
    }
    # Past the duration the window grows; a cut-off answer counts the tokens it streamed.
    late = [*equal, record("batch", "t4", 5.0, 6.0, 20.0, 8, error=UNFINISHED)]
    assert sb.throughput(late, T0, duration_s=10.0) == {
        "output_tok_per_s": pytest.approx(26 / 20),
        "req_per_s": pytest.approx(2 / 20),
    }


METRICS_BEFORE = """# TYPE vllm:num_preemptions counter
vllm:num_preemptions_total{engine="0"} 2.0
vllm:num_preemptions_created{engine="0"} 17.0
# TYPE tokenfleet_scheduler_schedule_seconds histogram
tokenfleet_scheduler_schedule_seconds_bucket{le="0.0005"} 10.0
tokenfleet_scheduler_schedule_seconds_bucket{le="0.001"} 10.0
tokenfleet_scheduler_schedule_seconds_bucket{le="+Inf"} 10.0
tokenfleet_scheduler_schedule_seconds_sum 0.002
tokenfleet_scheduler_schedule_seconds_count 10.0
# TYPE tokenfleet_scheduler_wait_seconds histogram
tokenfleet_scheduler_wait_seconds_bucket{le="1.0",slo_class="batch"} 1.0
tokenfleet_scheduler_wait_seconds_bucket{le="5.0",slo_class="batch"} 1.0
tokenfleet_scheduler_wait_seconds_bucket{le="+Inf",slo_class="batch"} 1.0
tokenfleet_scheduler_wait_seconds_sum{slo_class="batch"} 0.5
tokenfleet_scheduler_wait_seconds_count{slo_class="batch"} 1.0
"""
METRICS_AFTER = """# TYPE vllm:num_preemptions counter
vllm:num_preemptions_total{engine="0"} 7.0
# TYPE tokenfleet_scheduler_schedule_seconds histogram
tokenfleet_scheduler_schedule_seconds_bucket{le="0.0005"} 900.0
tokenfleet_scheduler_schedule_seconds_bucket{le="0.001"} 1009.0
tokenfleet_scheduler_schedule_seconds_bucket{le="+Inf"} 1010.0
tokenfleet_scheduler_schedule_seconds_sum 0.302
tokenfleet_scheduler_schedule_seconds_count 1010.0
# TYPE tokenfleet_scheduler_wait_seconds histogram
tokenfleet_scheduler_wait_seconds_bucket{le="1.0",slo_class="batch"} 3.0
tokenfleet_scheduler_wait_seconds_bucket{le="5.0",slo_class="batch"} 4.0
tokenfleet_scheduler_wait_seconds_bucket{le="+Inf",slo_class="batch"} 4.0
tokenfleet_scheduler_wait_seconds_sum{slo_class="batch"} 6.5
tokenfleet_scheduler_wait_seconds_count{slo_class="batch"} 4.0
tokenfleet_scheduler_wait_seconds_bucket{le="1.0",slo_class="interactive"} 9.0
tokenfleet_scheduler_wait_seconds_bucket{le="+Inf",slo_class="interactive"} 9.0
tokenfleet_scheduler_wait_seconds_sum{slo_class="interactive"} 1.0
tokenfleet_scheduler_wait_seconds_count{slo_class="interactive"} 9.0
"""


def test_engine_metrics_deltas_and_bucket_bounds() -> None:
    before, after = METRICS_BEFORE, METRICS_AFTER
    assert sb.counter_delta(before, after, "vllm:num_preemptions_total") == 5.0
    assert sb.histogram_upper(before, after, sb.SCHEDULE_METRIC) == 0.001  # 999 of 1000 within 1 ms
    assert sb.histogram_upper("", "", sb.SCHEDULE_METRIC) is None
    assert sb.histogram_mean(before, after, sb.SCHEDULE_METRIC) == pytest.approx(0.0003)
    assert sb.histogram_mean("", "", sb.SCHEDULE_METRIC) is None
    # Labels filter: batch's 3 new waits are within 1 s (2) and 5 s (1); interactive's are apart.
    assert sb.histogram_upper(before, after, sb.WAIT_METRIC, 1.0, slo_class="batch") == 5.0
    assert sb.histogram_upper(before, after, sb.WAIT_METRIC, 0.5, slo_class="batch") == 1.0
    assert sb.histogram_upper(before, after, sb.WAIT_METRIC, 1.0, slo_class="standard") is None


def test_stated_wait_bounds_follow_the_adr() -> None:
    served = record("batch", "t2", 0.0, 1.0, 4.0, 4)
    unfinished = record("batch", "t2", 0.0, 1.0, 9.0, 2, error=UNFINISHED)
    assert sb.longest_service_s([served, unfinished]) == pytest.approx(3.0)
    assert sb.longest_service_s([unfinished]) is None
    bounds = sb.stated_wait_bounds(sb.DEFAULT_CLASSES, slots=8, t_max_s=3.0)
    assert bounds is not None
    q = sum(c.queue_limit or 0 for c in sb.DEFAULT_CLASSES) - 1
    batch = next(c for c in sb.DEFAULT_CLASSES if c.name == "batch")
    assert bounds["batch"] == pytest.approx(batch.max_wait_s + -(-(q + 1) // 8) * 3.0)
    unlimited = [sb.ClassLoad("x", 0, 1.0, (1, 1), (1, 1), None, None, 5.0, None)]
    assert sb.stated_wait_bounds(unlimited, slots=8, t_max_s=3.0) is None


def test_driver_lag_is_the_latest_send_against_its_slot() -> None:
    on_time = record("batch", "t2", 1.0, 2.0, 3.0, 2, scheduled=1.0)
    late = record("batch", "t2", 5.0, 6.0, 7.0, 2, scheduled=2.0)
    assert sb.driver_lag_s([on_time, late]) == pytest.approx(3.0)
    assert sb.driver_lag_s([record("batch", "t2", 1.0, 2.0, 3.0, 2)]) == 0.0  # closed loop: no slots


def write_run(run_dir: Path, records: list[RequestRecord]) -> None:
    """A run directory as run_one leaves it (the harness's files plus the engine's metrics)."""
    run_dir.mkdir(parents=True)
    (run_dir / "requests.jsonl").write_text("".join(r.to_json() + "\n" for r in records))
    (run_dir / "summary.json").write_text(json.dumps({"run": {"window_start": T0}}))
    (run_dir / sb.METRICS_BEFORE).write_text(METRICS_BEFORE)
    (run_dir / sb.METRICS_AFTER).write_text(METRICS_AFTER)


def test_a_run_is_summarized_and_rescored_from_its_directory(tmp_path: Path) -> None:
    records = [record("batch", t, 0.0, 12.0, 14.0, 3) for t in ("t2", "t3")]
    records.append(record("interactive", "t4", 1.0, None, 1.1, 0, rejected=True))
    write_run(tmp_path / "runs" / "sla-1.2x-1", records)
    data = sb.read_run(tmp_path / "runs" / "sla-1.2x-1")
    assert data is not None
    assert (data.start, len(data.records)) == (T0, 3)
    run = sb.summarize_run(data, duration_s=10.0, slots=8)
    assert run["requests"] == 3
    assert run["classes"]["interactive"]["rejected"] == 1
    assert run["classes"]["batch"]["served"] == 2
    assert run["jain"] == pytest.approx(1.0)  # both backlogged through [0, 10), nothing served
    assert run["preemptions"] == 5.0
    assert run["schedule_p99_le_s"] == 0.001
    assert run["server_max_wait_le_s"] == {"interactive": 1.0, "standard": None, "batch": 5.0}
    assert run["t_max_s"] == pytest.approx(2.0)
    assert run["wait_bounds"] == sb.stated_wait_bounds(sb.DEFAULT_CLASSES, 8, 2.0)
    assert sb.read_run(tmp_path / "missing") is None
    results: dict[str, Any] = {
        "config": {"duration_s": 10.0, "max_num_seqs": 8},
        "runs": [
            {"policy": "sla", "profile": "1.2x", "seed": 1, "run_dir": "runs/sla-1.2x-1", "jain": None},
            {"policy": "x", "profile": "y", "seed": 2, "jain": 0.5},  # an earlier version's run
        ],
    }
    assert sb.rescore(results, tmp_path) == 1
    assert results["runs"][0]["jain"] == pytest.approx(1.0)
    assert results["runs"][0]["classes"] == run["classes"]
    assert results["runs"][1] == {"policy": "x", "profile": "y", "seed": 2, "jain": 0.5}


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
    agg = sr.aggregate(runs, "sla", "1.2x")
    assert agg["seeds"] == 3
    assert agg["output_tok_per_s"].mean == pytest.approx(102.0)
    assert agg["output_tok_per_s"].half_width == pytest.approx(4.303 * 1.0 / 3**0.5)  # t(0.975, df=2)
    assert agg["batch.max_wait"] == pytest.approx(12.0)  # max over seeds
    assert agg["interactive.rejected"] == 3
    assert agg["batch.wait_bound"] is None  # no run stated one
    text = sr.render_markdown({"runs": runs})
    assert "### 1.2x λ_sat" in text
    assert "### burst" in text
    assert "| figure | fcfs | sla |" in text
    assert "| throughput (output tok/s) | 102.0 ± 2.5 | 102.0 ± 2.5 |" in text
    assert "| schedule() p99 (bucket bound, max over seeds) | n/a | 1.00 ms |" in text
    one_seed = sr.render_markdown({"runs": [fake_run("sla", "0.8x", 1, 1.0, 100.0)]})
    assert "| throughput (output tok/s) | 100.0 |" in one_seed  # no interval from one seed


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
    checks = sr.check_targets({"runs": runs})
    by_start = {c.target.split(":")[0]: c for c in checks}
    assert by_start["1.2× λ_sat"].met  # attainment 100 % (the first 1.2x check)
    p99 = next(c for c in checks if "P99" in c.target)
    assert p99.met
    assert "80 % lower" in p99.measured
    assert not by_start["0.8× λ_sat"].met
    assert "96.0 %" in by_start["0.8× λ_sat"].measured
    assert by_start["1.2x"].met  # Jain 0.97
    bound = next(c for c in checks if "bound" in c.target)
    assert bound.met
    assert bound.measured == "2.0 s ≤ 50.0 s"
    schedule = next(c for c in checks if "schedule" in c.target)
    assert schedule.met
    text = sr.render_targets(checks)
    assert text.startswith("| target | measured | met? |")
    assert "| no |" in text
    no_jain = [dict(r, jain=None) for r in runs]
    jain = next(c for c in sr.check_targets({"runs": no_jain}) if "Jain" in c.target)
    assert jain.met is None
    assert "| n/a |" in sr.render_targets([jain])


def test_earlier_results_still_render() -> None:
    # The recorded run of the earlier, self-driven bench: same JSON layout, no run directories.
    results = json.loads((RESULTS / "final" / "scheduler.json").read_text())
    assert sb.rescore(results, RESULTS / "final") == 0
    text = sr.render_markdown(results)
    assert "| interactive SLO attainment | 84.2% ± 8.4% | 100.0% | 100.0% |" in text
    checks = {c.target: c for c in sr.check_targets(results)}
    assert checks["1.2× λ_sat: interactive TTFT-SLO attainment ≥ 99 %"].met
    assert checks["0.8× λ_sat: throughput ≥ 97 % of fcfs"].measured == "317.0 vs 318.5 tok/s (99.5 %)"


def test_run_line_names_the_headline_figures() -> None:
    line = sr.run_line(fake_run("sla", "1.2x", 2, 0.5, 123.4))
    assert line.startswith(
        "[sla] 1.2x seed 2: 30 req, interactive SLO 90.0% p99 TTFT 500 ms max wait 1.0 s, "
    )
    assert "batch SLO 90.0% p99 TTFT 500 ms max wait 1.0 s" in line
    assert line.endswith("J 0.970, 123.4 tok/s")


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
        assert service.spec.engine.max_num_seqs == 2
        batch = service.spec.scheduler.class_named("batch")
        assert batch is not None
        assert batch.queue_limit == sb.BATCH.queue_limit  # the bench's limit reaches the spec
        # The workload judges each class by the targets the scheduler is given.
        for cls in service.spec.scheduler.classes:
            mix = sb.class_mix(next(c for c in sb.DEFAULT_CLASSES if c.name == cls.name))
            assert (mix.priority, mix.ttft_ms, mix.tpot_ms) == (cls.priority, cls.ttft_ms, cls.tpot_ms)


def test_every_policy_streams_in_chunks_and_the_baselines_run_vllms_scheduler_timed() -> None:
    from tokenfleet.engine.launch import TIMED_SCHEDULER_CLS, EngineCommand

    command = EngineCommand(argv=["vllm", "--scheduling-policy", "priority"], env={})
    timed = sb.bench_command("priority", command)
    assert timed.argv[:3] == command.argv
    assert timed.argv[3:] == [
        "--stream-interval",
        str(sb.STREAM_INTERVAL),
        "--scheduler-cls",
        TIMED_SCHEDULER_CLS,
    ]
    assert sb.bench_command("sla", command).argv[3:] == ["--stream-interval", str(sb.STREAM_INTERVAL)]


def test_the_engine_and_the_front_end_get_separate_cores() -> None:
    # vLLM binds its worker to core 0 and reserves core 1: the engine's other processes join the
    # worker, the API server and the load generator take what is left.
    assert sb.cpu_partition({0}, {0, 1}) == ({0}, {1})
    assert sb.cpu_partition({0, 1, 2}, set(range(8))) == ({0, 1, 2}, {3, 4, 5, 6, 7})
    # Nothing reserved (or nothing known): leave the cores alone rather than starve one side.
    assert sb.cpu_partition({0, 1}, {0, 1}) is None
    assert sb.cpu_partition(set(), {0, 1}) is None


def test_lambda_sat_counts_as_the_engines_capacity_only_when_its_slots_were_full() -> None:
    assert sb.calibration_verdict(1.8, slots=2)
    assert not sb.calibration_verdict(1.5, slots=2)  # the front end could not keep two busy
    assert not sb.calibration_verdict(1.2, slots=8)


def test_the_starvation_scenario_overloads_the_top_class_beside_a_batch_trickle() -> None:
    workload = sb.profile_workload("starvation", lam=6.0, duration_s=40.0, seed=3)
    assert isinstance(workload.arrival.shape, ConstantShape)
    assert workload.arrival.shape.value == pytest.approx(6.6)
    sent = [r for _, r in open_loop(workload, 400.0)]
    classes = Counter(r.cls for r in sent)
    assert set(classes) == {"interactive", "batch"}
    assert classes["batch"] / len(sent) == pytest.approx(0.05, abs=0.015)
    # The top class's answers are as long as the standard mix's mean, so its load is ~1.1×.
    mix_mean = sum(c.share * sum(c.output) / 2 for c in sb.DEFAULT_CLASSES)
    top = [r.max_tokens for r in sent if r.cls == "interactive"]
    assert sum(top) / len(top) == pytest.approx(mix_mean, rel=0.05)


def test_the_noisy_scenario_sends_five_times_a_fair_share_beside_a_modest_victim() -> None:
    workload = sb.profile_workload("noisy", lam=6.0, duration_s=40.0, seed=3)
    sent = [r for _, r in open_loop(workload, 200.0)]
    assert {r.cls for r in sent} == {"standard"}
    tenants = Counter(r.tenant for r in sent)
    # Equal weights: each tenant's fair share is half of λ_sat; the noisy one sends 5× that.
    assert tenants[sb.NOISY] / 200.0 == pytest.approx(5 * 6.0 / 2, rel=0.05)
    assert tenants[sb.VICTIM] / 200.0 == pytest.approx(0.2 * 6.0, rel=0.1)
    spec = sb.service_spec("sla", sb.BenchConfig())
    assert {t["name"] for t in spec["scheduler"]["tenants"]} >= {sb.NOISY, sb.VICTIM}


def test_a_victim_is_judged_by_its_own_requests() -> None:
    cls = sb.class_mix(sb.STANDARD)
    records = [
        record("standard", sb.VICTIM, 0.0, 0.5, 1.0, 8),
        record("standard", sb.VICTIM, 1.0, 10.0, 11.0, 8),  # missed the 4 s target
        record("standard", sb.NOISY, 0.0, 0.1, 1.0, 8),
        record("interactive", sb.NOISY, 0.0, 0.1, 0.2, 8),  # another class: not counted
    ]
    report = sb.tenant_report(records, cls)
    assert report[sb.VICTIM]["requests"] == 2
    assert report[sb.VICTIM]["slo_attainment"] == pytest.approx(0.5)
    assert report[sb.NOISY]["requests"] == 1


def test_mixed_deadlines_share_one_server_class_and_send_their_own_deadline() -> None:
    from tokenfleet.load.client import build_http_request

    workload = sb.profile_workload("deadlines", lam=6.0, duration_s=40.0, seed=3)
    assert isinstance(workload.arrival.shape, ConstantShape)
    assert workload.arrival.shape.value == pytest.approx(sb.DEADLINES_LOAD * 6.0)
    sent = [r for _, r in open_loop(workload, 200.0)]
    assert {r.cls for r in sent} == {"chat", "agent"}
    for request in sent[:20]:
        _, body, headers = build_http_request(request, "m")
        # One class and one priority level for the engine; the deadline is each request's own.
        assert body["vllm_xargs"]["slo_class"] == "interactive"
        assert body["priority"] == 0
        assert body["vllm_xargs"]["ttft_ms"] == (500.0 if request.cls == "chat" else 2000.0)
        assert headers["x-tokenfleet-class"] == "interactive"
    # A plain class sends no deadline of its own: the engine's class target holds.
    plain = sb.profile_workload("0.8x", lam=6.0, duration_s=40.0, seed=3)
    _, body, _ = build_http_request(open_loop(plain, 5.0)[0][1], "m")
    assert "ttft_ms" not in body["vllm_xargs"]
    # Each run is summarised by the classes its traffic came in.
    assert [c.name for c in sb.profile_classes("deadlines")] == ["chat", "agent"]
    assert sb.profile_classes("1.2x") == sb.DEFAULT_CLASSES


def test_starvation_runs_twice_as_long_as_the_others() -> None:
    assert sb.profile_duration("starvation", 30.0) == 60.0
    assert sb.profile_duration("noisy", 30.0) == 30.0


def test_a_scenarios_workload_file_loads_back_as_the_same_workload(tmp_path: Path) -> None:
    from tokenfleet.load.workload import load_workload

    workload = sb.profile_workload("deadlines", lam=6.0, duration_s=40.0, seed=3)
    sb.save_workload(workload, tmp_path / "w" / "deadlines.yaml")
    assert load_workload(tmp_path / "w" / "deadlines.yaml") == workload


def test_slo_capacity_is_the_interpolated_crossing_of_the_threshold() -> None:
    # Meets 90 % at 0.8 (95 %) and misses at 1.0 (85 %): the crossing is half-way.
    assert sr.slo_capacity([(0.6, 1.0), (0.8, 0.95), (1.0, 0.85), (1.2, 0.5)]) == pytest.approx(0.9)
    # The first miss decides, even if a higher level happens to meet it again.
    assert sr.slo_capacity([(0.6, 0.95), (0.8, 0.8), (1.0, 0.95)]) == pytest.approx(0.6 + 0.05 / 0.15 * 0.2)
    assert sr.slo_capacity([(0.8, 0.5), (1.0, 0.4)]) is None  # already missed at the lowest level
    assert sr.slo_capacity([(1.0, 0.99), (0.8, 1.0)]) == 1.0  # never missed: the top (a lower bound)


def capacity_run(policy: str, profile: str, seed: int, attainments: dict[str, float]) -> dict[str, Any]:
    classes = {n: {"requests": 10, "slo_attainment": a} for n, a in attainments.items()}
    classes["idle"] = {"requests": 0, "slo_attainment": None}  # a class that sent nothing
    return {"policy": policy, "profile": profile, "seed": seed, "classes": classes}


def test_capacity_follows_the_worst_class_and_sla_is_compared_seed_by_seed() -> None:
    runs = []
    for seed in (1, 2):
        for policy, (low, high) in {"fcfs": (0.95, 0.5), "priority": (1.0, 0.85), "sla": (1.0, 0.95)}.items():
            runs.append(capacity_run(policy, "0.8x", seed, {"interactive": low, "batch": 1.0}))
            runs.append(capacity_run(policy, "1.2x", seed, {"interactive": high, "batch": 1.0}))
        runs.append(capacity_run("sla", "starvation", seed, {"interactive": 0.1}))  # not a load level
    assert sr.load_level("1.2x") == pytest.approx(1.2)
    assert sr.load_level("burst") is None
    assert sr.min_attainment(runs[0]) == 0.95
    summary = sr.capacity_summary({"lambda_sat": 5.0, "runs": runs})
    assert summary is not None
    fcfs = summary["policies"]["fcfs"]["capacity"]
    assert fcfs.mean == pytest.approx(0.8 + 0.05 / 0.45 * 0.4)
    assert summary["policies"]["sla"]["capacity"].mean == pytest.approx(1.2)
    assert summary["policies"]["sla"]["at_top"] == 2
    assert summary["sla_over_fcfs"].mean == pytest.approx(1.2 / fcfs.mean)
    assert summary["sla_over_priority"].mean == pytest.approx(1.2 / (0.8 + 0.1 / 0.15 * 0.4))
    text = sr.render_capacity(summary)
    assert "| sla ÷ fcfs (paired by seed) |" in text
    checks = {c.target: c.met for c in sr.check_targets({"lambda_sat": 5.0, "runs": []} | {"runs": runs})}
    assert checks["SLO capacity: sla ≥ 1.3× fcfs"] is True
    assert checks["SLO capacity: sla ≥ 1.1× priority"] is True
    assert sr.capacity_summary({"lambda_sat": 5.0, "runs": runs[:1]}) is None  # one level is no sweep


def test_engine_occupancy_averages_the_gauges_sampled_while_arrivals_came() -> None:
    samples = [
        (T0 - 1, 0.0, 0.0),
        (T0 + 1, 2.0, 4.0),
        (T0 + 6, 2.0, 8.0),
        (T0 + 11, 1.0, 0.0),
        (T0 + 40, 0.0, 0.0),
    ]
    running, waiting = sb.engine_occupancy(samples, T0, 30.0) or (None, None)
    assert running == pytest.approx(5 / 3)
    assert waiting == pytest.approx(4.0)
    assert sb.engine_occupancy(samples, T0 + 100, 30.0) is None  # no sample inside the window
