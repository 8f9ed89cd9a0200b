"""explore/fit.py: the budget bisection and the phase-transition fit (pure math, CPU, fast)."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from collections.abc import Callable

import numpy as np
import pytest

from pytest_hemorrhage.explore.fit import (
    PhaseTransition,
    Threshold,
    bisect_threshold,
    fit_phase_transition,
    monotonicity,
)

# LLaMA-2-7B WikiText-2 perplexity from Ma et al. 2025 (dense 5.12).
DENSE_PPL = 5.12
SPARSITY = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
MAGNITUDE = [5.17, 5.33, 5.79, 7.31, 14.90, 3676, 52423, math.nan]
WANDA = [5.14, 5.23, 5.36, 5.64, 6.31, 9.23, 57.25, 4262]
SPARSEGPT = [5.14, 5.23, 5.34, 5.56, 6.09, 7.83, 15.95, 50.16]
SLICEGPT = [5.65, 6.49, 8.15, 12.13, 19.54, 32.03, 59.98, 162.65]
ASVD_X = [0.0, 0.05, 0.10, 0.15, 0.17, 0.20, 0.23, 0.25, 0.27]
ASVD = [5.45, 5.56, 5.92, 6.89, 7.70, 9.73, 17.20, 42.83, 259.05]


# --------------------------------------------------------------------------------------------
# bisect_threshold
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("true", [0.004, 0.137, 0.5, 0.731, 0.996])
def test_bisect_step_function_brackets_within_budget(true: float) -> None:
    res = bisect_threshold(lambda x: (x >= true, 5.0 + x), lo=0.0, hi=1.0, tol=0.01)
    lo, hi = res.bracket
    # 1 harsh-end call + 7 halvings of [0, 1]; only a bracket collapsed onto the gentle end
    # (true <= 1/128) costs a 9th call, to confirm that x=0 passes.
    assert res.evaluations == (9 if true <= 1 / 128 else 8)
    assert lo is not None and hi is not None
    assert lo < true <= hi
    assert hi - lo <= 0.01
    assert res.value == hi
    assert res.measurements[0][0] == 1.0  # harsh end first
    assert res.monotone and "non-monotone" not in res.note


@pytest.mark.parametrize("budget", [6.0, 20.0, 1000.0])
def test_bisect_smooth_metric_finds_budget_crossing(budget: float) -> None:
    def ppl(x: float) -> float:
        return DENSE_PPL + 0.01 * math.exp(12 * x)

    true = math.log((budget - DENSE_PPL) / 0.01) / 12
    res = bisect_threshold(lambda x: (ppl(x) > budget, ppl(x)), lo=0.0, hi=1.0, tol=0.01)
    lo, hi = res.bracket
    assert res.evaluations <= 8
    assert lo is not None and hi is not None
    assert lo <= true <= hi and hi - lo <= 0.01
    assert [m for _, m, _ in res.measurements] == [ppl(x) for x, _, _ in res.measurements]
    assert res.monotone


def test_bisect_decreasing_continuous() -> None:
    # Damage grows as x shrinks (e.g. a continuous bit budget): gentlest is the high end.
    res = bisect_threshold(lambda x: (x <= 3.3, 10.0 - x), lo=2.0, hi=8.0, tol=0.01,
                           increasing=False)  # fmt: skip
    lo, hi = res.bracket
    assert res.measurements[0][0] == 2.0
    assert hi is not None and lo is not None
    assert hi <= 3.3 < lo and lo - hi <= 0.01
    assert res.evaluations <= 1 + math.ceil(math.log2(6 / 0.01))


def _bits_breaks(k: int) -> tuple[list[int], Callable[[float], tuple[bool, float]]]:
    calls: list[int] = []

    def breaks(bits: float) -> tuple[bool, float]:
        calls.append(int(bits))
        return bits <= k, DENSE_PPL * (1 + 4.0 ** (3 - bits))

    return calls, breaks


@pytest.mark.parametrize("k", range(1, 8))
def test_bisect_integer_bits_exact(k: int) -> None:
    calls, breaks = _bits_breaks(k)
    res = bisect_threshold(breaks, lo=1, hi=8, integer=True, increasing=False)
    assert res.value == k
    assert res.bracket == (k + 1, k)
    assert all(isinstance(x, int) for x in calls)
    assert res.evaluations == len(calls) <= 5  # 1 + ceil(log2 7), +1 only to confirm bits=8
    assert res.monotone


def test_bisect_integer_breaks_everywhere_and_nowhere() -> None:
    _, breaks = _bits_breaks(8)
    res = bisect_threshold(breaks, lo=1, hi=8, integer=True, increasing=False)
    assert res.value == 8 and res.bracket == (None, 8)
    assert "breaks everywhere" in res.note

    _, breaks = _bits_breaks(0)
    res = bisect_threshold(breaks, lo=1, hi=8, integer=True, increasing=False)
    assert res.value is None and res.bracket == (1, None) and res.evaluations == 1


def test_bisect_no_threshold_in_range() -> None:
    res = bisect_threshold(lambda x: (False, 5.0 + x), lo=0.0, hi=1.0, tol=0.01)
    assert res.value is None
    assert res.bracket == (1.0, None)
    assert res.evaluations == 1
    assert "no threshold in range" in res.note


def test_bisect_breaks_everywhere_confirms_gentle_end() -> None:
    res = bisect_threshold(lambda x: (True, 50.0 + x), lo=0.0, hi=1.0, tol=0.01)
    assert res.value == 0.0
    assert res.bracket == (None, 0.0)
    # 8 calls reach the tolerance; the 9th is the confirmation at the gentle end.
    assert res.evaluations == 9
    assert res.measurements[-1][0] == 0.0
    assert "breaks everywhere" in res.note


def test_bisect_collapse_onto_gentle_end_that_passes() -> None:
    res = bisect_threshold(lambda x: (x > 0.001, 5.0 + x), lo=0.0, hi=1.0, tol=0.01)
    assert res.bracket == (0.0, 1 / 128)
    assert res.evaluations == 9
    assert res.value == 1 / 128


def test_bisect_reports_non_monotone_metric() -> None:
    # The budget flag is a clean step at 0.6, but the metric drops on the harsh side of 0.55.
    def breaks(x: float) -> tuple[bool, float]:
        return x >= 0.6, (5.0 + 10 * x) if x < 0.55 else (8.0 + x)

    res = bisect_threshold(breaks, lo=0.0, hi=1.0, tol=0.01)
    assert not res.monotone
    assert "non-monotone" in res.note
    lo, hi = res.bracket
    assert lo is not None and hi is not None and lo < 0.6 <= hi


def test_bisect_tolerates_small_noise_and_accuracy_direction() -> None:
    # A +-0.5 % wobble is within rtol=2 %; a falling accuracy is monotone damage, not a warning.
    res = bisect_threshold(lambda x: (x >= 0.4, 5.0 * (1 + 0.005 * math.sin(40 * x))),
                           lo=0.0, hi=1.0)  # fmt: skip
    assert res.monotone
    res = bisect_threshold(lambda x: (x >= 0.4, 0.7 - 0.3 * x), lo=0.0, hi=1.0,
                           higher_is_worse=False)  # fmt: skip
    assert res.monotone
    res = bisect_threshold(lambda x: (x >= 0.4, 0.7 - 0.3 * x), lo=0.0, hi=1.0)
    assert not res.monotone


def testmonotonicity_flags_pass_on_harsh_side_of_fail() -> None:
    ok, note = monotonicity(
        [(0.2, 5.0, True), (0.5, 6.0, False)], increasing=True, higher_is_worse=True, rtol=0.02
    )
    assert not ok and "passes at x=0.5" in note
    ok, _ = monotonicity(
        [(0.2, 5.0, False), (0.5, 6.0, True)], increasing=True, higher_is_worse=True, rtol=0.02
    )
    assert ok


def test_threshold_to_dict_is_strict_json() -> None:
    res = bisect_threshold(lambda x: (x >= 0.3, math.nan if x > 0.9 else x), lo=0.0, hi=1.0)
    assert isinstance(res, Threshold)
    d = json.loads(json.dumps(res.to_dict(), allow_nan=False))
    assert d["measurements"][0] == {"x": 1.0, "metric": None, "broke": True}
    assert d["value"] == res.value and d["evaluations"] == res.evaluations
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.value = 0.0  # type: ignore[misc]


def test_bisect_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        bisect_threshold(lambda x: (True, 0.0), lo=1.0, hi=0.0)
    with pytest.raises(ValueError):
        bisect_threshold(lambda x: (True, 0.0), lo=0.5, hi=8, integer=True)


# --------------------------------------------------------------------------------------------
# fit_phase_transition
# --------------------------------------------------------------------------------------------


def _piecewise(x: np.ndarray, s0: float, b: float = 2.0, c: float = 20.0) -> np.ndarray:
    return np.where(x <= s0, x**b, s0**b * np.exp(c * (x - s0)))


def _noisy(y: np.ndarray, seed: int, sigma: float = 0.05) -> np.ndarray:
    return y * np.exp(np.random.default_rng(seed).normal(0.0, sigma, y.size))


@pytest.mark.parametrize("s0", [0.3, 0.45, 0.6])
@pytest.mark.parametrize("n", [15, 25])
@pytest.mark.parametrize("seed", [0, 1])
def test_fit_recovers_synthetic_s0(s0: float, n: int, seed: int) -> None:
    x = np.linspace(0.05, 0.9, n)
    res = fit_phase_transition(x, _noisy(_piecewise(x, s0), seed))
    assert res.transition, res.reason
    assert res.s0 is not None and res.s0_stderr is not None
    assert abs(res.s0 - s0) <= 0.02
    assert 0 < res.s0_stderr < 0.05
    assert res.b is not None and abs(res.b - 2.0) < 0.3
    assert res.c is not None and abs(res.c - 20.0) < 2.0
    assert res.r2 is not None and res.r2 > 0.99


@pytest.mark.parametrize(
    ("x", "s0", "b", "c", "noise"),
    [
        (np.linspace(0.1, 0.9, 12), 0.55, 1.5, 9.0, 0.15),  # the one-variance interval: 0.63
        (np.linspace(0.05, 0.9, 12), 0.40, 2.0, 20.0, 0.05),  # ends on the grid: 0.60
    ],
)
def test_fit_s0_interval_covers_the_true_s0_at_its_stated_rate(x, s0, b, c, noise) -> None:
    """s0 +- s0_stderr is a 68.3% interval: over 300 noisy 12-point sweeps of a known
    piecewise law it must contain the true s0 at that rate, less its binomial noise (0.027).
    Measured: 0.75 and 0.68 (before: 0.63 with one residual variance as the threshold; 0.60
    on the sharp kink with the region's ends taken at the last grid points inside)."""
    truth = 0.2 * _piecewise(x, s0, b=b, c=c)
    rng = np.random.default_rng(0)
    hits = fits = 0
    for _ in range(300):
        res = fit_phase_transition(x, truth * np.exp(rng.normal(0.0, noise, x.size)))
        if res.s0 is not None and res.s0_stderr is not None:
            fits += 1
            hits += abs(res.s0 - s0) <= res.s0_stderr
    assert fits > 250
    assert hits / fits >= 0.683 - 0.035, hits / fits


def test_fit_s0_interval_ends_where_the_profile_crosses_its_threshold() -> None:
    """The farther end of s0 +- s0_stderr is where RSS(s0) - RSS_min reaches F(1, n - 4)
    residual variances, to a small fraction of the grid: inside at the end, outside just
    beyond it."""
    from pytest_hemorrhage.explore.fit import _piecewise as profile
    from pytest_hemorrhage.stats import student_t_quantile

    x = np.linspace(0.05, 0.9, 12)
    ly = np.log(_noisy(_piecewise(x, 0.40, c=20.0), seed=1))
    res = fit_phase_transition(x, np.exp(ly))
    assert res.s0 is not None and res.s0_stderr is not None
    rss_min = profile(x, ly, np.array([res.s0]))[1][0]
    bound = rss_min * (1 + student_t_quantile(0.8413447460685429, 8) ** 2 / 8)
    for side in (-1, 1):
        end = res.s0 + side * res.s0_stderr
        rss = profile(x, ly, np.array([end, end + side * 1e-4]))[1]
        if rss[0] <= bound * (1 + 1e-9):  # the farther end: on the threshold
            assert rss[1] > bound
            break
    else:
        raise AssertionError("neither end of s0 +- s0_stderr lies on the profile's threshold")


def test_fit_baseline_offset_and_predict() -> None:
    # Raw perplexity = dense + damage; the caller passes the dense value as baseline.
    x = np.linspace(0.05, 0.9, 20)
    ppl = DENSE_PPL + _noisy(_piecewise(x, 0.45), seed=3)
    res = fit_phase_transition(x, ppl, baseline=DENSE_PPL)
    assert res.transition and res.s0 is not None
    assert abs(res.s0 - 0.45) <= 0.02
    fitted = res.predict(x)
    assert fitted.shape == x.shape
    assert np.all(np.abs(np.log((fitted - DENSE_PPL) / (ppl - DENSE_PPL))) < 0.2)
    assert res.predict(0.0) == pytest.approx(DENSE_PPL)


def test_fit_stderr_grows_with_noise() -> None:
    x = np.linspace(0.05, 0.9, 20)
    quiet = fit_phase_transition(x, _noisy(_piecewise(x, 0.45), seed=5, sigma=0.02))
    loud = fit_phase_transition(x, _noisy(_piecewise(x, 0.45), seed=5, sigma=0.2))
    assert quiet.s0_stderr is not None and loud.s0_stderr is not None
    assert loud.s0_stderr > quiet.s0_stderr


@pytest.mark.parametrize("seed", range(5))
def test_fit_refuses_pure_power_law(seed: int) -> None:
    x = np.linspace(0.05, 0.9, 20)
    res = fit_phase_transition(x, _noisy(0.5 * x**2.5, seed, sigma=0.1))
    assert not res.transition
    assert res.s0 is None and res.s0_stderr is None and res.a is None
    assert res.reason


@pytest.mark.parametrize("seed", range(5))
def test_fit_refuses_pure_exponential(seed: int) -> None:
    x = np.linspace(0.05, 0.9, 20)
    res = fit_phase_transition(x, _noisy(0.01 * np.exp(8 * x), seed, sigma=0.1))
    assert not res.transition and res.s0 is None
    assert "exponential" in res.reason


@pytest.mark.parametrize("seed", range(5))
def test_fit_refuses_flat_noise(seed: int) -> None:
    x = np.linspace(0.05, 0.9, 20)
    res = fit_phase_transition(x, _noisy(np.full(x.size, 3.0), seed, sigma=0.1))
    assert not res.transition and res.s0 is None


def test_fit_refuses_too_few_points() -> None:
    x = np.array([0.1, 0.2, 0.3, 0.4, 0.5])
    res = fit_phase_transition(x, _piecewise(x, 0.3))
    assert not res.transition and res.s0 is None and res.r2 is None
    assert "too few points" in res.reason
    with pytest.raises(ValueError):
        res.predict([0.1])


def test_fit_drops_unusable_points_and_says_so() -> None:
    x = [0.0, *SPARSITY]
    y = [DENSE_PPL, *MAGNITUDE]
    res = fit_phase_transition(x, y, baseline=DENSE_PPL)
    assert res.n_points == 7  # x=0 (no log) and the nan at 0.8 are dropped
    assert "2 point(s) dropped" in res.reason


def test_fit_refuses_wrong_rate() -> None:
    # A kink whose exponential branch barely outpaces the power law is no phase transition.
    x = np.linspace(0.05, 0.9, 20)
    res = fit_phase_transition(x, _noisy(_piecewise(x, 0.45, c=5.0), seed=0, sigma=0.02))
    assert not res.transition
    assert "not clearly larger" in res.reason


def test_fit_is_deterministic_and_json_ready() -> None:
    x = np.linspace(0.05, 0.9, 20)
    y = _noisy(_piecewise(x, 0.3), seed=11)
    first, second = fit_phase_transition(x, y), fit_phase_transition(x[::-1], y[::-1])
    assert first == second
    assert isinstance(first, PhaseTransition)
    d = json.loads(json.dumps(first.to_dict(), allow_nan=False))
    assert d["transition"] is True and d["s0"] == first.s0


# The ranges below are what the fit gives on the published curves, widened to the neighbouring
# sweep points; they are checks of plausibility, not of the paper's own numbers.
@pytest.mark.parametrize(
    ("x", "y", "lo", "hi"),
    [
        (SPARSITY, MAGNITUDE, 0.40, 0.55),
        (SPARSITY, WANDA, 0.50, 0.65),
        (SPARSITY, SPARSEGPT, 0.40, 0.60),
        (ASVD_X, ASVD, 0.15, 0.25),
    ],
    ids=["magnitude", "wanda", "sparsegpt", "asvd"],
)
def test_fit_paper_curves(x: list[float], y: list[float], lo: float, hi: float) -> None:
    res = fit_phase_transition(x, y, baseline=DENSE_PPL)
    assert res.transition, res.reason
    assert res.s0 is not None and lo <= res.s0 <= hi
    assert res.c is not None and res.b is not None and res.c > 2 * res.b / res.s0


def test_fit_slicegpt_is_exponential_throughout() -> None:
    # SliceGPT's ppl increase grows by a near-constant factor per 0.1 sparsity from the start
    # (log-slope 6-10 per unit), so a pure exponential explains it: no phase transition.
    res = fit_phase_transition(SPARSITY, SLICEGPT, baseline=DENSE_PPL)
    assert not res.transition
    assert "pure exponential" in res.reason


def test_import_does_not_import_torch() -> None:
    code = "import sys, pytest_hemorrhage.explore.fit; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
