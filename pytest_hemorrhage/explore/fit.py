"""Where does a model break? Bisection for a budget threshold and a phase-transition fit.

Two pure-math tools, independent of any model code (numpy only, no torch):

* :func:`bisect_threshold` finds the gentlest compression setting (sparsity, bits, layers
  dropped, ...) that breaks a degradation budget, with as few model evaluations as possible.
* :func:`fit_phase_transition` fits the piecewise law of Ma et al. 2025, "Model Hemorrhage and
  the Robustness Limits of LLMs": damage grows as a power law up to a critical compression
  ``s0`` (the phase-transition point) and exponentially beyond it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..metrics import jsonable
from ..stats import student_t_quantile

__all__ = [
    "PhaseTransition",
    "Threshold",
    "bisect_threshold",
    "fit_phase_transition",
    "monotonicity",
]


# --------------------------------------------------------------------------------------------
# Bisection
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Threshold:
    """Result of :func:`bisect_threshold`.

    Args:
        value: Estimated breaking point: the harsh edge of the final bracket (the gentlest
            setting seen to break), or None when nothing in range breaks.
        bracket: (last passing, first breaking) setting; an entry is None where no such setting
            exists in range (nothing breaks / everything breaks).
        evaluations: Number of calls to ``breaks``.
        measurements: (x, metric, broke) for every call, in evaluation order.
        monotone: False when the evaluated points contradict monotone damage.
        note: Human-readable summary, including any monotonicity warning.
    """

    value: float | None
    bracket: tuple[float | None, float | None]
    evaluations: int
    measurements: list[tuple[float, float, bool]]
    monotone: bool
    note: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (non-finite metrics become None)."""
        return {
            "value": self.value,
            "bracket": list(self.bracket),
            "evaluations": self.evaluations,
            "measurements": [
                {"x": x, "metric": jsonable(m), "broke": b} for x, m, b in self.measurements
            ],
            "monotone": self.monotone,
            "note": self.note,
        }


def monotonicity(
    measurements: Sequence[tuple[float, float, bool]],
    *,
    increasing: bool,
    higher_is_worse: bool,
    rtol: float,
) -> tuple[bool, str]:
    """Check evaluated points for evidence against monotone damage.

    Args:
        measurements: (x, metric, broke) triples in any order.
        increasing: Damage grows with x.
        higher_is_worse: The metric grows with damage (perplexity) rather than falls (accuracy).
        rtol: Relative improvement of the metric toward harsher settings that is tolerated as
            noise.

    Returns:
        (monotone, note); note is empty when monotone.
    """
    pts = sorted(measurements, key=lambda t: t[0] if increasing else -t[0])
    problems: list[str] = []

    # Bisection itself never yields a pass harsher than a fail; points from a sweep or a
    # search by other means can.
    fails = [x for x, _, broke in pts if broke]
    if fails:
        first_fail = fails[0]
        harsher_pass = [
            x
            for x, _, broke in pts
            if not broke and (x > first_fail if increasing else x < first_fail)
        ]
        if harsher_pass:
            problems.append(
                f"budget passes at x={harsher_pass[0]:g} although it broke at the gentler "
                f"x={first_fail:g}"
            )

    # Compare with the worst value so far, so that a slow drift of sub-tolerance steps toward
    # a better metric is still caught.
    sign = 1.0 if higher_is_worse else -1.0
    worst_x: float | None = None
    worst = -math.inf
    for x, metric, _ in pts:
        if not math.isfinite(metric):
            continue
        damage = sign * metric
        if worst_x is not None and damage < worst - rtol * abs(worst):
            problems.append(
                f"metric improves from {sign * worst:.4g} at x={worst_x:g} to {metric:.4g} "
                f"at the harsher x={x:g}"
            )
            break
        if damage > worst:
            worst, worst_x = damage, x

    if not problems:
        return True, ""
    return False, "non-monotone damage: " + "; ".join(problems) + " (threshold may be unreliable)"


