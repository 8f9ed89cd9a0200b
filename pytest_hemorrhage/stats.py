"""The statistics every verdict rests on, in one place: quantiles, calibrated standard errors
and the one-sided bounds a budget compares.

Used by the measures (``metrics``, ``embeddings``, ``extras``), the budgets (``budget``), early
stopping (``early_stop``), the fits (``explore.fit``) and every renderer of a verdict (through
``report.describe``). Nothing here imports torch: functions that take tensors only call their
methods (and import torch where they build one).

Standard errors are calibrated for one-sided bounds at a ``level``: ``value +- z * se``, ``z``
the standard normal quantile of ``level`` (:func:`normal_quantile`), is the studentized bound
``value +- t * s`` with ``s`` the plain cluster-robust standard error and ``t`` the quantile of
:func:`studentized_quantile`. Every bound is therefore ``value +- normal_quantile(level) * se``
(:func:`upper_bound`, :func:`lower_bound`).
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEFAULT_LEVEL",
    "cluster_mean",
    "lower_bound",
    "mean_se",
    "normal_quantile",
    "quantile_se",
    "sample_quantile",
    "student_t_quantile",
    "studentized_quantile",
    "upper_bound",
]

# The one-sided level of standard errors when no budget asks for another confidence.
DEFAULT_LEVEL = 0.95
# The standard normal quantile of DEFAULT_LEVEL, to the last bit (NormalDist's is 3 ulps short).
_Z_DEFAULT = 1.6448536269514722


def normal_quantile(level: float) -> float:
    """The standard normal quantile of ``level``."""
    return _Z_DEFAULT if level == DEFAULT_LEVEL else NormalDist().inv_cdf(level)


def upper_bound(value: float, stderr: float | None, confidence: float | None) -> float:
    """What a budget compares with its maximum: ``value`` itself without ``confidence``, else
    its one-sided upper bound ``value + z * stderr`` at ``confidence`` (z its normal quantile),
    infinite when there is no standard error to bound it with; a non-finite ``value`` is its
    own bound.

    Exact when ``stderr`` is calibrated at ``confidence`` (a measure made for the budget's
    confidence is); a standard error calibrated at another level is scaled linearly, which runs
    short at higher levels (0.95 scaled to 0.99; benchmarks/bench_coverage.py --level 0.99)."""
    if confidence is None or not math.isfinite(value):
        return value
    if stderr is None:
        return math.inf
    return value + normal_quantile(confidence) * stderr


def lower_bound(value: float, stderr: float | None, confidence: float) -> float:
    """The one-sided lower bound ``value - z * stderr`` at ``confidence`` (minus infinity
    without a standard error); the mirror image of :func:`upper_bound`."""
    if stderr is None:
        return -math.inf
    return value - normal_quantile(confidence) * stderr


def mean_se(
    x: torch.Tensor, unit: torch.Tensor | None = None, level: float = DEFAULT_LEVEL
) -> tuple[float, float | None]:
    """Mean of ``x`` and its standard error, with ``unit`` (one label per value, e.g. the
    window of each token) naming the independent draws; None: every value is one.

    Cluster-robust: the mean over values is a ratio estimator sum(Y_u) / sum(N_u) over the
    units' totals, whose variance is G / (G - 1) * sum((Y_u - mean * N_u)^2) / N^2 for G
    units (Cochran 1977, 6.9; the CR1 sandwich). The SE is None with fewer than 2 units.

    The SE returned is calibrated for one-sided bounds at ``level`` (95% unless told):
    ``mean +- z * se``, z the normal quantile of ``level``, is ``mean +- t * s`` with ``s`` the
    CR1 standard error and ``t`` the studentized mean's quantile corrected for the units'
    skewness and kurtosis (see :func:`studentized_quantile`), so that the bounds hold their
    level with tens of units. A measure for a budget with ``confidence`` asks for that level
    (``Result.level``), early stopping for each look's.
    """
    mean, se, t = cluster_mean(x, unit, level)
    return mean, None if se is None else se * t / normal_quantile(level)


def cluster_mean(
    x: torch.Tensor, unit: torch.Tensor | None, level: float = DEFAULT_LEVEL
) -> tuple[float, float | None, float]:
    """(mean, CR1 standard error, calibrated one-sided ``level`` quantile) of ``x`` over
    ``unit`` (see :func:`mean_se`); the standard error is None with fewer than 2 units."""
    import torch

    x = x.double().reshape(-1)
    n = x.numel()
    mean = x.mean().item() if n else math.nan
    if unit is None:
        groups, totals = n, x - mean
    else:
        labels = unit.reshape(-1).unique(return_inverse=True)[1]
        groups = int(labels.max()) + 1 if n else 0
        totals = torch.zeros(groups, dtype=torch.float64).index_add_(0, labels, x - mean)
    if groups < 2:
        return mean, None, normal_quantile(level)
    square = (totals**2).sum().item()
    return (
        mean,
        math.sqrt(groups / (groups - 1) * square) / n,
        studentized_quantile(totals, groups, level),
    )


def studentized_quantile(totals: torch.Tensor, groups: int, level: float = DEFAULT_LEVEL) -> float:
    """The one-sided ``level`` quantile (95% unless told) of a studentized mean of ``groups``
    units whose centred totals (influence values) are ``totals``, in place of the normal one.

    Window totals are skewed (0.3-0.6 for kl_mean, -0.5 for top1_disagreement) and
    heavy-tailed (kurtosis 3-4.5). The quantile is the studentized mean's Cornish-Fisher
    expansion to second order (Hall 1992, 2.6), with the skewness and excess kurtosis
    estimated by their bias-adjusted sample values G1 and G2 (Joanes & Gill 1998):

    * Student's t with the degrees of freedom of a variance estimate under kurtosis
      (2 G / (G2 + 2), Satterthwaite's moment match, at most G - 1), which widens more than
      the expansion's own kurtosis term at every level;
    * Hall's skewness term |G1| (2 z^2 + 1) / (6 sqrt(G)) and its second-order companion
      (5/72) z G1^2 (4 z^2 - 1) / G;
    * a plug-in term z (2 z^2 + 1) / 6 * (G2 - 1.5 G1^2) / G: the sample skewness moves with
      the sample mean (their covariance per unit is the excess kurtosis less 1.5 skewness^2),
      so on the samples whose mean falls short, those a bound must still cover, the
      skewness term falls short with it. Only added when positive: at a few units the
      estimate's sign is noise, and it never narrows the bound.

    Each is a derived term, not a tuned factor. The skew terms are taken by magnitude: they
    widen the bound on the side the skew shortens, and the same SE also serves lower bounds
    (early stopping), whose correction is the mirror image; so both one-sided bounds hold.
    Their coverage, at 95% on 64 windows and at early stopping's first look (level 0.983 on 8
    windows), resampled from the bundled model per modification: benchmarks/bench_coverage.py.
    """
    m2 = (totals**2).mean().item()
    z = normal_quantile(level)
    if m2 <= 0:
        return z
    skew = (totals**3).mean().item() / m2**1.5
    excess = (totals**4).mean().item() / m2**2 - 3
    g = groups
    if g > 3:  # the adjustments for the sample moments' bias need 4 units
        skew *= math.sqrt(g * (g - 1)) / (g - 2)
        excess = ((g + 1) * excess + 6) * (g - 1) / ((g - 2) * (g - 3))
    dof = min(g - 1, 2 * g / max(excess + 2, 1e-12))
    a = (2 * z * z + 1) / 6
    second = 5 / 72 * skew * skew * (4 * z * z - 1) + a * max(excess - 1.5 * skew * skew, 0)
    return student_t_quantile(level, dof) + abs(skew) * a / math.sqrt(g) + z * second / g


def student_t_quantile(level: float, dof: float) -> float:
    """Student's t quantile ``level`` (> 0.5) at real ``dof`` >= 1: Hill's algorithm (1970,
    CACM 396). At levels 0.84-0.9999 it is within 4e-4 (relative) of the exact value from 2
    degrees of freedom, exact at 1 and 2, and up to 5% above it in between."""
    n = max(float(dof), 1.0)
    p = 2 * (1 - level)  # the two-tailed area
    if n == 1:
        return 1 / math.tan(p * math.pi / 2)
    if n == 2:
        return math.sqrt(2 / (p * (2 - p)) - 2)
    a = 1 / (n - 0.5)
    b = 48 / a**2
    c = ((20700 * a / b - 98) * a - 16) * a + 96.36
    d = ((94.5 / (b + c) - 3) / b + 1) * math.sqrt(a * math.pi / 2) * n
    y = (d * p) ** (2 / n)
    if y > 0.05 + a:  # the normal-based expansion
        x = -normal_quantile(1 - p / 2)  # the lower tail's deviate
        y = x * x
        if n < 5:
            c += 0.3 * (n - 4.5) * (x + 0.6)
        c = (((0.05 * d * x - 5) * x - 7) * x - 2) * x + b + c
        y = a * ((((((0.4 * y + 6.3) * y + 36) * y + 94.5) / c - y - 3) / b + 1) * x) ** 2
        y = math.expm1(y) if y > 0.002 else 0.5 * y * y + y
    else:  # far tail at few degrees of freedom
        y = (
            (1 / (((n + 6) / (n * y) - 0.089 * d - 0.822) * (n + 2) * 3) + 0.5 / (n + 4)) * y - 1
        ) * (n + 1) / (n + 2) + 1 / y
    return math.sqrt(n * y)


def quantile_se(
    x: torch.Tensor, q: float, unit: torch.Tensor | None = None, level: float = DEFAULT_LEVEL
) -> tuple[float, float | None]:
    """Quantile ``q`` of ``x`` and a standard error calibrated for its one-sided upper bound
    at ``level`` (95% unless told).

    Woodruff (1952): the sample CDF at the quantile is a mean of indicators, with a
    cluster-robust SE ``s_F`` and calibrated quantile ``t`` (see :func:`mean_se`); the upper
    bound is the sample quantile at ``q + t * s_F``, and the SE returned is its distance from
    the quantile over z (the normal quantile of ``level``), so that ``value + z * se`` is that
    bound exactly. Infinite when the bound lies beyond the largest value (too few tokens).
    """
    x = x.double().reshape(-1)
    if x.numel() == 0:
        return math.nan, None
    ordered = x.sort().values  # one sort for both quantiles
    value = sample_quantile(ordered, q)
    _, s_f, t = cluster_mean((x <= value).double(), unit, level)
    if s_f is None:
        return value, None
    top = q + t * s_f
    if top > 1:
        return value, math.inf
    return value, (sample_quantile(ordered, top) - value) / normal_quantile(level)


def sample_quantile(ordered: torch.Tensor, q: float) -> float:
    """Quantile ``q`` of sorted values, interpolated linearly (``torch.quantile``'s default)."""
    position = q * (len(ordered) - 1)
    below = min(int(position), len(ordered) - 1)
    above = min(below + 1, len(ordered) - 1)
    low, high = ordered[below].item(), ordered[above].item()
    return low + (high - low) * (position - below)
