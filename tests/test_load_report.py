"""Report generation from a fixed raw log; statistics, comparisons, /metrics parsing, plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from tokenfleet.load.bench import write_results
from tokenfleet.load.compare import METRICS, aggregate, compare, interval_for, load_summary, render_comparison
from tokenfleet.load.plots import ecdf, per_second
from tokenfleet.load.record import RequestRecord, write_records
from tokenfleet.load.report import Window, meets_slo, render_markdown, summarize
from tokenfleet.load.scrape import histogram_mean, parse_prometheus, read_samples
from tokenfleet.load.stats import Interval, describe, mean_ci, t975, welch
from tokenfleet.load.workload import ClassMix, parse_workload

T0 = 1_700_000_000.0

WORKLOAD = parse_workload(
    {
        "name": "fixed",
        "classes": [
            {"name": "fast", "share": 1, "priority": 0, "ttftMs": 100, "tpotMs": 20},
            {"name": "slow", "share": 1, "priority": 1},
        ],
        "tenants": [{"name": "a"}, {"name": "b"}],
    }
)


def make(
    i: int,
    cls: str,
    tenant: str,
    ttft: float,
    tpot: float,
    n: int = 11,
    send: float | None = None,
    ok: bool = True,
) -> RequestRecord:
    e2e = ttft + tpot * (n - 1)
    record = RequestRecord(
        id=str(i),
        cls=cls,
        tenant=tenant,
        api="completions",
        stream=True,
        send=T0 + (i if send is None else send),
        scheduled=T0 + (i if send is None else send) - 0.01,
        ttft_s=ttft if ok else None,
        first_chunk_s=ttft if ok else None,
        chunk_s=[ttft + tpot * k for k in range(n)] if ok else [],
        e2e_s=e2e,
        prompt_tokens=50,
        output_tokens=n if ok else None,
        status=200 if ok else 500,
        ok=ok,
        error=None if ok else "HTTP 500: boom",
    )
    return record


def fixed_log() -> list[RequestRecord]:
    records = []
    # 10 fast requests: 8 meet TTFT ≤ 100 ms and TPOT ≤ 20 ms, 2 miss TTFT.
    for i in range(10):
        records.append(make(i, "fast", "a", ttft=0.05 if i < 8 else 0.3, tpot=0.01))
    # 9 slow requests without SLOs, 1 failure.
    for i in range(10, 19):
        records.append(make(i, "slow", "b", ttft=0.2, tpot=0.05))
    records.append(make(19, "slow", "b", ttft=0.0, tpot=0.0, ok=False))
    # One request in the warm-up, before the window.
    records.append(make(-5, "fast", "a", ttft=5.0, tpot=1.0))
    return records


def test_summary_from_fixed_log() -> None:
    window = Window(T0, T0 + 20)
    summary = summarize(fixed_log(), WORKLOAD, window, meta={"workload": "fixed"})
    overall = summary["overall"]
    assert overall["requests"] == 20
    assert overall["ok"] == 19
    assert overall["failed"] == 1
    assert overall["error_rate"] == pytest.approx(0.05)
    assert overall["errors"] == {"HTTP 500: boom": 1}
    fast = summary["classes"]["fast"]
    assert fast["ttft"]["p50"] == pytest.approx(0.05)
    assert fast["ttft"]["mean"] == pytest.approx((8 * 0.05 + 2 * 0.3) / 10)
    assert fast["tpot"]["mean"] == pytest.approx(0.01)
    assert fast["itl"]["count"] == 10 * 10
    assert fast["itl"]["p99"] == pytest.approx(0.01)
    assert fast["e2e"]["max"] == pytest.approx(0.3 + 0.1)
    assert fast["slo_attainment"] == pytest.approx(0.8)
    assert fast["goodput_req_per_s"] == pytest.approx(8 / 20)
    assert fast["goodput_tok_per_s"] == pytest.approx(8 * 11 / 20)
    slow = summary["classes"]["slow"]
    assert slow["slo_attainment"] == pytest.approx(0.9)  # no targets: every success counts
    assert slow["req_per_s"] == pytest.approx(9 / 20)
    assert slow["output_tok_per_s"] == pytest.approx(9 * 11 / 20)
    assert summary["tenants"]["a"]["requests"] == 10
    assert summary["tenants"]["b"]["failed"] == 1
    assert overall["queue"]["p50"] == pytest.approx(0.01)
    assert summary["run"]["records_total"] == 21
    assert summary["warnings"] == ["1 of 20 requests failed"]


def test_slo_rules() -> None:
    slo = ClassMix(name="x", ttft_ms=100, tpot_ms=20, e2e_ms=1000)
    assert meets_slo(make(0, "x", "a", ttft=0.05, tpot=0.01), slo)
    assert not meets_slo(make(0, "x", "a", ttft=0.05, tpot=0.03), slo)
    assert not meets_slo(make(0, "x", "a", ttft=0.05, tpot=0.01, n=200), slo)  # e2e 2.04 s
    one_token = make(0, "x", "a", ttft=0.05, tpot=0.0, n=1)
    assert one_token.tpot_s is None
    assert meets_slo(one_token, slo)
    no_token = make(0, "x", "a", ttft=0.05, tpot=0.01)
    no_token.ttft_s = None
    assert not meets_slo(no_token, slo)
    assert meets_slo(no_token, None)
    assert not meets_slo(make(0, "x", "a", 0, 0, ok=False), None)


def test_markdown_has_tables_and_accuracy() -> None:
    samples = [
        (T0 - 1, {"vllm:time_to_first_token_seconds_sum": 1.0, "vllm:time_to_first_token_seconds_count": 10}),
        (
            T0 + 10,
            {"vllm:num_requests_running": 4, "vllm:num_requests_waiting": 2, "vllm:kv_cache_usage_perc": 0.5},
        ),
        (
            T0 + 21,
            {
                "vllm:time_to_first_token_seconds_sum": 3.0,
                "vllm:time_to_first_token_seconds_count": 29,
                "vllm:num_preemptions_total": 3,
            },
        ),
    ]
    summary = summarize(fixed_log(), WORKLOAD, Window(T0, T0 + 20), server_samples=samples)
    server = summary["server"]
    assert server["ttft_mean_s"] == pytest.approx(2.0 / 19)
    assert server["max_running"] == 4
    assert server["max_waiting"] == 2
    # Accuracy covers every logged request (warm-up included) against first→last scrape.
    harness = (8 * 0.05 + 2 * 0.3 + 9 * 0.2 + 5.0) / 20
    assert summary["accuracy"]["harness_ttft_mean_s"] == pytest.approx(harness)
    assert summary["accuracy"]["server_ttft_count"] == 19
    assert summary["accuracy"]["relative_difference"] == pytest.approx((harness - 2.0 / 19) / (2.0 / 19))
    text = render_markdown(summary, ["timeline.png"])
    assert "## Per class" in text
    assert "## Per tenant" in text
    assert "| fast | 10 | 0 |" in text
    assert "80.0%" in text
    assert "fast: ttft ≤ 100 ms, tpot ≤ 20 ms; slow: none" in text
    assert "Harness vs server TTFT" in text
    assert "![timeline.png](timeline.png)" in text
    assert "HTTP 500: boom" in text


def test_sweep_table_and_warnings() -> None:
    workload = parse_workload({"arrival": {"shape": {"kind": "sweep", "rates": [1, 10], "stepS": 10}}})
    records = [make(i, "standard", "default", 0.05, 0.01, send=float(i)) for i in range(10)]
    # Step 2 offers 10/s, only 5/s complete.
    records += [
        make(100 + i, "standard", "default", 0.05, 0.01, send=10 + i / 10, ok=i % 2 == 0) for i in range(100)
    ]
    for r in records[10:]:
        r.scheduled = r.send - 0.5
    summary = summarize(records, workload, Window(T0, T0 + 20), run_start=T0)
    sweep = summary["sweep"]
    assert [row["offered_rate"] for row in sweep] == [1, 10]
    assert sweep[0]["achieved_rate"] == pytest.approx(1.0)
    assert not sweep[0]["saturated"]
    assert sweep[1]["achieved_rate"] == pytest.approx(5.0)
    assert sweep[1]["saturated"]
    assert any("pacer fell behind" in w for w in summary["warnings"])
    assert "## Sweep" in render_markdown(summary)
    # Stopped 2 s into the 10 s second step: that step is too short to report.
    cut = summarize(records, workload, Window(T0, T0 + 12), run_start=T0)
    assert [row["step"] for row in cut["sweep"]] == [0]
    half = summarize(records, workload, Window(T0, T0 + 16), run_start=T0)
    assert half["sweep"][1]["sent_rate"] == pytest.approx(60 / 6)
    empty = summarize([], workload, Window(T0, T0 + 1))
    assert "no request was sent in the measured window" in empty["warnings"]
    assert empty["sweep"] == []


def test_write_results_creates_artifacts(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    write_records(raw / "raw-1.jsonl", fixed_log())
    (tmp_path / "server_metrics.jsonl").write_text(
        json.dumps({"t": T0 + 1, "metrics": {"vllm:num_requests_running": 2.0}}) + "\n" + "garbage\n"
    )
    summary = write_results(tmp_path, WORKLOAD, T0, Window(T0, T0 + 20), {"workload": "fixed"})
    for name in ("summary.json", "report.md", "requests.jsonl", "latency_cdf.png", "timeline.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert json.loads((tmp_path / "summary.json").read_text())["overall"]["requests"] == 20
    assert summary["server"]["max_running"] == 2
    assert len((tmp_path / "requests.jsonl").read_text().splitlines()) == 21


def test_stats() -> None:
    assert t975(1) == pytest.approx(12.706)
    assert t975(30) == pytest.approx(2.042)
    assert 1.96 < t975(120) < 2.0
    assert t975(0.5) == math.inf
    d = describe([1.0, 2.0, 3.0, 4.0])
    assert d["p50"] == pytest.approx(2.5)
    assert d["mean"] == pytest.approx(2.5)
    assert describe([])["p99"] is None
    rng = np.random.default_rng(0)
    # Coverage of the 95% interval over many samples of size 5.
    hits = 0
    for _ in range(2000):
        ci = mean_ci(list(rng.normal(10, 2, size=5)))
        hits += ci.low <= 10 <= ci.high
    assert hits / 2000 == pytest.approx(0.95, abs=0.02)
    assert mean_ci([3.0]).half_width == math.inf
    with pytest.raises(ValueError, match="no samples"):
        mean_ci([])


def test_welch_significance() -> None:
    a = mean_ci([10.0, 10.2, 9.9, 10.1])
    b = mean_ci([12.0, 12.1, 11.9, 12.2])
    diff = welch(a, b)
    assert diff.delta == pytest.approx(2.0)
    assert diff.significant
    assert diff.relative == pytest.approx(2.0 / 10.05)
    same = welch(a, mean_ci([10.1, 9.8, 10.2, 10.0]))
    assert not same.significant
    assert not welch(Interval(1, math.inf, 1, 0), Interval(2, math.inf, 1, 0)).significant
    assert welch(Interval(1, 0, 3, 0), Interval(2, 0, 3, 0)).significant


def test_aggregate_and_compare_runs(tmp_path: Path) -> None:
    def summary_for(ttft: float, rate: float) -> dict[str, object]:
        records = [
            make(i, "fast", "a", ttft=ttft + 0.001 * (i % 3), tpot=0.01) for i in range(int(rate * 10))
        ]
        return summarize(records, WORKLOAD, Window(T0, T0 + 10))

    runs_a = [summary_for(0.050 + 0.001 * k, 2) for k in range(3)]
    runs_b = [summary_for(0.080 + 0.001 * k, 2) for k in range(3)]
    agg_a, agg_b = aggregate(runs_a), aggregate(runs_b)
    assert agg_a["TTFT mean (ms)"]["n"] == 3
    assert agg_a["TTFT mean (ms)"]["mean"] == pytest.approx(52.0, rel=0.01)
    rows = compare({"aggregate": agg_a}, {"aggregate": agg_b})
    by_label = {m.label: d for m, _, _, d in rows}
    assert by_label["TTFT mean (ms)"].significant
    assert by_label["TTFT mean (ms)"].delta == pytest.approx(30.0, rel=0.01)
    assert not by_label["requests/s"].significant  # identical rates
    text = render_comparison(rows, "A", "B")
    assert "| TTFT mean (ms) |" in text
    assert "* worse" in text
    # Single runs: per-request means get an interval, percentiles do not.
    single = compare(runs_a[0], runs_b[0])
    labels = {m.label: (ia, d) for m, ia, _, d in single}
    assert math.isfinite(labels["TTFT mean (ms)"][0].half_width)
    assert labels["TTFT mean (ms)"][1].significant
    assert not math.isfinite(labels["TTFT p99 (ms)"][1].half_width)
    (tmp_path / "summary.json").write_text(json.dumps(runs_a[0]))
    assert load_summary(tmp_path)["overall"]["requests"] == 10  # sends inside the 10 s window
    assert interval_for({"aggregate": {}}, METRICS[0]) is None


def test_prometheus_parsing_and_histogram_mean(tmp_path: Path) -> None:
    text = """# HELP vllm:num_requests_running Number of requests
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="tiny"} 3.0
vllm:num_requests_running{engine="1",model_name="tiny"} 1.0
vllm:time_to_first_token_seconds_bucket{le="0.1",model_name="tiny"} 4.0
vllm:time_to_first_token_seconds_sum{model_name="tiny"} 0.5
vllm:time_to_first_token_seconds_count{model_name="tiny"} 5.0
vllm:time_to_first_token_seconds_created{model_name="tiny"} 1.7e9
vllm:num_preemptions_total 2
python_gc_objects_collected_total{generation="0"} 10.0
"""
    parsed = parse_prometheus(text)
    assert parsed["vllm:num_requests_running"] == 4.0
    assert parsed["vllm:num_preemptions_total"] == 2.0
    assert "vllm:time_to_first_token_seconds_bucket" not in parsed
    assert "python_gc_objects_collected_total" not in parsed
    with pytest.raises(ValueError, match="NaNx"):
        parse_prometheus('vllm:bad_value{x="1"} NaNx\n')  # the scraper counts it as a failed scrape
    after = {"vllm:time_to_first_token_seconds_sum": 2.5, "vllm:time_to_first_token_seconds_count": 15.0}
    mean = histogram_mean(parsed, after, "vllm:time_to_first_token_seconds")
    assert mean == (pytest.approx(0.2), 10)
    assert histogram_mean(parsed, parsed, "vllm:time_to_first_token_seconds") is None
    assert histogram_mean({}, {}, "vllm:nothing") is None
    assert read_samples(tmp_path / "none.jsonl") == []


def test_plot_helpers() -> None:
    counts = per_second([T0 + 0.1, T0 + 0.2, T0 + 1.5, T0 + 9.9], T0, 3)
    assert counts.tolist() == [2.0, 1.0, 0.0]
    weighted = per_second([T0 + 0.1, T0 + 0.2], T0, 1, weights=[5.0, 7.0])
    assert weighted.tolist() == [12.0]
    x, y = ecdf([3.0, 1.0, 2.0])
    assert x.tolist() == [1.0, 2.0, 3.0]
    assert y.tolist() == pytest.approx([1 / 3, 2 / 3, 1.0])
