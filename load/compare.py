"""Repeats and comparisons: mean ± 95% CI over repeated runs, and B − A deltas with significance.

With repeats, a metric's samples are its per-run values (the honest unit: runs vary more than
requests within a run). A single run has no run-to-run spread; then only per-request means get an
interval (from the requests), and percentiles and rates get a delta without one.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenfleet.load.stats import Difference, Interval, mean_ci, t975, welch


@dataclass(frozen=True, slots=True)
class Metric:
    label: str
    path: tuple[str, ...]
    scale: float = 1.0
    better: str = "lower"  # which direction is an improvement

    def value(self, summary: dict[str, Any]) -> float | None:
        node: Any = summary
        for key in self.path:
            if not isinstance(node, dict) or key not in node:
                return None
            node = node[key]
        return None if node is None else float(node) * self.scale


def _latency(name: str, label: str) -> list[Metric]:
    return [
        Metric(f"{label} {stat} (ms)", ("overall", name, stat), 1000.0)
        for stat in ("mean", "p50", "p90", "p99")
    ]


METRICS: tuple[Metric, ...] = (
    *_latency("ttft", "TTFT"),
    *_latency("tpot", "TPOT"),
    *_latency("itl", "ITL"),
    *_latency("e2e", "E2E"),
    Metric("requests/s", ("overall", "req_per_s"), better="higher"),
    Metric("output tok/s", ("overall", "output_tok_per_s"), better="higher"),
    Metric("goodput req/s", ("overall", "goodput_req_per_s"), better="higher"),
    Metric("goodput tok/s", ("overall", "goodput_tok_per_s"), better="higher"),
    Metric("SLO attainment (%)", ("overall", "slo_attainment"), 100.0, better="higher"),
    Metric("error rate (%)", ("overall", "error_rate"), 100.0),
)


def aggregate(summaries: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per metric: mean, 95% half-width, std, n and the per-run values."""
    out: dict[str, dict[str, Any]] = {}
    for metric in METRICS:
        values = [v for s in summaries if (v := metric.value(s)) is not None]
        if not values:
            continue
        ci = mean_ci(values)
        out[metric.label] = {
            "mean": ci.mean,
            "half_width": ci.half_width if math.isfinite(ci.half_width) else None,
            "std": ci.std,
            "n": ci.n,
            "values": values,
        }
    return out


def interval_for(summary: dict[str, Any], metric: Metric) -> Interval | None:
    agg = summary.get("aggregate")
    if isinstance(agg, dict):
        row = agg.get(metric.label)
        if row is None:
            return None
        hw = row["half_width"]
        return Interval(row["mean"], math.inf if hw is None else hw, row["n"], row["std"])
    value = metric.value(summary)
    if value is None:
        return None
    if metric.path[-1] == "mean" and len(metric.path) == 3:
        stats = summary["overall"][metric.path[1]]
        n, std = int(stats["count"]), float(stats["std"] or 0.0) * metric.scale
        if n >= 2:
            return Interval(value, t975(n - 1) * std / math.sqrt(n), n, std)
    return Interval(value, math.inf, 1, 0.0)


def load_summary(run: str | Path) -> dict[str, Any]:
    path = Path(run)
    path = path / "summary.json" if path.is_dir() else path
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def compare(a: dict[str, Any], b: dict[str, Any]) -> list[tuple[Metric, Interval, Interval, Difference]]:
    rows = []
    for metric in METRICS:
        ia, ib = interval_for(a, metric), interval_for(b, metric)
        if ia is not None and ib is not None:
            rows.append((metric, ia, ib, welch(ia, ib)))
    return rows


def _fmt(interval: Interval) -> str:
    if math.isfinite(interval.half_width):
        return f"{interval.mean:.3g} ± {interval.half_width:.2g}"
    return f"{interval.mean:.3g}"


def render_comparison(rows: Sequence[tuple[Metric, Interval, Interval, Difference]], a: str, b: str) -> str:
    lines = [
        f"A = {a}",
        f"B = {b}",
        "",
        "| metric | A | B | B − A | ±95% | Δ% | sig |",
        "|---|---|---|---|---|---|---|",
    ]
    for metric, ia, ib, diff in rows:
        rel = "–" if diff.relative is None else f"{diff.relative * 100:+.1f}%"
        hw = f"{diff.half_width:.2g}" if math.isfinite(diff.half_width) else "n/a"
        mark = ""
        if diff.significant:
            improved = (diff.delta < 0) == (metric.better == "lower")
            mark = "* better" if improved else "* worse"
        lines.append(
            f"| {metric.label} | {_fmt(ia)} | {_fmt(ib)} | {diff.delta:+.3g} | {hw} | {rel} | {mark} |"
        )
    lines += [
        "",
        "sig: * = the 95% Welch interval of B − A excludes zero. Without repeats only per-request "
        "means have intervals; use --repeat for intervals on percentiles and rates.",
    ]
    return "\n".join(lines) + "\n"


def render_aggregate(agg: dict[str, dict[str, Any]], n: int) -> str:
    lines = [
        f"## Over {n} repeats (mean ± 95% CI, Student t)",
        "",
        "| metric | mean | ±95% | runs |",
        "|---|---|---|---|",
    ]
    for label, row in agg.items():
        hw = "n/a" if row["half_width"] is None else f"{row['half_width']:.3g}"
        lines.append(f"| {label} | {row['mean']:.4g} | {hw} | {row['n']} |")
    return "\n".join(lines) + "\n"
