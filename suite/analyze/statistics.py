"""The tests and intervals ``suite.compare`` makes its verdicts with, written out (no SciPy):
Newcombe's interval for a difference of proportions, Student's and Welch's t, Holm's adjustment,
and the smallest p-value a few seeds can give at all."""

from __future__ import annotations

import math

from suite.analyze.summary import wilson_interval


def newcombe_interval(
    successes_a: int, n_a: int, successes_b: int, n_b: int, z: float = 1.96
) -> tuple[float, float]:
    """Newcombe's hybrid score interval of p_a − p_b (Newcombe 1998, "Interval estimation for the
    difference between independent proportions", method 10), built from the two Wilson intervals:
    it stays in [−1, 1] and is not degenerate at 0 % or 100 %, unlike the Wald interval."""
    p_a, p_b = successes_a / n_a, successes_b / n_b
    low_a, high_a = wilson_interval(successes_a, n_a, z)
    low_b, high_b = wilson_interval(successes_b, n_b, z)
    difference = p_a - p_b
    return (
        difference - math.sqrt((p_a - low_a) ** 2 + (high_b - p_b) ** 2),
        difference + math.sqrt((high_a - p_a) ** 2 + (p_b - low_b) ** 2),
    )


def newcombe_p_value(successes_a: int, n_a: int, successes_b: int, n_b: int) -> float:
    """The two-sided p-value that inverts Newcombe's interval: the α at which a bound reaches 0."""
    if successes_a * n_b == successes_b * n_a:
        return 1.0
    excludes, includes = 0.0, 40.0  # z at which the interval excludes zero / includes it
    for _ in range(60):
        z = (excludes + includes) / 2
        lo, hi = newcombe_interval(successes_a, n_a, successes_b, n_b, z)
        excludes, includes = (z, includes) if lo > 0 or hi < 0 else (excludes, z)
    return math.erfc(excludes / math.sqrt(2))


def _incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), by its continued fraction (modified
    Lentz; converges fast for x < (a + 1) / (a + b + 2), the other side by symmetry)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    if x > (a + 1) / (a + b + 2):
        return 1.0 - _incomplete_beta(b, a, 1.0 - x)
    log_front = a * math.log(x) + b * math.log1p(-x) - math.log(a)
    log_front -= math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 500):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return math.exp(log_front) * result


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| ≥ |t|) for Student's t with ``df`` degrees of freedom."""
    return _incomplete_beta(df / 2, 0.5, df / (df + t * t))


def t_critical(df: float, alpha: float = 0.05) -> float:
    """The t with P(|T| ≥ t) = alpha."""
    low, high = 0.0, 1e6
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if t_two_sided_p(middle, df) > alpha else (low, middle)
    return high


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (Holm 1979): valid whatever the dependence between the
    tests; NaN stays NaN and is not counted as a test."""
    present = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    adjusted = [math.nan] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(present):
        running = max(running, min(1.0, (len(present) - rank) * p))
        adjusted[i] = running
    return adjusted


def smallest_p(n_a: int, n_b: int | None = None) -> float:
    """The smallest two-sided p-value n seeds can give whatever the data: a sign test's 2·½ⁿ for
    n paired seeds, a permutation test's 2 / C(n_a + n_b, n_a) for two independent sets. A t-test
    on two seeds that happen to agree would say p ≈ 0; this floor says what they can show."""
    if n_b is None:
        return min(1.0, 2 * 0.5**n_a)
    return min(1.0, 2 / math.comb(n_a + n_b, n_a))
