"""Exact statistics over raw samples, computed offline (not Locust's bucketed percentiles).

Confidence intervals use Student's t; differences between runs use Welch's t-interval, so two runs
with unequal spread or repeat counts compare correctly. No SciPy: the two-sided 95% t quantiles
are tabulated (they are constants).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# t_{0.975, df} for df = 1..30; beyond 30 the normal 1.96 is within 2%.
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip
PERCENTILES = (50, 90, 99)


def t975(df: float) -> float:
    """Two-sided 95% Student t quantile; fractional df (Welch) rounds down, which is conservative."""
    if df < 1:
        return math.inf
    index = math.floor(df)
    if index <= len(_T975):
        return _T975[index - 1]
    # Interpolate 1/df between df=30 and the normal limit.
    return 1.96 + (_T975[-1] - 1.96) * 30 / df


def describe(values: Sequence[float]) -> dict[str, float | int | None]:
    """count, mean, std, min, max and P50/P90/P99 (linear interpolation, like numpy and vLLM)."""
    if not values:
        empty: dict[str, float | int | None] = {"count": 0}
        return empty | dict.fromkeys(["mean", "std", "min", "max", *(f"p{q}" for q in PERCENTILES)])
    arr = np.asarray(values, dtype=float)
    out: dict[str, float | int | None] = {
        "count": len(arr),
        "mean": float(arr.mean()),
        "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0,
        "min": float(arr.min()),
        "max": float(arr.max()),
    }
    for q, value in zip(PERCENTILES, np.percentile(arr, PERCENTILES), strict=True):
        out[f"p{q}"] = float(value)
    return out


@dataclass(frozen=True, slots=True)
class Interval:
    mean: float
    half_width: float  # 95%; inf with fewer than two samples
    n: int
    std: float

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width


def mean_ci(values: Sequence[float]) -> Interval:
    if not values:
        raise ValueError("no samples")
    arr = np.asarray(values, dtype=float)
    n = len(arr)
    if n < 2:
        return Interval(float(arr[0]), math.inf, 1, 0.0)
    std = float(arr.std(ddof=1))
    return Interval(float(arr.mean()), t975(n - 1) * std / math.sqrt(n), n, std)


@dataclass(frozen=True, slots=True)
class Difference:
    """B − A with its Welch 95% interval; significant when the interval excludes zero."""

    delta: float
    half_width: float
    relative: float | None  # delta / mean(A)

    @property
    def significant(self) -> bool:
        return math.isfinite(self.half_width) and abs(self.delta) > self.half_width


def welch(a: Interval, b: Interval) -> Difference:
    delta = b.mean - a.mean
    relative = delta / a.mean if a.mean else None
    if a.n < 2 or b.n < 2:
        return Difference(delta, math.inf, relative)
    va, vb = a.std**2 / a.n, b.std**2 / b.n
    se = math.sqrt(va + vb)
    if se == 0:
        return Difference(delta, 0.0, relative)
    df = (va + vb) ** 2 / ((va**2) / (a.n - 1) + (vb**2) / (b.n - 1))
    return Difference(delta, t975(df) * se, relative)