def bisect_threshold(
    breaks: Callable[[float], tuple[bool, float]],
    *,
    lo: float,
    hi: float,
    tol: float = 0.01,
    integer: bool = False,
    increasing: bool = True,
    higher_is_worse: bool = True,
    rtol: float = 0.02,
) -> Threshold:
    """Find the gentlest setting in [lo, hi] that breaks the budget, assuming monotone damage.

    The harsh end is evaluated first (if it passes there is no threshold in range); then the
    bracket is bisected on the assumption that the gentle end passes, which saves one call: on
    [0, 1] with tol=0.01 that is 1 + 7 = 8 evaluations. The gentle end is evaluated only if
    every probe broke and the bracket collapsed onto it, to confirm that the model really breaks
    everywhere (one extra call in that case only).

    Args:
        breaks: Evaluates the model at x; returns (exceeds_budget, metric_value).
        lo: Lower end of the search range.
        hi: Upper end of the search range.
        tol: Final bracket width for continuous x; ignored when ``integer`` (the result is then
            exact, bracket width 1).
        integer: Search over integers only (bits, layers dropped, ...).
        increasing: True if damage grows with x (sparsity: gentlest is small x); False if it
            grows as x shrinks (bits: gentlest is large x).
        higher_is_worse: The metric grows with damage (perplexity, KL); set False for metrics
            that fall with damage (accuracy). Only used for the monotonicity check.
        rtol: Relative improvement of the metric toward harsher settings tolerated as noise
            before damage is reported as non-monotone.

    Returns:
        The :class:`Threshold`.
    """
    if not lo <= hi:
        raise ValueError(f"need lo <= hi, got lo={lo}, hi={hi}")
    if integer:
        if lo != int(lo) or hi != int(hi):
            raise ValueError("integer search needs integer lo and hi")
        lo, hi, step = int(lo), int(hi), 1
    else:
        if not tol > 0:
            raise ValueError(f"tol must be positive, got {tol}")
        step = tol

    gentle, harsh = (lo, hi) if increasing else (hi, lo)
    measurements: list[tuple[float, float, bool]] = []

    def probe(x: float) -> bool:
        broke, metric = breaks(x)
        measurements.append((x, float(metric), bool(broke)))
        return bool(broke)

    def result(
        value: float | None, bracket: tuple[float | None, float | None], note: str
    ) -> Threshold:
        monotone, warning = monotonicity(
            measurements, increasing=increasing, higher_is_worse=higher_is_worse, rtol=rtol
        )
        return Threshold(
            value=value,
            bracket=bracket,
            evaluations=len(measurements),
            measurements=measurements,
            monotone=monotone,
            note=f"{note}; {warning}" if warning else note,
        )

    if not probe(harsh):
        return result(
            None,
            (harsh, None),
            f"no threshold in range: even the harshest setting x={harsh:g} passes",
        )

    passing, failing = gentle, harsh
    pass_seen = False
    while abs(failing - passing) > step:
        mid = (passing + failing) // 2 if integer else (passing + failing) / 2
        if probe(mid):
            failing = mid
        else:
            passing, pass_seen = mid, True

    if not pass_seen and (gentle == harsh or probe(gentle)):
        return result(
            gentle,
            (None, gentle),
            f"breaks everywhere: even the gentlest setting x={gentle:g} breaks",
        )
    return result(failing, (passing, failing), f"breaks at x={failing:g} (passes at x={passing:g})")


