"""The scheduler benchmark's report: per-profile tables, issue 4's target checks and plots, from
the results JSON that `load/scheduler_bench.py` writes (means and 95% Student t intervals over
seeds, `load/stats.py`). Pure, except the plots."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenfleet.load.scheduler_bench import (
    DEADLINES_LOAD,
    FAIRNESS_SHORT_WINDOW_S,
    FAIRNESS_WINDOW_S,
    REPORT_CLASSES,
    STARVATION_LOAD,
    VICTIM,
)
from tokenfleet.load.stats import Interval, mean_ci

# DistServe's SLO capacity: the highest rate at which every class keeps this attainment.
CAPACITY_ATTAINMENT = 0.9


def run_line(run: dict[str, Any]) -> str:
    """One run's headline figures, for the bench's progress log."""
    per_class = ", ".join(
        f"{name} SLO {_pct(c['slo_attainment'])} p99 TTFT {_ms(c['ttft_p99'])} max wait {_s(c['max_wait'])}"
        for name, c in run["classes"].items()
        if c["requests"]
    )
    return (
        f"[{run['policy']}] {run['profile']} seed {run['seed']}: {run['requests']} req, {per_class}, "
        f"J {_num(run['jain'])}, {run['output_tok_per_s']:.1f} tok/s"
    )


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}%"


def _ms(v: float | None) -> str:
    return "–" if v is None else f"{1000 * v:.0f} ms"


def _ms2(v: float | None) -> str:
    return "–" if v is None else f"{1000 * v:.2f} ms"


def _s(v: float | None) -> str:
    return "–" if v is None else f"{v:.1f} s"


def _num(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f}"


def _num2(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}"


def _field(run: dict[str, Any], *path: str) -> Any:
    """run[path[0]][path[1]]…, None where a level is missing (runs of older versions)."""
    value: Any = run
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def aggregate(runs: Sequence[dict[str, Any]], policy: str, profile: str) -> dict[str, Any]:
    """Mean (and 95% Student t interval) over seeds of each reported figure; max wait is the max
    over seeds, the stated bound the tightest run's."""
    mine = [r for r in runs if r["policy"] == policy and r["profile"] == profile]

    def values(*path: str) -> list[float]:
        return [v for r in mine if (v := _field(r, *path)) is not None]

    def interval(*path: str) -> Interval | None:
        sample = values(*path)
        return mean_ci(sample) if sample else None

    def largest(*path: str) -> float | None:
        return max(values(*path), default=None)

    agg: dict[str, Any] = {"seeds": len(mine)}
    for n in (c.name for c in REPORT_CLASSES):
        for key in ("slo_attainment", "ttft_p50", "ttft_p99", "tpot_p50", "tpot_p99"):
            agg[f"{n}.{key}"] = interval("classes", n, key)
        agg[f"{n}.max_wait"] = largest("classes", n, "max_wait")
        agg[f"{n}.wait_p99"] = interval("classes", n, "wait_p99")
        agg[f"{n}.engine_max_wait"] = largest("server_max_wait_le_s", n)
        agg[f"{n}.wait_bound"] = min(values("wait_bounds", n), default=None)
        agg[f"{n}.rejected"] = sum(values("classes", n, "rejected"))
        agg[f"{n}.requests"] = sum(values("classes", n, "requests"))
    for key in ("slo_attainment", "ttft_p50", "ttft_p99"):
        agg[f"victim.{key}"] = interval("tenants", "standard", VICTIM, key)
    keys = ("jain", "jain_short", "output_tok_per_s", "req_per_s", "preemptions", "schedule_mean_s")
    for key in (*keys, "mean_running", "mean_waiting", "goodput_req_per_s"):
        agg[key] = interval(key)
    for key in ("schedule_p99_le_s", "policy_p99_le_s"):
        agg[key] = largest(key)
    return agg


# -- SLO capacity: a sweep over load levels of the standard mix -----------------------------


def load_level(profile: str) -> float | None:
    """The load of a `<f>x` profile (× λ_sat); None for the burst profile and the scenarios."""
    if not profile.endswith("x"):
        return None
    try:
        return float(profile[:-1])
    except ValueError:
        return None


