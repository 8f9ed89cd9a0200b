"""The statistics module: calibrated standard errors, quantiles, and the one bound a budget
compares, against their definitions."""

from __future__ import annotations

import math
from statistics import NormalDist

import pytest
import torch

from pytest_hemorrhage.stats import (
    cluster_mean,
    lower_bound,
    mean_se,
    normal_quantile,
    quantile_se,
    student_t_quantile,
    studentized_quantile,
    upper_bound,
)


def test_standard_errors_count_windows_not_tokens():
    """Windows whose tokens all share one value: the window-level SE is that of 20 draws,
    where the token-level one would claim 20 x 50 independent draws."""
    g = torch.Generator().manual_seed(2)
    per_window = torch.randn(20, generator=g, dtype=torch.float64)
    x = per_window.repeat_interleave(50)
    window = torch.arange(20).repeat_interleave(50)
    mean, se, t95 = cluster_mean(x, window)
    assert mean == pytest.approx(per_window.mean().item())
    assert se == pytest.approx(per_window.double().std().item() / math.sqrt(20), rel=1e-9)
    totals = 50 * (per_window - per_window.mean())
    assert t95 == pytest.approx(studentized_quantile(totals, 20))
    assert mean_se(x, window) == (mean, pytest.approx(se * t95 / 1.6448536269514722))
    assert cluster_mean(x, None)[1] == pytest.approx(x.double().std().item() / math.sqrt(1000))
    assert mean_se(x, torch.zeros(1000))[1] is None  # one window: no spread to measure


def test_student_t_quantile_at_every_level_the_package_asks():
    """The bounds' levels (0.95 up to early stopping's 0.9999) and the fit's 84.1% (its
    68.3% profile interval), against the exact quantiles."""
    exact = {(3, 0.95): 2.353363, (10, 0.95): 1.812461, (30, 0.95): 1.697261,
             (63, 0.95): 1.669402, (10, 0.99): 2.763769, (7, 0.99833): 4.353637,
             (4, 0.9999): 13.033672, (2.5, 0.95): 2.558219, (1, 0.95): 6.313752,
             (1, 0.8413447): 1.837337, (2, 0.8413447): 1.321277, (3, 0.8413447): 1.196881,
             (8, 0.8413447): 1.066528}  # fmt: skip
    for (dof, level), value in exact.items():
        assert student_t_quantile(level, dof) == pytest.approx(value, rel=3e-4), (dof, level)
    assert normal_quantile(0.95) == 1.6448536269514722  # the last bit: what SEs divide by
    assert normal_quantile(0.99) == NormalDist().inv_cdf(0.99)


def test_calibrated_quantile_is_students_t_plus_the_second_order_terms():
    """Symmetric two-point totals (kurtosis 1, no skew) give Student's t with G - 1 degrees of
    freedom; heavy tails lower the degrees of freedom and add the plug-in term; skew either way
    adds Hall's term and its second-order companion, all with bias-adjusted moments; any level."""
    z, g = 1.6448536269514722, 64
    a = (2 * z * z + 1) / 6
    flat = torch.tensor([-1.0, 1.0]).repeat(32).double()
    assert studentized_quantile(flat, g) == pytest.approx(student_t_quantile(0.95, 63))
    assert studentized_quantile(flat, g, 0.99) == pytest.approx(student_t_quantile(0.99, 63))
    heavy = torch.tensor([-3.0] + [0.0] * 30 + [3.0]).repeat(2).double()  # kurtosis 16
    excess = (65 * 13 + 6) * 63 / (62 * 61)  # Joanes & Gill's G2
    plug_in = z * a * excess / g
    dof = 2 * g / (excess + 2)
    assert studentized_quantile(heavy, g) == pytest.approx(student_t_quantile(0.95, dof) + plug_in)
    right = torch.tensor([-1.0] * 48 + [3.0] * 16).double()  # skewness 1.1547, kurtosis 2.33
    skew = 1.1547005 * math.sqrt(64 * 63) / 62  # G1
    hall = skew * a / 8 + z * 5 / 72 * skew**2 * (4 * z * z - 1) / g
    expected = student_t_quantile(0.95, 63) + hall
    assert studentized_quantile(right, g) == pytest.approx(expected, rel=1e-6)
    # by magnitude: both one-sided bounds widen
    assert studentized_quantile(-right, g) == studentized_quantile(right, g)


