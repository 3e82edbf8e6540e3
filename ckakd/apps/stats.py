"""The statistics of ``ckakd report``: mean ± sample std and Welch's unequal-variance t-test (two-sided), in pure
Python (no scipy needed; it agrees with ``scipy.stats.ttest_ind(a, b, equal_var=False)``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["WelchResult", "mean_std", "significance", "welch_t_test"]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for one value) of ``values`` (at least one)."""
    if not values:
        raise ValueError("mean_std: no values")
    m = sum(values) / len(values)
    var = sum((v - m) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return m, math.sqrt(var)


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
            last = d * c
        if abs(last - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    ln = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(ln) * _betacf(a, b, x) / a
    return 1.0 - math.exp(ln) * _betacf(b, a, 1.0 - x) / b


@dataclass(frozen=True)
class WelchResult:
    """Welch's unequal-variance t-test of ``mean(a) - mean(b)``: statistic, Welch–Satterthwaite degrees of
    freedom, two-sided p-value (NaN when it is undefined: fewer than 2 values in a sample, or no spread at all
    with equal means)."""

    t: float
    df: float
    p: float


def welch_t_test(a: Sequence[float], b: Sequence[float]) -> WelchResult:
    """Welch's t-test of two independent samples (two-sided), as ``scipy.stats.ttest_ind(a, b, equal_var=False)``
    computes it; pure Python. Both samples without spread: ``t = ±inf, p = 0`` when the means differ."""
    na, nb = len(a), len(b)
    if na < 2 or nb < 2:
        return WelchResult(math.nan, math.nan, math.nan)
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    va, vb = sa * sa / na, sb * sb / nb
    if va + vb == 0.0:
        if ma == mb:
            return WelchResult(math.nan, math.nan, math.nan)
        return WelchResult(math.copysign(math.inf, ma - mb), float(na + nb - 2), 0.0)
    t = (ma - mb) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va * va / (na - 1) + vb * vb / (nb - 1))
    p = _betainc(df / 2.0, 0.5, df / (df + t * t))
    return WelchResult(t, df, min(1.0, max(0.0, p)))


def significance(p: float) -> str:
    """``***`` p < 0.001, ``**`` p < 0.01, ``*`` p < 0.05, else ``""``."""
    if math.isnan(p):
        return ""
    return "***" if p < 0.001 else "**" if p < 0.01 else "*" if p < 0.05 else ""
