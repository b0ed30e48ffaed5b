"""The statistical tests behind the findings scoreboard (:mod:`taskvec_interp.findings`).

Each one is a plain function of arrays or counts; the randomness is an explicit ``seed`` or a
:class:`numpy.random.Generator`, never a global state.

* :func:`mcnemar_exact`: the exact McNemar test of two paired binary outcomes: a two-sided binomial
  test (p = 1/2) on the discordant pairs.
* :func:`paired_bootstrap`: the percentile bootstrap CI of a difference of means of paired values
  (the pairs are resampled together, optionally within strata such as tasks).
* :func:`bootstrap_difference`: the same for two independent samples (each resampled on its own).
* :func:`bootstrap_statistic`: the percentile bootstrap CI of any statistic of resampled rows.
* :func:`difference_from_cis`: the CI of a difference of two estimates known only by their CIs
  (normal approximation, independent estimates).
* :func:`newcombe_difference`: the CI of a difference of two independent proportions from counts
  (Newcombe's hybrid score interval).
* :func:`verdict`: ``reproduced`` / ``not reproduced`` / ``inconclusive`` from a CI (and p-value)
  against a threshold.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

REPRODUCED = "reproduced"
NOT_REPRODUCED = "not reproduced"
INCONCLUSIVE = "inconclusive"
NOT_RUN = "not run"
VERDICTS: tuple[str, ...] = (REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE, NOT_RUN)
"""Every verdict a finding can get."""
SIDES: tuple[str, ...] = ("greater", "less")


@dataclass(frozen=True)
class McNemarResult:
    """The exact McNemar test: ``b`` pairs where only the first is true, ``c`` where only the second is."""

    b: int
    c: int
    n: int
    """All pairs (concordant included)."""
    p_value: float


@dataclass(frozen=True)
class BootstrapCI:
    """A point estimate with its percentile bootstrap CI (``n``: the units resampled)."""

    estimate: float
    ci_low: float
    ci_high: float
    n: int
    n_boot: int
    ci_level: float


def _rng(seed: int | None, generator: np.random.Generator | None) -> np.random.Generator:
    if generator is not None:
        if not isinstance(generator, np.random.Generator):
            raise TypeError(f"generator must be a numpy.random.Generator, got {type(generator).__name__}")
        return generator
    if seed is None or isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an int >= 0 (or give generator=), got {seed!r}")
    return np.random.default_rng(int(seed))


def _check_boot(n_boot: int, ci_level: float) -> None:
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ValueError(f"n_boot must be an int >= 1, got {n_boot!r}")
    if not 0 < ci_level < 1:
        raise ValueError(f"ci_level must be in (0, 1), got {ci_level!r}")


def binomial_two_sided_p(k: int, n: int) -> float:
    """Exact two-sided p-value of ``k`` successes in ``n`` trials at p = 1/2 (the doubled smaller tail,
    at most 1; the binomial at 1/2 is symmetric, so this equals ``scipy.stats.binomtest(k, n).pvalue``)."""
    if n < 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 1.0
    low = min(k, n - k)
    tail = Fraction(sum(math.comb(n, i) for i in range(low + 1)), 2**n)
    return float(min(Fraction(1), 2 * tail))


def mcnemar_exact(first: Sequence[bool] | np.ndarray, second: Sequence[bool] | np.ndarray) -> McNemarResult:
    """Exact McNemar test of paired binary outcomes (the same queries under two conditions): under the null
    hypothesis each discordant pair is equally likely to go either way, so ``b`` (first right, second wrong)
    is Binomial(b + c, 1/2); the p-value is two-sided (:func:`binomial_two_sided_p`). No discordant pair:
    p = 1."""
    a = np.asarray(first, dtype=bool)
    c_ = np.asarray(second, dtype=bool)
    if a.shape != c_.shape or a.ndim != 1:
        raise ValueError(f"first and second must be 1-d of one length, got shapes {a.shape} and {c_.shape}")
    b, c = int((a & ~c_).sum()), int((~a & c_).sum())
    return McNemarResult(b, c, int(a.size), binomial_two_sided_p(b, b + c))


def _strata_index(strata: Sequence | np.ndarray | None, n: int) -> list[np.ndarray]:
    if strata is None:
        return [np.arange(n)]
    s = np.asarray(strata)
    if s.shape != (n,):
        raise ValueError(f"strata must have one entry per pair ({n}), got shape {s.shape}")
    return [np.nonzero(s == v)[0] for v in dict.fromkeys(s.tolist())]


def resample_indices(n: int, n_boot: int, rng: np.random.Generator,
                     strata: Sequence | np.ndarray | None = None) -> np.ndarray:
    """``[n_boot, n]`` row indices drawn with replacement (within each stratum, keeping its size)."""
    groups = _strata_index(strata, n)
    return np.concatenate([g[rng.integers(0, len(g), size=(n_boot, len(g)))] for g in groups if len(g)], axis=1)


def _quantiles(boot: np.ndarray, ci_level: float) -> tuple[float, float]:
    boot = boot[np.isfinite(boot)]
    if boot.size == 0:
        return math.nan, math.nan
    lo, hi = np.quantile(boot, [(1 - ci_level) / 2, (1 + ci_level) / 2])
    return float(lo), float(hi)


def paired_bootstrap(first: Sequence[float] | np.ndarray, second: Sequence[float] | np.ndarray, *,
                     n_boot: int = 2000, seed: int | None = 0, generator: np.random.Generator | None = None,
                     strata: Sequence | np.ndarray | None = None, ci_level: float = 0.95) -> BootstrapCI:
    """``mean(first) - mean(second)`` with a percentile bootstrap CI, the pairs ``(first[i], second[i])``
    resampled together (within each stratum when ``strata`` is given, e.g. the task of each query). The same
    ``seed`` (or a generator in the same state) gives the same CI."""
    a, b = np.asarray(first, dtype=float), np.asarray(second, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"first and second must be non-empty, 1-d and of one length, got {a.shape} and {b.shape}")
    _check_boot(n_boot, ci_level)
    d = a - b
    idx = resample_indices(d.size, n_boot, _rng(seed, generator), strata)
    lo, hi = _quantiles(d[idx].mean(axis=1), ci_level)
    return BootstrapCI(float(d.mean()), lo, hi, int(d.size), int(n_boot), ci_level)


def bootstrap_difference(first: Sequence[float] | np.ndarray, second: Sequence[float] | np.ndarray, *,
                         n_boot: int = 2000, seed: int | None = 0, generator: np.random.Generator | None = None,
                         strata_first: Sequence | None = None, strata_second: Sequence | None = None,
                         ci_level: float = 0.95) -> BootstrapCI:
    """``mean(first) - mean(second)`` of two independent samples, each resampled on its own (within its
    strata when given); ``n`` is the smaller sample's size."""
    a, b = np.asarray(first, dtype=float), np.asarray(second, dtype=float)
    if a.ndim != 1 or b.ndim != 1 or not a.size or not b.size:
        raise ValueError(f"first and second must be non-empty and 1-d, got {a.shape} and {b.shape}")
    _check_boot(n_boot, ci_level)
    rng = _rng(seed, generator)
    ia = resample_indices(a.size, n_boot, rng, strata_first)
    ib = resample_indices(b.size, n_boot, rng, strata_second)
    lo, hi = _quantiles(a[ia].mean(axis=1) - b[ib].mean(axis=1), ci_level)
    return BootstrapCI(float(a.mean() - b.mean()), lo, hi, int(min(a.size, b.size)), int(n_boot), ci_level)