def test_standard_errors_are_calibrated_at_the_level_asked():
    """``value + z * se`` is the one-sided bound at ``level``: the same raw SE times the
    calibrated quantile of that level."""
    g = torch.Generator().manual_seed(4)
    x = torch.rand(30, 20, generator=g, dtype=torch.float64).pow(3).flatten()
    window = torch.arange(30).repeat_interleave(20)
    for level in (0.95, 0.99, 0.9983):
        mean, se, t = cluster_mean(x, window, level)
        z = NormalDist().inv_cdf(level)
        assert mean_se(x, window, level) == (mean, pytest.approx(se * t / z))
    assert cluster_mean(x, window, 0.99)[2] > cluster_mean(x, window)[2]


def test_quantile_bound_is_woodruffs_cluster_interval():
    """kl_p99's SE puts value + 1.645 SE at the sample quantile of q + 1.645 s_F, where s_F is
    the window-level SE of the share of values at or below the quantile (calibrated: see
    mean_se)."""
    g = torch.Generator().manual_seed(3)
    # windows of their own scale: correlated tokens (a scale near 0 would leave the upper
    # bound past the largest value)
    x = torch.rand(40, 100, generator=g) ** 3 * (0.5 + torch.rand(40, 1, generator=g))
    window = torch.arange(40).repeat_interleave(100)
    value, se = quantile_se(x.flatten(), 0.99, window)
    _, s_f = mean_se((x.flatten().double() <= value).double(), window)
    z = 1.6448536269514722
    assert value + z * se == pytest.approx(x.flatten().double().quantile(0.99 + z * s_f).item())
    assert se > quantile_se(x.flatten(), 0.99)[1]  # correlated windows: wider than per token
    few = torch.arange(2).repeat_interleave(10)
    assert quantile_se(x[:2, :10].flatten(), 0.99, few)[1] == math.inf  # bound past the max


def test_the_bound_a_budget_compares_is_one_rule_for_the_check_and_every_summary():
    """``Budget.upper`` (the check) and ``describe.compared_value`` (terminal, CI Markdown,
    HTML) give ``upper_bound``'s value for the same measurement, before and after the JSON
    round trip."""
    from pytest_hemorrhage.budget import Budget
    from pytest_hemorrhage.metrics import Result, jsonable
    from pytest_hemorrhage.report.describe import compared_value

    z99 = NormalDist().inv_cdf(0.99)
    assert upper_bound(0.1, 0.01, None) == 0.1  # no confidence: the point estimate
    assert upper_bound(0.1, 0.01, 0.99) == pytest.approx(0.1 + z99 * 0.01)
    assert upper_bound(0.1, None, 0.99) == math.inf  # nothing to bound it with
    assert math.isnan(upper_bound(math.nan, 0.01, 0.99))
    assert lower_bound(0.1, 0.01, 0.99) == pytest.approx(0.1 - z99 * 0.01)
    assert lower_bound(0.1, None, 0.99) == -math.inf
    metrics = {"kl_mean": 0.1, "kl_p99": 0.5, "top1_disagreement": math.nan}
    stderr = {"kl_mean": 0.01, "kl_p99": None, "top1_disagreement": 0.02}
    result = Result("noise.gaussian", {}, metrics, stderr, 8.0, 9.0, 100)
    for confidence in (None, 0.95, 0.99):
        budget = Budget(dict.fromkeys(metrics, 1.0), confidence)
        record = jsonable({**result.to_dict(), "budget": budget.to_dict()})
        for metric in metrics:
            check = budget.upper(result, metric)
            assert _same(check, upper_bound(metrics[metric], stderr[metric], confidence))
            shown = compared_value(record, metric)  # JSON: a NaN value is None
            assert _same(check, math.nan if shown is None else shown), (metric, confidence)


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))
