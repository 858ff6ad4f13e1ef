"""From raw records to the run's summary (the source of truth, summary.json) and report.md.

Pure functions over typed data: `summarize` takes records, the workload and the measurement
window and returns plain dicts; `render_markdown` formats one. Times in the summary are seconds;
the report shows milliseconds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from tokenfleet.load.record import RequestRecord
from tokenfleet.load.scrape import KV_CACHE, PREEMPTIONS, QUEUE, RUNNING, TTFT_SUM, first_of, histogram_mean
from tokenfleet.load.shapes import Sweep, saturated
from tokenfleet.load.stats import describe
from tokenfleet.load.workload import ClassMix, Workload, shape_of

Summary = dict[str, Any]
# client queue p99 above this means the pacer could not keep its schedule (too few users).
QUEUE_WARN_S = 0.1


@dataclass(frozen=True, slots=True)
class Window:
    """The measured interval (Unix seconds): warm-up excluded, requests sent within it counted."""

    start: float
    end: float

    @property
    def duration_s(self) -> float:
        return max(1e-9, self.end - self.start)

    def contains(self, record: RequestRecord) -> bool:
        return self.start <= record.send < self.end


def meets_slo(record: RequestRecord, slo: ClassMix | None) -> bool:
    """Good (for goodput) = finished without error and within every target its class sets."""
    if not record.ok:
        return False
    if slo is None:
        return True
    # TPOT is undefined for one-token replies: then TTFT and E2E alone decide.
    checks = (
        (slo.ttft_ms, record.ttft_s, False),
        (slo.tpot_ms, record.tpot_s, True),
        (slo.e2e_ms, record.e2e_s, False),
    )
    for target_ms, value_s, may_be_missing in checks:
        if target_ms is None:
            continue
        if value_s is None:
            # A missing measurement (no token arrived) cannot prove the target was met.
            if may_be_missing:
                continue
            return False
        if value_s * 1000 > target_ms:
            return False
    return True


def group_stats(
    records: Sequence[RequestRecord], duration_s: float, slo_of: Callable[[str], ClassMix | None]
) -> dict[str, Any]:
    ok = [r for r in records if r.ok]
    good = [r for r in records if meets_slo(r, slo_of(r.cls))]
    output_tokens = sum(r.output_tokens or 0 for r in ok)
    itls = [gap for r in ok for gap in r.itl_s]  # pooled over requests, as vLLM's ITL
    errors: dict[str, int] = {}
    for r in records:
        if not r.ok:
            key = (r.error or "unknown")[:80]
            errors[key] = errors.get(key, 0) + 1
    return {
        "requests": len(records),
        "ok": len(ok),
        "failed": len(records) - len(ok),
        "rejected": sum(r.rejected for r in records),
        "error_rate": (len(records) - len(ok)) / len(records) if records else 0.0,
        "errors": dict(sorted(errors.items(), key=lambda kv: -kv[1])[:10]),
        "ttft": describe([r.ttft_s for r in ok if r.ttft_s is not None]),
        "first_chunk": describe([r.first_chunk_s for r in ok if r.first_chunk_s is not None]),
        "tpot": describe([t for r in ok if (t := r.tpot_s) is not None]),
        "itl": describe(itls),
        "e2e": describe([r.e2e_s for r in ok if r.e2e_s is not None]),
        "queue": describe([q for r in records if (q := r.queue_s) is not None]),
        "output_tokens": output_tokens,
        "input_tokens": sum(r.prompt_tokens or 0 for r in ok),
        "req_per_s": len(ok) / duration_s,
        "output_tok_per_s": output_tokens / duration_s,
        "slo_attainment": len(good) / len(records) if records else None,
        "goodput_req_per_s": len(good) / duration_s,
        "goodput_tok_per_s": sum(r.output_tokens or 0 for r in good) / duration_s,
    }


def server_stats(samples: Sequence[tuple[float, dict[str, float]]], window: Window) -> dict[str, Any]:
    """Server-side figures over the window: histogram means from the samples bracketing it."""
    if not samples:
        return {}
    before = [s for t, s in samples if t <= window.start] or [samples[0][1]]
    after = [s for t, s in samples if t >= window.end] or [samples[-1][1]]
    inside = [s for t, s in samples if window.start <= t <= window.end] or [s for _, s in samples]
    out: dict[str, Any] = {"samples": len(samples)}
    ttft = histogram_mean(before[-1], after[0], TTFT_SUM.removesuffix("_sum"))
    if ttft is not None:
        out["ttft_mean_s"], out["ttft_count"] = ttft
    for key, base in (
        ("e2e_mean_s", "vllm:e2e_request_latency_seconds"),
        ("itl_mean_s", "vllm:inter_token_latency_seconds"),
        ("queue_mean_s", "vllm:request_queue_time_seconds"),
    ):
        mean = histogram_mean(before[-1], after[0], base)
        if mean is not None:
            out[key] = mean[0]
    for key, names in (("waiting", QUEUE), ("running", RUNNING), ("kv_cache_usage", KV_CACHE)):
        values = [v for s in inside if (v := first_of(s, names)) is not None]
        if values:
            out[f"max_{key}"] = max(values)
            out[f"mean_{key}"] = sum(values) / len(values)
    pre_a, pre_b = first_of(before[-1], PREEMPTIONS), first_of(after[0], PREEMPTIONS)
    if pre_a is not None and pre_b is not None:
        out["preemptions"] = pre_b - pre_a
    return out


def sweep_table(
    records: Sequence[RequestRecord], sweep: Sweep, run_start: float, end: float | None = None
) -> list[dict[str, Any]]:
    """Per sweep step: offered vs achieved rate and latencies (a request belongs to its send's step).

    A step that ran less than half its length before the run ended is left out: the pacer enters
    the next step on its own clock a moment before the shape stops the run at saturation."""
    rows = []
    for index, rate in enumerate(sweep.rates):
        lo, hi = run_start + index * sweep.step_s, run_start + (index + 1) * sweep.step_s
        if end is not None:
            if end - lo < sweep.step_s / 2:
                break
            hi = min(hi, end)
        step = [r for r in records if lo <= r.send < hi]
        if not step:
            break
        length = hi - lo
        done = [r for r in step if r.ok and r.end is not None and r.end < hi + sweep.step_s]
        achieved = len([r for r in step if r.ok]) / length
        rows.append(
            {
                "step": index,
                "offered_rate": rate,
                "sent_rate": len(step) / length,
                "achieved_rate": achieved,
                "ttft_p50_s": describe([r.ttft_s for r in done if r.ttft_s is not None])["p50"],
                "tpot_p50_s": describe([t for r in done if (t := r.tpot_s) is not None])["p50"],
                "e2e_p99_s": describe([r.e2e_s for r in done if r.e2e_s is not None])["p99"],
                "saturated": saturated(rate, achieved, sweep.min_achieved_ratio),
            }
        )
    return rows


def summarize(
    records: Iterable[RequestRecord],
    workload: Workload,
    window: Window,
    *,
    run_start: float | None = None,
    server_samples: Sequence[tuple[float, dict[str, float]]] = (),
    meta: dict[str, Any] | None = None,
) -> Summary:
    all_records = sorted(records, key=lambda r: r.send)
    measured = [r for r in all_records if window.contains(r)]
    slo_of = workload.class_named
    duration = window.duration_s
    by_class = {c.name: [r for r in measured if r.cls == c.name] for c in workload.classes}
    by_tenant = {t.name: [r for r in measured if r.tenant == t.name] for t in workload.tenants}
    overall = group_stats(measured, duration, slo_of)
    summary: Summary = {
        "run": {
            **(meta or {}),
            "window_start": window.start,
            "window_end": window.end,
            "duration_s": duration,
            "records_total": len(all_records),
            "records_measured": len(measured),
        },
        "overall": overall,
        "classes": {name: group_stats(rs, duration, slo_of) for name, rs in by_class.items()},
        "tenants": {name: group_stats(rs, duration, slo_of) for name, rs in by_tenant.items()},
        "server": server_stats(server_samples, window),
    }
    summary["slos"] = {
        c.name: {"ttft_ms": c.ttft_ms, "tpot_ms": c.tpot_ms, "e2e_ms": c.e2e_ms} for c in workload.classes
    }
    accuracy = ttft_accuracy(all_records, server_samples)
    if accuracy is not None:
        summary["accuracy"] = accuracy
    shape = shape_of(workload)
    if isinstance(shape, Sweep):
        origin = run_start if run_start is not None else window.start
        summary["sweep"] = sweep_table(all_records, shape, origin, window.end)
    summary["warnings"] = warnings_for(summary)
    return summary


def ttft_accuracy(
    records: Sequence[RequestRecord], samples: Sequence[tuple[float, dict[str, float]]]
) -> dict[str, Any] | None:
    """Harness vs server mean TTFT over the same requests: every logged request against the
    histogram's change from the first scrape (before any traffic) to the last (after every
    request ended). A window cut would split requests in flight at its edges differently on
    each side, so the whole run is compared, warm-up included."""
    ttfts = [r.ttft_s for r in records if r.ok and r.ttft_s is not None]
    if not ttfts or len(samples) < 2:
        return None
    server = histogram_mean(samples[0][1], samples[-1][1], TTFT_SUM.removesuffix("_sum"))
    if server is None or server[0] <= 0:
        return None
    harness = sum(ttfts) / len(ttfts)
    return {
        "harness_ttft_mean_s": harness,
        "harness_ttft_count": len(ttfts),
        "server_ttft_mean_s": server[0],
        "server_ttft_count": server[1],
        "relative_difference": (harness - server[0]) / server[0],
    }


def warnings_for(summary: Summary) -> list[str]:
    out = []
    overall = summary["overall"]
    if overall["requests"] == 0:
        out.append("no request was sent in the measured window")
    if overall["error_rate"] > 0:
        out.append(f"{overall['failed']} of {overall['requests']} requests failed")
    queue_p99 = overall["queue"]["p99"]
    if queue_p99 is not None and queue_p99 > QUEUE_WARN_S:
        out.append(
            f"client queue P99 {queue_p99 * 1000:.0f} ms: the pacer fell behind its schedule "
            "(raise arrival.maxConcurrency or the server is saturated)"
        )
    return out


# ---- markdown ---------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value * 1000:.1f}"


def _num(value: float | None, fmt: str = ".2f") -> str:
    return "–" if value is None else format(value, fmt)


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value * 100:.1f}%"


def latency_table(groups: dict[str, dict[str, Any]], label: str) -> list[str]:
    header = [label, "n", "fail", "req/s", "out tok/s"]
    for metric in ("TTFT", "TPOT", "ITL", "E2E"):
        header += [f"{metric} p50", "p90", "p99"]
    header += ["SLO met", "goodput req/s", "goodput tok/s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, g in groups.items():
        row = [name, str(g["requests"]), str(g["failed"])]
        row += [_num(g["req_per_s"]), _num(g["output_tok_per_s"], ".1f")]
        for metric in ("ttft", "tpot", "itl", "e2e"):
            row += [_ms(g[metric][f"p{q}"]) for q in (50, 90, 99)]
        row += [_pct(g["slo_attainment"]), _num(g["goodput_req_per_s"]), _num(g["goodput_tok_per_s"], ".1f")]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _targets(slo: dict[str, float | None]) -> str:
    parts = [f"{k.removesuffix('_ms')} ≤ {v:g} ms" for k, v in slo.items() if v]
    return ", ".join(parts) or "none"


def render_markdown(summary: Summary, plots: Sequence[str] = ()) -> str:
    run = summary["run"]
    lines = [f"# Load test: {run.get('workload', 'workload')}", ""]
    facts = [
        ("target", run.get("target")),
        ("model", run.get("model")),
        ("loop", run.get("loop")),
        ("shape", run.get("shape")),
        ("measured window", f"{run['duration_s']:.1f} s (warm-up {run.get('warmup_s', 0)} s excluded)"),
        ("requests", f"{run['records_measured']} measured of {run['records_total']} logged"),
        ("workers", run.get("workers")),
        ("interrupted", run.get("interrupted")),
    ]
    lines += [f"- **{k}**: {v}" for k, v in facts if v is not None]
    if summary.get("warnings"):
        lines += ["", "**Warnings**", ""] + [f"- {w}" for w in summary["warnings"]]
    lines += [
        "",
        "Times in ms. TTFT = first non-empty content chunk − send; TPOT = (E2E − TTFT)/(n − 1) per "
        "request (vLLM's TPOT = AIPerf's/GuideLLM's ITL); ITL = gaps between content chunks pooled over "
        "requests (vLLM's ITL = AIPerf's ICL); n from the server's usage. SLO met = fraction of all "
        "requests (failures count as misses) within their class's targets; goodput = such requests "
        "(tokens) per second.",
        "",
        "## Overall",
        "",
        *latency_table({"all": summary["overall"]}, "scope"),
        "",
        "## Per class",
        "",
        *latency_table(summary["classes"], "class"),
        "",
        "SLO targets: " + "; ".join(f"{name}: {_targets(slo)}" for name, slo in summary["slos"].items()),
        "",
        "## Per tenant",
        "",
        *latency_table(summary["tenants"], "tenant"),
    ]
    if summary["overall"]["errors"]:
        lines += ["", "## Errors", "", "| error | count |", "|---|---|"]
        lines += [f"| {e.replace('|', '/')} | {n} |" for e, n in summary["overall"]["errors"].items()]
    if summary.get("sweep"):
        lines += [
            "",
            "## Sweep",
            "",
            "| step | offered req/s | sent req/s | completed req/s | TTFT p50 | TPOT p50 | E2E p99 "
            "| saturated |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in summary["sweep"]:
            lines.append(
                f"| {row['step']} | {row['offered_rate']:g} | {row['sent_rate']:.2f} "
                f"| {row['achieved_rate']:.2f} | "
                f"{_ms(row['ttft_p50_s'])} | {_ms(row['tpot_p50_s'])} | {_ms(row['e2e_p99_s'])} | "
                f"{'yes' if row['saturated'] else ''} |"
            )
    server = summary.get("server") or {}
    if server:
        lines += ["", "## Server (/metrics)", ""]
        lines += [f"- {k}: {v:.4g}" if isinstance(v, float) else f"- {k}: {v}" for k, v in server.items()]
    if "accuracy" in summary:
        acc = summary["accuracy"]
        lines += [
            "",
            "## Harness vs server TTFT",
            "",
            f"Harness mean TTFT {_ms(acc['harness_ttft_mean_s'])} ms over "
            f"{acc['harness_ttft_count']} requests; "
            f"server histogram mean {_ms(acc['server_ttft_mean_s'])} ms over {acc['server_ttft_count']}; "
            f"difference {acc['relative_difference'] * 100:+.1f}%.",
        ]
    if run.get("machine"):
        lines += ["", "## Machine", ""] + [f"- {k}: {v}" for k, v in run["machine"].items()]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"
