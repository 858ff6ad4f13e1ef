"""PNG plots of a run: latency CDFs and one timeline (client and server on the same time axis).

Binning (`per_second`) is pure and tested; the drawing uses matplotlib's Agg backend so it works
on machines without a display.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tokenfleet.load.record import RequestRecord
from tokenfleet.load.scrape import KV_CACHE, PREEMPTIONS, QUEUE, RUNNING, first_of


def per_second(
    times: Sequence[float], origin: float, horizon_s: float, weights: Sequence[float] | None = None
) -> np.ndarray:
    """Events (optionally weighted, e.g. tokens) per 1-second bin over [origin, origin + horizon)."""
    bins = max(1, int(np.ceil(horizon_s)))
    counts, _ = np.histogram(np.asarray(times) - origin, bins=bins, range=(0, bins), weights=weights)
    return counts.astype(float)


def ecdf(values: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    x = np.sort(np.asarray(values, dtype=float))
    return x, np.arange(1, len(x) + 1) / max(1, len(x))


def _pyplot() -> Any:
    # Imported late: matplotlib is slow to import and only the report needs it.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_cdfs(records: Sequence[RequestRecord], path: Path) -> Path:
    plt = _pyplot()
    ok = [r for r in records if r.ok]
    series = {
        "TTFT": [r.ttft_s for r in ok if r.ttft_s is not None],
        "TPOT": [t for r in ok if (t := r.tpot_s) is not None],
        "ITL (chunk gaps)": [g for r in ok for g in r.itl_s],
        "E2E": [r.e2e_s for r in ok if r.e2e_s is not None],
    }
    classes = sorted({r.cls for r in ok})
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for ax, (name, _) in zip(axes.flat, series.items(), strict=True):
        for cls in classes:
            subset = [r for r in ok if r.cls == cls]
            values = {
                "TTFT": [r.ttft_s for r in subset if r.ttft_s is not None],
                "TPOT": [t for r in subset if (t := r.tpot_s) is not None],
                "ITL (chunk gaps)": [g for r in subset for g in r.itl_s],
                "E2E": [r.e2e_s for r in subset if r.e2e_s is not None],
            }[name]
            if values:
                x, y = ecdf([v * 1000 for v in values])
                ax.step(x, y, where="post", label=cls)
        ax.set_title(f"{name} CDF")
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction ≤ x")
        ax.grid(alpha=0.3)
        if classes:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_timeline(
    records: Sequence[RequestRecord],
    server: Sequence[tuple[float, dict[str, float]]],
    origin: float,
    horizon_s: float,
    path: Path,
    *,
    level: Callable[[float], float | None] | None = None,
    level_label: str = "offered rate (req/s)",
) -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(5, 1, figsize=(11, 13), sharex=True)
    ok = [r for r in records if r.ok]
    seconds = np.arange(max(1, int(np.ceil(horizon_s)))) + 0.5

    ax = axes[0]
    ttft = [(r.send - origin, r.ttft_s * 1000) for r in ok if r.ttft_s is not None]
    if ttft:
        ax.scatter(*zip(*ttft, strict=True), s=6, alpha=0.5, label="TTFT per request (at send)")
    failed = [r.send - origin for r in records if not r.ok]
    if failed:
        ax.scatter(failed, [0] * len(failed), marker="x", color="red", label="failed")
    ax.set_ylabel("TTFT (ms)")
    ax.legend(fontsize=8)

    ax = axes[1]
    ends = [r.end for r in ok if r.end is not None]
    ax.plot(seconds, per_second(ends, origin, horizon_s), label="completed req/s")
    ax2 = ax.twinx()
    tokens = [float(r.output_tokens or 0) for r in ok if r.end is not None]
    ax2.plot(seconds, per_second(ends, origin, horizon_s, tokens), color="tab:green", label="output tok/s")
    ax.set_ylabel("req/s")
    ax2.set_ylabel("tok/s")
    ax.legend(loc="upper left", fontsize=8)
    ax2.legend(loc="upper right", fontsize=8)

    ax = axes[2]
    ax.plot(seconds, per_second([r.send for r in records], origin, horizon_s), label="sent req/s")
    if level is not None:
        grid = np.linspace(0, horizon_s, 400)
        values = [level(float(t)) for t in grid]
        ax.plot(grid, [np.nan if v is None else v for v in values], "--", label=level_label)
    ax.set_ylabel("arrivals")
    ax.legend(fontsize=8)

    times = [t - origin for t, _ in server]
    ax = axes[3]
    for names, label in ((QUEUE, "waiting"), (RUNNING, "running")):
        ax.plot(times, [first_of(s, names) or 0.0 for _, s in server], label=f"server {label}")
    ax.set_ylabel("requests")
    ax.legend(fontsize=8)

    ax = axes[4]
    ax.plot(times, [100 * (first_of(s, KV_CACHE) or 0.0) for _, s in server], label="KV cache use %")
    ax.set_ylabel("KV cache %")
    preempt = [first_of(s, PREEMPTIONS) or 0.0 for _, s in server]
    if preempt:
        ax3 = ax.twinx()
        ax3.plot(times, np.asarray(preempt) - preempt[0], color="tab:red", label="preemptions (cumulative)")
        ax3.set_ylabel("preemptions")
        ax3.legend(loc="upper right", fontsize=8)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_xlabel("seconds since start")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