# --------------------------------------------------------------------------------------------
# Phase-transition fit
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PhaseTransition:
    """Result of :func:`fit_phase_transition`.

    The fitted damage curve is ``d(x) = a * x**b`` for ``x <= s0`` and
    ``d(x) = a * s0**b * exp(c * (x - s0))`` above; the metric is ``baseline + d(x)``.

    Args:
        s0: Phase-transition point, or None when no transition is reported.
        s0_stderr: Distance from s0 to the farther end of its 68.3 % profile-likelihood
            interval (so s0 +- s0_stderr contains it).
        a: Power-law prefactor.
        b: Power-law exponent.
        c: Exponential rate above s0 (per unit x).
        r2: Coefficient of determination of the best piecewise fit in log space (also set when
            the transition is refused; None when too few points to fit).
        baseline: Offset subtracted from the metric before the fit.
        n_points: Points used in the fit (after dropping unusable ones).
        evidence: Smallest BIC gain of the piecewise law over a pure power law and a pure
            exponential (log space); None when too few points to fit.
        transition: True when a transition is reported.
        reason: Why a transition is, or is not, reported; mentions dropped points.
    """

    s0: float | None
    s0_stderr: float | None
    a: float | None
    b: float | None
    c: float | None
    r2: float | None
    baseline: float
    n_points: int
    evidence: float | None
    transition: bool
    reason: str

    def predict(self, x: float | Sequence[float] | np.ndarray) -> np.ndarray:
        """Evaluate the fitted metric ``baseline + d(x)`` at x (for plotting).

        Args:
            x: Compression settings.

        Returns:
            Fitted metric values, same shape as x.
        """
        if self.s0 is None or self.a is None or self.b is None or self.c is None:
            raise ValueError(f"no fitted transition to evaluate: {self.reason}")
        xa = np.asarray(x, dtype=float)
        with np.errstate(divide="ignore", invalid="ignore"):
            power = self.a * np.power(xa, self.b)
            expo = self.a * self.s0**self.b * np.exp(self.c * (xa - self.s0))
        return self.baseline + np.where(xa <= self.s0, power, expo)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (non-finite numbers become None)."""
        return {k: jsonable(v) if isinstance(v, float) else v for k, v in asdict(self).items()}


def _lstsq_batch(design: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least squares for a stack of design matrices (G, n, p) against one target (n,).

    Returns:
        (coefficients (G, p), residual sum of squares (G,)).
    """
    # pinv goes through an SVD, so repeated x values (rank-deficient segments) are harmless.
    coef = np.linalg.pinv(design) @ target
    resid = target - np.einsum("gnp,gp->gn", design, coef)
    return coef, np.einsum("gn,gn->g", resid, resid)