def min_attainment(run: dict[str, Any]) -> float | None:
    """The worst class's SLO attainment in a run (classes that sent nothing left out)."""
    values = [c["slo_attainment"] for c in run["classes"].values() if c["requests"]]
    return min(values) if values else None


def slo_capacity(
    points: Sequence[tuple[float, float]], threshold: float = CAPACITY_ATTAINMENT
) -> float | None:
    """The highest load at which attainment is still ≥ threshold, from (load, attainment) points:
    the crossing between the last level that meets it and the first that does not, linearly
    interpolated. None when the lowest level already misses; the highest level when none does
    (then it is a lower bound)."""
    ordered = sorted(points)
    if not ordered or ordered[0][1] < threshold:
        return None
    for (low, met), (high, missed) in itertools.pairwise(ordered):
        if missed < threshold:
            return low + (met - threshold) / (met - missed) * (high - low)
    return ordered[-1][0]


def capacities(runs: Sequence[dict[str, Any]], policy: str) -> dict[int, float | None]:
    """Per seed, `slo_capacity` over that seed's sweep of load levels."""
    points: dict[int, list[tuple[float, float]]] = {}
    for r in runs:
        level, worst = load_level(r["profile"]), min_attainment(r)
        if r["policy"] == policy and level is not None and worst is not None:
            points.setdefault(r["seed"], []).append((level, worst))
    return {seed: slo_capacity(p) for seed, p in points.items() if len(p) >= 2}


def capacity_summary(results: dict[str, Any]) -> dict[str, Any] | None:
    """Capacity per policy (mean and interval over seeds, × λ_sat) and `sla`'s paired ratios to
    each baseline (same seed, same traffic); None without a sweep of two or more levels."""
    runs = results["runs"]
    policies = _policies(runs)
    per_policy = {p: capacities(runs, p) for p in policies}
    if not any(per_policy.values()):
        return None
    top = max((lv for r in runs if (lv := load_level(r["profile"])) is not None), default=0.0)
    out: dict[str, Any] = {"lambda_sat": results.get("lambda_sat"), "levels_max": top, "policies": {}}
    for policy, by_seed in per_policy.items():
        known = [v for v in by_seed.values() if v is not None]
        out["policies"][policy] = {
            "capacity": mean_ci(known) if known else None,
            "seeds": len(by_seed),
            "below_lowest": sum(v is None for v in by_seed.values()),
            "at_top": sum(v is not None and v >= top for v in by_seed.values()),
        }
    ours = per_policy.get("sla", {})
    for baseline in ("fcfs", "priority"):
        theirs = per_policy.get(baseline, {})
        ratios = [
            mine / base
            for seed, mine in ours.items()
            if mine is not None and (base := theirs.get(seed)) is not None and base > 0
        ]
        out[f"sla_over_{baseline}"] = mean_ci(ratios) if ratios else None
    return out


def render_capacity(summary: dict[str, Any]) -> str:
    lam = summary["lambda_sat"]
    lines = [
        f"SLO capacity: the highest load at which every class keeps ≥ {100 * CAPACITY_ATTAINMENT:.0f} % "
        "SLO attainment (interpolated between swept levels), per seed; mean ± 95 % t-interval.",
        "",
        "| policy | capacity (× λ_sat) | capacity (req/s) | seeds below the lowest level / at the top |",
        "|---|---|---|---|",
    ]
    for policy, row in summary["policies"].items():
        cap: Interval | None = row["capacity"]
        rate = (
            _ci(Interval(cap.mean * lam, cap.half_width * lam, cap.n, cap.std * lam), _num2)
            if cap and lam
            else "–"
        )
        lines.append(f"| {policy} | {_ci(cap, _num2)} | {rate} | {row['below_lowest']} / {row['at_top']} |")
    for baseline in ("fcfs", "priority"):
        ratio = summary.get(f"sla_over_{baseline}")
        lines.append(f"| sla ÷ {baseline} (paired by seed) | {_ci(ratio, _num2)} | | |")
    return "\n".join(lines) + "\n"


