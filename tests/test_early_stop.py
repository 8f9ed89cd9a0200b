"""--hemorrhage-early-stop: the sequential test, the harness path, and what the user sees."""

from __future__ import annotations

import json
import math

import pytest

from pytest_hemorrhage.budget import Budget
from pytest_hemorrhage.early_stop import NO_BUDGET, decide, look_schedule, t_quantile

RTN4 = [("quant.rtn", {"bits": 4})]


@pytest.fixture(scope="module")
def pair(tiny):
    """Two harnesses over the same 16 windows: early stopping off, and on."""
    from pytest_hemorrhage.harness import Harness
    from pytest_hemorrhage.settings import Settings

    full = Harness(tiny, Settings.defaults(model="hemorrhage-tiny", tokens=2048))
    early = Harness(tiny, Settings.defaults(model="hemorrhage-tiny", tokens=2048, early_stop=True))
    early.__dict__["reference"] = full.reference  # the same baseline, computed once
    return full, early, full.measure(RTN4)


def test_look_schedule():
    assert look_schedule(64) == [8, 12, 16, 24, 32, 48]
    assert look_schedule(16) == [8, 12]
    assert look_schedule(8) == []  # too few windows for an interim look


def test_t_quantile_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (7, 11, 15, 31, 63):
        for p in (0.95, 0.99, 0.999, 0.9999):
            assert t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=0.01)


def test_decide_per_metric():
    budget = Budget({"kl_mean": 0.1, "ppl_increase": 0.05, "kl_max": 1.0, "top1_disagreement": 0.2})
    metrics = {
        "kl_mean": 0.01,
        "nll_increase": math.log1p(0.2),  # ppl_increase 0.2: decided on the log scale
        "ppl_increase": 0.2,
        "kl_max": 0.5,
        "top1_disagreement": 0.19,
    }
    stderr = {
        "kl_mean": 0.001,
        "nll_increase": 0.01,
        "ppl_increase": 0.01,
        "kl_max": None,
        "top1_disagreement": 0.01,
    }
    got = decide(budget, metrics, stderr, windows=16, alpha=0.01)
    assert got == {
        "kl_mean": "under",
        "ppl_increase": "over",
        "kl_max": "open",
        "top1_disagreement": "open",
    }
    assert decide(budget, {**metrics, "kl_max": 2.0}, stderr, 16, 0.01)["kl_max"] == "over"
    assert decide(budget, metrics, {**stderr, "kl_mean": None}, 16, 0.01)["kl_mean"] == "open"


def test_clear_verdicts_stop_at_the_first_look(pair):
    full, early, base = pair
    under = early.measure(RTN4, budget=Budget({"kl_mean": 4 * base.metrics["kl_mean"]}))
    over = early.measure(RTN4, budget=Budget({"kl_mean": base.metrics["kl_mean"] / 4}, 0.95))
    for result, verdict in ((under, "under"), (over, "over")):
        stop = result.details["early_stop"]
        assert stop["stopped"] and stop["windows"] == 8 and stop["windows_max"] == 16
        assert result.tokens == 8 * 127 == stop["tokens"] < base.tokens == stop["tokens_max"]
        assert stop["verdicts"] == {"kl_mean": verdict}
    assert not Budget({"kl_mean": 4 * base.metrics["kl_mean"]}).violations(under)
    assert Budget({"kl_mean": base.metrics["kl_mean"] / 4}, 0.95).violations(over)


def test_too_close_to_call_is_the_full_evaluation(pair):
    full, early, base = pair
    budget = Budget({"kl_mean": base.metrics["kl_mean"], "top1_disagreement": 1.0})
    result = early.measure(RTN4, budget=budget)
    stop = result.details["early_stop"]
    assert not stop["stopped"] and stop["reason"].startswith("too close to call (kl_mean)")
    assert result.tokens == base.tokens
    for metric, value in base.metrics.items():
        assert result.metrics[metric] == pytest.approx(value, rel=1e-6, abs=1e-9), metric
        if base.stderr[metric] is not None:
            assert result.stderr[metric] == pytest.approx(base.stderr[metric], rel=1e-6)


def test_no_budget_evaluates_fully_and_says_why(pair):
    full, early, base = pair
    for budget in (None, Budget({"gen_mismatch": 0.5})):
        result = early.measure(RTN4, budget=budget)
        stop = result.details["early_stop"]
        assert stop == {**stop, "stopped": False, "budgeted": False, "reason": NO_BUDGET}
        assert result.tokens == base.tokens
    assert "early_stop" not in full.measure(RTN4).details  # off by default: nothing recorded


def test_composition_stops_on_its_total_only(pair):
    full, early, base = pair
    stages = [("prune.magnitude", {"sparsity": 0.1}), *RTN4]
    result = early.measure(stages, budget=Budget({"kl_mean": 10.0}))
    assert result.details["early_stop"]["stopped"] and result.tokens == 8 * 127
    assert result.stages[0].tokens == base.tokens and "early_stop" not in result.stages[0].details


def test_plugin_summary_and_json(pytester, tmp_path):
    pytester.makeini(
        "[pytest]\nhemorrhage_model = hemorrhage-tiny\nhemorrhage_tokens = 2048\n"
        "hemorrhage_early_stop = true\n"
    )
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.hemorrhage(kl_mean=5.0)
        def test_clear(hemorrhage):
            hemorrhage.check(hemorrhage.measure("quant.rtn", bits=8))

        def test_unbudgeted(hemorrhage):
            hemorrhage.measure("quant.rtn", bits=8)
        """
    )
    report = tmp_path / "r.json"
    result = pytester.runpytest_inprocess(
        f"--hemorrhage-report={report}", "-p", "no:randomly", "-p", "no:cacheprovider"
    )
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        [
            "early stop: 1 of 2 measures settled early on 50% of their tokens; 1 had no budgeted "
            "token metric to decide on and used every token (early stopping needs a budget)"
        ]
    )
    records = {
        r["nodeid"].rpartition("::")[2]: r for r in json.loads(report.read_text())["results"]
    }
    assert records["test_clear"]["tokens"] == 8 * 127
    assert records["test_clear"]["details"]["early_stop"]["stopped"] is True
    assert records["test_unbudgeted"]["tokens"] == 16 * 127
    assert records["test_unbudgeted"]["details"]["early_stop"]["reason"] == NO_BUDGET
