"""Budgets: validation, ini defaults, and the one-line-per-violation message."""

from __future__ import annotations

import pytest

from pytest_hemorrhage.budget import Budget, parse_ini
from pytest_hemorrhage.errors import HemorrhageError
from pytest_hemorrhage.metrics import Result


def _result(**metrics: float) -> Result:
    return Result(
        "quant.rtn",
        {"bits": 4},
        metrics,
        {k: 0.001 for k in metrics},
        baseline_ppl=8.41,
        modified_ppl=9.01,
        tokens=100,
    )


def test_violation_line_names_metric_value_budget_and_perplexities():
    budget = Budget.parse({"kl_mean": 0.02, "ppl_increase": 0.1}, where="t")
    lines = budget.violations(_result(kl_mean=0.0412, ppl_increase=0.05))
    assert lines == ["kl_mean: 0.0412 > 0.0200 (baseline ppl 8.41, modified ppl 9.01)"]


def test_every_violated_metric_gets_its_own_line():
    budget = Budget.parse({"kl_mean": 0.02, "ppl_increase": 0.01}, where="t")
    assert len(budget.violations(_result(kl_mean=0.5, ppl_increase=0.5))) == 2


def test_nan_metric_and_nonfinite_outputs_fail():
    result = _result(kl_mean=float("nan"))
    result.nonfinite = 3
    lines = Budget.parse({"kl_mean": 1.0}, where="t").violations(result)
    assert lines[0].startswith("non-finite outputs: 3 of 100 tokens")
    assert lines[1].startswith("kl_mean: nan > 1.0000")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"kl_meen": 0.1},
            "can't have 'kl_meen' in the hemorrhage budget; valid keys: ppl_increase",
        ),
        ({"kl_mean": -1}, "kl_mean=-1 must be a non-negative number"),
        ({"kl_mean": "0.1"}, "kl_mean='0.1' must be a non-negative number"),
        ({"confidence": 1.5}, "confidence=1.5 must be a number in [0.5, 1)"),
    ],
)
def test_bad_budgets_name_the_test_the_key_and_the_fix(kwargs, message):
    with pytest.raises(HemorrhageError) as info:
        Budget.parse(kwargs, where="test_x.py::test_y")
    assert str(info.value).startswith("test_x.py::test_y: ")
    assert message in str(info.value)


def test_ini_budget_parses_and_marker_overrides_per_key():
    default = parse_ini("ppl_increase=0.05 kl_mean=0.02")
    merged = default.merged(Budget.parse({"kl_mean": 0.5}, where="t"))
    assert merged.limits == {"ppl_increase": 0.05, "kl_mean": 0.5}
    with pytest.raises(HemorrhageError, match="'ppl_increase' is not metric=number"):
        parse_ini("ppl_increase")


def test_confidence_fails_on_the_upper_bound_and_shows_it():
    result = _result(kl_mean=0.019)
    result.stderr["kl_mean"] = 0.002
    assert Budget.parse({"kl_mean": 0.02}, where="t").violations(result) == []
    lines = Budget.parse({"kl_mean": 0.02, "confidence": 0.95}, where="t").violations(result)
    assert lines == [
        "kl_mean: 0.0190 (upper 95% bound 0.0223) > 0.0200 (baseline ppl 8.41, modified ppl 9.01)"
    ]


@pytest.mark.parametrize(
    ("marker", "ini"),
    [({"kl_max": 1.0, "confidence": 0.95}, ""), ({"confidence": 0.9}, "kl_max=1.0 kl_mean=0.1")],
)
def test_confidence_on_kl_max_is_refused_naming_it_and_the_way_out(marker, ini):
    """No bound on a maximum holds its level: refused when the budget is read, whether the
    confidence and kl_max come from one marker or from the ini budget and a marker."""
    with pytest.raises(HemorrhageError) as info:
        parse_ini(ini).merged(Budget.parse(marker, where="test_x.py::test_y"))
    message = str(info.value)
    assert "can't bound kl_max" in message
    assert "Budget kl_p99" in message and "without confidence" in message
    # without confidence kl_max is a plain maximum, and kl_p99 takes a confidence
    Budget.parse({"kl_max": 1.0}, where="t")
    Budget.parse({"kl_p99": 1.0, "confidence": 0.95}, where="t")