def _ci(v: Interval | None, fmt: Callable[[float], str]) -> str:
    if v is None:
        return "–"
    if not math.isfinite(v.half_width) or v.half_width == 0:
        return fmt(v.mean)  # one seed, or all seeds equal: no interval to show
    return f"{fmt(v.mean)} ± {fmt(v.half_width).split()[0]}"


def _policies(runs: Sequence[dict[str, Any]]) -> list[str]:
    """Policies in the canonical order (baselines first), whatever order the runs took."""
    canonical = ("fcfs", "priority", "sla")
    seen = list(dict.fromkeys(r["policy"] for r in runs))
    return sorted(seen, key=lambda p: (canonical.index(p) if p in canonical else len(canonical), p))


@dataclass(frozen=True, slots=True)
class TargetCheck:
    target: str
    measured: str
    met: bool | None  # None: not measurable in this run


def check_targets(results: dict[str, Any], ours: str = "sla", baseline: str = "fcfs") -> list[TargetCheck]:
    """Issue 4's targets for `ours`, from the recorded runs (means over seeds)."""
    runs = results["runs"]
    checks: list[TargetCheck] = []

    def agg(policy: str, profile: str) -> dict[str, Any] | None:
        a = aggregate(runs, policy, profile)
        return a if a["seeds"] else None

    high, high_base = agg(ours, "1.2x"), agg(baseline, "1.2x")
    if high is not None and high["interactive.slo_attainment"] is not None:
        att = high["interactive.slo_attainment"].mean
        checks.append(
            TargetCheck("1.2× λ_sat: interactive TTFT-SLO attainment ≥ 99 %", _pct(att), att >= 0.99)
        )
    if high and high_base and high["interactive.ttft_p99"] and high_base["interactive.ttft_p99"]:
        mine, theirs = high["interactive.ttft_p99"].mean, high_base["interactive.ttft_p99"].mean
        cut = 1 - mine / theirs
        checks.append(
            TargetCheck(
                f"1.2× λ_sat: interactive P99 TTFT ≥ 60 % below {baseline}",
                f"{_ms(mine)} vs {_ms(theirs)} ({100 * cut:.0f} % lower)",
                cut >= 0.6,
            )
        )
    waits = [
        w
        for r in runs
        if r["policy"] == ours and (w := _field(r, "classes", "batch", "max_wait")) is not None
    ]
    bounds = [
        b["batch"] for r in runs if r["policy"] == ours and "batch" in (b := r.get("wait_bounds") or {})
    ]
    if waits and bounds:
        worst, bound = max(waits), min(bounds)
        checks.append(
            TargetCheck(
                "batch max wait within its stated bound (all runs)",
                f"{_s(worst)} ≤ {_s(bound)}",
                worst <= bound,
            )
        )
    for profile in ("1.2x", "burst"):
        a = agg(ours, profile)
        if a is not None:
            jain_ci = a["jain"]
            checks.append(
                TargetCheck(
                    f"{profile}: Jain's index ≥ 0.95 among backlogged tenants",
                    _num(jain_ci.mean) if jain_ci else "no window with two backlogged tenants",
                    (jain_ci.mean >= 0.95) if jain_ci else None,
                )
            )
    low, low_base = agg(ours, "0.8x"), agg(baseline, "0.8x")
    if low and low_base and low["output_tok_per_s"] and low_base["output_tok_per_s"]:
        mine, theirs = low["output_tok_per_s"].mean, low_base["output_tok_per_s"].mean
        ratio = mine / theirs
        checks.append(
            TargetCheck(
                f"0.8× λ_sat: throughput ≥ 97 % of {baseline}",
                f"{mine:.1f} vs {theirs:.1f} tok/s ({100 * ratio:.1f} %)",
                ratio >= 0.97,
            )
        )
    starved = agg(ours, "starvation")
    if (
        starved is not None
        and starved["batch.max_wait"] is not None
        and starved["batch.wait_bound"] is not None
    ):
        worst, bound = starved["batch.max_wait"], starved["batch.wait_bound"]
        checks.append(
            TargetCheck(
                f"starvation ({STARVATION_LOAD}× λ_sat of the top class): batch max wait within its bound",
                f"{_s(worst)} ≤ {_s(bound)}",
                worst <= bound,
            )
        )
    if starved is not None and starved["interactive.slo_attainment"] is not None:
        att = starved["interactive.slo_attainment"].mean
        checks.append(TargetCheck("starvation: interactive SLO attainment ≥ 95 %", _pct(att), att >= 0.95))
    noisy = agg(ours, "noisy")
    if noisy is not None and noisy["victim.slo_attainment"] is not None:
        att = noisy["victim.slo_attainment"].mean
        checks.append(
            TargetCheck("noisy neighbour: the victim's SLO attainment ≥ 99 %", _pct(att), att >= 0.99)
        )
    if noisy is not None:
        jain_ci = noisy["jain"]
        checks.append(
            TargetCheck(
                "noisy neighbour: Jain's index ≥ 0.95 among backlogged tenants",
                _num(jain_ci.mean) if jain_ci else "no window with both tenants backlogged",
                (jain_ci.mean >= 0.95) if jain_ci else None,
            )
        )
    summary = capacity_summary(results)
    for baseline, factor in (("fcfs", 1.3), ("priority", 1.1)):
        ratio = summary.get(f"sla_over_{baseline}") if summary else None
        if ratio is not None:
            checks.append(
                TargetCheck(
                    f"SLO capacity: sla ≥ {factor}× {baseline}", f"{ratio.mean:.2f}×", ratio.mean >= factor
                )
            )
    deadlines, deadlines_base = agg(ours, "deadlines"), agg("priority", "deadlines")
    if (
        deadlines
        and deadlines_base
        and deadlines["goodput_req_per_s"]
        and deadlines_base["goodput_req_per_s"]
    ):
        mine, theirs = deadlines["goodput_req_per_s"].mean, deadlines_base["goodput_req_per_s"].mean
        checks.append(
            TargetCheck(
                "mixed deadlines: goodput above vLLM priority's",
                f"{mine:.2f} vs {theirs:.2f} req/s",
                mine > theirs,
            )
        )
    p99s = [v for r in runs if r["policy"] == ours and (v := r.get("schedule_p99_le_s")) is not None]
    if p99s:
        checks.append(
            TargetCheck(
                "schedule() p99 ≤ 1 ms (every run)", f"≤ {_ms2(max(p99s))} (bucket bound)", max(p99s) <= 0.001
            )
        )
    return checks


