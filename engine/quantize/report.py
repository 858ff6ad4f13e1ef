"""The side-by-side table, the recommendation, plots and the markdown report.

`rows_from` and `recommend` are pure: the recommendation follows from the measured rows and the
user's constraint (largest acceptable recovery loss, then smallest or fastest), so the same
numbers always give the same advice, and the report states the rule it applied.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tokenfleet.engine.quantize.config import ConstraintConfig
from tokenfleet.engine.quantize.techniques import TECHNIQUES

BASELINE = "baseline"


@dataclass(frozen=True, slots=True)
class Row:
    name: str
    method: str
    scheme: str
    weights_mb: float
    ppl: float
    recovery: float
    output_tok_per_s: float | None
    ttft_ms: float | None
    tpot_ms: float | None
    quantize_s: float | None


@dataclass(frozen=True, slots=True)
class Recommendation:
    choice: str  # a technique name, or BASELINE when none meets the constraint
    reason: str


def rows_from(
    evaluations: Mapping[str, Mapping[str, Any]], quantized: Mapping[str, Mapping[str, Any]]
) -> list[Row]:
    """One row per evaluated model, the baseline first; recovery = baseline ppl / model ppl."""
    base_ppl = float(evaluations[BASELINE]["ppl"])
    rows = []
    for name, result in evaluations.items():
        technique = TECHNIQUES.get(name)
        rows.append(
            Row(
                name=name,
                method=technique.method if technique else "-",
                scheme=technique.scheme if technique else "unquantized",
                weights_mb=float(result["weights_mb"]),
                ppl=float(result["ppl"]),
                recovery=base_ppl / float(result["ppl"]),
                output_tok_per_s=result.get("output_tok_per_s"),
                ttft_ms=result.get("ttft_ms"),
                tpot_ms=result.get("tpot_ms"),
                quantize_s=(quantized.get(name) or {}).get("quantize_s"),
            )
        )
    rows.sort(
        key=lambda r: (r.name != BASELINE, list(TECHNIQUES).index(r.name) if r.name in TECHNIQUES else 0)
    )
    return rows


def recommend(rows: Sequence[Row], constraint: ConstraintConfig) -> Recommendation:
    """Among quantized rows within the recovery loss, the smallest (or fastest); ties by recovery."""
    floor = 1.0 - constraint.max_recovery_loss
    eligible = [r for r in rows if r.name != BASELINE and r.recovery >= floor]
    rule = f"recovery ≥ {floor:.1%} (maxRecoveryLoss {constraint.max_recovery_loss:g})"
    if not eligible:
        best = max((r for r in rows if r.name != BASELINE), key=lambda r: r.recovery, default=None)
        closest = f"; the closest is {best.name} at {best.recovery:.2%}" if best else ""
        return Recommendation(BASELINE, f"no technique meets {rule}{closest}: serve the unquantized model")
    if constraint.optimize == "throughput" and all(r.output_tok_per_s is not None for r in eligible):
        choice = max(eligible, key=lambda r: (r.output_tok_per_s or 0.0, r.recovery))
        why = f"the highest throughput ({choice.output_tok_per_s:.1f} tok/s)"
    else:
        choice = min(eligible, key=lambda r: (r.weights_mb, -r.recovery))
        why = f"the smallest weights ({choice.weights_mb:.2f} MB)"
    others = ", ".join(r.name for r in eligible if r is not choice) or "none"
    return Recommendation(
        choice.name,
        f"{choice.name}: among techniques with {rule} it has {why} at {choice.recovery:.2%} recovery "
        f"(also eligible: {others})",
    )


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def table(rows: Sequence[Row]) -> str:
    lines = [
        "| technique | method | scheme | weights MB | ppl | recovery | out tok/s | TTFT ms | TPOT ms |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.name} | {r.method} | {r.scheme} | {r.weights_mb:.2f} | {r.ppl:.2f} | {r.recovery:.2%} "
            f"| {_fmt(r.output_tok_per_s, '.1f')} | {_fmt(r.ttft_ms, '.1f')} "
            f"| {_fmt(r.tpot_ms, '.2f')} |"
        )
    return "\n".join(lines)


def plot(rows: Sequence[Row], out_dir: Path, stem: str) -> list[str]:
    """perplexity vs size and throughput vs recovery; returns the PNG file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.scatter(r.weights_mb, r.ppl, marker="*" if r.name == BASELINE else "o")
        ax.annotate(r.name, (r.weights_mb, r.ppl), fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("weights on disk (MB)")
    ax.set_ylabel("perplexity (held-out split, lower is better)")
    ax.set_title("Perplexity vs size")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    names.append(f"{stem}-ppl-vs-size.png")
    fig.savefig(out_dir / names[-1], dpi=110)
    plt.close(fig)

    measured = [(r, r.output_tok_per_s) for r in rows if r.output_tok_per_s is not None]
    if measured:
        fig, ax = plt.subplots(figsize=(6, 4))
        for r, tok_s in measured:
            ax.scatter(r.recovery * 100, tok_s, marker="*" if r.name == BASELINE else "o")
            ax.annotate(
                r.name,
                (r.recovery * 100, tok_s),
                fontsize=8,
                xytext=(4, 4),
                textcoords="offset points",
            )
        ax.set_xlabel("recovery (% of baseline perplexity)")
        ax.set_ylabel("output tokens/s (fixed closed-loop workload)")
        ax.set_title("Throughput vs recovery")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        names.append(f"{stem}-throughput-vs-recovery.png")
        fig.savefig(out_dir / names[-1], dpi=110)
        plt.close(fig)
    return names


def write_report(
    path: Path,
    rows: Sequence[Row],
    recommendation: Recommendation,
    raw: Mapping[str, Any],
    *,
    notes: Sequence[str] = (),
    extra: Sequence[str] = (),
) -> list[Path]:
    """report markdown at `path`, plots and raw JSON beside it; returns the files written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    stem = path.stem
    plots = plot(rows, path.parent, stem)
    raw_path = path.with_suffix(".json")
    raw_path.write_text(json.dumps({**raw, "rows": [asdict(r) for r in rows]}, indent=2, default=str) + "\n")
    parts = [
        "# Quantization results\n",
        *[f"{note}\n" for note in notes],
        "## Side by side\n",
        table(rows) + "\n",
        "Weights MB: the safetensors files on disk. Recovery: baseline perplexity / perplexity. "
        "out tok/s: output tokens per second the load harness received over the measured window. "
        "TTFT / TPOT: means of vLLM's own per-request histograms (`/metrics`) over that window.\n",
        f"**Recommendation:** {recommendation.reason}.\n",
        *extra,
        "## Plots\n",
        *[f"![{name}]({name})\n" for name in plots],
        f"Raw results: [{raw_path.name}]({raw_path.name}).\n",
    ]
    path.write_text("\n".join(parts))
    return [path, raw_path, *(path.parent / name for name in plots)]
