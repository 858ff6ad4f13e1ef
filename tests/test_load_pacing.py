"""Arrival statistics of the pacers and the rate curve of every load shape."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tokenfleet.load.pacer import Pacer, gap
from tokenfleet.load.shapes import Burst, Constant, Diurnal, Ramp, Steps, Sweep, bounded, saturated

N = 20_000


def gaps_of(times: list[float]) -> np.ndarray:
    return np.diff(np.asarray([0.0, *times]))


def ks_exponential(gaps: np.ndarray, rate: float) -> float:
    """Kolmogorov–Smirnov distance between the gaps and Exp(rate)."""
    x = np.sort(gaps)
    cdf = 1 - np.exp(-rate * x)
    n = len(x)
    return float(max(np.max(np.arange(1, n + 1) / n - cdf), np.max(cdf - np.arange(n) / n)))


def test_poisson_rate_cv_and_distribution() -> None:
    pacer = Pacer(lambda t: 10.0, process="poisson", seed=1)
    times = pacer.arrivals(N)
    gaps = gaps_of(times)
    assert N / times[-1] == pytest.approx(10.0, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)
    # Critical KS distance at alpha=0.01 is 1.63/sqrt(n).
    assert ks_exponential(gaps, 10.0) < 1.63 / math.sqrt(N)


@pytest.mark.parametrize("burstiness", [0.25, 0.5, 4.0])
def test_gamma_cv_matches_burstiness(burstiness: float) -> None:
    pacer = Pacer(lambda t: 5.0, process="gamma", burstiness=burstiness, seed=2)
    times = pacer.arrivals(N)
    gaps = gaps_of(times)
    assert N / times[-1] == pytest.approx(5.0, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.07)


def test_constant_process_is_evenly_spaced() -> None:
    times = Pacer(lambda t: 4.0, process="constant").arrivals(8)
    assert np.allclose(np.diff(times), 0.25)
    with pytest.raises(ValueError, match="positive"):
        gap(np.random.default_rng(), 0.0, "poisson")


def test_rate_split_across_workers_adds_up() -> None:
    workers = 4
    horizon = 2000.0
    merged: list[float] = []
    for w in range(workers):
        pacer = Pacer(lambda t: 8.0 if t < horizon else None, share=1 / workers, seed=100 + w)
        merged += pacer.arrivals(10**6)
    merged.sort()
    assert len(merged) / horizon == pytest.approx(8.0, rel=0.03)
    # The superposition is again Poisson: CV of merged gaps ~ 1.
    gaps = gaps_of(merged)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)


def test_same_seed_same_schedule_and_shape_end_stops() -> None:
    a = Pacer(lambda t: 3.0 if t < 10 else None, seed=7).arrivals(1000)
    b = Pacer(lambda t: 3.0 if t < 10 else None, seed=7).arrivals(1000)
    assert a == b
    assert a[-1] < 10
    assert 15 < len(a) < 50


def test_pacer_follows_time_varying_rate_and_skips_off_phases() -> None:
    shape = Burst(low=0.0, high=20.0, on_s=5, off_s=5)
    times = np.asarray(Pacer(lambda t: bounded(shape, t, 200), seed=3).arrivals(10**6))
    phase = times % 10
    assert np.all(phase < 5 + 1e-9) or np.mean(phase >= 5) < 0.01
    # 20 bursts of 5 s at 20/s
    assert len(times) == pytest.approx(20 * 5 * 20, rel=0.06)

    steps = Steps(((2.0, 100.0), (10.0, 100.0)))
    times = np.asarray(Pacer(steps.level, seed=4).arrivals(10**6))
    first, second = np.sum(times < 100), np.sum(times >= 100)
    assert first / 100 == pytest.approx(2.0, rel=0.2)
    assert second / 100 == pytest.approx(10.0, rel=0.08)


def test_shape_curves() -> None:
    assert Constant(3).level(1e6) == 3
    steps = Steps(((1.0, 10.0), (5.0, 5.0)))
    assert [steps.level(t) for t in (0, 9.9, 10, 14.9, 15)] == [1.0, 1.0, 5.0, 5.0, None]
    ramp = Ramp(start=2, end=12, duration_s=10)
    assert [ramp.level(t) for t in (0, 5, 10, 20)] == [2, 7, 12, 12]
    burst = Burst(low=1, high=9, on_s=2, off_s=3)
    assert [burst.level(t) for t in (0, 1.9, 2, 4.9, 5, 7)] == [9, 9, 1, 1, 9, 1]
    diurnal = Diurnal(mean=10, amplitude=5, period_s=40)
    assert diurnal.level(0) == pytest.approx(10)
    assert diurnal.level(10) == pytest.approx(15)
    assert diurnal.level(30) == pytest.approx(5)
    values = [diurnal.level(t) for t in np.linspace(0, 40, 401)]
    assert np.mean(values) == pytest.approx(10, rel=0.01)
    assert Diurnal(mean=1, amplitude=5, period_s=4).level(3) == 0.0
    sweep = Sweep(rates=(1, 2, 4), step_s=10)
    assert [sweep.level(t) for t in (0, 10, 25, 30)] == [1, 2, 4, None]
    assert sweep.step_index(25) == 2
    assert bounded(Constant(3), 5, 5) is None
    assert bounded(Constant(3), 4.9, 5) == 3
    assert bounded(Constant(3), 1e9, None) == 3


def test_saturation_rule() -> None:
    assert saturated(offered_rate=10, achieved_rate=8, min_ratio=0.9)
    assert not saturated(offered_rate=10, achieved_rate=9.5, min_ratio=0.9)
    assert not saturated(offered_rate=0, achieved_rate=0, min_ratio=0.9)