def render_targets(checks: Sequence[TargetCheck]) -> str:
    lines = ["| target | measured | met? |", "|---|---|---|"]
    for c in checks:
        lines.append(
            f"| {c.target} | {c.measured} | {'yes' if c.met else 'no' if c.met is False else 'n/a'} |"
        )
    return "\n".join(lines) + "\n"


def _cells(a: dict[str, Any]) -> list[tuple[str, str]]:
    """One policy's column of a profile table: (figure, formatted value) rows."""
    cells: list[tuple[str, str]] = []
    for n in (c.name for c in REPORT_CLASSES):
        if not a[f"{n}.requests"]:
            continue  # a scenario without this class
        engine_wait = a[f"{n}.engine_max_wait"]
        cells += [
            (f"{n} SLO attainment", _ci(a[f"{n}.slo_attainment"], _pct)),
            (f"{n} P50 / P99 TTFT", f"{_ci(a[f'{n}.ttft_p50'], _ms)} / {_ci(a[f'{n}.ttft_p99'], _ms)}"),
            (f"{n} P50 / P99 TPOT", f"{_ci(a[f'{n}.tpot_p50'], _ms)} / {_ci(a[f'{n}.tpot_p99'], _ms)}"),
            (f"{n} max wait to first token (all seeds)", _s(a[f"{n}.max_wait"])),
            (f"{n} max queue wait in the engine (bucket bound)", _s(engine_wait) if engine_wait else "n/a"),
            (f"{n} stated wait bound (tightest run)", _s(a[f"{n}.wait_bound"])),
            (f"{n} rejected / requests", f"{a[f'{n}.rejected']:.0f} / {a[f'{n}.requests']:.0f}"),
        ]
    if a["victim.slo_attainment"] is not None:
        cells += [
            ("victim tenant SLO attainment", _ci(a["victim.slo_attainment"], _pct)),
            ("victim P50 / P99 TTFT", f"{_ci(a['victim.ttft_p50'], _ms)} / {_ci(a['victim.ttft_p99'], _ms)}"),
        ]
    schedule_p99 = a["schedule_p99_le_s"]
    return [
        *cells,
        (
            "engine slots busy / requests queued in it (mean)",
            f"{_ci(a['mean_running'], _num2)} / {_ci(a['mean_waiting'], _num2)}",
        ),
        (f"Jain's index (backlogged tenants, {FAIRNESS_WINDOW_S:.0f} s windows)", _ci(a["jain"], _num)),
        (f"Jain's index ({FAIRNESS_SHORT_WINDOW_S:.0f} s windows)", _ci(a["jain_short"], _num)),
        ("throughput (output tok/s)", _ci(a["output_tok_per_s"], lambda v: f"{v:.1f}")),
        ("completed req/s", _ci(a["req_per_s"], lambda v: f"{v:.2f}")),
        (
            "goodput (req/s meeting every target of their class)",
            _ci(a["goodput_req_per_s"], lambda v: f"{v:.2f}"),
        ),
        ("preemptions per run", _ci(a["preemptions"], lambda v: f"{v:.1f}")),
        ("schedule() p99 (bucket bound, max over seeds)", _ms2(schedule_p99) if schedule_p99 else "n/a"),
        ("schedule() mean", _ci(a["schedule_mean_s"], _ms2)),
    ]