def _piecewise(x: np.ndarray, ly: np.ndarray, s0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Profile fit of the piecewise law for each candidate s0.

    With s0 fixed the model is linear in (log a, b, c): below s0 log d = log a + b log x; above
    it log d = log a + b log s0 + c (x - s0), which builds continuity at s0 into the design.
    """
    s = s0[:, None]
    below = x[None, :] <= s
    design = np.empty((len(s0), len(x), 3))
    design[..., 0] = 1.0
    design[..., 1] = np.where(below, np.log(x)[None, :], np.log(s))
    design[..., 2] = np.where(below, 0.0, x[None, :] - s)
    return _lstsq_batch(design, ly)


def _line_rss(u: np.ndarray, ly: np.ndarray) -> float:
    design = np.stack([np.ones_like(u), u], axis=1)[None]
    return float(_lstsq_batch(design, ly)[1][0])


def _region_end(
    x: np.ndarray, ly: np.ndarray, grid: np.ndarray, rss: np.ndarray, bound: float, side: int
) -> float:
    """The lower (``side`` -1) or upper (+1) end of the region where the profile RSS stays
    within ``bound``, located between its outermost grid point inside and the next one out
    (the grid is coarse away from the minimum: its last point inside falls short of the end by
    up to a grid step, a large part of a narrow interval)."""
    inside = np.flatnonzero(rss <= bound)
    k = int(inside[0] if side < 0 else inside[-1])
    if not 0 <= k + side < len(grid):
        return float(grid[k])
    a, b = float(grid[k]), float(grid[k + side])
    for _ in range(2):  # two refinements: 1/4096 of the step
        fine = np.linspace(a, b, 65)
        _, fine_rss = _piecewise(x, ly, fine)
        j = int(np.flatnonzero(fine_rss <= bound)[-1])
        a, b = float(fine[j]), float(fine[min(j + 1, 64)])
    return a


def fit_phase_transition(
    x: Sequence[float] | np.ndarray,
    y: Sequence[float] | np.ndarray,
    *,
    baseline: float = 0.0,
    min_side: int = 3,
    bic_margin: float = 6.0,
    rate_ratio: float = 2.0,
) -> PhaseTransition:
    """Fit power law below s0 and exponential above it; report s0 only if the data demand it.

    Formulation: the damage ``d = y - baseline`` is modelled in log space as
    ``log d = log a + b log x`` for ``x <= s0`` and ``log d(s0) + c (x - s0)`` above, so the
    curve is continuous at s0. A power law vanishes at x=0, so d must be ~0 for the unmodified
    model: pass the raw metric with ``baseline`` set to the dense model's value (ppl with
    baseline=5.12), or an already zero-based damage (relative ppl increase, KL) with the default
    baseline=0. A ratio ppl/ppl_dense needs baseline=1 (it then gives the same s0 as raw ppl
    with the dense baseline, since a constant factor only shifts log a). Points with x <= 0,
    non-finite values or d <= 0 (no measurable damage) are dropped and the reason says so.

    With s0 fixed the rest is linear least squares, so s0 is profiled over a grid between the
    data points (then refined twice): deterministic, no starting values. s0_stderr is the
    distance from s0 to the farther end of the 68.3% profile-likelihood region, the s0 where
    RSS(s0) - RSS_min stays within F(1, n - 4) residual variances, its ends located between
    grid points (to 1/4096 of a step). On synthetic piecewise data
    (benchmarks/bench_fit.py: 8-20 points, 5-25% noise, a sharp and a gentle kink, 300 sweeps
    each) s0 +- s0_stderr covers the true s0 in 63-75% of the fits that report a transition
    (60-75% when the ends were the last grid points inside: a grid step was a large part of a
    narrow interval), but 54% for the gentle kink with 8 points and 25% noise, where only the
    sweeps the noise favoured report one (57%): selected fits, a far from quadratic profile.

    A transition is refused (s0=None) when fewer than ``min_side`` points can lie on each
    side; when a pure power law or a pure exponential (the two limits of the piecewise law)
    fits about as well, i.e. the BIC gain is below ``bic_margin``; when damage does not grow
    below the kink (b <= 0); or when the exponential rate c is below ``rate_ratio`` times the
    power law's local growth rate b / s0 at the kink.

    Args:
        x: Compression settings (sparsity, rank reduction, ...), any order.
        y: Metric at each setting, growing with damage.
        baseline: Value of the metric for the unmodified model; subtracted before the fit.
        min_side: Minimum number of points on each side of s0. With 3 each segment keeps its
            own residual degree of freedom; published sweeps often have only 7-8 points.
        bic_margin: BIC gain over both single-law fits required to report a transition.
        rate_ratio: How much steeper (in log d per unit x) the exponential must be than the
            power law at s0.

    Returns:
        The :class:`PhaseTransition`.
    """
    xa = np.asarray(x, dtype=float).ravel()
    ya = np.asarray(y, dtype=float).ravel()
    if xa.shape != ya.shape:
        raise ValueError(f"x and y differ in length: {xa.size} vs {ya.size}")
    if min_side < 3:
        raise ValueError("min_side must be at least 3 (the power law alone has 2 parameters)")

    d = ya - baseline
    with np.errstate(invalid="ignore"):
        keep = np.isfinite(xa) & np.isfinite(d) & (xa > 0) & (d > 0)
    order = np.argsort(xa[keep], kind="stable")
    xs, ly = xa[keep][order], np.log(d[keep][order])
    n = int(xs.size)
    n_dropped = xa.size - n
    dropped = (
        f" ({n_dropped} point(s) dropped: non-finite, x <= 0 or no damage above baseline)"
        if n_dropped
        else ""
    )

    def refuse(
        reason: str, r2: float | None = None, evidence: float | None = None
    ) -> PhaseTransition:
        return PhaseTransition(
            s0=None, s0_stderr=None, a=None, b=None, c=None, r2=r2, baseline=float(baseline),
            n_points=n, evidence=evidence, transition=False, reason=reason + dropped,
        )  # fmt: skip

    if n < 2 * min_side or xs[min_side - 1] >= xs[n - min_side]:
        return refuse(f"too few points: {n} usable, need {min_side} on each side of s0")

    # Admissible kinks keep min_side points on each side: xs[k-1] <= s0 < xs[n-k].
    lo_s, hi_s = xs[min_side - 1], xs[n - min_side]
    knots = np.unique(xs[(xs >= lo_s) & (xs <= hi_s)])
    grid = np.linspace(knots[:-1], knots[1:], 65).ravel()
    grid = np.unique(grid[grid < hi_s])
    _, rss = _piecewise(xs, ly, grid)
    for _ in range(2):
        i = int(np.argmin(rss))
        fine = np.linspace(grid[max(i - 1, 0)], grid[min(i + 1, grid.size - 1)], 65)
        grid = np.unique(np.concatenate([grid, fine[fine < hi_s]]))
        _, rss = _piecewise(xs, ly, grid)

    i = int(np.argmin(rss))
    s0 = float(grid[i])
    coef, _ = _piecewise(xs, ly, grid[i : i + 1])
    log_a, b, c = (float(v) for v in coef[0])
    rss_min = float(rss[i])

    tss = float(np.sum((ly - ly.mean()) ** 2))
    # A floor keeps log(RSS) finite for noise-free data without favouring either model.
    floor = 1e-12 * max(tss, 1e-300)

    def bic(r: float, p: int) -> float:
        return n * math.log(max(r, floor) / n) + p * math.log(n)

    # s0 counts as a fourth parameter: it was chosen to minimise the RSS.
    bic_pw = bic(rss_min, 4)
    gain_pow = bic(_line_rss(np.log(xs), ly), 2) - bic_pw
    gain_exp = bic(_line_rss(xs, ly), 2) - bic_pw
    evidence = min(gain_pow, gain_exp)
    r2 = 1.0 - rss_min / tss if tss > 0 else 0.0
    at = f"for a kink at x={s0:.3g}"

    if gain_pow < bic_margin:
        return refuse(
            f"a pure power law explains the data about as well (BIC gain {gain_pow:.1f} < "
            f"{bic_margin:g} {at})",
            r2,
            evidence,
        )
    if gain_exp < bic_margin:
        return refuse(
            f"a pure exponential explains the data about as well (BIC gain {gain_exp:.1f} < "
            f"{bic_margin:g} {at})",
            r2,
            evidence,
        )
    if b <= 0:
        # Noise is often fitted by a falling-then-rising curve; hemorrhage needs damage that
        # already grows, gently, below the transition.
        return refuse(f"damage does not grow below the kink (b={b:.3g} <= 0 {at})", r2, evidence)
    local = b / s0
    if c < rate_ratio * local:
        return refuse(
            f"the exponential rate c={c:.3g} is not clearly larger than the power law's local "
            f"growth b/s0={local:.3g} ({at})",
            r2,
            evidence,
        )

    # Profile-likelihood interval at 68.3% with the residual variance estimated (n - 4 dof):
    # RSS(s0) - RSS_min <= F(1, n - 4) * RSS_min / (n - 4), F's 68.3 % quantile being the
    # square of Student's t at 84.1 % (Hudson 1966 for the continuous two-segment model). A
    # chi-square threshold (one residual variance) is too narrow for the 7-12 point sweeps
    # typical of papers.
    limit = student_t_quantile(0.8413447460685429, n - 4) ** 2 * max(rss_min, floor) / (n - 4)
    # The whole region, not only the run around the minimum: a noisy profile has several
    # dips, and the interval must hold every s0 the data do not reject. The half-width
    # reaches its farther end, so that s0 +- s0_stderr contains it.
    lo_end, hi_end = (
        _region_end(xs, ly, grid, rss, rss_min + limit, -1),
        _region_end(xs, ly, grid, rss, rss_min + limit, 1),
    )
    spacing = float(np.max(np.diff(grid[max(i - 1, 0) : i + 2])))
    stderr = max(s0 - lo_end, hi_end - s0, spacing)

    return PhaseTransition(
        s0=s0,
        s0_stderr=stderr,
        a=math.exp(log_a),
        b=b,
        c=c,
        r2=r2,
        baseline=float(baseline),
        n_points=n,
        evidence=evidence,
        transition=True,
        reason=(
            f"power law (b={b:.3g}) up to s0={s0:.3g}, exponential (c={c:.3g}) above; BIC gain "
            f"{gain_pow:.1f} over a pure power law, {gain_exp:.1f} over a pure exponential"
        )
        + dropped,
    )