def bootstrap_statistic(statistic: Callable[[np.ndarray], float], n: int, *, n_boot: int = 2000,
                        seed: int | None = 0, generator: np.random.Generator | None = None,
                        strata: Sequence | np.ndarray | None = None, ci_level: float = 0.95) -> BootstrapCI:
    """Percentile bootstrap CI of ``statistic(rows)``, where ``rows`` is an index array into ``n`` units
    (``statistic(np.arange(n))`` is the estimate). Resamples where the statistic is NaN (undefined, e.g. a
    regression on constant values) are left out of the quantiles."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    _check_boot(n_boot, ci_level)
    idx = resample_indices(n, n_boot, _rng(seed, generator), strata)
    boot = np.array([statistic(row) for row in idx], dtype=float)
    lo, hi = _quantiles(boot, ci_level)
    return BootstrapCI(float(statistic(np.arange(n))), lo, hi, int(n), int(n_boot), ci_level)


def _z(ci_level: float) -> float:
    from scipy.stats import norm

    return float(norm.ppf((1 + ci_level) / 2))


def difference_from_cis(first: tuple[float, float, float], second: tuple[float, float, float], *,
                        ci_level: float = 0.95) -> tuple[float, float, float]:
    """``(estimate, ci_low, ci_high)`` of ``first - second`` from two ``(estimate, ci_low, ci_high)`` triples
    of independent estimates: each standard error read as the CI's half-width over z, combined in quadrature
    (normal approximation; for positively correlated, paired estimates it is conservative)."""
    z = _z(ci_level)
    (e1, l1, h1), (e2, l2, h2) = first, second
    se = math.hypot((h1 - l1) / (2 * z), (h2 - l2) / (2 * z))
    d = e1 - e2
    return d, d - z * se, d + z * se


def _wilson(k: int, n: int, z: float) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def newcombe_difference(k1: int, n1: int, k2: int, n2: int, *, ci_level: float = 0.95) -> tuple[float, float, float]:
    """``(p1 - p2, ci_low, ci_high)`` for two independent proportions ``k1/n1`` and ``k2/n2``: Newcombe's
    hybrid score interval (method 10 of Newcombe 1998, from the two Wilson intervals)."""
    for k, n in ((k1, n1), (k2, n2)):
        if n < 1 or not 0 <= k <= n:
            raise ValueError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}")
    z = _z(ci_level)
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = _wilson(k1, n1, z)
    l2, u2 = _wilson(k2, n2, z)
    d = p1 - p2
    return d, d - math.hypot(p1 - l1, u2 - p2), d + math.hypot(u1 - p1, p2 - l2)


def verdict(ci_low: float, ci_high: float, *, threshold: float = 0.0, side: str = "greater",
            p_value: float | None = None, alpha: float = 0.05) -> str:
    """The verdict of a finding from its statistic's CI, never from the paper's number.

    ``side`` is the side of ``threshold`` the paper's claim is on (``"greater"``: the statistic is above
    it). ``reproduced``: the whole CI is strictly on the paper's side (and ``p_value < alpha`` where a
    p-value is the test); ``not reproduced``: the whole CI is strictly on the other side (and
    ``p_value < alpha``); ``inconclusive`` otherwise: the CI spans or touches the threshold, the test is
    not significant, or the CI is undefined (NaN).
    """
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    lo, hi = float(ci_low), float(ci_high)
    if math.isnan(lo) or math.isnan(hi):
        return INCONCLUSIVE
    if lo > hi:
        raise ValueError(f"ci_low must be <= ci_high, got {lo} > {hi}")
    significant = p_value is None or (not math.isnan(float(p_value)) and float(p_value) < alpha)
    above, below = lo > threshold, hi < threshold
    ours, theirs = (above, below) if side == "greater" else (below, above)
    if ours and significant:
        return REPRODUCED
    if theirs and significant:
        return NOT_REPRODUCED
    return INCONCLUSIVE


__all__ = [
    "INCONCLUSIVE", "NOT_REPRODUCED", "NOT_RUN", "REPRODUCED", "SIDES", "VERDICTS", "BootstrapCI", "McNemarResult",
    "binomial_two_sided_p", "bootstrap_difference", "bootstrap_statistic", "difference_from_cis", "mcnemar_exact",
    "newcombe_difference", "paired_bootstrap", "resample_indices", "verdict",
]