def scenario_table(results: dict[str, Any]) -> str:
    """The lead table: each scenario's deciding figures, FCFS / priority / sla side by side."""
    runs = results["runs"]
    policies = _policies(runs)
    profiles = set(r["profile"] for r in runs)
    rows: list[tuple[str, str, Callable[[dict[str, Any]], str]]] = [
        ("starvation", "batch max wait (all seeds)", lambda a: _s(a["batch.max_wait"])),
        ("starvation", "batch P99 wait", lambda a: _ci(a["batch.wait_p99"], _s)),
        ("starvation", "batch stated bound (tightest run)", lambda a: _s(a["batch.wait_bound"])),
        ("starvation", "interactive SLO attainment", lambda a: _ci(a["interactive.slo_attainment"], _pct)),
        ("noisy", "victim SLO attainment", lambda a: _ci(a["victim.slo_attainment"], _pct)),
        ("noisy", "victim P50 TTFT", lambda a: _ci(a["victim.ttft_p50"], _ms)),
        ("noisy", "victim P99 TTFT", lambda a: _ci(a["victim.ttft_p99"], _ms)),
        (
            "noisy",
            "noisy tenant rejected / requests",
            lambda a: f"{a['standard.rejected']:.0f} / {a['standard.requests']:.0f}",
        ),
        ("deadlines", "goodput (req/s meeting every target)", lambda a: _ci(a["goodput_req_per_s"], _num2)),
        ("deadlines", "chat (TTFT 0.5 s) SLO attainment", lambda a: _ci(a["chat.slo_attainment"], _pct)),
        ("deadlines", "agent (TTFT 2 s) SLO attainment", lambda a: _ci(a["agent.slo_attainment"], _pct)),
    ]
    lines = ["| scenario | figure | " + " | ".join(policies) + " |", "|---|---|" + "---|" * len(policies)]
    for profile, label, cell in rows:
        if profile in profiles:
            cells = [cell(aggregate(runs, p, profile)) for p in policies]
            lines.append(f"| {profile} | {label} | " + " | ".join(cells) + " |")
    summary = capacity_summary(results)
    if summary is not None:
        cells = [_ci(summary["policies"].get(p, {}).get("capacity"), _num2) for p in policies]
        lines.append("| SLO capacity | × λ_sat (every class ≥ 90 %) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


PROFILE_TITLES = {
    "burst": "burst (0.7 → 1.5 → 0.5 × λ_sat)",
    "starvation": f"starvation: the top class alone at {STARVATION_LOAD} × λ_sat, a trickle of batch",
    "noisy": "noisy neighbour: one tenant at 5× its share of λ_sat beside a victim at 0.2 × λ_sat",
    "deadlines": f"mixed deadlines in one class: chat (TTFT 0.5 s), agent (2 s) at {DEADLINES_LOAD} × λ_sat",
}


def render_markdown(results: dict[str, Any]) -> str:
    """The results tables (one per profile), FCFS and priority next to sla."""
    runs = results["runs"]
    policies = _policies(runs)
    lines: list[str] = []
    for profile in dict.fromkeys(r["profile"] for r in runs):
        lines += [f"### {PROFILE_TITLES.get(profile, f'{profile} λ_sat')}", ""]
        lines.append("| figure | " + " | ".join(policies) + " |")
        lines.append("|---|" + "---|" * len(policies))
        columns = [_cells(aggregate(runs, p, profile)) for p in policies]
        for row in zip(*columns, strict=True):
            lines.append(f"| {row[0][0]} | " + " | ".join(value for _, value in row) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(results: dict[str, Any], out_dir: Path) -> list[Path]:  # pragma: no cover - matplotlib
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    policies = _policies(runs)
    profiles = list(dict.fromkeys(r["profile"] for r in runs))
    paths: list[Path] = []
    figures = [
        ("interactive.ttft_p99", "interactive P99 TTFT (s)", "interactive-ttft-p99.png"),
        ("interactive.slo_attainment", "interactive SLO attainment", "interactive-attainment.png"),
        ("output_tok_per_s", "throughput (output tok/s)", "throughput.png"),
        ("jain", "Jain's index (backlogged tenants)", "jain.png"),
    ]
    levels = sorted({lv for r in runs if (lv := load_level(r["profile"])) is not None})
    if len(levels) >= 2:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        for policy in policies:
            means, errs = [], []
            for level in levels:
                worst = [
                    w
                    for r in runs
                    if r["policy"] == policy
                    and load_level(r["profile"]) == level
                    and (w := min_attainment(r)) is not None
                ]
                ci = mean_ci(worst) if worst else None
                means.append(100 * ci.mean if ci else float("nan"))
                errs.append(100 * ci.half_width if ci and math.isfinite(ci.half_width) else 0.0)
            ax.errorbar(levels, means, yerr=errs, marker="o", capsize=3, label=policy)
        ax.axhline(100 * CAPACITY_ATTAINMENT, color="grey", linestyle="--", linewidth=1)
        ax.set_xlabel("load (× λ_sat)")
        ax.set_ylabel("worst class's SLO attainment (%)")
        ax.set_title("SLO capacity sweep")
        ax.legend()
        fig.tight_layout()
        path = out_dir / "slo-capacity.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    for key, title, name in figures:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        width = 0.8 / len(policies)
        for i, policy in enumerate(policies):
            means, errs = [], []
            for profile in profiles:
                v: Interval | None = aggregate(runs, policy, profile)[key]
                means.append(v.mean if v else 0.0)
                errs.append(v.half_width if v and math.isfinite(v.half_width) else 0.0)
            xs = [j + i * width for j in range(len(profiles))]
            ax.bar(xs, means, width, yerr=errs, label=policy, capsize=3)
        ax.set_xticks([j + width * (len(policies) - 1) / 2 for j in range(len(profiles))], profiles)
        ax.set_title(title)
        ax.legend()
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def write_report(results: dict[str, Any], out: Path) -> str:  # pragma: no cover - matplotlib
    """tables.md (per-profile tables and the targets) and the PNG plots, from scheduler.json."""
    parts = ["### Scenarios\n\n" + scenario_table(results)]
    if (summary := capacity_summary(results)) is not None:
        parts.append("### SLO capacity\n\n" + render_capacity(summary))
    parts += [render_markdown(results), "### Targets\n\n" + render_targets(check_targets(results))]
    tables = "\n".join(parts)
    (out / "tables.md").write_text(tables)
    plot(results, out)
    return tables