def test_confidence_fails_a_metric_without_a_standard_error_and_says_why():
    """A measurement whose metric has no standard error (one prompt, one window) is not
    silently judged on its point estimate when the budget asks for a bound."""
    result = _result(gen_mismatch=0.0, kl_mean=0.0)
    result.stderr["gen_mismatch"] = None
    assert Budget.parse({"gen_mismatch": 0.1}, where="t").violations(result) == []
    lines = Budget.parse(
        {"gen_mismatch": 0.1, "kl_mean": 0.1, "confidence": 0.95}, where="t"
    ).violations(result)
    assert len(lines) == 1
    assert lines[0].startswith("gen_mismatch: 0.0000 has no standard error, so its 95% upper")


@pytest.mark.parametrize("confidence", [None, 0.95])
def test_a_value_exactly_at_its_budget_passes_and_one_step_above_fails(confidence):
    """Budgets are maxima: the compared value (point estimate, or upper bound) equal to the
    limit passes; the next float above it fails."""
    import math

    result = _result(kl_mean=0.25)
    bound = Budget({}, confidence).upper(result, "kl_mean")
    kwargs = {"confidence": confidence} if confidence else {}
    assert Budget.parse({"kl_mean": bound, **kwargs}, where="t").violations(result) == []
    below = math.nextafter(bound, 0)
    (line,) = Budget.parse({"kl_mean": below, **kwargs}, where="t").violations(result)
    assert line.startswith("kl_mean: 0.2500")


def _zero_budgets():
    from pytest_hemorrhage.metrics import MARKER_METRICS, METRICS, NO_STDERR

    # raw text: the bundled model never predicts its one special token (tests/test_chat.py
    # budgets special_top1_flip on chat data)
    measured = [metric for metric in METRICS if metric not in MARKER_METRICS]
    zero = {metric: 0.0 for metric in measured}
    bounded = {metric: 0.0 for metric in measured if metric not in NO_STDERR}
    return [zero, {**bounded, "confidence": 0.95}]


@pytest.mark.parametrize("kwargs", _zero_budgets(), ids=["point", "confidence"])
def test_a_zero_budget_passes_the_unmodified_baseline_and_a_candidate_identical_to_it(
    harness, tiny, kwargs
):
    """An unmodified model measures exactly 0 (with standard error 0), so a budget of 0 on
    every metric passes it."""
    from pytest_hemorrhage.modifications import make

    budget = Budget.parse(kwargs, where="t")
    unmodified = harness.measure(make("noise.gaussian", {"sigma": 0.0}), budget=budget)
    identical = harness.measure_model(tiny, {"label": "baseline"}, budget=budget)
    for result in (unmodified, identical):
        assert set(result.metrics.values()) == {0.0}, result.metrics
        assert budget.violations(result) == []


ZERO_BUDGET = """
import pytest

@pytest.mark.hemorrhage({budget})
def test_unmodified(hemorrhage):
    hemorrhage.check(hemorrhage.measure("noise.gaussian", sigma=0.0))

@pytest.mark.hemorrhage({budget})
def test_identical_candidate(hemorrhage):
    hemorrhage.check(hemorrhage.measure_model("hemorrhage-tiny"))
"""


def test_a_zero_budget_passes_an_unmodified_run_through_pytest(pytester):
    from pytest_hemorrhage.metrics import MARKER_METRICS, METRICS

    budget = ", ".join(f"{metric}=0" for metric in METRICS if metric not in MARKER_METRICS)
    pytester.makepyfile(test_zero=ZERO_BUDGET.format(budget=budget))
    result = pytester.runpytest(
        "--hemorrhage-model=hemorrhage-tiny",
        "--hemorrhage-tokens=512",
        "-p",
        "no:randomly",
        "-p",
        "no:cacheprovider",
    )
    result.assert_outcomes(passed=2)
