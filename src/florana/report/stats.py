"""Statistics over seeds as small pure functions: Student-t intervals, a paired bootstrap, paired differences with
wins/ties/losses, and the first round a target is reached. No SciPy: the t distribution of integer degrees of
freedom has a closed form (Abramowitz & Stegun 26.7.3–4), which is all that seeds ever give."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95
TIE = 0.005  # |difference| below this is a tie (half a point of accuracy)
RESAMPLES = 10_000
BOOTSTRAP_SEED = 0


def t_within(t: float, df: int) -> float:
    """P(|T| ≤ t) for Student's T with `df` (a positive integer) degrees of freedom, in closed form."""
    if df < 1 or int(df) != df:
        raise ValueError(f"degrees of freedom must be a positive integer, got {df}")
    theta = math.atan(abs(t) / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    if df % 2 == 0:  # sinθ·(1 + ½cos²θ + (1·3)/(2·4)cos⁴θ + … up to cos^(df−2)θ)
        term, total = 1.0, 1.0
        for j in range(1, df // 2):
            term *= c2 * (2 * j - 1) / (2 * j)
            total += term
        return math.sin(theta) * total
    # odd: (2/π)·(θ + sinθ·(cosθ + ⅔cos³θ + … up to cos^(df−2)θ))
    term, total = math.cos(theta), 0.0
    for j in range(1, (df - 1) // 2 + 1):
        total += term
        term *= c2 * (2 * j) / (2 * j + 1)
    return 2 / math.pi * (theta + math.sin(theta) * total) if df > 1 else 2 * theta / math.pi


def t_quantile(confidence: float, df: int) -> float:
    """The t with P(|T| ≤ t) = confidence (the two-sided critical value: 12.706 for df=1 at 0.95), by bisection."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    low, high = 0.0, 1.0
    while t_within(high, df) < confidence:
        low, high = high, high * 2
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if t_within(mid, df) < confidence else (low, mid)
        if high - low < 1e-12 * max(1.0, high):
            break
    return (low + high) / 2


@dataclass(frozen=True)
class Estimate:
    """A mean over n values with its sample standard deviation and two-sided t interval (None where n is too small:
    no std or interval for n=1, nothing for n=0)."""

    n: int
    mean: float | None
    std: float | None
    low: float | None
    high: float | None


def mean_ci(values: list[float], confidence: float = CONFIDENCE) -> Estimate:
    """Mean, sample std (ddof=1) and the Student-t interval mean ± t_{n−1}·std/√n of `values`."""
    x = np.asarray(values, dtype=float)
    n = len(x)
    if n == 0:
        return Estimate(0, None, None, None, None)
    mean = float(x.mean())
    if n == 1:
        return Estimate(1, mean, None, None, None)
    std = float(x.std(ddof=1))
    half = t_quantile(confidence, n - 1) * std / math.sqrt(n)
    return Estimate(n, mean, std, mean - half, mean + half)


def bootstrap_ci(values: list[float], confidence: float = CONFIDENCE, resamples: int = RESAMPLES,
                 seed: int = BOOTSTRAP_SEED) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean: `resamples` resamples with replacement, a fixed seed (so a
    report is reproducible). None for fewer than 2 values. With few values it is too narrow (3 values have 10
    distinct resamples): read the t interval there."""
    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return None
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(resamples, len(x)))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


@dataclass(frozen=True)
class Paired:
    """A method against a baseline on the same seeds: the mean difference (method − baseline) with its paired-t
    interval and p-value, its paired-bootstrap interval, and wins/ties/losses (|difference| < tie is a tie)."""

    n: int
    diff: Estimate
    p_value: float | None
    bootstrap: tuple[float, float] | None
    wins: int
    ties: int
    losses: int


def paired_diff(values: list[float], baseline: list[float], tie: float = TIE,
                confidence: float = CONFIDENCE) -> Paired:
    """Paired comparison of values[i] with baseline[i] (the same seed and partition): differences value − baseline.
    Where every pair differs by the same amount (to rounding) there is no spread to judge it by: no interval and no
    p-value (a t test would call two equal differences certain), save p = 1 when they are all zero (to rounding)."""
    if len(values) != len(baseline):
        raise ValueError(f"paired values need equal lengths, got {len(values)} and {len(baseline)}")
    d = np.asarray(values, dtype=float) - np.asarray(baseline, dtype=float)
    est, boot, p = mean_ci(d.tolist(), confidence), None, None
    if est.n > 1 and est.std <= 1e-12 * max(1.0, abs(est.mean)):
        est, p = Estimate(est.n, est.mean, 0.0, None, None), 1.0 if abs(est.mean) <= 1e-12 else None
    elif est.n > 1:
        p = 1 - t_within(est.mean / (est.std / math.sqrt(est.n)), est.n - 1)
        boot = bootstrap_ci(d.tolist(), confidence)
    return Paired(len(d), est, p, boot, int((d >= tie).sum()), int((np.abs(d) < tie).sum()), int((d <= -tie).sum()))


def first_reached(values: list[float | None], target: float) -> int | None:
    """The index of the first value ≥ target (None values never reach it), or None when none does."""
    for i, v in enumerate(values):
        if v is not None and v >= target:
            return i
    return None


def median_reached(values: list[float | None]) -> float | None:
    """Median of a cost over seeds where None means "never reached" (an infinite cost): finite, and returned,
    only when more than half of the seeds reached it; None otherwise."""
    if not values:
        return None
    m = float(np.median([math.inf if v is None else v for v in values]))
    return None if math.isinf(m) or math.isnan(m) else m
