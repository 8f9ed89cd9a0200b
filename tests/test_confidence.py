"""``confidence=0.95``: a check fails only when the one-sided upper bound exceeds the budget."""

from __future__ import annotations

import dataclasses
from statistics import NormalDist

import pytest

from pytest_hemorrhage.extras.tasks import DEFAULT_TASK
from pytest_hemorrhage.harness import Harness
from pytest_hemorrhage.loading import load_model

TASK_METRICS = frozenset({"accuracy_drop", "flip_rate"})
MODIFICATION = [("quant.rtn", {"bits": 3})]


@pytest.fixture(scope="module")
def task_harness(harness, tmp_path_factory):
    """Like the shared harness, scored on the first 80 items of the cloze task (quicker, and
    still some flips at 3 bits); its own copy of the model, since a harness tracks its model's
    tensors to prove every restore."""
    path = tmp_path_factory.mktemp("tasks") / "cloze80.jsonl"
    path.write_text("".join(DEFAULT_TASK.read_text().splitlines(keepends=True)[:80]))
    loaded = load_model("hemorrhage-tiny", device="cpu")
    return Harness(loaded, dataclasses.replace(harness.settings, tasks=(path,)))


def test_every_metric_has_a_paired_standard_error(task_harness):
    r = task_harness.measure(MODIFICATION, TASK_METRICS)
    missing = sorted(m for m in r.metrics if r.stderr.get(m) is None)
    assert missing == ["kl_max"]  # a maximum has none (a budget refuses confidence on it)
    assert all(r.stderr[m] > 0 for m in r.metrics if m not in missing)
    # paired: a model identical to the baseline has no spread to report, whatever the data
    same = task_harness.measure([("prune.magnitude", {"sparsity": 0.0})], TASK_METRICS)
    assert {m: same.stderr[m] for m in same.metrics if m not in missing} == {
        m: 0.0 for m in same.metrics if m not in missing
    }


def test_token_metrics_count_windows_as_the_independent_draws(harness):
    """The tokens of a window are correlated: measure()'s standard error of kl_mean is the
    window-level one, well above the one that treats tokens as independent (~1.7x at 3 bits)."""
    from pytest_hemorrhage.metrics import TokenStats, mean_se, token_stats

    r = harness.measure(MODIFICATION)
    reference, parts, row = harness.reference, [], 0
    with harness.modified(MODIFICATION) as patch:
        for logits, targets, *_ in harness.chunks(patch.logits_processors):
            parts.append(token_stats(logits, reference.rows(row, row + len(targets))))
            row += len(targets)
    stats = TokenStats.cat(parts)
    assert stats.window.unique().tolist() == list(range(len(harness.windows.eval)))
    assert r.stderr["kl_mean"] == pytest.approx(mean_se(stats.kl, stats.window)[1], rel=1e-6)
    ratio = r.stderr["kl_mean"] / mean_se(stats.kl)[1]
    assert 1.3 < ratio < 3, ratio


def test_confidence_fails_only_on_the_upper_bound(task_harness, pytester):
    """Budgets between the point estimate and its 95% upper bound: pass without confidence,
    fail with it, and the failure line shows the bound."""
    r = task_harness.measure(MODIFICATION, TASK_METRICS)
    z = NormalDist().inv_cdf(0.95)
    limits = {m: r.metrics[m] + 0.5 * z * r.stderr[m] for m in ("kl_mean", "flip_rate")}
    assert all(r.stderr[m] > 0 for m in limits)
    budget = ", ".join(f"{m}={v!r}" for m, v in limits.items())
    pytester.makepyfile(
        f"""
        import pytest

        @pytest.mark.hemorrhage({budget})
        def test_point_estimate(hemorrhage):
            hemorrhage.check(hemorrhage.measure("quant.rtn", bits=3))

        @pytest.mark.hemorrhage({budget}, confidence=0.95)
        def test_upper_bound(hemorrhage):
            hemorrhage.check(hemorrhage.measure("quant.rtn", bits=3))
        """
    )
    settings = task_harness.settings
    result = pytester.runpytest(
        "--hemorrhage-model=hemorrhage-tiny",
        f"--hemorrhage-tokens={settings.tokens}",
        f"--hemorrhage-tasks={settings.tasks[0]}",
        "-p",
        "no:cacheprovider",
    )
    result.assert_outcomes(passed=1, failed=1)
    for metric in limits:
        value, bound = r.metrics[metric], r.metrics[metric] + z * r.stderr[metric]
        result.stdout.fnmatch_lines(
            [f"*{metric}: {value:.4f} (upper 95% bound {bound:.4f}) > {limits[metric]:.4f} (*"]
        )
    result.stdout.fnmatch_lines(["*test_upper_bound*", "*hemorrhage begins at block *"])


def test_a_budget_bounds_at_its_own_confidence(task_harness):
    """A budget with confidence=0.99 is checked with standard errors calibrated at 0.99, token
    metrics and extras alike: the calibration's skewness and kurtosis terms grow faster than
    the normal quantile, so the 95% ones scaled to 0.99 would run short."""
    from pytest_hemorrhage.budget import Budget

    r95 = task_harness.measure(MODIFICATION, TASK_METRICS)
    r99 = task_harness.measure(MODIFICATION, TASK_METRICS, budget=Budget({"kl_mean": 1.0}, 0.99))
    assert (r95.level, r99.level) == (0.95, 0.99)
    assert r99.to_dict()["stderr_level"] == 0.99
    assert r99.metrics == r95.metrics
    for metric in ("kl_mean", "top1_disagreement", "kl_p99", "flip_rate"):
        assert r99.stderr[metric] > 1.005 * r95.stderr[metric], metric
